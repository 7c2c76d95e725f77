//! Tunnelgate's proxy configuration: the wire format shared by the operator (which writes it)
//! and the proxy (which reads it), its validation, and policy evaluation.
//!
//! Pure: no I/O, no async runtime, no Kubernetes. The operator validates what it renders with
//! exactly the code the proxy loads it with.
//!
//! # Layout
//! - [`config`]: [`ProxyConfig`] and `ProxyConfig::from_yaml` (raw document → valid types).
//! - [`policy`]: rules and [`Policy::decide`] (deny over allow, then the default; private
//!   addresses refused unless listed).
//! - [`decide`]: the decision pipeline for one request (name → addresses → rules → the proxy's
//!   own endpoints → dry run), shared by the proxy and both `explain` commands.
//! - [`origin`]: the policy a rendered rule comes from, as written into the rule's name.
//! - [`parents`]: upstream (parent) proxies, their groups and the route a rule names.
//! - [`host`]: the strict `host:port` grammar and name normalization.
//! - [`addr`]: classification of non-public addresses, unwrapping IPv6 forms that embed IPv4.
//! - [`tls`]: a listener's certificates (files by SNI, or ACME), protocol floor, ALPN, mTLS.
//! - [`status`], [`shards`]: what the operator and the proxy tell each other besides the
//!   configuration, and the whole-cluster document in shards.
//! - [`error`]: errors that name the path of the bad value.
//! - [`warnings`]: what a valid configuration says that does not do what it reads like.
#![forbid(unsafe_code)]

pub mod addr;
pub mod config;
pub mod decide;
pub mod error;
pub mod host;
pub mod origin;
pub mod parents;
pub mod policy;
pub mod raw;
pub mod shards;
pub mod status;
mod structure;
pub mod tls;
pub mod warnings;

pub use config::{
    Admin, Auth, Dns, HttpSettings, Limits, Listener, ListenerHttp, ListenerMode, LogFormat, Logging, OtherPorts,
    ProxyConfig, ProxyProtocol, Redirect, RelayDefaults, Serves, Transparent, TunnelUpstream, ADMIN_TOKEN_HEADER,
};
pub use error::{ConfigError, ConfigErrors};
pub use host::{Authority, Host, HostName, HostPattern};
pub use parents::{Parent, ParentGroup, ParentTls, Parents, Route, SendTarget};
pub use policy::{Action, Decision, DenyReason, DryRunVerdict, Policy, PreDecision, Rule, TunnelLimits};
pub use tls::{Acme, ClientAuth, ListenerTls, TlsFiles, TlsVersion};
pub use warnings::ConfigWarning;
