//! Test harness: the stub DNS server (testkit's), loopback upstreams that count their
//! connections, the proxy started in-process, and raw-socket client helpers.

#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use testkit::dns::{Answer, DnsStub};
pub use testkit::free_port;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tunnelgate_proxy::app::{self, ProxyHandle};

/// A loopback TCP server that counts the connections it accepted.
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
}

impl Upstream {
    /// Serves every connection with `handler` on `ip`:0.
    pub async fn start<F, Fut>(ip: &str, handler: F) -> Upstream
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let l = TcpListener::bind((ip.parse::<IpAddr>().unwrap(), 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let acc = accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                acc.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(handler(s));
            }
        });
        Upstream { addr, accepted }
    }

    /// An echo server: returns every byte, and half-closes when the client does.
    pub async fn echo(ip: &str) -> Upstream {
        Upstream::start(ip, |mut s| async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        })
        .await
    }

    pub fn count(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// The standard world: stub DNS, an echo upstream on 127.0.0.2 and a sink on 127.0.0.3 that
/// stands in for addresses that must never be reached.
pub struct World {
    pub dns: DnsStub,
    pub echo: Upstream,
    pub sink: Upstream,
}

impl World {
    pub async fn new() -> World {
        let dns = DnsStub::start().await;
        let echo = Upstream::echo("127.0.0.2").await;
        let sink = Upstream::echo("127.0.0.3").await;
        dns.set("allowed.test", Answer::Addrs(vec!["127.0.0.2".parse().unwrap()]));
        dns.set("denied.test", Answer::Addrs(vec!["127.0.0.2".parse().unwrap()]));
        dns.set("internal.attacker.test", Answer::Addrs(vec!["127.0.0.3".parse().unwrap()]));
        dns.set("metadata.google.internal", Answer::Addrs(vec!["169.254.169.254".parse().unwrap()]));
        World { dns, echo, sink }
    }

    /// A config: default deny; `allowed.test` (and subdomains) allowed, reachable because
    /// 127.0.0.2 is listed; `denied.test` denied; `extra` is appended to the document.
    pub fn config(&self, extra: &str) -> String {
        format!(
            r#"version: 1
listeners: [{{name: forward, bind: "127.0.0.1:0"}}]
admin: {{bind: "127.0.0.1:0"}}
dns: {{nameservers: ["{dns}"], timeout: 1s}}
limits: {{drainDelay: 0s, requestHeadTimeout: 5s}}
policy:
  defaultAction: deny
  rules:
    - {{name: allow-test, action: allow, hosts: [allowed.test, "*.allowed.test"]}}
    - {{name: echo-addr, action: allow, cidrs: ["127.0.0.2/32"]}}
    - {{name: blocklist, action: deny, hosts: [denied.test]}}
{extra}"#,
            dns = self.dns.addr
        )
    }

    pub async fn proxy(&self, extra: &str) -> ProxyHandle {
        start_proxy(&self.config(extra)).await
    }

    pub fn echo_target(&self, host: &str) -> String {
        format!("{host}:{}", self.echo.addr.port())
    }
}

pub async fn start_proxy(yaml: &str) -> ProxyHandle {
    let cfg = proxy_config::ProxyConfig::from_yaml(yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    app::start(cfg, yaml).await.unwrap()
}

pub fn addr(p: &ProxyHandle) -> SocketAddr {
    p.listeners[0].1
}

/// Reads a response head byte by byte (so nothing after it is consumed); returns status and head.
pub async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> (u16, String) {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await {
            Ok(Ok(1)) => head.push(b[0]),
            Ok(Ok(_)) => break,
            Ok(Err(e)) => panic!("read error: {e}; got {:?}", String::from_utf8_lossy(&head)),
            Err(_) => panic!("no response head; got {:?}", String::from_utf8_lossy(&head)),
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

/// Sends raw `bytes` and returns the whole answer up to EOF, panicking if the proxy does not
/// close within 10 s. Returns (status, full text).
pub async fn exchange(proxy: SocketAddr, bytes: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let _ = s.write_all(bytes).await;
    read_to_close(&mut s).await
}

/// Reads until EOF (or reset after a complete answer); panics if the peer keeps it open.
pub async fn read_to_close<S: AsyncRead + Unpin>(s: &mut S) -> (u16, String) {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_secs(120), s.read(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => break,
            Err(_) => panic!("connection not closed; got {:?}", String::from_utf8_lossy(&out)),
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

/// Opens a tunnel to `target` and asserts the exact 200 answer.
pub async fn tunnel(proxy: SocketAddr, target: &str) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).await.unwrap();
    let (status, head) = read_head(&mut s).await;
    assert_eq!(status, 200, "{head}");
    assert_eq!(head, "HTTP/1.1 200 Connection established\r\n\r\n");
    s
}

/// Writes `msg` and expects it echoed back.
pub async fn roundtrip<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got)).await.unwrap().unwrap();
    assert_eq!(got, msg);
}

/// Fetches an admin path; returns (status, body).
pub async fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let (status, text) = read_to_close(&mut s).await;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// The value of a metric sample line that starts with `prefix` (name plus labels).
pub async fn metric(admin: SocketAddr, prefix: &str) -> f64 {
    let (_, body) = admin_get(admin, "/metrics").await;
    body.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// The metric once `want` holds for it, or its value after 5 s. Connections are served on worker
/// threads, which may count an event just after the client saw its effect.
pub async fn metric_when(admin: SocketAddr, prefix: &str, want: impl Fn(f64) -> bool) -> f64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let v = metric(admin, prefix).await;
        if want(v) || tokio::time::Instant::now() >= deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `f` every 20 ms until it returns true, for at most `secs` seconds.
pub async fn eventually<F, Fut>(secs: u64, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
