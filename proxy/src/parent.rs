//! Leaving through a parent proxy, after the policy decided: the route's parents tried in order
//! (one that refuses the connection, times out, fails TLS or closes without answering is skipped
//! for its group's `retryAfter`; when every member is down they are all tried anyway), TLS to the
//! parent, a CONNECT naming the checked address or the name, and the parent's answer judged: a
//! `2xx` is a tunnel, anything else is the parent's refusal, passed to the client as a `502` that
//! names the parent and its status, never its credentials.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use proxy_config::{Authority, Host, Parent, Parents, Route, SendTarget};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at, Instant};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::dial::Resolver;
use crate::error::{ParentFailure, TunnelError};
use crate::metrics::ProxyMetrics;
use crate::prefixed::Prefixed;
use crate::sync::lock;

/// Largest response head a parent may send to a CONNECT.
const MAX_HEAD: usize = 16 * 1024;

/// Why a parent's files could not be loaded (the reload fails; the configuration in force stays).
#[derive(Debug, thiserror::Error)]
pub enum ParentFileError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: no CA certificate in it")]
    NoCa { path: PathBuf },
    #[error("{path}: not a usable CA certificate")]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{path}: must hold one line, user:password")]
    BadCredentials { path: PathBuf },
    #[error("TLS settings")]
    Tls(#[source] rustls::Error),
    #[error("tls.serverName {0:?} is not a valid name")]
    ServerName(String),
}

/// What dialling one parent needs, loaded from its files by each reload.
struct Dialer {
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// `Basic base64(user:password)`, when the parent takes credentials.
    authorization: Option<String>,
}

/// The parents of one configuration, ready to dial (index = index in `parents`).
pub struct ParentDialers(Vec<Dialer>);

impl ParentDialers {
    /// How plain-HTTP requests go through parent `i` of `parents`.
    pub fn http_via(&self, parents: &Parents, i: usize) -> Option<HttpVia> {
        let (p, d) = (parents.proxies.get(i)?, self.0.get(i)?);
        Some(HttpVia { parent: p.name.clone(), send_target: p.send_target, authorization: d.authorization.clone() })
    }

    /// Loads every parent's CA and credentials files; the error names the parent's index.
    pub fn load(parents: &Parents) -> Result<ParentDialers, (usize, ParentFileError)> {
        let mut out = Vec::new();
        for (i, p) in parents.proxies.iter().enumerate() {
            out.push(dialer(p).map_err(|e| (i, e))?);
        }
        Ok(ParentDialers(out))
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ParentFileError> {
    std::fs::read(path).map_err(|source| ParentFileError::Read { path: path.to_owned(), source })
}

fn dialer(p: &Parent) -> Result<Dialer, ParentFileError> {
    let tls = match &p.tls {
        None => None,
        Some(t) => {
            let pem = read(&t.ca_file)?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|source| ParentFileError::Read { path: t.ca_file.clone(), source })?;
                roots.add(cert).map_err(|source| ParentFileError::BadCa { path: t.ca_file.clone(), source })?;
            }
            if roots.is_empty() {
                return Err(ParentFileError::NoCa { path: t.ca_file.clone() });
            }
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(ParentFileError::Tls)?
                .with_root_certificates(roots)
                .with_no_client_auth();
            let name = ServerName::try_from(t.server_name.clone())
                .map_err(|_| ParentFileError::ServerName(t.server_name.clone()))?;
            Some((TlsConnector::from(Arc::new(config)), name))
        }
    };
    let authorization = match &p.credentials_file {
        None => None,
        Some(path) => {
            let bad = || ParentFileError::BadCredentials { path: path.clone() };
            let text = String::from_utf8(read(path)?).map_err(|_| bad())?;
            let line = proxy_config::parents::credentials_line(&text).ok_or_else(bad)?;
            Some(format!("Basic {}", STANDARD.encode(line)))
        }
    };
    Ok(Dialer { tls, authorization })
}

/// Which parents failed and until when they are skipped; kept across reloads (by name).
#[derive(Default)]
pub struct ParentHealth(Mutex<HashMap<String, Instant>>);

impl ParentHealth {
    fn down_until(&self, name: &str) -> Option<Instant> {
        lock(&self.0).get(name).copied().filter(|t| *t > Instant::now())
    }

