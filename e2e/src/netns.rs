//! Pod networks for the suites: a bridge in the host's namespace and one network namespace per
//! pod on it, each with an address of its own (the API server's pod proxy dials only addresses
//! that are not loopback). Everything is created by the test and removed when dropped. Needs root.

use std::net::Ipv4Addr;
use std::process::Command;

use crate::controlplane::Error;

/// A bridge `10.<a>.<b>.0/24` whose host end is `.1`, with pod namespaces on it.
pub struct Network {
    bridge: String,
    net: [u8; 3],
    tag: String,
    pods: Vec<(String, String)>,
}

fn ip(args: &[&str]) -> Result<(), Error> {
    let out =
        Command::new("ip").args(args).output().map_err(|source| Error::Io { what: "running ip".into(), source })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Build(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())))
    }
}

impl Network {
    /// Creates the bridge `10.<net[1]>.<net[2]>.1/24` (`net[0]` must be 10); `tag` keeps the
    /// interface names of parallel tests apart (at most 6 characters).
    ///
    /// # Errors
    /// When not root, or `ip` refuses.
    pub fn create(tag: &str, net: [u8; 3]) -> Result<Self, Error> {
        let bridge = format!("tgb{tag}");
        let n = Self { bridge, net, tag: tag.to_owned(), pods: Vec::new() };
        // A test process killed outright leaves its network behind: a later one of the same tag
        // takes the names over.
        let _ = ip(&["link", "del", &n.bridge]);
        ip(&["link", "add", &n.bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{}/24", n.host()), "dev", &n.bridge])?;
        ip(&["link", "set", &n.bridge, "up"])?;
        Ok(n)
    }

    /// The host's end of the bridge (`.1`): where the API server and upstreams listen.
    pub fn host(&self) -> Ipv4Addr {
        self.addr(1)
    }

    /// The address `.last` in this network.
    pub fn addr(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.net[0], self.net[1], self.net[2], last)
    }

    /// Adds `.last` to the host's end, for a client or a stand-in that the test runs itself.
    ///
    /// # Errors
    /// When `ip` refuses.
    pub fn host_address(&self, last: u8) -> Result<Ipv4Addr, Error> {
        let a = self.addr(last);
        ip(&["addr", "add", &format!("{a}/24"), "dev", &self.bridge])?;
        Ok(a)
    }

    /// A pod's network namespace with address `.last` (default route via the host end); returns
    /// the namespace's name, for `ip netns exec NAME …`.
    ///
    /// # Errors
    /// When `ip` refuses.
    pub fn pod(&mut self, last: u8) -> Result<String, Error> {
        let ns = format!("tgp{}-{last}", self.tag);
        let veth = format!("tgv{}-{last}", self.tag);
        let _ = ip(&["link", "del", &veth]);
        let _ = ip(&["netns", "del", &ns]);
        ip(&["netns", "add", &ns])?;
        self.pods.push((ns.clone(), veth.clone()));
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
        ip(&["link", "set", &veth, "master", &self.bridge, "up"])?;
        let addr = format!("{}/24", self.addr(last));
        let host = self.host().to_string();
        for cmd in [
            vec!["addr", "add", addr.as_str(), "dev", "eth0"],
            vec!["link", "set", "eth0", "up"],
            vec!["link", "set", "lo", "up"],
            vec!["route", "add", "default", "via", host.as_str()],
        ] {
            let mut args = vec!["netns", "exec", ns.as_str(), "ip"];
            args.extend(cmd);
            ip(&args)?;
        }
        Ok(ns)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for (ns, veth) in &self.pods {
            let _ = ip(&["link", "del", veth]);
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}
