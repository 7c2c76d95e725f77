//! `tunnelgate-operator`: watches TunnelPolicies and ClusterTunnelPolicies, the pods and
//! namespaces they select, the cluster's own networks, the base ConfigMap and the Secrets it
//! names; renders them into the proxy's ConfigMap and Secret.
#![forbid(unsafe_code)]

pub mod admin;
pub mod controller;
pub mod crd;
pub mod lenient;
pub mod metrics;
pub mod plugin;
pub mod render;
pub mod secrets;
pub mod status;
pub mod validate;

/// Renders an error and its sources on one line (`a: b: c`).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
