//! What a client connects through: a direct connection, Tunnelgate, the peer proxies and the
//! no-parsing floors, each started on loopback and stopped on drop; and opening a stream to an
//! upstream through one of them.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::upstreams::Upstreams;
use crate::Res;

/// Something a client connects through.
pub(crate) struct Target {
    pub(crate) name: &'static str,
    pub(crate) proxy: Option<SocketAddr>,
    /// Fixed forwarders, one per upstream (upstream, where to connect): a relay with no request
    /// to parse, the floor a CONNECT proxy's cost is measured against.
    l4: Vec<(SocketAddr, SocketAddr)>,
    /// The client's source address (a transparent target's redirect matches it).
    source: Option<IpAddr>,
    /// Names it resolves go to the bench's DNS stub (a peer would ask the system's resolver, so
    /// the scenarios by name skip it).
    pub(crate) stub_dns: bool,
    pub(crate) child: Option<Child>,
    pub(crate) _dir: Option<TempDir>,
    /// A parent proxy this target sends its traffic through (stopped with it).
    pub(crate) _parent: Option<Box<Target>>,
}

impl Target {
    /// The baseline: a direct connection to each upstream.
    pub(crate) fn direct() -> Target {
        Target {
            name: "direct",
            proxy: None,
            l4: Vec::new(),
            source: None,
            stub_dns: true,
            child: None,
            _dir: None,
            _parent: None,
        }
    }

    /// Where a connection to `upstream` goes without CONNECT: the fixed forwarder for it, or the
    /// upstream itself.
    pub(crate) fn front(&self, upstream: SocketAddr) -> SocketAddr {
        self.l4.iter().find(|(u, _)| *u == upstream).map_or(upstream, |(_, f)| *f)
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            stop_child(c);
        }
        if self.source.is_some() {
            let _ = Command::new("nft").args(["delete", "table", "inet", REDIRECT_TABLE]).status();
        }
    }
}

/// A TCP connection to `addr`, from the target's client source address when it has one.
pub(crate) async fn tcp(t: &Target, addr: SocketAddr) -> Res<TcpStream> {
    let s = match t.source {
        Some(src) => {
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.bind(SocketAddr::new(src, 0))?;
            sock.connect(addr).await?
        }
        None => TcpStream::connect(addr).await?,
    };
    s.set_nodelay(true)?;
    Ok(s)
}

/// The nftables table of the transparent target's redirect (its own, removed when it stops).
const REDIRECT_TABLE: &str = "tunnelgate_bench";

/// The source address of the transparent target's clients: only their connections are redirected.
const TRANSPARENT_CLIENT: [u8; 4] = [127, 0, 0, 5];

/// Tunnelgate's transparent listener: the clients connect to the upstreams themselves, from
/// 127.0.0.5, and an nftables `output` rule (this bench's own table, matching only that source)
/// redirects them to the listener, which reads the original destination and, with no name in
/// the bytes, decides by address (the SNI path adds a ClientHello parse and a cached lookup).
/// Needs root and `nft`; run it in a network namespace of its own (bench/run-transparent.sh).
pub(crate) async fn start_transparent(
    bin: &Path,
    up: &Upstreams,
    extra: &[String],
    dns: SocketAddr,
) -> Res<Option<Target>> {
    if which("nft").is_none() {
        return Ok(None);
    }
    let dir = TempDir::new("tunnelgate-transparent")?;
    let (port, admin) = (free_port()?, free_port()?);
    let cfg = format!(
        "version: 1\nlisteners: [{{name: transparent, bind: '127.0.0.1:{port}', mode: transparent}}]\nadmin: {{bind: '127.0.0.1:{admin}'}}\npolicy:\n  rules:\n    - {{name: loopback, action: allow, cidrs: ['127.0.0.1/32']}}\nrelay: {{idleTimeout: 10m}}\ndns: {{nameservers: ['{dns}']}}\nlimits: {{maxConnections: 100000, maxConnectionsPerClient: 100000, drainDelay: 0s, drainTimeout: 1s}}\nlogging: {{accessLog: false}}\n"
    );
    let path = dir.0.join("config.yaml");
    std::fs::write(&path, cfg)?;
    let ports: Vec<String> =
        [up.sink, up.echo, up.hello, up.hold, up.http, up.tls].iter().map(|a| a.port().to_string()).collect();
    let client = std::net::Ipv4Addr::from(TRANSPARENT_CLIENT);
    let rules = format!(
        "table inet {REDIRECT_TABLE} {{ chain out {{ type nat hook output priority -100; policy accept; \
         ip saddr {client} tcp dport {{ {} }} redirect to :{port}; }}; }}",
        ports.join(", ")
    );
    let ok = Command::new("nft").arg(&rules).status()?.success();
    if !ok {
        return Err("nft refused the redirect (root is needed)".into());
    }
    let mut cmd = Command::new(bin);
    cmd.arg("--config").arg(&path).args(extra).env("TUNNELGATE_LOG", "warn");
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    let t = Target {
        name: "transparent",
        proxy: None,
        l4: Vec::new(),
        source: Some(IpAddr::V4(client)),
        stub_dns: true,
        child: Some(child),
        _dir: Some(dir),
        _parent: None,
    };
    wait_port(format!("127.0.0.1:{port}").parse()?).await?;
    Ok(Some(t))
}

