//! The paths of a forward listener: CONNECT tunnels, and absolute-form plain HTTP with upgrades.

pub mod connect;
