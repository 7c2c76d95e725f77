//! `tunnelgate-bench`: runs each scenario directly and through each proxy in turn (Tunnelgate,
//! Squid, tinyproxy, http-tunnel) against loopback upstreams it starts itself, and prints medians
//! over rounds with the ratio of each proxy to the direct connection: CONNECT tunnels (bulk,
//! setup, round trips, idle memory) and plain-HTTP forwarding (keep-alive and per-request
//! connections, with proxy CPU per request); and TLS termination against hitch, stunnel, HAProxy
//! and nginx ([`termination`]). It measures; it never asserts.

use std::error::Error;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

mod reload;
mod termination;

type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// Benchmark Tunnelgate against a direct connection and peer proxies.
#[derive(Parser, Debug, Clone)]
struct Args {
    /// The tunnelgate-proxy binary (build it with `cargo build --release -p tunnelgate-proxy`).
    #[arg(long, default_value = "target/release/tunnelgate-proxy")]
    proxy_bin: PathBuf,
    /// Rounds per scenario; the table shows medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Bytes each bulk tunnel carries.
    #[arg(long, default_value_t = 1 << 30)]
    bulk_bytes: u64,
    /// Seconds each timed scenario runs per round.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Idle tunnels opened for the memory scenario.
    #[arg(long, default_value_t = 5000)]
    idle_tunnels: usize,
    /// Extra arguments for tunnelgate-proxy (repeatable), e.g. `--proxy-arg=--worker-threads=1`.
    #[arg(long = "proxy-arg", allow_hyphen_values = true)]
    proxy_args: Vec<String>,
    /// Only these targets (comma-separated: direct,tunnelgate,squid,tinyproxy,http-tunnel for the
    /// forward suite, plus haproxy (CONNECT through a Lua action) and the no-parsing floors
    /// tunnelgate-l4 and haproxy-l4, which run only when named; plain,tunnelgate,hitch,stunnel,
    /// haproxy,nginx for termination).
    #[arg(long)]
    only: Option<String>,
    /// Which suites: forward (CONNECT and plain HTTP), termination (TLS in front of a backend),
    /// reload (cost of a 300 KB and a 3 MB rendered configuration), all (forward and termination).
    #[arg(long, default_value = "all", value_parser = ["forward", "termination", "reload", "all"])]
    suite: String,
    /// Only these scenarios of the forward suite (comma-separated: bulk,setup,round-trips,http,idle),
    /// e.g. to profile one of them.
    #[arg(long)]
    scenarios: Option<String>,
}

/// Something a client connects through.
struct Target {
    name: &'static str,
    proxy: Option<SocketAddr>,
    /// Fixed forwarders, one per upstream (upstream, where to connect): a relay with no request
    /// to parse, the floor a CONNECT proxy's cost is measured against.
    l4: Vec<(SocketAddr, SocketAddr)>,
    child: Option<Child>,
    _dir: Option<TempDir>,
}

impl Target {
    /// Where a connection to `upstream` goes without CONNECT: the fixed forwarder for it, or the
    /// upstream itself.
    fn front(&self, upstream: SocketAddr) -> SocketAddr {
        self.l4.iter().find(|(u, _)| *u == upstream).map_or(upstream, |(_, f)| *f)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            stop_child(c);
        }
    }
}

/// Stops a peer with the processes it started: SIGTERM first, which a master process (nginx,
/// hitch, Squid) passes on to its workers — after a SIGKILL they would keep running, listening
/// and taking CPU in the scenarios after — and SIGKILL if it has not exited within two seconds.
fn stop_child(child: &mut Child) {
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    for _ in 0..40 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Res<TempDir> {
        let p = std::env::temp_dir().join(format!("tunnelgate-bench-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p)?;
        // Squid and tinyproxy drop privileges; let them write their logs and pid files.
        let _ = Command::new("chmod").arg("777").arg(&p).status();
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> Res<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(bin)).find(|p| p.is_file()))
}

async fn wait_port(addr: SocketAddr) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("nothing listening on {addr}").into())
}

async fn spawn(name: &'static str, mut cmd: Command, port: u16, dir: TempDir) -> Res<Target> {
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let t = Target { name, proxy: Some(addr), l4: Vec::new(), child: Some(child), _dir: Some(dir) };
    wait_port(addr).await?;
    Ok(t)
}

