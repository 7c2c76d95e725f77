//! Transparent listeners across a network of the test's own (network namespaces; needs root, `ip`
//! and `nft`): a pod with no proxy settings, a node running the proxy and the nftables rule that
//! redirects the pod's TCP 80 and 443 to the transparent listener, and an "outside" with TLS and
//! HTTP servers. Names resolve through the test's DNS stub; `curl` in the pod is the client, as a
//! workload would be. The outside uses private addresses standing in for public ones, so the
//! proxy's configuration sets `denyPrivateAddresses: false`.

use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::{Answer, DnsStub};

/// Runs `ip` (or any command) and fails the test with its stderr when it fails.
fn run(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    out
}

/// The namespaces and links of one test, removed on drop. Every `Net` uses the same addresses
/// (the host side is 10.241.0.1/24), so one exists at a time: two at once would give the host two
/// routes to 10.241.0.0/24, and removing one would cut the other's connections.
pub(crate) struct Net {
    tag: String,
    _only_one: std::sync::MutexGuard<'static, ()>,
}

static ONE_NET: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Net {
    fn ns(&self, role: &str) -> String {
        format!("tgt{}-{role}", self.tag)
    }

    /// Runs `args` inside namespace `role`.
    fn exec(&self, role: &str, args: &[&str]) -> Output {
        let ns = self.ns(role);
        let mut all = vec!["netns", "exec", ns.as_str()];
        all.extend_from_slice(args);
        Command::new("ip").args(&all).output().unwrap()
    }

    fn ip(&self, role: &str, args: &[&str]) {
        let ns = self.ns(role);
        let mut all = vec!["-n", ns.as_str()];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// host ↔ node (10.241.0.0/24: the DNS stub and the admin port), node ↔ pod (10.241.1.0/24,
    /// fd41:1::/64; redirected), node ↔ pod2 (10.241.3.0/24; not enrolled), node ↔ outside
    /// (10.241.2.0/24, fd41:2::/64; the outside has .2 and .3). The node forwards.
    pub(crate) fn create(tag: &str) -> Net {
        // A test that failed while holding it leaves no state behind it (its `Net` was dropped).
        let only_one = ONE_NET.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let net = Net { tag: tag.to_owned(), _only_one: only_one };
        net.remove();
        for role in ["node", "pod", "pod2", "out"] {
            run("ip", &["netns", "add", &net.ns(role)]);
            net.ip(role, &["link", "set", "lo", "up"]);
        }
        let (node, h) = (net.ns("node"), format!("tgt{tag}h"));
        run("ip", &["link", "add", &h, "type", "veth", "peer", "name", "hn", "netns", &node]);
        run("ip", &["addr", "add", "10.241.0.1/24", "dev", &h]);
        run("ip", &["link", "set", &h, "up"]);
        net.ip("node", &["addr", "add", "10.241.0.2/24", "dev", "hn"]);
        net.ip("node", &["link", "set", "hn", "up"]);
        for (role, dev, v4, v6) in [
            ("pod", "tp", "10.241.1", Some("fd41:1::")),
            ("pod2", "tq", "10.241.3", None),
            ("out", "to", "10.241.2", Some("fd41:2::")),
        ] {
            let peer_ns = net.ns(role);
            net.ip("node", &["link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", &peer_ns]);
            net.ip("node", &["addr", "add", &format!("{v4}.1/24"), "dev", dev]);
            net.ip(role, &["addr", "add", &format!("{v4}.2/24"), "dev", "eth0"]);
            if let Some(v6) = v6 {
                net.ip("node", &["addr", "add", &format!("{v6}1/64"), "dev", dev, "nodad"]);
                net.ip(role, &["addr", "add", &format!("{v6}2/64"), "dev", "eth0", "nodad"]);
            }
            net.ip("node", &["link", "set", dev, "up"]);
            net.ip(role, &["link", "set", "eth0", "up"]);
            net.ip(role, &["route", "add", "default", "via", &format!("{v4}.1")]);
            if let Some(v6) = v6 {
                net.ip(role, &["-6", "route", "add", "default", "via", &format!("{v6}1")]);
            }
        }
        net.ip("out", &["addr", "add", "10.241.2.3/24", "dev", "eth0"]);
        for sysctl in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            assert!(net.exec("node", &["sysctl", "-qw", sysctl]).status.success());
        }
        net
    }

    fn remove(&self) {
        for role in ["node", "pod", "pod2", "out"] {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(role)]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &format!("tgt{}h", self.tag)]).output();
    }

    /// `curl` in `role` with no proxy settings; (exit code, stdout, stderr).
    fn curl(&self, role: &str, args: &[&str]) -> (i32, String, String) {
        let mut all = vec!["curl", "-sS", "--noproxy", "*", "--max-time", "10", "-k"];
        all.extend_from_slice(args);
        let out = self.exec(role, &all);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// What `make` returns, run on a thread inside namespace `role` (a socket it creates stays
    /// in that namespace).
    pub(crate) fn in_ns<T: Send>(&self, role: &str, make: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.ns(role));
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).unwrap();
                rustix::thread::move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&ns),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .unwrap();
                make()
            })
            .join()
            .unwrap()
        })
    }

    /// A TCP listener bound to `addr` inside namespace `role`.
    pub(crate) fn listen_in(&self, role: &str, addr: SocketAddr) -> TcpListener {
        let std = self.in_ns(role, || std::net::TcpListener::bind(addr).unwrap());
        std.set_nonblocking(true).unwrap();
        TcpListener::from_std(std).unwrap()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Serves `who` over HTTP on `listener`, in TLS (a certificate for every name) when `tls` is set.
fn serve(listener: TcpListener, who: &'static str, tls: Option<Arc<tokio_rustls::TlsAcceptor>>) {
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let tls = tls.clone();
            tokio::spawn(async move {
                let answer = |mut io: Box<dyn Io>| async move {
                    let mut buf = vec![0u8; 4096];
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match io.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    // `/hold` never gets its answer: the connection stays open until the proxy ends it.
                    if head.starts_with(b"GET /hold ") {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    }
                    let resp =
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{who}", who.len());
                    let _ = io.write_all(resp.as_bytes()).await;
                    let _ = io.shutdown().await;
                };
                match tls {
                    Some(acceptor) => {
                        if let Ok(t) = acceptor.accept(s).await {
                            answer(Box::new(t)).await;
                        }
                    }
                    None => answer(Box::new(s)).await,
                }
            });
        }
    });
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

