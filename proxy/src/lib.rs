//! `tunnelgate-proxy`: an HTTP CONNECT egress proxy with policy, per-tunnel limits, Prometheus
//! metrics and graceful drain.
//!
//! # Layout (the path of a connection)
//! - [`listeners`]: the running listeners (plan a new set, switch, start); [`accept`]: accept
//!   loops, connection caps, one tracked task per connection with its [`context`].
//! - [`conn`]: one connection: caps → TLS handshake → [`negotiate`] (first head, bounded) →
//!   dispatch to a [`forward`] path: `connect` (CONNECT tunnels) or `http` (absolute-form HTTP,
//!   with `upgrade` for WebSocket).
//! - [`authorize`]: pre-decide → resolve → decide on every address → self-connection check (also
//!   used by `explain`); [`dial`]: resolve and connect to exactly the approved addresses.
//! - [`established`]: an established tunnel's task (registered, relayed, logged once); [`relay`]:
//!   full duplex with half-close and the tunnel's limits, one close reason per tunnel;
//!   [`tunnels`]: the registry of established tunnels (active count, revocation, drain);
//!   [`stop`]: the per-connection stop signal of tunnels and HTTP connections.
//! - [`access`]: one access event per tunnel or HTTP request, with the privacy defaults.
//! - [`snapshot`]: the configuration in force (policy, resolver, TLS), one `Arc` per connection.
//! - [`reload`]: hot reload (file watcher, SIGHUP, poll) through one validate → diff → publish pipeline.
//! - [`state`]: the shared state; [`app`]: binding and the shutdown sequence; [`admin`]: metrics,
//!   health, config.
//! - [`terminate`]: tunnel listeners (one fixed upstream, optional TLS termination), with
//!   [`proxy_protocol`] out and [`inbound_proxy`] in; [`tls`]: certificates by SNI, mTLS, the
//!   handshake; [`acme`]: certificates from an ACME directory.
//! - [`error`], [`metrics`], [`telemetry`], [`cli`].
#![forbid(unsafe_code)]

pub mod accept;
pub mod access;
pub mod admin;
pub mod admin_token;
pub mod app;
pub mod auth;
pub mod authorize;
pub mod cli;
pub mod conn;
pub mod conn_limit;
pub mod context;
pub mod control;
pub mod dial;
pub mod error;
pub mod established;
pub mod forward;
pub mod inbound_proxy;
pub mod k8s_source;
pub mod listeners;
pub mod memory;
pub mod metrics;
pub mod negotiate;
pub mod own_addresses;
pub mod owner;
pub mod parent;
pub mod prefixed;
pub mod proxy_protocol;
pub mod ratelimit;
pub mod redirect;
pub mod relay;
pub mod reload;
pub mod snapshot;
pub mod state;
pub mod stop;
pub mod sync;
pub mod telemetry;
pub mod terminate;
pub mod tls;
pub mod transparent;
pub mod tunnels;
