//! `tunnelgate-operator`: watches TunnelPolicies, the pods they select, the base ConfigMap and
//! the TLS Secrets it names; renders them into the proxy's ConfigMap and TLS Secret.
#![forbid(unsafe_code)]

pub mod crd;
pub mod render;
pub mod validate;
