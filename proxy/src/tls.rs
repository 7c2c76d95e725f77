//! TLS server configuration for listeners whose clients speak TLS to the proxy: PEM chain and
//! key (PKCS#8, PKCS#1 or SEC1) loaded from files, key checked against the certificate.

use std::fs::File;
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use proxy_config::TlsFiles;
use rustls::ServerConfig;

/// Why a certificate or key could not be used. Never includes key material.
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
    Rustls {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

fn open(path: &Path) -> Result<BufReader<File>, TlsError> {
    File::open(path).map(BufReader::new).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

/// Refuses a leaf certificate outside its validity period: serving it would only fail every
/// handshake, and on reload the previous certificate is better.
fn check_validity(path: &Path, leaf: &rustls::pki_types::CertificateDer<'_>) -> Result<(), TlsError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|_| TlsError::Parse { path: path.to_owned() })?;
    let v = cert.validity();
    if v.is_valid() {
        Ok(())
    } else {
        Err(TlsError::NotValidNow {
            path: path.to_owned(),
            not_before: v.not_before.to_string(),
            not_after: v.not_after.to_string(),
        })
    }
}

/// Loads `files` into a rustls server configuration (TLS 1.2 and 1.3 only; ALPN http/1.1).
pub fn load(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = rustls_pemfile::certs(&mut open(&files.cert_file)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { path: files.cert_file.clone(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: files.cert_file.clone() });
    }
    check_validity(&files.cert_file, &certs[0])?;
    let key = rustls_pemfile::private_key(&mut open(&files.key_file)?)
        .map_err(|source| TlsError::Pem { path: files.key_file.clone(), source })?
        .ok_or_else(|| TlsError::NoKey { path: files.key_file.clone() })?;
    let rustls_err = |source| TlsError::Rustls { cert: files.cert_file.clone(), key: files.key_file.clone(), source };
    let mut cfg = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(rustls_err)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(rustls_err)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
