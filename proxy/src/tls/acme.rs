//! Certificates from an ACME directory (RFC 8555) for listeners with `tls.acme`: one order and
//! renewal task per listener, driven by `rustls-acme` (TLS-ALPN-01 answered on the listener
//! itself), its account key and certificates cached in `cacheDir`. Kept across configuration
//! generations: a reload that leaves a listener's `acme` block alone keeps its certificate and
//! its renewal schedule.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use proxy_config::Acme;
use rustls::server::ResolvesServerCert;
use rustls_acme::caches::DirCache;
use rustls_acme::{AcmeConfig, EventOk};
use tracing::{info, warn};

use crate::metrics::ProxyMetrics;
use crate::sync::lock;
use crate::tls::{self, TlsError};

/// Why an ACME certificate source could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("acme.directoryCaFile")]
    DirectoryCa(#[source] Box<TlsError>),
    #[error("acme.directoryCaFile {path}: no usable CA certificate")]
    NoDirectoryCa { path: std::path::PathBuf },
}

struct Source {
    resolver: Arc<dyn ResolvesServerCert>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Source {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The ACME certificate sources of the process, by listener name.
pub struct AcmeCerts {
    sources: Mutex<HashMap<String, Source>>,
    metrics: ProxyMetrics,
}

impl AcmeCerts {
    pub fn new(metrics: ProxyMetrics) -> AcmeCerts {
        AcmeCerts { sources: Mutex::new(HashMap::new()), metrics }
    }

    /// The certificate source of `listener` for `acme`: the running one when its settings are
    /// unchanged, else a new one (the old one keeps running until [`AcmeCerts::retain`] drops
    /// it, so a reload that fails later changes nothing). Must be called inside the runtime.
    pub fn resolver(&self, listener: &str, acme: &Acme) -> Result<Arc<dyn ResolvesServerCert>, AcmeError> {
        let mut sources = lock(&self.sources);
        let key = format!("{listener}\0{}", acme_key(acme));
        if let Some(s) = sources.get(&key) {
            return Ok(s.resolver.clone());
        }
        let source = self.start(listener, acme)?;
        let resolver = source.resolver.clone();
        sources.insert(key, source);
        Ok(resolver)
    }

    /// Stops the sources the configuration in force no longer names.
    pub fn retain(&self, config: &proxy_config::ProxyConfig) {
        let wanted: Vec<String> = config
            .listeners
            .iter()
            .filter_map(|l| Some(format!("{}\0{}", l.name, acme_key(l.tls.as_ref()?.acme.as_ref()?))))
            .collect();
        lock(&self.sources).retain(|k, _| wanted.contains(k));
    }

    /// Stops every source (at the end of the drain).
    pub fn stop_all(&self) {
        lock(&self.sources).clear();
    }

    fn start(&self, listener: &str, acme: &Acme) -> Result<Source, AcmeError> {
        let provider = tls::provider();
        let config = match &acme.directory_ca_file {
            None => AcmeConfig::new_with_provider(&acme.domains, provider),
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                let certs = tls::read_certs(path).map_err(|e| AcmeError::DirectoryCa(Box::new(e)))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(AcmeError::NoDirectoryCa { path: path.clone() });
                }
                let client = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| AcmeError::DirectoryCa(Box::new(TlsError::Settings(e))))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                AcmeConfig::new_with_client_config(&acme.domains, Arc::new(client))
            }
        };
        let mut state = config
            .contact(&acme.contact)
            .directory(&acme.directory)
            .cache(DirCache::new(acme.cache_dir.clone()))
            .state();
        let resolver: Arc<dyn ResolvesServerCert> = state.resolver();
        let metrics = self.metrics.clone();
        let name = listener.to_owned();
        // The state stream orders, validates, deploys, caches and sleeps until the renewal time
        // (a third of the validity before expiry); on errors it backs off and retries while the
        // last good certificate keeps being served.
        let task = tokio::spawn(async move {
            while let Some(event) = state.next().await {
                let result = match event {
                    Ok(EventOk::DeployedCachedCert) => {
                        info!(listener = %name, "ACME certificate loaded from the cache");
                        "cached"
                    }
                    Ok(EventOk::DeployedNewCert) => {
                        info!(listener = %name, "ACME certificate issued and deployed");
                        "issued"
                    }
                    Ok(EventOk::CertCacheStore | EventOk::AccountCacheStore) => continue,
                    Err(e) => {
                        warn!(listener = %name, error = %e, "ACME: will retry, the current certificate stays in use");
                        "error"
                    }
                };
                metrics.acme_events.with_label_values(&[&name, result]).inc();
            }
        });
        Ok(Source { resolver, task })
    }
}

/// Identity of an ACME source: a change to any field is a new account or order.
fn acme_key(a: &Acme) -> String {
    format!("{:?}", (&a.directory, &a.domains, &a.contact, &a.cache_dir, &a.directory_ca_file))
}