async fn start_tunnelgate(bin: &Path, extra: &[String]) -> Res<Target> {
    let dir = TempDir::new("tunnelgate")?;
    let (port, admin) = (free_port()?, free_port()?);
    let cfg = format!(
        "version: 1\nlisteners: [{{name: forward, bind: '127.0.0.1:{port}'}}]\nadmin: {{bind: '127.0.0.1:{admin}'}}\npolicy:\n  rules:\n    - {{name: loopback, action: allow, cidrs: ['127.0.0.1/32']}}\nrelay: {{idleTimeout: 10m}}\nlimits: {{maxConnections: 100000, maxConnectionsPerClient: 100000, drainDelay: 0s, drainTimeout: 1s}}\n# The peers run without access logs too.\nlogging: {{accessLog: false}}\n"
    );
    let path = dir.0.join("config.yaml");
    std::fs::write(&path, cfg)?;
    let mut cmd = Command::new(bin);
    cmd.arg("--config").arg(&path).args(extra).env("TUNNELGATE_LOG", "warn");
    spawn("tunnelgate", cmd, port, dir).await
}

/// HAProxy as a CONNECT proxy: TCP mode, a Lua action that reads the CONNECT head, answers 200
/// and sets the destination (HAProxy has no CONNECT of its own).
async fn start_haproxy() -> Res<Option<Target>> {
    let Some(bin) = which("haproxy") else { return Ok(None) };
    let dir = TempDir::new("haproxy")?;
    let port = free_port()?;
    let lua = dir.0.join("connect.lua");
    std::fs::write(
        &lua,
        r#"core.register_action("connect", {"tcp-req"}, function(txn)
  local data = txn.req:dup()
  local hend = data:find("\r\n\r\n", 1, true)
  local host, port = data:match("^CONNECT ([%d%.]+):(%d+) HTTP/1%.[01]\r\n")
  if not hend or not host then
    txn.res:send("HTTP/1.1 400 Bad Request\r\n\r\n")
    txn:done()
    return
  end
  txn.req:remove(0, hend + 3)
  txn:set_var("txn.dst_ip", host)
  txn:set_var("txn.dst_port", tonumber(port))
  txn.res:send("HTTP/1.1 200 Connection established\r\n\r\n")
end)
"#,
    )?;
    // maxconn 8000: HAProxy asks for about two descriptors per connection, within the 20,000 here.
    let cfg = format!(
        "global\n  nbthread 2\n  maxconn 8000\n  lua-load {}\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 600s\n  timeout server 600s\nfrontend f\n  bind 127.0.0.1:{port}\n  tcp-request inspect-delay 5s\n  tcp-request content lua.connect if {{ req.payload(0,0) -m reg \\r\\n\\r\\n }}\n  tcp-request content set-dst var(txn.dst_ip)\n  tcp-request content set-dst-port var(txn.dst_port)\n  default_backend b\nbackend b\n  server s 0.0.0.0:0\n",
        lua.display()
    );
    std::fs::write(dir.0.join("haproxy.cfg"), cfg)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-db").arg("-f").arg(dir.0.join("haproxy.cfg"));
    Ok(Some(spawn("haproxy", cmd, port, dir).await?))
}

/// A fixed forwarder per upstream: (name, upstream) pairs and their front ports.
fn l4_fronts(up: &Upstreams) -> Res<Vec<(&'static str, SocketAddr, u16)>> {
    [("sink", up.sink), ("echo", up.echo), ("hello", up.hello), ("hold", up.hold), ("http", up.http)]
        .into_iter()
        .map(|(n, u)| Ok((n, u, free_port()?)))
        .collect()
}

