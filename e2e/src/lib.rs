//! Support for the end-to-end suites: a real Kubernetes control plane on loopback
//! ([`controlplane`]), the kubelet's part in it ([`kubelet`]), and the chart installed into it
//! ([`release`]); the tests themselves live in `tests/`.

pub mod controlplane;
pub mod kubelet;
pub mod netns;
pub mod release;
pub mod scratch;
