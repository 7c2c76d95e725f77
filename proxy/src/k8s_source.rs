//! The Kubernetes configuration source: a watch on one ConfigMap (`--config-map NS/NAME`, key
//! `config.yaml`) through the API, so a policy change is enforced in well under a second; with
//! `--node-name`, also on the operator's per-node document, which wins while it exists. It only
//! delivers documents; the reload pipeline validates and applies them. Losing the API keeps the
//! last good configuration; the watch reconnects with backoff. A deleted ConfigMap changes nothing.

use std::sync::{Arc, Mutex};

use crate::sync::lock;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{info, warn};

/// The key of the document in the ConfigMap.
pub const KEY: &str = proxy_config::status::CONFIG_KEY;

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
/// With `node`, the operator's document for that node (`NAME-node-NODE`, written when the operator
/// renders per node) is preferred, and `NAME` serves while there is none.
pub async fn spawn(
    namespace: String,
    name: String,
    node: Option<String>,
) -> Result<watch::Receiver<Option<String>>, SourceError> {
    let client = Client::try_default().await.map_err(SourceError::Client)?;
    let api = Api::<ConfigMap>::namespaced(client, &namespace);
    let (tx, rx) = watch::channel(None);
    // [whole document, this node's document]: the node's wins while it exists.
    let docs: Arc<Mutex<[Option<String>; 2]>> = Arc::default();
    let names = [Some(name.clone()), node.map(|n| proxy_config::status::node_document_name(&name, &n))];
    for (slot, cm_name) in names.into_iter().enumerate() {
        let Some(cm_name) = cm_name else { continue };
        let (api, tx, docs, namespace) = (api.clone(), tx.clone(), docs.clone(), namespace.clone());
        tokio::spawn(async move {
            let cfg = watcher::Config::default().fields(&format!("metadata.name={cm_name}"));
            let mut events = watcher(api, cfg).default_backoff().boxed();
            let whole = slot == 0;
            while let Some(ev) = events.next().await {
                let update = match ev {
                    Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => {
                        match cm.data.as_ref().and_then(|d| d.get(KEY)) {
                            Some(text) => Some(Some(text.clone())),
                            None => {
                                warn!(configmap = %format!("{namespace}/{cm_name}"), key = KEY, "ConfigMap has no config key; keeping the configuration in force");
                                None
                            }
                        }
                    }
                    // The whole document deleted: keep what is in force. A node's document
                    // deleted (the operator renders one document again): the whole one serves.
                    Ok(watcher::Event::Delete(_)) if whole => {
                        warn!(configmap = %format!("{namespace}/{cm_name}"), "ConfigMap deleted; keeping the configuration in force");
                        None
                    }
                    Ok(watcher::Event::Delete(_)) => Some(None),
                    Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
                    Err(e) => {
                        warn!(error = %e, "ConfigMap watch failed; retrying with backoff");
                        None
                    }
                };
                if let Some(doc) = update {
                    let chosen = {
                        let mut d = lock(&docs);
                        d[slot] = doc;
                        d[1].clone().or_else(|| d[0].clone())
                    };
                    if let Some(text) = chosen {
                        tx.send_if_modified(|cur| {
                            let changed = cur.as_deref() != Some(text.as_str());
                            if changed {
                                *cur = Some(text);
                            }
                            changed
                        });
                    }
                }
                if tx.is_closed() {
                    return;
                }
            }
            info!("ConfigMap watch ended");
        });
    }
    Ok(rx)
}
