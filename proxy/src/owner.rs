//! Whether the node's redirect rules outlive this proxy (`--daemonset NAME`). A rolling update, an
//! eviction or a crash stops the proxy with its DaemonSet unchanged, and the rules then stay (the
//! enrolled pods fail closed until the next proxy listens). Two changes release them: the
//! DaemonSet deleted (the release uninstalled) or no longer annotated [`KEEP_ANNOTATION`]
//! (transparent mode turned off, which also takes the next pods out of the node's network
//! namespace, where they could not remove the rules). The DaemonSet is watched while the proxy runs
//! because both arrive before the kubelet stops the proxy, when the release's RBAC and
//! ServiceAccount may already be gone.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tracing::{info, warn};

/// The DaemonSet annotation (value `keep`) under which the node's redirect rules outlive the proxy.
pub const KEEP_ANNOTATION: &str = "tunnelgate.io/redirect-rules";

/// Nothing seen yet (the watch has not listed the DaemonSet, or it never existed): the rules stay.
const UNKNOWN: u8 = 0;
const KEEPS: u8 = 1;
/// Seen deleted, marked for deletion, or without the annotation.
const RELEASES: u8 = 2;

/// What the watch last saw of the DaemonSet.
#[derive(Debug, Clone, Default)]
pub struct Owner(Arc<AtomicU8>);

impl Owner {
    /// True when the DaemonSet, seen earlier, was deleted, is being deleted or no longer keeps the
    /// rules. A DaemonSet never seen (a wrong name, no permission, no API) never releases them.
    pub fn releases_rules(&self) -> bool {
        self.0.load(Ordering::Acquire) == RELEASES
    }

    fn saw(&self, ds: &DaemonSet) {
        let keeps = ds.metadata.deletion_timestamp.is_none()
            && ds.metadata.annotations.as_ref().and_then(|a| a.get(KEEP_ANNOTATION)).is_some_and(|v| v == "keep");
        self.set(if keeps { KEEPS } else { RELEASES });
    }

    /// Its deletion, seen by the watch (a deletion before anything was seen changes nothing).
    fn gone(&self) {
        if self.0.load(Ordering::Acquire) != UNKNOWN {
            self.set(RELEASES);
        }
    }

    fn set(&self, state: u8) {
        let was = self.0.swap(state, Ordering::AcqRel);
        if was != state && state == RELEASES {
            info!(
                "this proxy's DaemonSet is deleted or no longer keeps the redirect rules: they go when the proxy exits"
            );
        }
    }
}

/// Starts watching DaemonSet `namespace/name` (in-cluster config or KUBECONFIG).
///
/// # Errors
/// When no Kubernetes client can be made.
pub async fn watch(namespace: &str, name: &str) -> Result<Owner, kube::Error> {
    let client = Client::try_default().await?;
    let owner = Owner::default();
    let api = Api::<DaemonSet>::namespaced(client, namespace);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let seen = owner.clone();
    tokio::spawn(async move {
        let mut events = watcher(api, cfg).default_backoff().boxed();
        while let Some(ev) = events.next().await {
            match ev {
                Ok(watcher::Event::Apply(ds) | watcher::Event::InitApply(ds)) => seen.saw(&ds),
                Ok(watcher::Event::Delete(_)) => seen.gone(),
                Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
                Err(e) => warn!(error = %e, "DaemonSet watch failed; retrying with backoff"),
            }
        }
    });
    Ok(owner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn ds(keep: bool, deleting: bool) -> DaemonSet {
        let mut d = DaemonSet::default();
        if keep {
            d.metadata.annotations = Some([(KEEP_ANNOTATION.to_owned(), "keep".to_owned())].into());
        }
        if deleting {
            d.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        }
        d
    }

    /// The rules are released by a DaemonSet seen deleted, being deleted or without the
    /// annotation; never by one not seen; a DaemonSet that keeps them again owns them again.
    #[test]
    fn only_a_daemonset_seen_releases_the_rules() {
        let o = Owner::default();
        o.gone();
        assert!(!o.releases_rules(), "never seen");
        o.saw(&ds(true, false));
        assert!(!o.releases_rules());
        o.saw(&ds(true, true));
        assert!(o.releases_rules(), "marked for deletion");
        o.saw(&ds(true, false));
        assert!(!o.releases_rules(), "recreated");
        o.gone();
        assert!(o.releases_rules(), "deleted");
        o.saw(&ds(true, false));
        o.saw(&ds(false, false));
        assert!(o.releases_rules(), "transparent mode turned off");
    }
}
