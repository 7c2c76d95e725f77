//! The operator's writes of the rendered ConfigMap and Secret (server-side apply, only when the
//! hash changed). Policy statuses go through the status writer.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::ByteString;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tracing::info;

use super::{Error, Settings, HASH_ANNOTATION, MANAGER, RENDER_ANNOTATION};
use crate::metrics::Metrics;
use crate::render;

/// What the writer knows of what is in force: the whole document's hash and render number, and
/// each node's document (when rendering per node). Only the writer changes it.
#[derive(Debug, Default)]
pub(super) struct Writer {
    /// Hash of the last document written or found in force (`None`: read it first).
    last_hash: Option<String>,
    /// Render number of the last document written or found in force (it only grows).
    render: u64,
    /// Per node: the hash and render number of its document in force.
    node_docs: std::collections::HashMap<String, (String, u64)>,
    /// When `node_docs` was last read from the API (`None`: not since the start, a change of
    /// leader or a failed write).
    node_docs_read: Option<tokio::time::Instant>,
    /// The whole document's shards in force, by index: each one's SHA-256 (`None`: not read since
    /// the start, a change of leader or a failed write).
    shards: Option<Vec<String>>,
}

impl Writer {
    /// Forgets what is in force (after a change of leader): the next write reads it first.
    pub(super) fn forget(&mut self) {
        self.last_hash = None;
        self.node_docs_read = None;
        self.shards = None;
    }

    /// The latest render number written or found in force.
    pub(super) fn render(&self) -> u64 {
        self.render
    }

    /// Per node: the hash and render number of its document in force.
    pub(super) fn node_docs(&self) -> &std::collections::HashMap<String, (String, u64)> {
        &self.node_docs
    }

    #[cfg(test)]
    pub(super) fn last_hash(&self) -> Option<&str> {
        self.last_hash.as_deref()
    }
}

/// Server-side applies the Secret (first, so the files exist) and the ConfigMap when the hash changed.
pub(super) async fn apply(
    client: &Client,
    s: &Settings,
    metrics: &Metrics,
    w: &mut Writer,
    r: &render::Rendered,
) -> Result<(), Error> {
    let cms = Api::<ConfigMap>::namespaced(client.clone(), &s.namespace);
    if w.last_hash.is_none() {
        // After a start or a leadership change: what is in force?
        match cms.get_opt(&s.config_name()).await {
            Ok(Some(cm)) => {
                w.last_hash = cm.annotations().get(HASH_ANNOTATION).cloned();
                // The shards in force are those its index names (none without one).
                let index = cm.data.as_ref().and_then(|d| d.get(proxy_config::shards::INDEX_KEY));
                w.shards = Some(
                    index
                        .and_then(|i| proxy_config::shards::parse_index(i).ok())
                        .map(|i| i.shards.into_iter().map(|s| s.sha256).collect())
                        .unwrap_or_default(),
                );
                // Render numbers continue across restarts and leaders: they only grow.
                let written = cm.annotations().get(RENDER_ANNOTATION).and_then(|n| n.parse().ok()).unwrap_or(0);
                w.render = w.render.max(written);
                metrics.render.set(i64::try_from(w.render).unwrap_or(i64::MAX));
            }
            Ok(None) => w.shards = Some(Vec::new()),
            Err(e) => return Err(Error::Apply(format!("ConfigMap {}", s.config_name()), e)),
        }
    }
    if w.last_hash.as_deref() == Some(r.hash.as_str()) {
        metrics.config_writes.with_label_values(&["unchanged"]).inc();
        return Ok(());
    }
    let labels = json!({ "app.kubernetes.io/managed-by": MANAGER, "app.kubernetes.io/part-of": "tunnelgate" });
    let pp = PatchParams::apply(MANAGER).force();
    if !r.tls_data.is_empty() {
        let data: BTreeMap<String, ByteString> =
            r.tls_data.iter().map(|(k, v)| (k.clone(), ByteString(v.clone().into_bytes()))).collect();
        let secret = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": { "name": s.tls_name(), "namespace": s.namespace, "labels": labels },
            "type": "Opaque",
            "data": data,
        });
        let secrets = Api::<Secret>::namespaced(client.clone(), &s.namespace);
        if let Err(e) = secrets.patch(&s.tls_name(), &pp, &Patch::Apply(&secret)).await {
            metrics.config_writes.with_label_values(&["failed"]).inc();
            return Err(Error::Apply(format!("Secret {}", s.tls_name()), e));
        }
    }
    let render = w.render + 1;
    let nodes = apply_nodes(client, s, metrics, w, r, render).await;
    if nodes.is_err() {
        // What is in force is uncertain after a failed write: read it again next time.
        w.node_docs_read = None;
    }
    nodes?;
    let shards = apply_shards(client, s, metrics, w, &r.shards).await;
    if shards.is_err() {
        w.shards = None;
    }
    let index = shards?;
    if r.config.is_empty() && index.is_none() {
        // Per node only: the whole document would not fit even in shards.
        w.last_hash = Some(r.hash.clone());
        w.render = render;
        metrics.render.set(i64::try_from(render).unwrap_or(i64::MAX));
        return Ok(());
    }
    let mut annotations = r.annotations.clone();
    annotations.insert(HASH_ANNOTATION.into(), r.hash.clone());
    annotations.insert(RENDER_ANNOTATION.into(), render.to_string());
    // The proxies report the render number they have in force (`/config`): the first line of the
    // document says it, or the index of its shards (written after them: a proxy merges the shards
    // once each matches the index).
    let data = match index {
        Some(shards) => {
            let index = proxy_config::shards::ShardIndex { render, shards };
            json!({ proxy_config::shards::INDEX_KEY: serde_json::to_string(&index).unwrap_or_default() })
        }
        None => json!({ proxy_config::status::CONFIG_KEY: proxy_config::status::stamp_render(render, &r.config) }),
    };
    let cm = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": s.config_name(), "namespace": s.namespace, "labels": labels, "annotations": annotations },
        "data": data,
    });
    match cms.patch(&s.config_name(), &pp, &Patch::Apply(&cm)).await {
        Ok(_) => {
            metrics.config_writes.with_label_values(&["applied"]).inc();
            info!(configmap = %s.config_name(), sha256 = %r.hash, render, shards = r.shards.len(), "proxy configuration applied");
            w.last_hash = Some(r.hash.clone());
            w.render = render;
            metrics.render.set(i64::try_from(render).unwrap_or(i64::MAX));
            let removed = remove_extra_shards(client, s, w, r.shards.len()).await;
            if removed.is_err() {
                w.shards = None;
            }
            removed
        }
        Err(e) => {
            metrics.config_writes.with_label_values(&["failed"]).inc();
            Err(Error::Apply(format!("ConfigMap {}", s.config_name()), e))
        }
    }
}

