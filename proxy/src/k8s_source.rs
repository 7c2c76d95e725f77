//! The Kubernetes configuration source: a watch on one ConfigMap (`--config-map NS/NAME`, key
//! `config.yaml`) through the API, so a policy change is enforced in well under a second. It only
//! delivers documents; the reload pipeline validates and applies them. Losing the API keeps the
//! last good configuration; the watch reconnects with backoff. A deleted ConfigMap changes nothing.

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{info, warn};

/// The key of the document in the ConfigMap.
pub const KEY: &str = "config.yaml";

/// Why the source could not start.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("--config-map must be NAMESPACE/NAME, got {0:?}")]
    BadName(String),
    #[error("cannot create the Kubernetes client (in-cluster config or KUBECONFIG)")]
    Client(#[source] kube::Error),
}

/// Parses `NAMESPACE/NAME`.
pub fn parse_ref(s: &str) -> Result<(String, String), SourceError> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_owned(), name.to_owned()))
        }
        _ => Err(SourceError::BadName(s.to_owned())),
    }
}

/// Starts watching; the receiver yields the latest `config.yaml` text (None until the first).
pub async fn spawn(namespace: String, name: String) -> Result<watch::Receiver<Option<String>>, SourceError> {
    let client = Client::try_default().await.map_err(SourceError::Client)?;
    let api = Api::<ConfigMap>::namespaced(client, &namespace);
    let (tx, rx) = watch::channel(None);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    tokio::spawn(async move {
        let mut events = watcher(api, cfg).default_backoff().boxed();
        while let Some(ev) = events.next().await {
            match ev {
                Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => {
                    match cm.data.as_ref().and_then(|d| d.get(KEY)) {
                        Some(text) => {
                            tx.send_if_modified(|cur| {
                                let changed = cur.as_deref() != Some(text.as_str());
                                if changed {
                                    *cur = Some(text.clone());
                                }
                                changed
                            });
                        }
                        None => {
                            warn!(configmap = %format!("{namespace}/{name}"), key = KEY, "ConfigMap has no config key; keeping the configuration in force")
                        }
                    }
                }
                Ok(watcher::Event::Delete(_)) => {
                    warn!(configmap = %format!("{namespace}/{name}"), "ConfigMap deleted; keeping the configuration in force");
                }
                Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
                Err(e) => warn!(error = %e, "ConfigMap watch failed; retrying with backoff"),
            }
            if tx.is_closed() {
                return;
            }
        }
        info!("ConfigMap watch ended");
    });
    Ok(rx)
}