    fn failed(&self, name: &str, retry_after: Duration) {
        lock(&self.0).insert(name.to_owned(), Instant::now() + retry_after);
    }

    /// The parent answered: it is up; true when it was marked down.
    fn answered(&self, name: &str) -> bool {
        lock(&self.0).remove(name).is_some()
    }

    /// Sets the parent gauges for `parents`: each parent up or down, each group's healthy
    /// members and the member in use (the first healthy one). Series of parents no longer
    /// configured are removed.
    pub fn publish(&self, parents: &Parents, m: &ProxyMetrics) {
        m.parent_up.reset();
        m.parent_group_healthy.reset();
        m.parent_group_active.reset();
        for p in &parents.proxies {
            m.parent_up.with_label_values(&[&p.name]).set(i64::from(self.down_until(&p.name).is_none()));
        }
        for g in &parents.groups {
            let healthy: Vec<&str> = g
                .members
                .iter()
                .filter_map(|&i| parents.proxies.get(i))
                .filter(|p| self.down_until(&p.name).is_none())
                .map(|p| p.name.as_str())
                .collect();
            m.parent_group_healthy.with_label_values(&[&g.name]).set(healthy.len() as i64);
            if let Some(first) = healthy.first() {
                m.parent_group_active.with_label_values(&[g.name.as_str(), first]).set(1);
            }
        }
    }
}

/// A connection to a parent: plain TCP or TLS.
pub enum ParentStream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for ParentStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ParentStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            ParentStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ParentStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ParentStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            ParentStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ParentStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            ParentStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ParentStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            ParentStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What dialling through parents needs of the configuration in force (a snapshot lends it).
pub struct Parenting<'a> {
    pub parents: &'a Parents,
    pub dialers: &'a ParentDialers,
    /// Resolves parents' names.
    pub resolver: &'a Resolver,
    /// How long a parent may take to answer a CONNECT (`http.responseHeadTimeout`).
    pub answer_timeout: Duration,
}

/// Where an allowed connection goes, with the parent carrying it (`None`: dialled directly): a
/// TCP connection (to the target, or to a plain parent that sent nothing past its answer), relayed
/// on the TCP fast path; or a parent's stream (TLS, or one whose reads first yield what the parent
/// sent after its answer's head).
pub enum Upstream {
    Tcp(TcpStream, Option<String>),
    Stream(Box<Prefixed<ParentStream>>, String),
}

impl Upstream {
    /// The parent carrying it, if one does.
    pub fn parent(&self) -> Option<&str> {
        match self {
            Upstream::Tcp(_, parent) => parent.as_deref(),
            Upstream::Stream(_, name) => Some(name),
        }
    }
}

/// What a parent is sent for a target the policy allowed at `addrs` (the CONNECT target, or the
/// authority of an absolute-form request): the checked address (`sendTarget: address`, the
/// default) or the name as the client sent it.
pub fn target_text(send: SendTarget, host: &Host, port: u16, addrs: &[IpAddr]) -> String {
    match (send, host, addrs.first()) {
        (SendTarget::Address, Host::Name(_), Some(ip)) => Authority { host: Host::Ip(*ip), port }.to_string(),
        _ => Authority { host: host.clone(), port }.to_string(),
    }
}

/// How an attempt on one parent failed.
enum Failure {
    /// The parent could not be used (it is then skipped for a while).
    Unreachable(ParentFailure, TunnelError),
    /// The parent answered with a status other than 2xx.
    Answered(u16),
}

/// Opens a tunnel to `host:port` (allowed at `addrs`) through `route`'s parents: a CONNECT, and
/// the parent's `2xx`.
pub async fn tunnel(
    parenting: &Parenting<'_>,
    health: &ParentHealth,
    m: &ProxyMetrics,
    route: Route,
    host: &Host,
    port: u16,
    addrs: &[IpAddr],
) -> Result<Upstream, TunnelError> {
    let (name, (stream, early)) = through(parenting, health, m, route, |p, d| async move {
        let mut stream = reach(parenting, m, p, d).await?;
        let early = exchange(parenting, &mut stream, d, &target_text(p.send_target, host, port, addrs)).await?;
        Ok((stream, early))
    })
    .await?;
    Ok(match stream {
        ParentStream::Tcp(tcp) if early.is_empty() => Upstream::Tcp(tcp, Some(name)),
        other => Upstream::Stream(Box::new(Prefixed::new(early, other)), name),
    })
}

