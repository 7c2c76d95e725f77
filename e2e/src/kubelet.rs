//! The part of a kubelet that the suites need and no controller does: a bound pod that is
//! deleted stays `Terminating` until its node's kubelet has stopped its containers and removes
//! it; here that is done at once (grace period 0) for every pod deleted on any node.

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};
use kube::runtime::watcher;
use kube::Client;

/// Finishes the deletion of terminating pods until dropped.
pub struct Kubelet {
    task: tokio::task::JoinHandle<()>,
}

impl Kubelet {
    /// Starts watching every pod with `client` (which may delete pods in every namespace).
    pub fn start(client: Client) -> Self {
        let task = tokio::spawn(async move {
            let all: Api<Pod> = Api::all(client.clone());
            let mut events = std::pin::pin!(watcher(all, watcher::Config::default()));
            while let Some(event) = events.next().await {
                let pod = match event {
                    Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => p,
                    _ => continue,
                };
                let bound = pod.spec.as_ref().is_some_and(|s| s.node_name.is_some());
                if pod.metadata.deletion_timestamp.is_none() || !bound {
                    continue;
                }
                let (Some(ns), Some(name)) = (pod.metadata.namespace.as_deref(), pod.metadata.name.as_deref()) else {
                    continue;
                };
                let now = DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() };
                let _ = Api::<Pod>::namespaced(client.clone(), ns).delete(name, &now).await;
            }
        });
        Self { task }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}
