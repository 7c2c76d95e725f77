//! The Kubernetes configuration source: a watch on one ConfigMap (`--config-map NS/NAME`, key
//! `config.yaml`) through the API, so a policy change is enforced in well under a second; with
//! `--node-name`, also on the operator's per-node document, which wins while it exists. It only
//! delivers documents; the reload pipeline validates and applies them. A whole-cluster document
//! past one ConfigMap comes as shards and an index; it is delivered once they merge. Losing the API keeps the
//! last good configuration; the watch reconnects with backoff. A deleted ConfigMap changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use crate::sync::lock;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use proxy_config::shards::{parse_index, ShardIndex, ShardSet, INDEX_KEY};
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

/// The latest documents, and the whole document's shards while it comes in shards.
#[derive(Default)]
struct Docs {
    /// [whole document, this node's document]: the node's wins while it exists.
    slots: [Option<String>; 2],
    /// The shard index the whole document's ConfigMap holds instead of a document.
    index: Option<ShardIndex>,
    /// The index `slots[0]` was merged for: the same index names the same shard digests, so the
    /// merge is not done again for it (a re-list of unchanged shards, say).
    merged_for: Option<ShardIndex>,
    /// The shards' documents by ConfigMap name, each parsed once.
    shards: ShardSet,
    /// The shard watches running, by shard name: only while the whole document serves (no node
    /// document), so a node's proxy never holds the whole cluster's rules beside its own.
    watched: BTreeMap<String, tokio::task::AbortHandle>,
    /// Whether the node's document has been looked for (true without `--node-name`): until then
    /// the whole document is not merged from shards (a node's proxy would rarely need it).
    node_listed: bool,
}

/// Starts watching; the receiver yields the latest `config.yaml` text (None until the first).
/// With `node`, the operator's document for that node (`NAME-node-NODE`, written when the operator
/// renders per node) is preferred, and `NAME` serves while there is none. When `NAME` holds a
/// shard index instead of a document (a whole-cluster document past one ConfigMap), the shards
/// are watched too and their merge serves as the whole document, once each matches the index.
pub async fn spawn(
    namespace: String,
    name: String,
    node: Option<String>,
) -> Result<watch::Receiver<Option<String>>, SourceError> {
    let client = Client::try_default().await.map_err(SourceError::Client)?;
    let api = Api::<ConfigMap>::namespaced(client, &namespace);
    let (tx, rx) = watch::channel(None);
    let docs = Arc::new(Mutex::new(Docs { node_listed: node.is_none(), ..Docs::default() }));
    let names = [Some(name.clone()), node.map(|n| proxy_config::status::node_document_name(&name, &n))];
    for (slot, cm_name) in names.into_iter().enumerate() {
        let Some(cm_name) = cm_name else { continue };
        let source = Source {
            api: api.clone(),
            tx: tx.clone(),
            docs: docs.clone(),
            namespace: namespace.clone(),
            whole: name.clone(),
        };
        tokio::spawn(async move {
            let cfg = watcher::Config::default().fields(&format!("metadata.name={cm_name}"));
            let mut events = watcher(source.api.clone(), cfg).default_backoff().boxed();
            let whole = slot == 0;
            let at = format!("{}/{cm_name}", source.namespace);
            while let Some(ev) = events.next().await {
                match ev {
                    Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => {
                        let data = cm.data.unwrap_or_default();
                        match (data.get(KEY), data.get(INDEX_KEY)) {
                            (Some(text), _) => source.update(|d| {
                                if whole {
                                    d.index = None;
                                    d.merged_for = None;
                                }
                                d.slots[slot] = Some(text.clone());
                            }),
                            (None, Some(index)) if whole => match parse_index(index) {
                                Ok(index) => source.update(|d| d.index = Some(index)),
                                Err(e) => {
                                    warn!(configmap = %at, error = %e, "invalid shard index; keeping the configuration in force");
                                }
                            },
                            _ => {
                                warn!(configmap = %at, key = KEY, "ConfigMap has no config key; keeping the configuration in force");
                            }
                        }
                    }
                    // The whole document deleted: keep what is in force. A node's document
                    // deleted (the operator renders one document again): the whole one serves.
                    Ok(watcher::Event::Delete(_)) if whole => {
                        warn!(configmap = %at, "ConfigMap deleted; keeping the configuration in force");
                    }
                    Ok(watcher::Event::Delete(_)) => source.update(|d| d.slots[slot] = None),
                    Ok(watcher::Event::InitDone) if !whole => source.update(|d| d.node_listed = true),
                    Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
                    Err(e) => {
                        warn!(error = %e, "ConfigMap watch failed; retrying with backoff");
                    }
                }
                if source.tx.is_closed() {
                    return;
                }
            }
            info!("ConfigMap watch ended");
        });
    }
    Ok(rx)
}

