//! The operator's writes: the rendered ConfigMap and Secret (server-side apply, only when the
//! hash changed) and policy statuses.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::ByteString;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tracing::info;

use super::{Error, LoopState, Settings, HASH_ANNOTATION, MANAGER, RENDER_ANNOTATION};
use crate::crd::{ClusterTunnelPolicy, TunnelPolicy, TunnelPolicyStatus};
use crate::lenient::Lenient;
use crate::metrics::Metrics;
use crate::render;

/// Writes a policy's status. A policy deleted meanwhile is not an error (the write raced the delete).
pub(super) async fn write_status(
    client: &Client,
    p: &TunnelPolicy,
    status: &TunnelPolicyStatus,
) -> Result<(), kube::Error> {
    let (Some(ns), Some(name)) = (p.metadata.namespace.as_deref(), p.metadata.name.as_deref()) else { return Ok(()) };
    let api = Api::<TunnelPolicy>::namespaced(client.clone(), ns);
    not_found_is_ok(api.patch_status(name, &PatchParams::default(), &Patch::Merge(json!({ "status": status }))).await)
}

/// The status of a policy that does not deserialize: not accepted, not rendered, and why.
pub(super) async fn write_unreadable_status(
    client: &Client,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    namespaced: bool,
    message: &str,
    now: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
) -> Result<(), kube::Error> {
    let Some(name) = meta.name.as_deref() else { return Ok(()) };
    let condition = |type_: &str, reason: &str| {
        json!({"type": type_, "status": "False", "reason": reason, "message": message,
               "observedGeneration": meta.generation, "lastTransitionTime": now})
    };
    let status = json!({ "status": {
        "observedGeneration": meta.generation,
        "conditions": [condition("Accepted", "Unreadable"), condition("Ready", "Unreadable")],
    }});
    let pp = PatchParams::default();
    match (namespaced, meta.namespace.as_deref()) {
        (true, Some(ns)) => {
            // The answer is the object itself, which does not deserialize as a TunnelPolicy.
            let api = Api::<Lenient<TunnelPolicy>>::namespaced(client.clone(), ns);
            not_found_is_ok(api.patch_status(name, &pp, &Patch::Merge(status)).await)
        }
        (false, _) => {
            let api = Api::<Lenient<ClusterTunnelPolicy>>::all(client.clone());
            not_found_is_ok(api.patch_status(name, &pp, &Patch::Merge(status)).await)
        }
        (true, None) => Ok(()),
    }
}

fn not_found_is_ok<T>(r: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

pub(super) async fn write_cluster_status(
    client: &Client,
    p: &ClusterTunnelPolicy,
    status: &TunnelPolicyStatus,
) -> Result<(), kube::Error> {
    let Some(name) = p.metadata.name.as_deref() else { return Ok(()) };
    let api = Api::<ClusterTunnelPolicy>::all(client.clone());
    not_found_is_ok(api.patch_status(name, &PatchParams::default(), &Patch::Merge(json!({ "status": status }))).await)
}

/// Server-side applies the Secret (first, so the files exist) and the ConfigMap when the hash changed.
pub(super) async fn apply(
    client: &Client,
    s: &Settings,
    metrics: &Metrics,
    state: &mut LoopState,
    r: &render::Rendered,
) -> Result<(), Error> {
    let cms = Api::<ConfigMap>::namespaced(client.clone(), &s.namespace);
    if state.last_hash.is_none() {
        // After a start or a leadership change: what is in force?
        match cms.get_opt(&s.config_name()).await {
            Ok(Some(cm)) => {
                state.last_hash = cm.annotations().get(HASH_ANNOTATION).cloned();
                // Render numbers continue across restarts and leaders: they only grow.
                let written = cm.annotations().get(RENDER_ANNOTATION).and_then(|n| n.parse().ok()).unwrap_or(0);
                state.render = state.render.max(written);
                metrics.render.set(i64::try_from(state.render).unwrap_or(i64::MAX));
            }
            Ok(None) => {}
            Err(e) => return Err(Error::Apply(format!("ConfigMap {}", s.config_name()), e)),
        }
    }
    if state.last_hash.as_deref() == Some(r.hash.as_str()) {
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
    let render = state.render + 1;
    let mut annotations = r.annotations.clone();
    annotations.insert(HASH_ANNOTATION.into(), r.hash.clone());
    annotations.insert(RENDER_ANNOTATION.into(), render.to_string());
    // The proxies report the render number they have in force (`/config`): the first line says it.
    let text = format!("# tunnelgate-render: {render}\n{}", r.config);
    let cm = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": s.config_name(), "namespace": s.namespace, "labels": labels, "annotations": annotations },
        "data": { "config.yaml": text },
    });
    match cms.patch(&s.config_name(), &pp, &Patch::Apply(&cm)).await {
        Ok(_) => {
            metrics.config_writes.with_label_values(&["applied"]).inc();
            info!(configmap = %s.config_name(), sha256 = %r.hash, render, "proxy configuration applied");
            state.last_hash = Some(r.hash.clone());
            state.render = render;
            metrics.render.set(i64::try_from(render).unwrap_or(i64::MAX));
            Ok(())
        }
        Err(e) => {
            metrics.config_writes.with_label_values(&["failed"]).inc();
            Err(Error::Apply(format!("ConfigMap {}", s.config_name()), e))
        }
    }
}