/// Starts a fixed-forwarder target and waits for its fronts.
async fn spawn_l4(
    name: &'static str,
    mut cmd: Command,
    fronts: &[(&'static str, SocketAddr, u16)],
    dir: TempDir,
) -> Res<Target> {
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    let l4: Vec<(SocketAddr, SocketAddr)> =
        fronts.iter().map(|(_, u, p)| Ok((*u, format!("127.0.0.1:{p}").parse()?))).collect::<Res<_>>()?;
    let t = Target { name, proxy: None, l4, child: Some(child), _dir: Some(dir) };
    for (_, front) in &t.l4 {
        wait_port(*front).await?;
    }
    Ok(t)
}

/// Tunnelgate's own floor: `mode: tunnel` listeners, one per upstream (no CONNECT to parse).
async fn start_tunnelgate_l4(bin: &Path, up: &Upstreams, extra: &[String]) -> Res<Target> {
    let dir = TempDir::new("tunnelgate-l4")?;
    let fronts = l4_fronts(up)?;
    let admin = free_port()?;
    let mut cfg = String::from("version: 1\nlisteners:\n");
    for (n, u, p) in &fronts {
        cfg.push_str(&format!("  - {{name: {n}, bind: '127.0.0.1:{p}', mode: tunnel, upstream: '{u}'}}\n"));
    }
    cfg.push_str(&format!("admin: {{bind: '127.0.0.1:{admin}'}}\nrelay: {{idleTimeout: 10m}}\nlimits: {{maxConnections: 100000, maxConnectionsPerClient: 100000, drainDelay: 0s, drainTimeout: 1s}}\nlogging: {{accessLog: false}}\n"));
    let path = dir.0.join("config.yaml");
    std::fs::write(&path, cfg)?;
    let mut cmd = Command::new(bin);
    cmd.arg("--config").arg(&path).args(extra).env("TUNNELGATE_LOG", "warn");
    spawn_l4("tunnelgate-l4", cmd, &fronts, dir).await
}

/// HAProxy's plain TCP relay (mode tcp, one frontend per upstream): the no-parsing floor.
async fn start_haproxy_l4(up: &Upstreams) -> Res<Option<Target>> {
    let Some(bin) = which("haproxy") else { return Ok(None) };
    let dir = TempDir::new("haproxy-l4")?;
    let fronts = l4_fronts(up)?;
    let mut cfg = String::from("global\n  nbthread 2\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 600s\n  timeout server 600s\n");
    for (n, u, p) in &fronts {
        cfg.push_str(&format!("listen {n}\n  bind 127.0.0.1:{p}\n  server s {u}\n"));
    }
    std::fs::write(dir.0.join("haproxy.cfg"), cfg)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-db").arg("-f").arg(dir.0.join("haproxy.cfg"));
    Ok(Some(spawn_l4("haproxy-l4", cmd, &fronts, dir).await?))
}

async fn start_squid() -> Res<Option<Target>> {
    let Some(bin) = which("squid") else { return Ok(None) };
    let dir = TempDir::new("squid")?;
    let port = free_port()?;
    let d = dir.0.display();
    let cfg = format!(
        "http_port 127.0.0.1:{port}\nhttp_access allow all\ncache deny all\naccess_log none\ncache_store_log none\ncache_log {d}/cache.log\npid_filename {d}/squid.pid\ncoredump_dir {d}\nmax_filedescriptors 65536\nshutdown_lifetime 0 seconds\n"
    );
    std::fs::write(dir.0.join("squid.conf"), cfg)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-N").arg("-f").arg(dir.0.join("squid.conf"));
    Ok(Some(spawn("squid", cmd, port, dir).await?))
}

async fn start_tinyproxy() -> Res<Option<Target>> {
    let Some(bin) = which("tinyproxy") else { return Ok(None) };
    let dir = TempDir::new("tinyproxy")?;
    let port = free_port()?;
    // No ConnectPort line: CONNECT to any port is allowed.
    let cfg = format!(
        "Port {port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 20000\nAllow 127.0.0.1\nLogLevel Critical\nPidFile \"{}/tinyproxy.pid\"\n",
        dir.0.display()
    );
    std::fs::write(dir.0.join("tinyproxy.conf"), cfg)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-d").arg("-c").arg(dir.0.join("tinyproxy.conf"));
    Ok(Some(spawn("tinyproxy", cmd, port, dir).await?))
}

async fn start_http_tunnel() -> Res<Option<Target>> {
    let bin = which("http-tunnel").or_else(|| {
        let home = std::env::var_os("HOME")?;
        let p = PathBuf::from(home).join(".cargo/bin/http-tunnel");
        p.is_file().then_some(p)
    });
    let Some(bin) = bin else { return Ok(None) };
    let dir = TempDir::new("http-tunnel")?;
    let port = free_port()?;
    let policy = "relay_policy:\n    idle_timeout: 600s\n    min_rate_bpm: 0\n    max_rate_bps: 100000000000\n";
    let cfg = format!(
        "client_connection:\n  initiation_timeout: 30s\n  {policy}\ntarget_connection:\n  dns_cache_ttl: 60s\n  allowed_targets: \".*\"\n  connect_timeout: 10s\n  {policy}"
    );
    std::fs::write(dir.0.join("config.yaml"), cfg)?;
    let mut cmd = Command::new(bin);
    cmd.current_dir(&dir.0)
        .arg("--config")
        .arg(dir.0.join("config.yaml"))
        .arg("--bind")
        .arg(format!("127.0.0.1:{port}"))
        .arg("http");
    Ok(Some(spawn("http-tunnel", cmd, port, dir).await?))
}

/// Opens a stream to `upstream`, directly or through a CONNECT tunnel.
async fn open(t: &Target, upstream: SocketAddr) -> Res<TcpStream> {
    let Some(proxy) = t.proxy else {
        let s = TcpStream::connect(t.front(upstream)).await?;
        s.set_nodelay(true)?;
        return Ok(s);
    };
    // A target that stops answering must not hang the whole bench.
    match tokio::time::timeout(Duration::from_secs(10), connect_via(proxy, upstream)).await {
        Ok(r) => r.map_err(|e| format!("{}: {e}", t.name).into()),
        Err(_) => Err(format!("{}: no answer to CONNECT within 10 s", t.name).into()),
    }
}

/// A CONNECT tunnel to `upstream` through the proxy at `proxy`.
async fn connect_via(proxy: SocketAddr, upstream: SocketAddr) -> Res<TcpStream> {
    let mut s = TcpStream::connect(proxy).await?;
    s.set_nodelay(true)?;
    s.write_all(format!("CONNECT {upstream} HTTP/1.1\r\nHost: {upstream}\r\n\r\n").as_bytes()).await?;
    // Read the response head in whole reads, as HTTP clients do (Go's and Python's buffer it):
    // the upstreams here speak only after the client, so nothing past the head can arrive yet.
    let mut head = Vec::with_capacity(128);
    let mut b = [0u8; 512];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut b).await?;
        if n == 0 {
            return Err("closed during CONNECT".into());
        }
        head.extend_from_slice(&b[..n]);
        if head.len() > 4096 {
            return Err("response head too long".into());
        }
        if head.windows(4).position(|w| w == b"\r\n\r\n").is_some_and(|end| end + 4 != head.len()) {
            return Err("tunnel data before the client spoke".into());
        }
    }
    if !head.starts_with(b"HTTP/1.1 200") && !head.starts_with(b"HTTP/1.0 200") {
        return Err(String::from_utf8_lossy(&head).lines().next().unwrap_or("").to_owned().into());
    }
    Ok(s)
}

