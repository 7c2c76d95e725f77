//! One TLS handshake on a listener: the ClientHello is read first, so that ACME validation
//! connections and (on strict listeners) unknown server names are answered before any
//! certificate is chosen; what the handshake established is summarized in [`TlsFacts`].

use std::io;
use std::sync::Arc;

use rustls::server::Acceptor;
use rustls::{ProtocolVersion, ServerConfig, ServerConnection};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

use super::sni::SniCerts;

/// The ALPN protocol of ACME TLS-ALPN-01 validation (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// A plaintext fatal `unrecognized_name` alert (RFC 6066 §3), sent before any server flight.
const UNRECOGNIZED_NAME_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];

/// The TLS side of one listener for one configuration generation.
pub struct TlsServer {
    config: Arc<ServerConfig>,
    sni: Arc<SniCerts>,
    strict_sni: bool,
    /// Set on ACME listeners: the configuration that answers validation connections.
    challenge: Option<Arc<ServerConfig>>,
    /// The earliest notAfter (Unix time) of the certificate files it serves.
    pub expires: Option<i64>,
}

/// Why a handshake did not give a session.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS handshake failed")]
    Io(#[from] io::Error),
    #[error("TLS handshake refused: no certificate for the requested server name")]
    UnrecognizedName,
    /// An ACME server's validation connection was answered; there is nothing to relay.
    #[error("ACME validation connection")]
    AcmeChallenge,
}

impl HandshakeError {
    /// The `result` label of the handshake counter.
    pub fn label(&self) -> &'static str {
        match self {
            HandshakeError::Io(e) if e.kind() == io::ErrorKind::TimedOut => "timeout",
            HandshakeError::Io(_) => "failure",
            HandshakeError::UnrecognizedName => "unrecognized_name",
            HandshakeError::AcmeChallenge => "acme_challenge",
        }
    }
}

impl TlsServer {
    pub(super) fn new(
        config: Arc<ServerConfig>,
        sni: Arc<SniCerts>,
        strict_sni: bool,
        challenge: Option<Arc<ServerConfig>>,
    ) -> TlsServer {
        TlsServer { config, sni, strict_sni, challenge, expires: None }
    }

    /// Runs the server side of the handshake on `io`.
    pub async fn accept<IO: AsyncRead + AsyncWrite + Unpin>(&self, io: IO) -> Result<TlsStream<IO>, HandshakeError> {
        let start = LazyConfigAcceptor::new(Acceptor::default(), io).await?;
        let hello = start.client_hello();
        if let Some(challenge) = &self.challenge {
            if hello.alpn().is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN)) {
                let mut s = start.into_stream(challenge.clone()).await?;
                let _ = s.shutdown().await;
                return Err(HandshakeError::AcmeChallenge);
            }
        }
        if self.strict_sni && self.sni.matching(hello.server_name()).is_none() {
            let mut pending = start.into_stream(self.config.clone());
            if let Some(io) = pending.get_mut() {
                let _ = io.write_all(&UNRECOGNIZED_NAME_ALERT).await;
                let _ = io.shutdown().await;
            }
            return Err(HandshakeError::UnrecognizedName);
        }
        Ok(start.into_stream(self.config.clone()).await?)
    }
}

/// What a finished handshake tells about the client, for metrics and PROXY v2 TLVs.
#[derive(Debug, Clone, Default)]
pub struct TlsFacts {
    pub sni: Option<String>,
    pub alpn: Option<Vec<u8>>,
    /// `TLSv1.2` / `TLSv1.3`, the spelling of OpenSSL and HAProxy's `ssl_fc_protocol`.
    pub version: &'static str,
    /// IANA cipher suite name.
    pub cipher: Option<&'static str>,
    /// The client presented a certificate, and it was verified (only possible with
    /// `clientAuth`; a certificate that fails verification ends the handshake).
    pub client_cert: bool,
    /// The verified client certificate's subject common name.
    pub client_cn: Option<String>,
}

impl TlsFacts {
    pub fn of(conn: &ServerConnection) -> TlsFacts {
        let leaf = conn.peer_certificates().and_then(|c| c.first());
        TlsFacts {
            sni: conn.server_name().map(str::to_owned),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            version: version_name(conn.protocol_version()),
            cipher: conn.negotiated_cipher_suite().and_then(|s| s.suite().as_str()),
            client_cert: leaf.is_some(),
            client_cn: leaf.and_then(|der| {
                let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
                let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_owned();
                Some(cn)
            }),
        }
    }
}

/// The `version` label: a closed set.
pub fn version_name(v: Option<ProtocolVersion>) -> &'static str {
    match v {
        Some(ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "unknown",
    }
}