/// A connection to one of `route`'s parents for plain-HTTP requests (sent in absolute form):
/// the stream, the parent's name, what its request target names and its `Proxy-Authorization`.
pub async fn http_connection(
    parenting: &Parenting<'_>,
    health: &ParentHealth,
    m: &ProxyMetrics,
    route: Route,
) -> Result<(ParentStream, HttpVia), TunnelError> {
    let (parent, (stream, send_target, authorization)) = through(parenting, health, m, route, |p, d| async move {
        let stream = reach(parenting, m, p, d).await?;
        Ok((stream, p.send_target, d.authorization.clone()))
    })
    .await?;
    Ok((stream, HttpVia { parent, send_target, authorization }))
}

/// How plain-HTTP requests are sent through a parent.
#[derive(Debug, Clone)]
pub struct HttpVia {
    pub parent: String,
    pub send_target: SendTarget,
    /// `Proxy-Authorization` for the parent (never logged).
    pub authorization: Option<String>,
}

impl HttpVia {
    /// The absolute-form target of a request for `host:port` (allowed at `addrs`) and
    /// `path_and_query`: the checked address or the name, as the parent is configured.
    pub fn absolute(&self, host: &Host, port: u16, addrs: &[IpAddr], path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", target_text(self.send_target, host, port, addrs))
    }
}

/// Tries `route`'s parents with `attempt` in order (healthy ones first; when all are down, all of
/// them, soonest back first) until one serves; records each outcome. Returns the parent's name.
async fn through<'a, T, F, Fut>(
    parenting: &'a Parenting<'a>,
    health: &ParentHealth,
    m: &ProxyMetrics,
    route: Route,
    mut attempt: F,
) -> Result<(String, T), TunnelError>
where
    F: FnMut(&'a Parent, &'a Dialer) -> Fut,
    Fut: std::future::Future<Output = Result<T, Failure>>,
{
    let parents = parenting.parents;
    let retry_after = parents.retry_after(route);
    let mut order: Vec<(Option<Instant>, usize)> = parents
        .members(route)
        .into_iter()
        .filter_map(|i| parents.proxies.get(i).map(|p| (health.down_until(&p.name), i)))
        .collect();
    order.sort_by_key(|(down, _)| *down);
    // Validation gives every route a member; an empty one fails as unreachable.
    let mut last =
        TunnelError::ParentUnreachable { parent: parents.name(route).to_owned(), failure: ParentFailure::Unreachable };
    for (_, i) in order {
        let (Some(p), Some(d)) = (parents.proxies.get(i), parenting.dialers.0.get(i)) else { continue };
        let started = Instant::now();
        match attempt(p, d).await {
            Ok(t) => {
                m.parent_requests.with_label_values(&[&p.name, "established"]).inc();
                m.parent_connect_duration.with_label_values(&[&p.name]).observe(started.elapsed().as_secs_f64());
                if health.answered(&p.name) {
                    health.publish(parents, m);
                }
                return Ok((p.name.clone(), t));
            }
            Err(Failure::Answered(status)) => {
                if health.answered(&p.name) {
                    health.publish(parents, m);
                }
                m.parent_requests.with_label_values(&[&p.name, "refused_by_parent"]).inc();
                return Err(TunnelError::ParentRefused { parent: p.name.clone(), status });
            }
            Err(Failure::Unreachable(kind, error)) => {
                m.parent_requests.with_label_values(&[&p.name, kind.as_str()]).inc();
                tracing::warn!(parent = %p.name, failure = kind.as_str(), error = %crate::error::ErrorChain(&error), "parent unusable");
                if !retry_after.is_zero() {
                    health.failed(&p.name, retry_after);
                    health.publish(parents, m);
                }
                last = TunnelError::ParentUnreachable { parent: p.name.clone(), failure: kind };
            }
        }
    }
    Err(last)
}

