//! `tunnelgate-proxy`: an HTTP CONNECT egress proxy with policy, per-tunnel limits, Prometheus
//! metrics and graceful drain.
//!
//! # Layout (the path of a connection)
//! - [`accept`]: accept loops, connection caps, one tracked task per connection.
//! - [`conn`]: one connection: TLS handshake → [`negotiate`] (bounded head) → authorize
//!   (`proxy_config::Policy`) → [`dial`] (resolve, check every address, connect) → 200 → [`relay`].
//! - [`relay`]: full duplex with half-close and the tunnel's limits; one close reason per tunnel.
//! - [`snapshot`]: the configuration in force (policy, resolver, TLS), one `Arc` per connection.
//! - [`reload`]: hot reload (file watcher, SIGHUP, poll) through one validate → diff → publish pipeline.
//! - [`app`]: binding, shared state, and the shutdown sequence; [`admin`]: metrics, health, config.
//! - [`error`], [`metrics`], [`tls`], [`telemetry`], [`cli`].
#![forbid(unsafe_code)]

pub mod accept;
pub mod admin;
pub mod app;
pub mod cli;
pub mod conn;
pub mod dial;
pub mod error;
pub mod k8s_source;
pub mod metrics;
pub mod negotiate;
pub mod relay;
pub mod reload;
pub mod snapshot;
pub mod telemetry;
pub mod tls;
