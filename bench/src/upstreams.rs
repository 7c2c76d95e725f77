//! Loopback upstreams shared by all targets: a sink, an echo, HTTP servers, a TLS echo under a
//! made-up name.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::Res;

/// Loopback upstreams shared by all targets.
pub(crate) struct Upstreams {
    /// Reads an 8-byte length, then that many bytes, then answers with the count. (It does not
    /// wait for EOF: Squid and tinyproxy close both directions on the client's FIN.)
    pub(crate) sink: SocketAddr,
    /// Echoes everything.
    pub(crate) echo: SocketAddr,
    /// Reads "ping", writes "pong", closes.
    pub(crate) hello: SocketAddr,
    /// Accepts and holds connections.
    pub(crate) hold: SocketAddr,
    /// HTTP/1.1 keep-alive server: `/10` answers 10 bytes, `/100k` 100 KiB.
    pub(crate) http: SocketAddr,
    /// TLS (1.3) echo with a certificate for [`TLS_NAME`], and a client configuration trusting it.
    pub(crate) tls: SocketAddr,
    pub(crate) tls_client: Arc<rustls::ClientConfig>,
}

/// The TLS echo's name: resolved by the bench's own DNS stub (to 127.0.0.1), never by a real resolver.
pub(crate) const TLS_NAME: &str = "echo.bench.test";

/// A TLS 1.3 echo server with a fresh self-signed certificate for [`TLS_NAME`], and a client
/// configuration that trusts it.
async fn tls_echo() -> Res<(SocketAddr, Arc<rustls::ClientConfig>)> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cert = rcgen::generate_simple_self_signed(vec![TLS_NAME.to_owned()])?;
    let der = cert.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der)?;
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let addr = serve(move |s| {
        let acceptor = acceptor.clone();
        async move {
            if let Ok(tls) = acceptor.accept(s).await {
                let (mut r, mut w) = tokio::io::split(tls);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        }
    })
    .await?;
    Ok((addr, Arc::new(client)))
}

pub(crate) async fn serve<F, Fut>(f: F) -> Res<SocketAddr>
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(f(s));
        }
    });
    Ok(addr)
}

pub(crate) async fn upstreams() -> Res<Upstreams> {
    let sink = serve(|mut s| async move {
        let mut len = [0u8; 8];
        if s.read_exact(&mut len).await.is_err() {
            return;
        }
        let want = u64::from_be_bytes(len);
        let mut buf = vec![0u8; 256 * 1024];
        let mut n = 0u64;
        while n < want {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k as u64,
            }
        }
        let _ = s.write_all(&n.to_be_bytes()).await;
    })
    .await?;
    let echo = serve(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await?;
    let hello = serve(|mut s| async move {
        let mut b = [0u8; 4];
        if s.read_exact(&mut b).await.is_ok() {
            let _ = s.write_all(b"pong").await;
        }
    })
    .await?;
    let hold = serve(|mut s| async move {
        let mut b = [0u8; 1];
        let _ = s.read(&mut b).await;
    })
    .await?;
    let http = serve(|s| async move {
        let _ = http_server(s).await;
    })
    .await?;
    let (tls, tls_client) = tls_echo().await?;
    Ok(Upstreams { sink, echo, hello, hold, http, tls, tls_client })
}

/// A minimal keep-alive HTTP/1.1 server for requests without a body: `/10`, `/1k` and `/100k`
/// answer that many bytes; a request with `Connection: close` is answered and the connection closed.
pub(crate) async fn http_server<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
) -> std::io::Result<()> {
    let body = |n: usize, close: bool| {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n{}\r\n",
            if close { "Connection: close\r\n" } else { "" }
        )
        .into_bytes();
        r.resize(r.len() + n, b'x');
        r
    };
    let answers: Vec<[Vec<u8>; 2]> = [10, 1024, 102_400].iter().map(|&n| [body(n, false), body(n, true)]).collect();
    let mut buf = Vec::with_capacity(4096);
    let mut tmp = [0u8; 4096];
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = s.read(&mut tmp).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&tmp[..n]);
        };
        let head = &buf[..end];
        let size =
            if head.windows(5).any(|w| w == b"/100k") { 2 } else { usize::from(head.windows(3).any(|w| w == b"/1k")) };
        let close = head.to_ascii_lowercase().windows(17).any(|w| w == b"connection: close");
        buf.drain(..end);
        s.write_all(&answers[size][usize::from(close)]).await?;
        if close {
            return s.shutdown().await;
        }
    }
}