fn acceptor() -> Arc<tokio_rustls::TlsAcceptor> {
    let cert = rcgen::generate_simple_self_signed(vec!["allowed.test".into(), "denied.test".into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
    Arc::new(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The proxy's configuration: one dual-stack transparent listener (IPv4 connections reach it as
/// v4-mapped addresses), the node's redirect for `enrolled` (none: no redirect section), and `rules`.
fn config(dns: SocketAddr, port: u16, strict: bool, enrolled: Option<&str>, rules: &str) -> String {
    let redirect = enrolled.map(|e| format!("redirect: {{listener: t4, enrolled: [{e}]}}\n")).unwrap_or_default();
    format!(
        "version: 1\n\
         listeners:\n\
         \x20 - {{name: t4, bind: '[::]:{port}', mode: transparent, transparent: {{strictDestination: {strict}}}}}\n\
         admin: {{bind: '10.241.0.2:9090'}}\n\
         dns: {{nameservers: ['{dns}']}}\n\
         limits: {{drainDelay: 0s, drainTimeout: 1s}}\n\
         {redirect}\
         policy:\n  defaultAction: deny\n  denyPrivateAddresses: false\n  reevaluateOnReload: true\n  rules:\n{rules}"
    )
}

/// The enrolled pod's addresses.
const POD: &str = "10.241.1.2, 'fd41:1::2'";

const RULES: &str = "    - {name: allowed, action: allow, hosts: [allowed.test], ports: [80, 443]}\n\
                     \x20   - {name: by-address, action: allow, cidrs: [10.241.2.3/32], ports: [443]}\n";

async fn metrics() -> String {
    let mut s = tokio::net::TcpStream::connect("10.241.0.2:9090").await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_without_proxy_settings_are_held_to_the_policy_by_sni_and_host() {
    let tag = format!("{}", std::process::id() % 100_000);
    let net = Net::create(&tag);
    let dns = DnsStub::start_on("10.241.0.1:0").await;
    let v4 = |s: &str| -> IpAddr { s.parse().unwrap() };
    dns.set("allowed.test", Answer::Addrs(vec![v4("10.241.2.2"), v4("fd41:2::2")]));
    dns.set("denied.test", Answer::Addrs(vec![v4("10.241.2.2")]));
    // The outside: the real server on .2 (and fd41:2::2), another on .3 that an SNI must never
    // lead to by name (an address-only rule allows it by address), HTTP on 80 and TLS on 443.
    let tls = acceptor();
    for (addr, who, tls) in [
        ("10.241.2.2:443", "outside", Some(tls.clone())),
        ("[fd41:2::2]:443", "outside-v6", Some(tls.clone())),
        ("10.241.2.3:443", "elsewhere", Some(tls.clone())),
        ("10.241.2.2:80", "outside-http", None),
    ] {
        serve(net.listen_in("out", addr.parse().unwrap()), who, tls);
    }
    let port = testkit::free_port();
    let dir = std::env::temp_dir().join(format!("tg-transparent-{tag}"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.yaml");
    std::fs::write(&path, config(dns.addr, port, false, Some(POD), RULES)).unwrap();
    let proxy = env!("CARGO_BIN_EXE_tunnelgate-proxy");
    let node = net.ns("node");
    let mut child = tokio::process::Command::new("ip")
        .args(["netns", "exec", &node, proxy, "--config", path.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("proxy.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Ready once the admin endpoint answers: it serves only after the start wrote the rules and
    // bound every listener (its socket accepts connections from the moment it is bound, before).
    testkit::until("the proxy is ready", 20, || async {
        let Ok(mut s) = tokio::net::TcpStream::connect("10.241.0.2:9090").await else { return false };
        let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out.starts_with("HTTP/1.1 200")
    })
    .await;
    // The proxy wrote the node's rules itself at start.
    let table = net.exec("node", &["nft", "list", "table", "inet", "tunnelgate"]);
    let listed = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(listed.contains("10.241.1.2") && listed.contains(&format!("redirect to :{port}")), "{listed}");
    let resolve = |name: &str, port: u16, ip: &str| format!("{name}:{port}:{ip}");

    // The enrolled pod's UDP 443 (QUIC) is dropped, so clients fall back to TCP; other UDP passes.
    let udp = |port: u16| {
        let s = net.in_ns("out", || std::net::UdpSocket::bind(("10.241.2.2", port)).unwrap());
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        s
    };
    let (quic, other) = (udp(443), udp(444));
    let sent = net.exec("pod", &["bash", "-c", "echo q > /dev/udp/10.241.2.2/443; echo o > /dev/udp/10.241.2.2/444"]);
    assert!(sent.status.success());
    let mut buf = [0u8; 16];
    assert!(other.recv(&mut buf).is_ok(), "UDP to another port passes");
    assert!(quic.recv(&mut buf).is_err(), "UDP 443 of an enrolled pod is dropped");

    // An allowed name, by SNI: the pod's curl, with no proxy settings, reaches the server.
    let (code, body, err) =
        net.curl("pod", &["--resolve", &resolve("allowed.test", 443, "10.241.2.2"), "https://allowed.test/"]);
    assert_eq!((code, body.as_str()), (0, "outside"), "{err}");
    // A denied name gets a TLS alert before any handshake.
    let (code, _, err) =
        net.curl("pod", &["--resolve", &resolve("denied.test", 443, "10.241.2.2"), "https://denied.test/"]);
    assert_ne!(code, 0);
    assert!(err.contains("alert access denied"), "{err}");
    // Plain HTTP, by Host: allowed, and a 403 with Proxy-Status for a denied name.
    let (code, body, err) =
        net.curl("pod", &["--resolve", &resolve("allowed.test", 80, "10.241.2.2"), "http://allowed.test/"]);
    assert_eq!((code, body.as_str()), (0, "outside-http"), "{err}");
    let (_, head, err) =
        net.curl("pod", &["-i", "--resolve", &resolve("denied.test", 80, "10.241.2.2"), "http://denied.test/"]);
    assert!(head.starts_with("HTTP/1.1 403"), "{head}{err}");
    assert!(head.to_ascii_lowercase().contains("proxy-status: tunnelgate; error=http_request_denied"), "{head}");
    // The SNI of an allowed name sent to another address: dialled at the name's address.
    let (code, body, err) =
        net.curl("pod", &["--resolve", &resolve("allowed.test", 443, "10.241.2.3"), "https://allowed.test/"]);
    assert_eq!((code, body.as_str()), (0, "outside"), "never the address the client chose: {err}");
    // IPv6 too.
    let (code, body, err) =
        net.curl("pod", &["-6", "--resolve", &resolve("allowed.test", 443, "[fd41:2::2]"), "https://allowed.test/"]);
    assert!(code == 0 && body.starts_with("outside"), "{code} {body} {err}");
    // Without a name (an address in the URL: no SNI), the CIDR and port rules decide.
    let (code, body, err) = net.curl("pod", &["https://10.241.2.3/"]);
    assert_eq!((code, body.as_str()), (0, "elsewhere"), "allowed by its address: {err}");
    let (code, _, err) = net.curl("pod", &["https://10.241.2.2/"]);
    assert!(code != 0 && err.contains("alert access denied"), "an address no rule allows: {code} {err}");
    // A pod that is not enrolled is not intercepted (no redirect rule names it): it reaches even
    // a denied name directly.
    let (code, body, err) =
        net.curl("pod2", &["--resolve", &resolve("denied.test", 443, "10.241.2.2"), "https://denied.test/"]);
    assert_eq!((code, body.as_str()), (0, "outside"), "{err}");

    let m = metrics().await;
    assert!(m.contains("tunnelgate_policy_decisions_total{decision=\"allow\""), "{m}");

    // A live transparent tunnel is revoked when a reload takes its permission away.
    let pod = net.ns("pod");
    let held = tokio::process::Command::new("ip")
        .args(["netns", "exec", &pod, "curl", "-sS", "--noproxy", "*", "--max-time", "30"])
        .args(["--resolve", &resolve("allowed.test", 80, "10.241.2.2"), "http://allowed.test/hold"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    testkit::until("the held request's tunnel is open", 10, || async {
        metrics().await.lines().any(|l| l.starts_with("tunnelgate_tunnels_active{listener=\"t4\"} 1"))
    })
    .await;
    std::fs::write(
        &path,
        config(dns.addr, port, false, Some(POD), "    - {name: other, action: allow, hosts: [other.test]}\n"),
    )
    .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(15), held.wait_with_output()).await;
    let status = ended.expect("the revoked tunnel closes long before curl's own 30 s limit").unwrap().status;
    assert!(!status.success(), "the held request got no answer: its tunnel was closed");
    // The client may see the close just before the relay task deregisters the tunnel.
    testkit::until("the revoked tunnel is no longer counted", 5, || async {
        metrics().await.lines().any(|l| l.starts_with("tunnelgate_tunnels_active{listener=\"t4\"} 0"))
    })
    .await;
    let (_, head, _) =
        net.curl("pod", &["-i", "--resolve", &resolve("allowed.test", 80, "10.241.2.2"), "http://allowed.test/"]);
    assert!(head.starts_with("HTTP/1.1 403"), "and new connections are refused: {head}");

    // Strict: an allowed name whose original destination is not among its addresses is refused.
    std::fs::write(&path, config(dns.addr, port, true, Some(POD), RULES)).unwrap();
    testkit::until("the strict configuration is in force", 20, || async {
        let (code, body, _) =
            net.curl("pod", &["--resolve", &resolve("allowed.test", 443, "10.241.2.2"), "https://allowed.test/"]);
        code == 0 && body == "outside"
    })
    .await;
    let (code, _, err) =
        net.curl("pod", &["--resolve", &resolve("allowed.test", 443, "10.241.2.3"), "https://allowed.test/"]);
    assert!(code != 0 && err.contains("alert access denied"), "{code} {err}");
    let m = metrics().await;
    assert!(m.contains("tunnelgate_tunnel_requests_total{listener=\"t4\",result=\"destination_mismatch\"} 1"), "{m}");
    assert!(
        m.contains("tunnelgate_policy_decisions_total{decision=\"allow\",reason=\"policy\",rule=\"allowed\"}"),
        "{m}"
    );

    // The enrolled set changes in place: pod2 instead of the pod.
    std::fs::write(&path, config(dns.addr, port, false, Some("10.241.3.2"), RULES)).unwrap();
    let denied_from = |role: &'static str| {
        let net = &net;
        async move {
            let (code, _, err) =
                net.curl(role, &["--resolve", &resolve("denied.test", 443, "10.241.2.2"), "https://denied.test/"]);
            code != 0 && err.contains("alert access denied")
        }
    };
    testkit::until("pod2 is intercepted", 20, || denied_from("pod2")).await;
    assert!(!denied_from("pod").await, "the pod is no longer intercepted");
    // Turning the mode off removes every rule: nobody is intercepted, and the table is gone.
    std::fs::write(&path, config(dns.addr, port, false, None, RULES)).unwrap();
    testkit::until("the table is removed", 20, || async {
        !net.exec("node", &["nft", "list", "table", "inet", "tunnelgate"]).status.success()
    })
    .await;
    assert!(!denied_from("pod2").await && !denied_from("pod").await);
    child.kill().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
