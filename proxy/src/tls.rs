//! TLS server side of a listener: certificates loaded from PEM files (chosen by SNI, see
//! [`sni`]) or obtained by ACME, the protocol floor, ALPN and client-certificate checks, compiled
//! into one [`TlsServer`] per listener and generation; [`handshake`] runs the handshake.

pub mod acme;
pub mod handshake;
pub mod sni;

use std::fs::File;
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use proxy_config::{ListenerTls, TlsFiles, TlsVersion};
use rustls::crypto::CryptoProvider;
use rustls::server::{ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

pub use handshake::{HandshakeError, TlsServer};

/// Why a certificate, key or CA bundle could not be used. Never includes key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no PEM private key found (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error("{path}: invalid PEM")]
    Pem {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: certificate is not valid now (notBefore {not_before}, notAfter {not_after})")]
    NotValidNow { path: PathBuf, not_before: String, not_after: String },
    #[error("{path}: cannot parse the leaf certificate")]
    Parse { path: PathBuf },
    #[error("certificate {cert} and key {key} cannot be used together")]
    Key {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{path}: CA bundle cannot be used to verify client certificates")]
    ClientCa {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("{path}: no PEM certificate revocation list found")]
    NoCrl { path: PathBuf },
    #[error("{path}: a CA certificate cannot be used")]
    CaCert {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("ACME")]
    Acme(#[source] acme::AcmeError),
    #[error("TLS settings")]
    Settings(#[source] rustls::Error),
}

/// The crypto provider of every TLS listener: aws-lc-rs (rustls' default), with the cipher suites
/// in the order the server picks from (see `SERVER_SUITES`). Not *ring*: X25519 was a quarter of
/// the proxy's CPU per resumed handshake with *ring*, and aws-lc's assembly does it in half the time.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites = SERVER_SUITES.to_vec();
    Arc::new(p)
}

/// The server's order of preference, applied whatever order the client lists (as
/// `ssl_prefer_server_ciphers` does elsewhere): AES-128-GCM with SHA-256 first, the suites
/// Mozilla's TLS guidelines list first too. A SHA-384 suite's key schedule costs a handshake
/// more hashing than a SHA-256 one, and SHA-256 has SHA-NI on current x86 and ARM CPUs where
/// SHA-512 often has no hardware path (AMD servers among them).
const SERVER_SUITES: &[rustls::SupportedCipherSuite] = {
    use rustls::crypto::aws_lc_rs::cipher_suite as s;
    &[
        s::TLS13_AES_128_GCM_SHA256,
        s::TLS13_AES_256_GCM_SHA384,
        s::TLS13_CHACHA20_POLY1305_SHA256,
        s::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        s::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        s::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        s::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        s::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        s::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ]
};

fn open(path: &Path) -> Result<BufReader<File>, TlsError> {
    File::open(path).map(BufReader::new).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

pub(crate) fn read_certs(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut open(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { path: path.to_owned(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_owned() });
    }
    Ok(certs)
}

/// A certificate pair ready to serve, with the DNS names its leaf is valid for.
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    /// Lower-case SAN dNSName entries (the subject CN when there are none), `*.` kept.
    pub names: Vec<String>,
    /// The leaf's notAfter, Unix time.
    pub not_after: i64,
}

/// Loads one pair: refuses a leaf outside its validity period (serving it would only fail every
/// handshake, and on reload the previous certificate is better) and a key that does not match.
pub fn load_pair(files: &TlsFiles, provider: &CryptoProvider) -> Result<LoadedCert, TlsError> {
    let chain = read_certs(&files.cert_file)?;
    let (names, not_after) = leaf_names(&files.cert_file, &chain[0])?;
    let key = rustls_pemfile::private_key(&mut open(&files.key_file)?)
        .map_err(|source| TlsError::Pem { path: files.key_file.clone(), source })?
        .ok_or_else(|| TlsError::NoKey { path: files.key_file.clone() })?;
    let key_err = |source| TlsError::Key { cert: files.cert_file.clone(), key: files.key_file.clone(), source };
    let signing = provider.key_provider.load_private_key(key).map_err(key_err)?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(key_err)?;
    Ok(LoadedCert { key: Arc::new(certified), names, not_after })
}

/// The leaf's names and notAfter; refuses one that is not valid now.
fn leaf_names(path: &Path, leaf: &rustls::pki_types::CertificateDer<'_>) -> Result<(Vec<String>, i64), TlsError> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|_| TlsError::Parse { path: path.to_owned() })?;
    let v = cert.validity();
    if !v.is_valid() {
        return Err(TlsError::NotValidNow {
            path: path.to_owned(),
            not_before: v.not_before.to_string(),
            not_after: v.not_after.to_string(),
        });
    }
    let mut names: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    if names.is_empty() {
        names.extend(cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).map(str::to_ascii_lowercase));
    }
    Ok((names, v.not_after.timestamp()))
}

/// Compiles a listener's `tls` block. `acme` is the certificate source when the block names an
/// ACME directory (kept across generations by the caller, so a reload never re-orders).
pub fn load(t: &ListenerTls, acme: Option<Arc<dyn ResolvesServerCert>>) -> Result<TlsServer, TlsError> {
    let provider = provider();
    let certs = t.certificates.iter().map(|f| load_pair(f, &provider)).collect::<Result<Vec<_>, _>>()?;
    let expires = certs.iter().map(|c| c.not_after).min();
    let sni = Arc::new(sni::SniCerts::new(certs));
    let versions: &[&rustls::SupportedProtocolVersion] = match t.min_version {
        TlsVersion::V1_2 => rustls::DEFAULT_VERSIONS,
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(TlsError::Settings)?;
    let builder = match &t.client_auth {
        None => builder.with_no_client_auth(),
        Some(c) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(&c.ca_file)? {
                roots.add(cert).map_err(|source| TlsError::CaCert { path: c.ca_file.clone(), source })?;
            }
            let mut v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            if let Some(path) = &c.crl_file {
                let crls = rustls_pemfile::crls(&mut open(path)?)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|source| TlsError::Pem { path: path.clone(), source })?;
                if crls.is_empty() {
                    return Err(TlsError::NoCrl { path: path.clone() });
                }
                v = v.with_crls(crls);
            }
            if !c.required {
                v = v.allow_unauthenticated();
            }
            let verifier = v.build().map_err(|source| TlsError::ClientCa { path: c.ca_file.clone(), source })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let is_acme = acme.is_some();
    let resolver: Arc<dyn ResolvesServerCert> = match acme {
        Some(a) => a,
        None => sni.clone(),
    };
    let mut cfg = builder.with_cert_resolver(resolver.clone());
    cfg.ignore_client_order = true;
    cfg.alpn_protocols = t.alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    // TLS-ALPN-01 validation connections get a configuration of their own: offering
    // acme-tls/1 to every client would refuse those whose ALPN lists nothing else we speak.
    let challenge = if is_acme {
        let mut c = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .map_err(TlsError::Settings)?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
        c.alpn_protocols = vec![handshake::ACME_TLS_ALPN.to_vec()];
        Some(Arc::new(c))
    } else {
        None
    };
    let mut server = TlsServer::new(Arc::new(cfg), sni, t.strict_sni && !is_acme, challenge);
    // ACME renews its own certificates (and counts them in acme_events); only files can lapse.
    server.expires = expires.filter(|_| !is_acme);
    Ok(server)
}
