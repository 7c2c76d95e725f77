//! The configuration in force, compiled for use: policy, resolver and TLS acceptors, stamped
//! with a generation and the SHA-256 of the document. Connections take one `Arc` at accept.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use proxy_config::status::{ConfigStatus, LastReload};
use proxy_config::ProxyConfig;
use sha2::{Digest, Sha256};

use crate::admin_token::{AdminToken, AdminTokenError};
use crate::auth::{AuthFileError, AuthMemory, Authenticator};
use crate::dial::{Resolver, ResolverError};
use crate::ratelimit::RequestLimiter;
use crate::tls::acme::AcmeCerts;
use crate::tls::{self, TlsError, TlsServer};

/// Why a configuration could not be made into a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("listeners[{index}] ({name}): TLS")]
    Tls {
        index: usize,
        name: String,
        #[source]
        source: Box<TlsError>,
    },
    #[error("dns")]
    Resolver(#[source] ResolverError),
    #[error("auth.htpasswdFile")]
    Auth(#[source] AuthFileError),
    #[error("admin.configTokenFile")]
    AdminToken(#[source] AdminTokenError),
    #[error("parents[{index}] ({name})")]
    Parent {
        index: usize,
        name: String,
        #[source]
        source: crate::parent::ParentFileError,
    },
}

/// A compiled configuration.
pub struct Snapshot {
    pub config: ProxyConfig,
    /// 1 for the first config, +1 for every successful reload.
    pub generation: u64,
    /// Hex SHA-256 of the document text.
    pub sha256: String,
    /// Hex SHA-256 of the text and of every TLS file it names: equal means nothing to reload.
    pub fingerprint: String,
    pub loaded_at: SystemTime,
    /// The operator's render number (`# tunnelgate-render: N` in the document), when it has one.
    pub render: Option<u64>,
    pub resolver: Resolver,
    /// TLS servers by listener name.
    pub tls: HashMap<String, Arc<TlsServer>>,
    /// Proxy authentication, when `auth` is configured (the users of this generation).
    pub auth: Option<Authenticator>,
    /// Per-client request rate limit, when `limits.requestsPerSecond` is set. A new generation
    /// starts with full buckets.
    pub request_limiter: Option<RequestLimiter>,
    /// The token `/config` requires, when `admin.configTokenFile` is set.
    pub admin_token: Option<AdminToken>,
    /// The parent proxies, ready to dial (their CA and credentials files read).
    pub parents: crate::parent::ParentDialers,
}

impl Snapshot {
    /// Compiles `config` (parsed from `text`) into generation `generation`. ACME listeners take
    /// their certificates from `acme`, and authentication remembers through `auth_memory`; both
    /// outlive generations.
    pub fn build(
        config: ProxyConfig,
        text: &str,
        generation: u64,
        acme: &AcmeCerts,
        auth_memory: &Arc<AuthMemory>,
    ) -> Result<Snapshot, SnapshotError> {
        // The digest is taken before the files are loaded: a file that changes while this runs
        // then differs from the digest, and the next check reloads it. (Taken after, it could
        // record the new content while the old one was loaded, and the change would be missed.)
        let fingerprint = fingerprint(&config, text);
        let mut acceptors = HashMap::new();
        for (index, l) in config.listeners.iter().enumerate() {
            if let Some(t) = &l.tls {
                let err = |source| SnapshotError::Tls { index, name: l.name.clone(), source: Box::new(source) };
                let acme_certs = match &t.acme {
                    Some(a) => Some(acme.resolver(&l.name, a).map_err(|e| err(TlsError::Acme(e)))?),
                    None => None,
                };
                acceptors.insert(l.name.clone(), Arc::new(tls::load(t, acme_certs).map_err(err)?));
            }
        }
        let resolver = Resolver::new(&config.dns).map_err(SnapshotError::Resolver)?;
        let request_limiter = RequestLimiter::new(&config.limits);
        let auth = match &config.auth {
            Some(a) => Some(
                Authenticator::load(&a.htpasswd_file, &a.realm, auth_memory.clone()).map_err(SnapshotError::Auth)?,
            ),
            None => None,
        };
        let parents = crate::parent::ParentDialers::load(&config.parents).map_err(|(index, source)| {
            let name = config.parents.proxies.get(index).map(|p| p.name.clone()).unwrap_or_default();
            SnapshotError::Parent { index, name, source }
        })?;
        let admin_token = match &config.admin.config_token_file {
            Some(path) => Some(AdminToken::load(path).map_err(SnapshotError::AdminToken)?),
            None => None,
        };
        Ok(Snapshot {
            fingerprint,
            config,
            generation,
            sha256: hex::encode(Sha256::digest(text.as_bytes())),
            loaded_at: SystemTime::now(),
            render: proxy_config::status::render_of(text),
            resolver,
            tls: acceptors,
            request_limiter,
            auth,
            admin_token,
            parents,
        })
    }

    /// What dialling through this configuration's parents needs.
    pub fn parenting(&self) -> crate::parent::Parenting<'_> {
        crate::parent::Parenting {
            parents: &self.config.parents,
            dialers: &self.parents,
            resolver: &self.resolver,
            answer_timeout: self.config.http.response_head_timeout,
        }
    }

    /// The `/config` document: what is in force, without any secret, and whether the last reload
    /// failed (with a closed-set reason).
    pub fn describe(&self, reload_failure: Option<&str>) -> ConfigStatus {
        ConfigStatus {
            generation: self.generation,
            sha256: self.sha256.clone(),
            render: self.render,
            loaded_at: humantime::format_rfc3339_seconds(self.loaded_at).to_string(),
            last_reload: LastReload { failed: reload_failure.is_some(), reason: reload_failure.map(str::to_owned) },
            changes: 0,
            dry_run: Default::default(),
        }
    }
}

/// Digest of `text` and of the TLS files `config` names (unreadable files count as empty, so
/// a file that comes back changes the digest).
pub fn fingerprint(config: &ProxyConfig, text: &str) -> String {
    let mut h = Sha256::new();
    h.update(text.as_bytes());
    for path in watched_files(config) {
        h.update([0u8]);
        h.update(std::fs::read(path).unwrap_or_default());
    }
    hex::encode(h.finalize())
}

/// The files a configuration names besides itself (TLS certificates and keys, the htpasswd
/// file, the admin token, parents' CAs and credentials): a change to any of them is a reload.
pub fn watched_files(config: &ProxyConfig) -> Vec<&std::path::Path> {
    let tls = config.listeners.iter().filter_map(|l| l.tls.as_ref());
    let mut files: Vec<&std::path::Path> = tls.flat_map(|t| t.files()).collect();
    files.extend(config.auth.as_ref().map(|a| a.htpasswd_file.as_path()));
    files.extend(config.admin.config_token_file.as_deref());
    for p in &config.parents.proxies {
        files.extend(p.tls.as_ref().map(|t| t.ca_file.as_path()));
        files.extend(p.credentials_file.as_deref());
    }
    files
}

/// A shared, immutable snapshot.
pub type SharedSnapshot = Arc<Snapshot>;

/// Logs what a loaded configuration says that does not do what it reads like (the same warnings
/// `check` prints).
pub(crate) fn log_warnings(cfg: &ProxyConfig) {
    for w in cfg.warnings() {
        tracing::warn!(path = %w.path, "{}", w.message);
    }
}
