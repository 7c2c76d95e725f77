//! Support for the end-to-end suites: a real Kubernetes control plane on loopback
//! ([`controlplane`]); the tests themselves live in `tests/`.

pub mod controlplane;
pub mod release;