/// How long the node documents in force are trusted as written before they are listed again.
const NODE_DOCS_REREAD: std::time::Duration = std::time::Duration::from_secs(300);

/// The label on per-node documents, naming the document they belong to.
const NODE_DOC_LABEL: &str = "tunnelgate.io/node-config-of";

/// Writes the node documents that changed (render number `render`) and deletes those of nodes
/// that are gone, or all of them when the operator renders one document again.
async fn apply_nodes(
    client: &Client,
    s: &Settings,
    metrics: &Metrics,
    w: &mut Writer,
    r: &render::Rendered,
    render: u64,
) -> Result<(), Error> {
    let cms = Api::<ConfigMap>::namespaced(client.clone(), &s.namespace);
    // What is in force, read after a start, a change of leader or a failed write, and at most
    // every few minutes (a document deleted by hand is then written again); in between it is kept
    // as written: at 1,000 nodes a list of every document per change was most of a reconcile.
    let stale = w.node_docs_read.is_none_or(|at| at.elapsed() > NODE_DOCS_REREAD);
    if stale {
        let existing = cms
            .list(&kube::api::ListParams::default().labels(&format!("{NODE_DOC_LABEL}={}", s.config_name())))
            .await
            .map_err(|e| Error::Apply(format!("ConfigMaps {NODE_DOC_LABEL}={}", s.config_name()), e))?;
        w.node_docs.clear();
        for cm in &existing.items {
            let (Some(node), a) = (cm.labels().get("tunnelgate.io/node").cloned(), cm.annotations()) else { continue };
            // One without our annotations is rewritten (or removed) like a stale one.
            let hash = a.get(HASH_ANNOTATION).cloned().unwrap_or_default();
            let n = a.get(RENDER_ANNOTATION).and_then(|n| n.parse().ok()).unwrap_or(0);
            w.node_docs.insert(node, (hash, n));
        }
        w.node_docs_read = Some(tokio::time::Instant::now());
    }
    let pp = PatchParams::apply(MANAGER).force();
    for (node, doc) in &r.nodes {
        if w.node_docs.get(node).is_some_and(|(h, _)| *h == doc.hash) {
            continue;
        }
        let name = proxy_config::status::node_document_name(&s.config_name(), node);
        let cm = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {
                "name": name, "namespace": s.namespace,
                "labels": { "app.kubernetes.io/managed-by": MANAGER, "app.kubernetes.io/part-of": "tunnelgate",
                            NODE_DOC_LABEL: s.config_name(), "tunnelgate.io/node": node },
                "annotations": { HASH_ANNOTATION: doc.hash, RENDER_ANNOTATION: render.to_string() },
            },
            "data": { proxy_config::status::CONFIG_KEY: proxy_config::status::stamp_render(render, &doc.config) },
        });
        if let Err(e) = cms.patch(&name, &pp, &Patch::Apply(&cm)).await {
            metrics.config_writes.with_label_values(&["failed"]).inc();
            return Err(Error::Apply(format!("ConfigMap {name}"), e));
        }
        metrics.config_writes.with_label_values(&["applied"]).inc();
        w.node_docs.insert(node.clone(), (doc.hash.clone(), render));
    }
    let gone: Vec<String> = w.node_docs.keys().filter(|n| !r.nodes.contains_key(*n)).cloned().collect();
    for node in gone {
        let name = proxy_config::status::node_document_name(&s.config_name(), &node);
        match cms.delete(&name, &kube::api::DeleteParams::default()).await {
            Ok(_) => info!(configmap = %name, "node document removed"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(Error::Apply(format!("ConfigMap {name}"), e)),
        }
        w.node_docs.remove(&node);
    }
    Ok(())
}