/// Stops a peer with the processes it started: SIGTERM first, which a master process (nginx,
/// hitch, Squid) passes on to its workers — after a SIGKILL they would keep running, listening
/// and taking CPU in the scenarios after — and SIGKILL if it has not exited within two seconds.
pub(crate) fn stop_child(child: &mut Child) {
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

pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Res<TempDir> {
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

pub(crate) fn free_port() -> Res<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(crate) fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(bin)).find(|p| p.is_file()))
}

pub(crate) async fn wait_port(addr: SocketAddr) -> Res<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("nothing listening on {addr}").into())
}

pub(crate) async fn spawn(name: &'static str, mut cmd: Command, port: u16, dir: TempDir) -> Res<Target> {
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let t = Target {
        name,
        proxy: Some(addr),
        l4: Vec::new(),
        source: None,
        stub_dns: false,
        child: Some(child),
        _dir: Some(dir),
        _parent: None,
    };
    wait_port(addr).await?;
    Ok(t)
}

/// Tunnelgate as a forward proxy, named `name` in the table (`tunnelgate`, or `tunnelgate-b` of an
/// A/B: `--b-bin`, `--b-arg`).
pub(crate) async fn start_tunnelgate(bin: &Path, extra: &[String], dns: SocketAddr, name: &'static str) -> Res<Target> {
    start_tunnelgate_with(bin, extra, dns, name, "").await
}

/// Tunnelgate with Squid as its parent for everything it allows (`tunnelgate-squid`): the chain
/// an enterprise runs, measured against each alone. Its CPU figures are Tunnelgate's own.
pub(crate) async fn start_tunnelgate_via_squid(bin: &Path, extra: &[String], dns: SocketAddr) -> Res<Option<Target>> {
    let Some(squid) = start_squid_in("squid-parent").await? else { return Ok(None) };
    let Some(parent) = squid.proxy else { return Ok(None) };
    let parents = format!("parents: [{{name: squid, address: '{parent}'}}]\n");
    let mut t = start_tunnelgate_with(bin, extra, dns, "tunnelgate-squid", &parents).await?;
    t.stub_dns = false;
    t._parent = Some(Box::new(squid));
    Ok(Some(t))
}