/// Connects to a parent (and completes TLS with it) within its connect timeout.
async fn reach(parenting: &Parenting<'_>, m: &ProxyMetrics, p: &Parent, d: &Dialer) -> Result<ParentStream, Failure> {
    let deadline = Instant::now() + p.connect_timeout;
    let addrs = match &p.address.host {
        Host::Ip(ip) => vec![*ip],
        Host::Name(n) => {
            parenting.resolver.resolve(n, m).await.map_err(|e| Failure::Unreachable(ParentFailure::DnsFailed, e))?
        }
    };
    let tcp = crate::dial::connect(&addrs, p.address.port, p.connect_timeout, m).await.map_err(|e| {
        let kind =
            if matches!(e, TunnelError::UpstreamTimeout) { ParentFailure::Timeout } else { ParentFailure::Unreachable };
        Failure::Unreachable(kind, e)
    })?;
    Ok(match &d.tls {
        None => ParentStream::Tcp(tcp),
        Some((connector, name)) => match timeout_at(deadline, connector.connect(name.clone(), tcp)).await {
            Ok(Ok(s)) => ParentStream::Tls(Box::new(s)),
            Ok(Err(e)) => return Err(Failure::Unreachable(ParentFailure::TlsFailed, TunnelError::UpstreamRefused(e))),
            Err(_) => return Err(Failure::Unreachable(ParentFailure::Timeout, TunnelError::UpstreamTimeout)),
        },
    })
}

/// Sends the CONNECT for `target` and reads the answer's head within `http.responseHeadTimeout`;
/// on a `2xx`, the bytes the parent sent after the head.
async fn exchange(
    parenting: &Parenting<'_>,
    stream: &mut ParentStream,
    d: &Dialer,
    target: &str,
) -> Result<Vec<u8>, Failure> {
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(auth) = &d.authorization {
        request.push_str("Proxy-Authorization: ");
        request.push_str(auth);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    let closed = |e: io::Error| Failure::Unreachable(ParentFailure::Closed, TunnelError::UpstreamRefused(e));
    stream.write_all(request.as_bytes()).await.map_err(closed)?;
    let (status, len, buf) = timeout(parenting.answer_timeout, read_head(stream))
        .await
        .map_err(|_| Failure::Unreachable(ParentFailure::Timeout, TunnelError::UpstreamResponseTimeout))?
        .map_err(closed)?;
    if (200..300).contains(&status) {
        Ok(buf.get(len..).unwrap_or_default().to_vec())
    } else {
        Err(Failure::Answered(status))
    }
}

/// Reads a response head: (status, head length, everything read).
async fn read_head(s: &mut ParentStream) -> io::Result<(u16, usize, Vec<u8>)> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 2048];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the parent closed before answering"));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = resp.code.unwrap_or(0);
                return Ok((status, len, buf));
            }
            Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "the parent's answer head is too large"))
            }
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parent(send: SendTarget) -> Parent {
        Parent {
            name: "corp".into(),
            address: "proxy.corp.example:3128".parse().unwrap(),
            tls: None,
            credentials_file: None,
            connect_timeout: Duration::from_secs(1),
            send_target: send,
        }
    }

    /// By default the parent is sent the address the proxy checked, never a name it would
    /// resolve again; with `sendTarget: name`, the name.
    #[test]
    fn the_parent_is_sent_the_checked_address_unless_told_to_send_the_name() {
        let host = Host::Name(proxy_config::host::normalize_name("api.example.com").unwrap());
        let addrs: Vec<IpAddr> = vec!["203.0.113.7".parse().unwrap(), "2001:db8::7".parse().unwrap()];
        assert_eq!(target_text(SendTarget::Address, &host, 443, &addrs), "203.0.113.7:443");
        assert_eq!(target_text(SendTarget::Name, &host, 443, &addrs), "api.example.com:443");
        let v6 = vec!["2001:db8::7".parse().unwrap()];
        assert_eq!(target_text(SendTarget::Address, &host, 443, &v6), "[2001:db8::7]:443");
    }

    /// A credentials file holds one `user:password` line; anything else fails the reload.
    #[test]
    fn credentials_files_hold_one_user_password_line() {
        let dir = std::env::temp_dir().join(format!("tg-parent-creds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c");
        let mut p = parent(SendTarget::Address);
        p.credentials_file = Some(path.clone());
        std::fs::write(&path, "alice:s3cret\n").unwrap();
        assert_eq!(dialer(&p).unwrap().authorization.as_deref(), Some("Basic YWxpY2U6czNjcmV0"));
        for bad in ["", "alice\n", "a:b\nc:d\n"] {
            std::fs::write(&path, bad).unwrap();
            assert!(matches!(dialer(&p), Err(ParentFileError::BadCredentials { .. })), "{bad:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