/// Writes the whole document's shards that changed and deletes those past their number (all of
/// them when the document fits one ConfigMap again); returns the index to write, if sharded.
async fn apply_shards(
    client: &Client,
    s: &Settings,
    metrics: &Metrics,
    w: &mut Writer,
    shards: &[String],
) -> Result<Option<Vec<proxy_config::shards::ShardRef>>, Error> {
    use proxy_config::shards::{digest, shard_document_name, ShardRef, SHARD_LABEL};
    let cms = Api::<ConfigMap>::namespaced(client.clone(), &s.namespace);
    let whole = s.config_name();
    // Unknown after a failed write: listed (the index in force may not name them all).
    if w.shards.is_none() {
        let existing = cms
            .list(&kube::api::ListParams::default().labels(&format!("{SHARD_LABEL}={whole}")))
            .await
            .map_err(|e| Error::Apply(format!("ConfigMaps {SHARD_LABEL}={whole}"), e))?;
        let mut in_force: Vec<String> = Vec::new();
        for cm in &existing.items {
            let Some(k) = cm.name_any().rsplit_once("-shard-").and_then(|(_, k)| k.parse::<usize>().ok()) else {
                continue;
            };
            if in_force.len() <= k {
                in_force.resize(k + 1, String::new());
            }
            // A shard that is not ours as written is rewritten.
            in_force[k] = cm
                .data
                .as_ref()
                .and_then(|d| d.get(proxy_config::status::CONFIG_KEY))
                .map(|t| digest(t))
                .unwrap_or_default();
        }
        w.shards = Some(in_force);
    }
    let in_force = w.shards.get_or_insert_with(Vec::new);
    let pp = PatchParams::apply(MANAGER).force();
    let mut index = Vec::with_capacity(shards.len());
    for (k, text) in shards.iter().enumerate() {
        let name = shard_document_name(&whole, k);
        let sha = digest(text);
        if in_force.get(k) != Some(&sha) {
            let cm = json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {
                    "name": name, "namespace": s.namespace,
                    "labels": { "app.kubernetes.io/managed-by": MANAGER, "app.kubernetes.io/part-of": "tunnelgate",
                                SHARD_LABEL: whole },
                },
                "data": { proxy_config::status::CONFIG_KEY: text },
            });
            if let Err(e) = cms.patch(&name, &pp, &Patch::Apply(&cm)).await {
                metrics.config_writes.with_label_values(&["failed"]).inc();
                return Err(Error::Apply(format!("ConfigMap {name}"), e));
            }
            metrics.config_writes.with_label_values(&["applied"]).inc();
            if in_force.len() <= k {
                in_force.resize(k + 1, String::new());
            }
            in_force[k].clone_from(&sha);
        }
        index.push(ShardRef { name, sha256: sha });
    }
    Ok((!shards.is_empty()).then_some(index))
}

/// Deletes the shards past the number the index in force names (all of them when the document
/// fits one ConfigMap again): after the index, so that no proxy misses a shard it still needs.
async fn remove_extra_shards(client: &Client, s: &Settings, w: &mut Writer, keep: usize) -> Result<(), Error> {
    use proxy_config::shards::shard_document_name;
    let cms = Api::<ConfigMap>::namespaced(client.clone(), &s.namespace);
    let whole = s.config_name();
    let Some(in_force) = w.shards.as_mut() else { return Ok(()) };
    while in_force.len() > keep {
        let k = in_force.len() - 1;
        let name = shard_document_name(&whole, k);
        match cms.delete(&name, &kube::api::DeleteParams::default()).await {
            Ok(_) => info!(configmap = %name, "shard removed"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(Error::Apply(format!("ConfigMap {name}"), e)),
        }
        in_force.pop();
    }
    Ok(())
}