async fn start_tunnelgate_with(
    bin: &Path,
    extra: &[String],
    dns: SocketAddr,
    name: &'static str,
    parents: &str,
) -> Res<Target> {
    let dir = TempDir::new(name)?;
    let (port, admin) = (free_port()?, free_port()?);
    let cfg = format!(
        "version: 1\nlisteners: [{{name: forward, bind: '127.0.0.1:{port}'}}]\nadmin: {{bind: '127.0.0.1:{admin}'}}\n{parents}policy:\n  defaultRoute: {route}\n  rules:\n    - {{name: loopback, action: allow, cidrs: ['127.0.0.1/32']}}\nrelay: {{idleTimeout: 10m}}\ndns: {{nameservers: ['{dns}']}}\nlimits: {{maxConnections: 100000, maxConnectionsPerClient: 100000, drainDelay: 0s, drainTimeout: 1s}}\n# The peers run without access logs too.\nlogging: {{accessLog: false}}\n",
        route = if parents.is_empty() { "direct" } else { "squid" }
    );
    let path = dir.0.join("config.yaml");
    std::fs::write(&path, cfg)?;
    let mut cmd = Command::new(bin);
    cmd.arg("--config").arg(&path).args(extra).env("TUNNELGATE_LOG", "warn");
    let mut t = spawn(name, cmd, port, dir).await?;
    t.stub_dns = true;
    Ok(t)
}

/// HAProxy's zero-copy relaying, both ways, always: `option splice-auto` (splicing only where
/// its heuristic sees a stream) measured the same CPU per GiB as no splicing at all in this
/// bench (HAProxy 2.6), so the peer is the stronger forced form.
const HAPROXY_SPLICE: &str = "  option splice-request\n  option splice-response\n";
/// Its pipes, in `global`: two descriptors each, counted with maxconn's against the descriptor
/// limit (the default, maxconn / 4, is more than the 20,000 descriptors here allow).
const HAPROXY_PIPES: &str = "  maxpipes 1000\n";

/// HAProxy as a CONNECT proxy: TCP mode, a Lua action that reads the CONNECT head, answers 200
/// and sets the destination (HAProxy has no CONNECT of its own); `splice`: splicing both ways.
pub(crate) async fn start_haproxy(splice: bool) -> Res<Option<Target>> {
    let Some(bin) = which("haproxy") else { return Ok(None) };
    let name = if splice { "haproxy-splice" } else { "haproxy" };
    let dir = TempDir::new(name)?;
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
        "global\n  nbthread 2\n  maxconn 8000\n{}  lua-load {}\ndefaults\n  mode tcp\n{}  timeout connect 5s\n  timeout client 600s\n  timeout server 600s\nfrontend f\n  bind 127.0.0.1:{port}\n  tcp-request inspect-delay 5s\n  tcp-request content lua.connect if {{ req.payload(0,0) -m reg \\r\\n\\r\\n }}\n  tcp-request content set-dst var(txn.dst_ip)\n  tcp-request content set-dst-port var(txn.dst_port)\n  default_backend b\nbackend b\n  server s 0.0.0.0:0\n",
        if splice { HAPROXY_PIPES } else { "" },
        lua.display(),
        if splice { HAPROXY_SPLICE } else { "" }
    );
    std::fs::write(dir.0.join("haproxy.cfg"), cfg)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-db").arg("-f").arg(dir.0.join("haproxy.cfg"));
    Ok(Some(spawn(name, cmd, port, dir).await?))
}

/// A fixed forwarder per upstream: (name, upstream) pairs and their front ports.
pub(crate) fn l4_fronts(up: &Upstreams) -> Res<Vec<(&'static str, SocketAddr, u16)>> {
    [("sink", up.sink), ("echo", up.echo), ("hello", up.hello), ("hold", up.hold), ("http", up.http)]
        .into_iter()
        .map(|(n, u)| Ok((n, u, free_port()?)))
        .collect()
}