/// Loopback upstreams shared by all targets.
struct Upstreams {
    /// Reads an 8-byte length, then that many bytes, then answers with the count. (It does not
    /// wait for EOF: Squid and tinyproxy close both directions on the client's FIN.)
    sink: SocketAddr,
    /// Echoes everything.
    echo: SocketAddr,
    /// Reads "ping", writes "pong", closes.
    hello: SocketAddr,
    /// Accepts and holds connections.
    hold: SocketAddr,
    /// HTTP/1.1 keep-alive server: `/10` answers 10 bytes, `/100k` 100 KiB.
    http: SocketAddr,
}

async fn serve<F, Fut>(f: F) -> Res<SocketAddr>
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

async fn upstreams() -> Res<Upstreams> {
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
    Ok(Upstreams { sink, echo, hello, hold, http })
}

/// A minimal keep-alive HTTP/1.1 server for requests without a body: `/10`, `/1k` and `/100k`
/// answer that many bytes; a request with `Connection: close` is answered and the connection closed.
async fn http_server<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S) -> std::io::Result<()> {
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

/// One HTTP GET of `path` on `s` (absolute-form through a proxy, origin-form direct); reads the
/// whole response. `buf` is reused across calls.
async fn http_get(s: &mut TcpStream, proxied: bool, upstream: SocketAddr, path: &str, buf: &mut Vec<u8>) -> Res<()> {
    let req = if proxied {
        format!("GET http://{upstream}{path} HTTP/1.1\r\nHost: {upstream}\r\n\r\n")
    } else {
        format!("GET {path} HTTP/1.1\r\nHost: {upstream}\r\n\r\n")
    };
    s.write_all(req.as_bytes()).await?;
    buf.clear();
    let mut tmp = [0u8; 16384];
    let (end, len) = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            if !head.starts_with("http/1.1 200") && !head.starts_with("http/1.0 200") {
                return Err(head.lines().next().unwrap_or("").to_owned().into());
            }
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:").and_then(|v| v.trim().parse::<usize>().ok()))
                .ok_or("no content-length")?;
            break (i + 4, len);
        }
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return Err("closed".into());
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    while buf.len() < end + len {
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return Err("closed mid-body".into());
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    Ok(())
}

/// Requests per second of plain-HTTP GETs of `path` from `conc` clients, each on one keep-alive
/// connection (`keep_alive`) or a new connection per request; and the proxy's CPU time (user +
/// system) per request in microseconds, when the target is a process.
async fn http_requests(
    t: &Arc<Target>,
    up: &Upstreams,
    conc: usize,
    path: &'static str,
    keep_alive: bool,
    secs: f64,
) -> Res<(f64, f64)> {
    let connect = |t: Arc<Target>, upstream: SocketAddr| async move {
        let s = TcpStream::connect(t.proxy.unwrap_or(t.front(upstream))).await?;
        s.set_nodelay(true)?;
        Ok::<TcpStream, Box<dyn Error + Send + Sync>>(s)
    };
    let cpu_before = t.child.as_ref().map(|c| cpu_us(c.id())).transpose()?;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (t, stop, count, upstream) = (t.clone(), stop.clone(), count.clone(), up.http);
        tasks.push(tokio::spawn(async move {
            let proxied = t.proxy.is_some();
            let mut buf = Vec::with_capacity(128 * 1024);
            let mut s = connect(t.clone(), upstream).await?;
            while !stop.load(Ordering::Relaxed) {
                if !keep_alive {
                    #[allow(deprecated)]
                    let _ = s.set_linger(Some(Duration::ZERO));
                    s = connect(t.clone(), upstream).await?;
                }
                http_get(&mut s, proxied, upstream, path, &mut buf).await?;
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), Box<dyn Error + Send + Sync>>(())
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for mut task in tasks {
        // A target that stops answering must not hang the whole bench.
        match tokio::time::timeout(Duration::from_secs(10), &mut task).await {
            Ok(joined) => joined??,
            Err(_) => {
                task.abort();
                return Err("stalled: a request got no answer within 10 s".into());
            }
        }
    }
    let n = count.load(Ordering::Relaxed) as f64;
    let rate = n / start.elapsed().as_secs_f64();
    Ok((rate, cpu_per_op(t, cpu_before, n)?))
}

/// User + system CPU time of process `pid`, in microseconds.
fn cpu_us(pid: u32) -> Res<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').ok_or("bad stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11).ok_or("bad stat")?.parse::<u64>()? + f.get(12).ok_or("bad stat")?.parse::<u64>()?;
    // Clock ticks are 100 Hz on Linux (USER_HZ).
    Ok(ticks * 10_000)
}

/// MB/s (10^6 bytes) moved by `n` tunnels of `bytes` each.
async fn bulk(t: &Target, up: &Upstreams, n: usize, bytes: u64) -> Res<f64> {
    let mut streams = Vec::new();
    for _ in 0..n {
        streams.push(open(t, up.sink).await?);
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for mut s in streams {
        tasks.push(tokio::spawn(async move {
            let chunk = vec![0x5au8; 256 * 1024];
            s.write_all(&bytes.to_be_bytes()).await?;
            let mut left = bytes;
            while left > 0 {
                let k = left.min(chunk.len() as u64) as usize;
                s.write_all(&chunk[..k]).await?;
                left -= k as u64;
            }
            let mut ack = [0u8; 8];
            s.read_exact(&mut ack).await?;
            Ok::<u64, std::io::Error>(u64::from_be_bytes(ack))
        }));
    }
    for task in tasks {
        let got = task.await??;
        if got != bytes {
            return Err(format!("{}: sink got {got} of {bytes} bytes", t.name).into());
        }
    }
    Ok((n as u64 * bytes) as f64 / start.elapsed().as_secs_f64() / 1e6)
}

fn percentile(v: &mut [u64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)] as f64
}

/// Tunnel setups per second and p50/p99 latency (µs) at `conc` concurrent clients.
async fn setup(t: &Arc<Target>, up: &Upstreams, conc: usize, secs: f64) -> Res<(f64, f64, f64, f64)> {
    let cpu_before = t.child.as_ref().map(|c| cpu_us(c.id())).transpose()?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let start = Instant::now();
    for _ in 0..conc {
        let (t, stop, hello) = (t.clone(), stop.clone(), up.hello);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let mut s = open(&t, hello).await?;
                s.write_all(b"ping").await?;
                let mut b = [0u8; 4];
                s.read_exact(&mut b).await?;
                // Reset rather than FIN: no TIME_WAIT pile-up on the client's ports.
                #[allow(deprecated)]
                let _ = s.set_linger(Some(Duration::ZERO));
                drop(s);
                lat.push(t0.elapsed().as_micros() as u64);
            }
            Ok::<Vec<u64>, Box<dyn Error + Send + Sync>>(lat)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    let rate = all.len() as f64 / start.elapsed().as_secs_f64();
    let cpu = cpu_per_op(t, cpu_before, all.len() as f64)?;
    Ok((rate, percentile(&mut all, 0.5), percentile(&mut all, 0.99), cpu))
}

/// The target process's CPU time (µs) per operation since `before`; NaN without a process.
fn cpu_per_op(t: &Target, before: Option<u64>, ops: f64) -> Res<f64> {
    Ok(match (before, t.child.as_ref()) {
        (Some(b), Some(c)) => (cpu_us(c.id())? - b) as f64 / ops.max(1.0),
        _ => f64::NAN,
    })
}

/// Round trips per second, p50 and p99 (µs) of 64-byte echoes over `n` established tunnels,
/// and the proxy's CPU per round trip.
async fn round_trips(t: &Target, up: &Upstreams, n: usize, secs: f64) -> Res<(f64, f64, f64, f64)> {
    let mut streams = Vec::new();
    for _ in 0..n {
        streams.push(open(t, up.echo).await?);
    }
    let cpu_before = t.child.as_ref().map(|c| cpu_us(c.id())).transpose()?;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for mut s in streams {
        let (stop, count) = (stop.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let msg = [7u8; 64];
            let mut back = [0u8; 64];
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                s.write_all(&msg).await?;
                s.read_exact(&mut back).await?;
                lat.push(t0.elapsed().as_micros() as u64);
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<Vec<u64>, std::io::Error>(lat)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for mut task in tasks {
        // A target that stops answering must not hang the whole bench.
        match tokio::time::timeout(Duration::from_secs(5), &mut task).await {
            Ok(joined) => all.extend(joined??),
            Err(_) => {
                task.abort();
                return Err("stalled: an echo got no answer within 5 s".into());
            }
        }
    }
    let done = count.load(Ordering::Relaxed) as f64;
    let rate = done / start.elapsed().as_secs_f64();
    let cpu = cpu_per_op(t, cpu_before, done)?;
    Ok((rate, percentile(&mut all, 0.5), percentile(&mut all, 0.99), cpu))
}

fn rss_kib(pid: u32) -> Res<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).ok_or("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).ok_or("bad VmRSS")?.parse()?)
}

/// Proxy memory per idle tunnel in KiB (RSS after opening `n` tunnels minus before).
async fn idle(t: &Target, up: &Upstreams, n: usize) -> Res<Option<f64>> {
    let Some(pid) = t.child.as_ref().map(Child::id) else { return Ok(None) };
    // Warm up allocator pools and lazily created structures first.
    let mut warm = Vec::new();
    for _ in 0..100 {
        warm.push(open(t, up.hold).await?);
    }
    drop(warm);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib(pid)?;
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(open(t, up.hold).await?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid)?;
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(Some(after.saturating_sub(before) as f64 / n as f64))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One row of the table: a metric for each target, and whether higher is better.
struct Row {
    scenario: String,
    higher_better: bool,
    values: Vec<f64>,
}

// Two workers whatever the environment says, so every target meets the same load generator.
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Res<()> {
    let args = Args::parse();
    let _ = rlimit::increase_nofile_limit(200_000);
    if args.suite == "termination" {
        return termination::run(&args.proxy_bin, args.rounds, args.seconds, args.only.as_deref()).await;
    }
    let up = upstreams().await?;
    if args.suite == "reload" {
        return reload::run(&args.proxy_bin, args.rounds, up.echo).await;
    }
    let wanted = |n: &str| args.only.as_deref().is_none_or(|o| o.split(',').any(|x| x.trim() == n));

    let mut targets: Vec<Arc<Target>> = Vec::new();
    if wanted("direct") {
        targets.push(Arc::new(Target { name: "direct", proxy: None, l4: Vec::new(), child: None, _dir: None }));
    }
    if wanted("tunnelgate") {
        if !args.proxy_bin.is_file() {
            return Err(format!(
                "{} not found: run `cargo build --release -p tunnelgate-proxy` first",
                args.proxy_bin.display()
            )
            .into());
        }
        targets.push(Arc::new(start_tunnelgate(&args.proxy_bin, &args.proxy_args).await?));
    }
    // HAProxy's CONNECT is a Lua action of ours, and it stops answering in some runs (see
    // bench/RESULTS.md): on request only, like the floors below.
    let opted = |n: &str| args.only.as_deref().is_some_and(|o| o.split(',').any(|x| x.trim() == n));
    if opted("haproxy") {
        match start_haproxy().await {
            Ok(Some(t)) => targets.push(Arc::new(t)),
            Ok(None) => println!("skipping haproxy: not installed"),
            Err(e) => println!("skipping haproxy: cannot start it: {e}"),
        }
    }
    type Starter = fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Res<Option<Target>>>>>;
    let peers: [(&str, Starter); 3] = [
        ("squid", || Box::pin(start_squid())),
        ("tinyproxy", || Box::pin(start_tinyproxy())),
        ("http-tunnel", || Box::pin(start_http_tunnel())),
    ];
    for (name, start) in peers {
        if !wanted(name) {
            continue;
        }
        match start().await {
            Ok(Some(t)) => targets.push(Arc::new(t)),
            Ok(None) => println!("skipping {name}: not installed (bench/install-peers.sh installs it)"),
            Err(e) => println!("skipping {name}: cannot start it: {e}"),
        }
    }
    // The floors: fixed forwarders with no request to parse (opt in with --only).
    if opted("tunnelgate-l4") {
        targets.push(Arc::new(start_tunnelgate_l4(&args.proxy_bin, &up, &args.proxy_args).await?));
    }
    if opted("haproxy-l4") {
        match start_haproxy_l4(&up).await {
            Ok(Some(t)) => targets.push(Arc::new(t)),
            Ok(None) => println!("skipping haproxy-l4: not installed"),
            Err(e) => println!("skipping haproxy-l4: cannot start it: {e}"),
        }
    }
    let names: Vec<&str> = targets.iter().map(|t| t.name).collect();
    println!("targets: {}; rounds: {}; medians shown\n", names.join(", "), args.rounds);

    let mut rows: Vec<Row> = Vec::new();
    let mut add = |scenario: String, higher_better: bool, values: Vec<f64>| {
        println!("  {scenario}: {}", values.iter().map(|v| format!("{v:.1}")).collect::<Vec<_>>().join(" | "));
        rows.push(Row { scenario, higher_better, values });
    };
    let r = args.rounds;
    let scenario = |n: &str| args.scenarios.as_deref().is_none_or(|o| o.split(',').any(|x| x.trim() == n));
    let gib = args.bulk_bytes as f64 / (1u64 << 30) as f64;

    for n in [1usize, 8].into_iter().filter(|_| scenario("bulk")) {
        let mut vals = Vec::new();
        for t in &targets {
            let mut v = Vec::new();
            for _ in 0..r {
                v.push(bulk(t, &up, n, args.bulk_bytes).await.unwrap_or_else(|e| report(t.name, &*e)));
            }
            vals.push(median(v));
        }
        add(format!("bulk, {n} tunnel(s) x {gib:.2} GiB (MB/s)"), true, vals);
    }
    for conc in [1usize, 64].into_iter().filter(|_| scenario("setup")) {
        let (mut rate, mut p50, mut p99, mut cpu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for t in &targets {
            let (mut a, mut b, mut c, mut d) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for _ in 0..r {
                match setup(t, &up, conc, args.seconds).await {
                    Ok((x, y, z, w)) => {
                        a.push(x);
                        b.push(y);
                        c.push(z);
                        d.push(w);
                    }
                    Err(e) => {
                        report(t.name, &*e);
                    }
                }
                // Let TIME_WAIT and backlog settle between rounds.
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            rate.push(median(a));
            p50.push(median(b));
            p99.push(median(c));
            cpu.push(median(d));
        }
        add(format!("setup, concurrency {conc} (tunnels/s)"), true, rate);
        add(format!("setup, concurrency {conc} p50 (us)"), false, p50);
        add(format!("setup, concurrency {conc} p99 (us)"), false, p99);
        add(format!("setup, concurrency {conc}, proxy CPU per tunnel (us)"), false, cpu);
    }
    for n in [1usize, 64].into_iter().filter(|_| scenario("round-trips")) {
        let (mut rate, mut p50, mut p99, mut cpu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for t in &targets {
            let (mut a, mut b, mut c, mut d) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for _ in 0..r {
                match round_trips(t, &up, n, args.seconds).await {
                    Ok((x, y, z, w)) => {
                        a.push(x);
                        b.push(y);
                        c.push(z);
                        d.push(w);
                    }
                    Err(e) => {
                        report(t.name, &*e);
                    }
                }
            }
            rate.push(median(a));
            p50.push(median(b));
            p99.push(median(c));
            cpu.push(median(d));
        }
        let what = if n == 1 { "1 tunnel".to_owned() } else { format!("{n} tunnels") };
        add(format!("round trips, {what} (req/s)"), true, rate);
        add(format!("round trips, {what} p50 (us)"), false, p50);
        add(format!("round trips, {what} p99 (us)"), false, p99);
        add(format!("round trips, {what}, proxy CPU per round trip (us)"), false, cpu);
    }
    for (path, keep_alive, label) in [
        ("/10", true, "http keep-alive GET 10 B"),
        ("/100k", true, "http keep-alive GET 100 KiB"),
        ("/10", false, "http new connection per GET 10 B"),
    ]
    .into_iter()
    .filter(|_| scenario("http"))
    {
        let conc = 16;
        let (mut rate, mut cpu) = (Vec::new(), Vec::new());
        for t in &targets {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for _ in 0..r {
                match http_requests(t, &up, conc, path, keep_alive, args.seconds).await {
                    Ok((x, y)) => {
                        a.push(x);
                        b.push(y);
                    }
                    Err(e) => {
                        report(t.name, &*e);
                    }
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            rate.push(median(a));
            cpu.push(median(b));
        }
        add(format!("{label}, {conc} clients (req/s)"), true, rate);
        add(format!("{label}, proxy CPU per request (us)"), false, cpu);
    }
    if scenario("idle") {
        let mut vals = Vec::new();
        for t in &targets {
            let v = match idle(t, &up, args.idle_tunnels).await {
                Ok(Some(k)) => k,
                Ok(None) => f64::NAN,
                Err(e) => report(t.name, &*e),
            };
            vals.push(v);
        }
        add(format!("idle, {} tunnels (KiB RSS per tunnel)", args.idle_tunnels), false, vals);
    }

    // The table: value and ratio to direct.
    println!();
    print!("| scenario |");
    for n in &names {
        print!(" {n} |");
    }
    println!();
    print!("|---|");
    for _ in &names {
        print!("---|");
    }
    println!();
    let direct = names.iter().position(|n| *n == "direct");
    for row in &rows {
        print!("| {} {} |", row.scenario, if row.higher_better { "↑" } else { "↓" });
        for (i, v) in row.values.iter().enumerate() {
            match direct.map(|d| row.values[d]) {
                Some(d) if Some(i) != direct && d.is_finite() && v.is_finite() && d > 0.0 => {
                    let ratio = v / d;
                    print!(" {v:.1} ({ratio:.2}x) |");
                }
                _ if v.is_finite() => print!(" {v:.1} |"),
                _ => print!(" n/a |"),
            }
        }
        println!();
    }
    println!("\nratios are proxy / direct; ↑ higher is better, ↓ lower is better; idle memory has no direct baseline");
    drop(targets);
    if args.suite == "all" {
        termination::run(&args.proxy_bin, args.rounds, args.seconds, args.only.as_deref()).await?;
    }
    Ok(())
}

fn report(name: &str, e: &(dyn Error + Send + Sync)) -> f64 {
    eprintln!("{name}: {e}");
    f64::NAN
}
