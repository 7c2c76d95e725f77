//! Support for the end-to-end suites: a real Kubernetes control plane on loopback
//! ([`controlplane`]), the kubelet's part in it ([`kubelet`]), and the chart installed into it
//! ([`release`]); the tests themselves live in `tests/`.

pub mod controlplane;
pub mod kubelet;
pub mod netns;
pub mod release;
pub mod scratch;

/// A workspace binary (`tunnelgate-proxy`, `tunnelgate-operator`, `kubectl-tunnelgate`) built
/// beside the running test by `cargo build --workspace` (the README's test command builds them).
///
/// # Panics
/// When it is not built, saying how to build it.
#[allow(clippy::panic, reason = "test support: a missing binary is a broken setup")]
pub fn workspace_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().and_then(std::path::Path::parent).unwrap_or(std::path::Path::new("."));
    let p = dir.join(name);
    if !p.is_file() {
        panic!("{} not built: run `cargo build --workspace` (the README's test command builds it)", p.display());
    }
    p
}