/// What each watch task shares.
#[derive(Clone)]
struct Source {
    api: Api<ConfigMap>,
    tx: watch::Sender<Option<String>>,
    docs: Arc<Mutex<Docs>>,
    namespace: String,
    /// The whole document's ConfigMap name.
    whole: String,
}

impl Source {
    /// Changes the documents with `f`, then publishes the one that serves: the node's, else the
    /// whole one (merged from its shards when it comes in shards and they are all there).
    fn update<R>(&self, f: impl FnOnce(&mut Docs) -> R) -> R {
        let (out, chosen) = {
            let mut d = lock(&self.docs);
            let out = f(&mut d);
            self.watch_shards_while_needed(&mut d);
            let due = d.slots[1].is_none() && d.node_listed && d.index != d.merged_for;
            if let Some(index) = d.index.clone().filter(|_| due) {
                match d.shards.assemble(&index) {
                    Ok(Some(text)) => {
                        d.slots[0] = Some(text);
                        d.merged_for = Some(index);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        warn!(configmap = %format!("{}/{}", self.namespace, self.whole), error = %e, "shards do not merge; keeping the configuration in force");
                    }
                }
            }
            (out, d.slots[1].clone().or_else(|| d.slots[0].clone()))
        };
        if let Some(text) = chosen {
            self.tx.send_if_modified(|cur| {
                let changed = cur.as_deref() != Some(text.as_str());
                if changed {
                    *cur = Some(text);
                }
                changed
            });
        }
        out
    }

    /// Starts a watch for each shard the index names while the whole document serves, and stops
    /// them (dropping their documents) while the node's own document does.
    fn watch_shards_while_needed(&self, d: &mut Docs) {
        let needed: BTreeSet<String> = match (&d.index, &d.slots[1]) {
            (Some(index), None) if d.node_listed => index.shards.iter().map(|s| s.name.clone()).collect(),
            _ => BTreeSet::new(),
        };
        d.watched.retain(|name, task| {
            let keep = needed.contains(name);
            if !keep {
                task.abort();
            }
            keep
        });
        d.shards.retain(|name| needed.contains(name));
        if d.index.is_some() && d.slots[1].is_some() {
            // The merged whole document is not kept beside the node's own: merged again if needed.
            d.slots[0] = None;
            d.merged_for = None;
        }
        for name in needed {
            if let std::collections::btree_map::Entry::Vacant(e) = d.watched.entry(name) {
                let task = tokio::spawn(self.clone().watch_shard(e.key().clone()));
                e.insert(task.abort_handle());
            }
        }
    }

    /// Watches one shard of the whole document, by name (the proxies' Role names each shard the
    /// operator may write), for as long as the proxy runs.
    async fn watch_shard(self, shard: String) {
        let cfg = watcher::Config::default().fields(&format!("metadata.name={shard}"));
        let mut events = watcher(self.api.clone(), cfg).default_backoff().boxed();
        while let Some(ev) = events.next().await {
            match ev {
                Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => {
                    match cm.data.and_then(|mut d| d.remove(KEY)) {
                        Some(text) => self.update(|d| d.shards.insert(&shard, &text)),
                        None => self.update(|d| d.shards.remove(&shard)),
                    };
                }
                Ok(watcher::Event::Delete(_)) => {
                    self.update(|d| d.shards.remove(&shard));
                }
                Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
                Err(e) => warn!(error = %e, "shard ConfigMap watch failed; retrying with backoff"),
            }
            if self.tx.is_closed() {
                return;
            }
        }
    }
}
