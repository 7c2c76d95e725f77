//! The Secrets a render uses: each TLS listener's certificate and the proxy users, validated;
//! an invalid one gets a Warning event and falls back to what the proxy already has.

use std::collections::BTreeMap;

use kube::runtime::events::Recorder;
use kube::runtime::reflector::ObjectRef;
use kube::Resource;
use tracing::warn;

use super::watches::Caches;
use super::{warn_once, LoopState, Settings};
use crate::render::{self, TlsIn};
use crate::secrets::{htpasswd_from_secret, tls_from_secret};

/// TLS material by listener and the htpasswd file, for the base document `base`.
pub(super) async fn secrets(
    c: &Caches,
    s: &Settings,
    base: Option<&str>,
    recorder: &Recorder,
    state: &mut LoopState,
) -> (BTreeMap<String, TlsIn>, Option<String>) {
    let ns = &s.namespace;
    // TLS: validated Secrets; an invalid one falls back to what the proxy already has.
    let mut tls: BTreeMap<String, TlsIn> = BTreeMap::new();
    if let Some(base) = base {
        let previous = c.secrets.get(&ObjectRef::new(&s.tls_name()).within(ns));
        for (_, listener, secret_name) in render::tls_refs(base).unwrap_or_default() {
            let secret = c.secrets.get(&ObjectRef::new(&secret_name).within(ns));
            let result = match &secret {
                Some(sec) => tls_from_secret(sec).map_err(|e| e.to_string()),
                None => Err("not found".to_owned()),
            };
            match result {
                Ok(t) => {
                    state.warned.remove(&format!("secret/{secret_name}"));
                    tls.insert(listener, t);
                }
                Err(msg) => {
                    let note = format!(
                        "TLS Secret for listener {listener} is invalid: {msg}; the previous certificate stays in use"
                    );
                    warn_invalid(recorder, state, secret.as_deref(), &secret_name, note).await;
                    warn!(listener = %listener, secret = %secret_name, error = %msg, "TLS Secret unusable; keeping the previous certificate");
                    let prev = previous.as_ref().and_then(|p| p.data.as_ref()).and_then(|d| {
                        let crt = d.get(&format!("{listener}.crt"))?;
                        let key = d.get(&format!("{listener}.key"))?;
                        crate::secrets::tls_from_pem(&crt.0, &key.0).ok()
                    });
                    if let Some(p) = prev {
                        tls.insert(listener, p);
                    }
                }
            }
        }
    }

    // Proxy users: a validated htpasswd Secret; an invalid one keeps the users the proxy has.
    let mut htpasswd = None;
    if let Some(secret_name) = base.and_then(render::auth_ref) {
        let secret = c.secrets.get(&ObjectRef::new(&secret_name).within(ns));
        match secret.as_ref().map(|sec| htpasswd_from_secret(sec)) {
            Some(Ok(text)) => {
                state.warned.remove(&format!("secret/{secret_name}"));
                htpasswd = Some(text);
            }
            other => {
                let msg = match other {
                    Some(Err(e)) => e.to_string(),
                    _ => "not found".to_owned(),
                };
                let note = format!("htpasswd Secret is invalid: {msg}; the previous users stay in force");
                warn_invalid(recorder, state, secret.as_deref(), &secret_name, note).await;
                warn!(secret = %secret_name, error = %msg, "htpasswd Secret unusable; keeping the previous users");
                let previous = c.secrets.get(&ObjectRef::new(&s.tls_name()).within(ns));
                htpasswd = previous
                    .as_ref()
                    .and_then(|p| p.data.as_ref()?.get("htpasswd"))
                    .and_then(|b| String::from_utf8(b.0.clone()).ok());
            }
        }
    }

    (tls, htpasswd)
}

/// A Warning event `InvalidSecret` on a Secret that exists but cannot be used (once per message).
async fn warn_invalid(
    recorder: &Recorder,
    state: &mut LoopState,
    secret: Option<&k8s_openapi::api::core::v1::Secret>,
    name: &str,
    note: String,
) {
    if let Some(sec) = secret {
        warn_once(recorder, state, format!("secret/{name}"), &sec.object_ref(&()), "InvalidSecret", note).await;
    }
}