/// Starts a fixed-forwarder target and waits for its fronts.
pub(crate) async fn spawn_l4(
    name: &'static str,
    mut cmd: Command,
    fronts: &[(&'static str, SocketAddr, u16)],
    dir: TempDir,
) -> Res<Target> {
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    let l4: Vec<(SocketAddr, SocketAddr)> =
        fronts.iter().map(|(_, u, p)| Ok((*u, format!("127.0.0.1:{p}").parse()?))).collect::<Res<_>>()?;
    let t = Target {
        name,
        proxy: None,
        l4,
        source: None,
        stub_dns: false,
        child: Some(child),
        _dir: Some(dir),
        _parent: None,
    };
    for (_, front) in &t.l4 {
        wait_port(*front).await?;
    }
    Ok(t)
}

/// Tunnelgate's own floor: `mode: tunnel` listeners, one per upstream (no CONNECT to parse).
pub(crate) async fn start_tunnelgate_l4(bin: &Path, up: &Upstreams, extra: &[String]) -> Res<Target> {
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

/// HAProxy's plain TCP relay (mode tcp, one frontend per upstream): the no-parsing floor;
/// `splice`: splicing both ways.
pub(crate) async fn start_haproxy_l4(up: &Upstreams, splice: bool) -> Res<Option<Target>> {
    let Some(bin) = which("haproxy") else { return Ok(None) };
    let name = if splice { "haproxy-l4-splice" } else { "haproxy-l4" };
    let dir = TempDir::new(name)?;
    let fronts = l4_fronts(up)?;
    let mut cfg = String::from("global\n  nbthread 2\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 600s\n  timeout server 600s\n");
    if splice {
        cfg = cfg.replace("  maxconn 8000\n", &format!("  maxconn 8000\n{HAPROXY_PIPES}"));
        cfg.push_str(HAPROXY_SPLICE);
    }
    for (n, u, p) in &fronts {
        cfg.push_str(&format!("listen {n}\n  bind 127.0.0.1:{p}\n  server s {u}\n"));
    }
    std::fs::write(dir.0.join("haproxy.cfg"), cfg)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-db").arg("-f").arg(dir.0.join("haproxy.cfg"));
    Ok(Some(spawn_l4(name, cmd, &fronts, dir).await?))
}

pub(crate) async fn start_squid() -> Res<Option<Target>> {
    start_squid_in("squid").await
}

/// Squid in a directory of its own (`tag`): two Squids must not share a pid file.
async fn start_squid_in(tag: &str) -> Res<Option<Target>> {
    let Some(bin) = which("squid") else { return Ok(None) };
    let dir = TempDir::new(tag)?;
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

pub(crate) async fn start_tinyproxy() -> Res<Option<Target>> {
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

pub(crate) async fn start_http_tunnel() -> Res<Option<Target>> {
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
pub(crate) async fn open(t: &Target, upstream: SocketAddr) -> Res<TcpStream> {
    open_as(t, upstream, &upstream.to_string()).await
}

/// Opens a stream to `upstream`, directly (by its address) or through a CONNECT tunnel to
/// `authority` (a name the proxy resolves, or the address).
pub(crate) async fn open_as(t: &Target, upstream: SocketAddr, authority: &str) -> Res<TcpStream> {
    let Some(proxy) = t.proxy else {
        return tcp(t, t.front(upstream)).await;
    };
    // A target that stops answering must not hang the whole bench.
    match tokio::time::timeout(Duration::from_secs(10), connect_via(proxy, authority)).await {
        Ok(r) => r.map_err(|e| format!("{}: {e}", t.name).into()),
        Err(_) => Err(format!("{}: no answer to CONNECT within 10 s", t.name).into()),
    }
}

/// A CONNECT tunnel to `upstream` (host:port) through the proxy at `proxy`.
pub(crate) async fn connect_via(proxy: SocketAddr, upstream: &str) -> Res<TcpStream> {
    let s = TcpStream::connect(proxy).await?;
    s.set_nodelay(true)?;
    connect_on(s, upstream).await
}

/// A CONNECT tunnel to `upstream` (host:port) asked on `s`, a connection to the proxy (new, or
/// one that carried plain-HTTP requests before).
pub(crate) async fn connect_on(mut s: TcpStream, upstream: &str) -> Res<TcpStream> {
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
            return Err(format!("tunnel data before the client spoke: {:?}", String::from_utf8_lossy(&head)).into());
        }
    }
    if !head.starts_with(b"HTTP/1.1 200") && !head.starts_with(b"HTTP/1.0 200") {
        return Err(String::from_utf8_lossy(&head).lines().next().unwrap_or("").to_owned().into());
    }
    Ok(s)
}
