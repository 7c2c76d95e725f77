//! The paths of a forward listener: CONNECT tunnels, and absolute-form plain HTTP (through hyper)
//! with upgrades, over a pool of upstream connections.

pub mod connect;
pub mod handler;
pub mod headers;
pub mod http;
pub mod limits;
pub mod pool;
pub mod upgrade;
