//! Parent proxies: the upstream proxies that allowed traffic may leave through, their groups
//! (failover in order), and the [`Route`] a rule or the policy's default names. Validated here;
//! the proxy dials them.

use std::path::PathBuf;
use std::time::Duration;

use crate::host::Authority;

/// The route that means "dial the target directly"; no parent or group may take the name.
pub const DIRECT: &str = "direct";

/// The `user:password` line a parent's credentials hold (the proxy's file, the operator's Secret):
/// exactly one line, with a `:`; `None` for anything else.
pub fn credentials_line(text: &str) -> Option<&str> {
    let line = text.trim_end_matches(['\r', '\n']);
    (!line.is_empty() && !line.contains(['\r', '\n']) && line.contains(':')).then_some(line)
}

/// How allowed traffic leaves the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Route {
    /// Dialled by the proxy itself (the default).
    #[default]
    Direct,
    /// Through the parent at this index of [`Parents::proxies`].
    Parent(usize),
    /// Through the first healthy member of the group at this index of [`Parents::groups`].
    Group(usize),
}

/// One upstream proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    /// `[a-z0-9-]{1,63}`, unique among parents and groups; the `parent` metric label.
    pub name: String,
    /// Where it listens; a name is resolved through the proxy's resolver, and its addresses are
    /// trusted as configured (a parent often sits in private address space).
    pub address: Authority,
    /// TLS to the parent; plain TCP when `None`.
    pub tls: Option<ParentTls>,
    /// A file holding `user:password` for `Proxy-Authorization: Basic` (re-read by every reload).
    pub credentials_file: Option<PathBuf>,
    /// Connecting (and the TLS handshake) to the parent must finish within this.
    pub connect_timeout: Duration,
    /// What the CONNECT (or absolute-form request) to the parent names.
    pub send_target: SendTarget,
}

/// TLS to a parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentTls {
    /// PEM CA certificates the parent's certificate must chain to (the only trust anchors).
    pub ca_file: PathBuf,
    /// The name its certificate must carry.
    pub server_name: String,
}

/// What the proxy names to a parent after its own decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SendTarget {
    /// The address the proxy resolved and checked (`CONNECT 203.0.113.7:443`): the parent cannot
    /// reach anything the proxy did not approve, but sees no name.
    #[default]
    Address,
    /// The name as the client sent it (`CONNECT api.example.com:443`): the parent's own
    /// name-based policy and logs keep working, and it resolves the name again itself.
    Name,
}

impl SendTarget {
    pub fn as_str(self) -> &'static str {
        match self {
            SendTarget::Address => "address",
            SendTarget::Name => "name",
        }
    }
}

/// Parents tried in order: one that refuses the connection, times out or fails the TLS
/// handshake is skipped for `retry_after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentGroup {
    pub name: String,
    /// Indexes into [`Parents::proxies`], in the order they are tried.
    pub members: Vec<usize>,
    pub retry_after: Duration,
}

/// Every parent and group of a configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parents {
    pub proxies: Vec<Parent>,
    pub groups: Vec<ParentGroup>,
}

impl Parents {
    /// The route `name` means: `direct`, a parent or a group.
    pub fn route(&self, name: &str) -> Option<Route> {
        if name == DIRECT {
            return Some(Route::Direct);
        }
        if let Some(i) = self.proxies.iter().position(|p| p.name == name) {
            return Some(Route::Parent(i));
        }
        self.groups.iter().position(|g| g.name == name).map(Route::Group)
    }

    /// The route's name as written.
    pub fn name(&self, route: Route) -> &str {
        match route {
            Route::Direct => DIRECT,
            Route::Parent(i) => self.proxies.get(i).map_or(DIRECT, |p| p.name.as_str()),
            Route::Group(i) => self.groups.get(i).map_or(DIRECT, |g| g.name.as_str()),
        }
    }

    /// The parents `route` tries, in order (none for `direct`; a lone parent is a group of one).
    pub fn members(&self, route: Route) -> Vec<usize> {
        match route {
            Route::Direct => Vec::new(),
            Route::Parent(i) => vec![i],
            Route::Group(i) => self.groups.get(i).map(|g| g.members.clone()).unwrap_or_default(),
        }
    }

    /// How long a failed member of `route` is skipped (a lone parent: never skipped).
    pub fn retry_after(&self, route: Route) -> Duration {
        match route {
            Route::Group(i) => self.groups.get(i).map_or(Duration::ZERO, |g| g.retry_after),
            _ => Duration::ZERO,
        }
    }

    /// How `explain` shows a route: `direct`, `parent corp-a (CONNECT by address)`, or
    /// `group corp: corp-a, then corp-b`.
    pub fn describe(&self, route: Route) -> String {
        match route {
            Route::Direct => DIRECT.to_owned(),
            Route::Parent(i) => match self.proxies.get(i) {
                Some(p) => {
                    format!("parent {} at {} (names the target by {})", p.name, p.address, p.send_target.as_str())
                }
                None => DIRECT.to_owned(),
            },
            Route::Group(i) => match self.groups.get(i) {
                Some(g) => {
                    let names: Vec<&str> =
                        g.members.iter().filter_map(|&m| self.proxies.get(m).map(|p| p.name.as_str())).collect();
                    format!("group {}: {}", g.name, names.join(", then "))
                }
                None => DIRECT.to_owned(),
            },
        }
    }
}
