//! Local end-to-end: the real `tunnelgate-operator`, `tunnelgate-proxy` and `kubectl-tunnelgate`
//! binaries against a real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager
//! built from their Go modules by controlplane/build.sh) with the chart installed by helm; the
//! operator and the proxies authenticate with tokens of the chart's ServiceAccounts, so they have
//! exactly the chart's RBAC. The test plays the kubelet: pods get 127.0.0.x addresses in their
//! status and the test binds its client sockets to them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub, reason = "test harness")]

mod addresses;
mod convergence;
mod harness;
mod parents;
mod resilience;
mod rollout;
mod secrets;
mod shards;
mod tenancy;
mod transparent;
