//! L-* and T-04/T-05: hot reload of policy, listeners and certificates, keeping the last good
//! configuration on any error and dropping no tunnel.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tunnelgate_proxy::app::ProxyHandle;
use tunnelgate_proxy::reload::{self, ReloadOutcome};

use crate::support::*;
use crate::tls::TempDir;

/// A document allowing `hosts`. Private addresses are allowed here so that the loopback echo
/// can stand for a public destination and rules on names alone decide (a CIDR rule listing
/// 127.0.0.2 would allow every name resolving there).
fn doc(w: &World, listeners: &str, hosts: &str, extra: &str) -> String {
    format!(
        "version: 1\nlisteners: [{listeners}]\nadmin: {{bind: '127.0.0.1:0'}}\ndns: {{nameservers: ['{}']}}\nlimits: {{drainDelay: 0s, maxConnectionsPerClient: 5000}}\npolicy:\n  denyPrivateAddresses: false\n{extra}  rules:\n    - {{name: names, action: allow, hosts: [{hosts}]}}\n    - {{name: echo-addr, action: allow, cidrs: ['127.0.0.2/32'], ports: [1]}}\n",
        w.dns.addr
    )
}

const ONE: &str = "{name: forward, bind: '127.0.0.1:0'}";

fn sha(s: &str) -> String {
    hex_lower(&Sha256::digest(s.as_bytes()))
}

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn generation(p: &ProxyHandle) -> (u64, String) {
    let (_, body) = admin_get(p.admin, "/config").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    (v["generation"].as_u64().unwrap(), v["sha256"].as_str().unwrap().to_owned())
}

async fn status_of(proxy: SocketAddr, target: &str) -> u16 {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\n\r\n").as_bytes()).await.unwrap();
    read_head(&mut s).await.0
}

fn setup_names(w: &World) {
    for n in ["a.test", "b.test"] {
        w.dns.set(n, Answer::Addrs(vec!["127.0.0.2".parse().unwrap()]));
    }
}

#[tokio::test]
async fn l01_invalid_config_keeps_the_last_good_one() {
    let w = World::new().await;
    setup_names(&w);
    let good = doc(&w, ONE, "a.test", "");
    let p = start_proxy(&good).await;
    let a = w.echo_target("a.test");
    let mut t = tunnel(addr(&p), &a).await;
    let bad = [
        "version: 1\nlisteners: [\n".to_owned(),
        good.replace("policy:", "polcy:"),
        good.replace("ports: [1]", "ports: [70000]"),
        good.replace("127.0.0.2/32", "10.0.0.0/33"),
        good.replace("hosts: [a.test]", "hosts: ['a.*.test']"),
        good.replace("action: allow, hosts", "action: permit, hosts"),
        String::new(),
        good[..good.len() / 2].to_owned(),
        good.replace("  rules:\n", "  rules:\n  rules2:\n").split("    - ").next().unwrap().to_owned(),
    ];
    for (i, b) in bad.iter().enumerate() {
        let r = reload::apply(&p.inner, b).await;
        assert!(r.is_err(), "document {i} must be refused");
        roundtrip(&mut t, b"tunnel unaffected").await;
        assert_eq!(status_of(addr(&p), &a).await, 200, "old policy still in force after document {i}");
    }
    let err = reload::apply(&p.inner, &good.replace("hosts: [a.test]", "hosts: ['a.*.test']")).await.unwrap_err();
    assert!(tunnelgate_proxy::error::ErrorChain(&err).to_string().contains("policy.rules[0].hosts[0]"), "{err}");
    assert_eq!(generation(&p).await, (1, sha(&good)));
    let failures = (bad.len() + 1) as f64;
    assert_eq!(
        metric_when(p.admin, "tunnelgate_config_reloads_total{result=\"failure\"}", |v| v == failures).await,
        failures
    );
    assert_eq!(metric_when(p.admin, "tunnelgate_config_generation", |v| v == 1.0).await, 1.0);
    assert_eq!(admin_get(p.admin, "/readyz").await.0, 200);
}

#[tokio::test]
async fn l03_stricter_policy_spares_established_tunnels_by_default() {
    let w = World::new().await;
    setup_names(&w);
    let p = start_proxy(&doc(&w, ONE, "a.test", "")).await;
    let (a, b) = (w.echo_target("a.test"), w.echo_target("b.test"));
    let mut t = tunnel(addr(&p), &a).await;
    assert_eq!(status_of(addr(&p), &b).await, 403);
    let next = doc(&w, ONE, "b.test", "");
    assert!(matches!(
        reload::apply(&p.inner, &next).await.unwrap(),
        ReloadOutcome::Applied { generation: 2, revoked: 0 }
    ));
    assert_eq!(generation(&p).await, (2, sha(&next)));
    assert_eq!(status_of(addr(&p), &a).await, 403, "new connections follow the new policy");
    assert_eq!(status_of(addr(&p), &b).await, 200);
    roundtrip(&mut t, b"admitted under generation 1").await;
    // The same document again changes nothing.
    assert_eq!(reload::apply(&p.inner, &next).await.unwrap(), ReloadOutcome::Unchanged);
    assert_eq!(generation(&p).await.0, 2);
}

#[tokio::test]
async fn l03_reevaluate_on_reload_revokes_what_is_no_longer_allowed() {
    let w = World::new().await;
    setup_names(&w);
    let p = start_proxy(&doc(&w, ONE, "a.test, b.test", "")).await;
    let mut ta = tunnel(addr(&p), &w.echo_target("a.test")).await;
    let mut tb = tunnel(addr(&p), &w.echo_target("b.test")).await;
    let next = doc(&w, ONE, "b.test", "  reevaluateOnReload: true\n");
    assert!(matches!(reload::apply(&p.inner, &next).await.unwrap(), ReloadOutcome::Applied { revoked: 1, .. }));
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(1), ta.read(&mut buf)).await.expect("closed within 1 s");
    assert!(matches!(closed, Ok(0) | Err(_)));
    roundtrip(&mut tb, b"still allowed").await;
    assert!(
        eventually(2, || async {
            metric(p.admin, "tunnelgate_tunnel_duration_seconds_count{close=\"revoked\"}").await == 1.0
        })
        .await
    );
}

#[tokio::test]
async fn listeners_are_added_removed_and_rebound_without_disturbing_others() {
    let w = World::new().await;
    setup_names(&w);
    let p = start_proxy(&doc(&w, "{name: a, bind: '127.0.0.1:0'}, {name: b, bind: '127.0.0.1:0'}", "a.test", "")).await;
    let (la, lb) = (p.listener("a").unwrap(), p.listener("b").unwrap());
    let target = w.echo_target("a.test");
    let mut on_a = tunnel(la, &target).await;
    let mut on_b = tunnel(lb, &target).await;
    // Remove b, add c: a keeps its socket and tunnels; b stops accepting but its tunnel drains.
    let next = doc(&w, "{name: a, bind: '127.0.0.1:0'}, {name: c, bind: '127.0.0.1:0'}", "a.test", "");
    reload::apply(&p.inner, &next).await.unwrap();
    assert_eq!(p.listener("a"), Some(la));
    let lc = p.listener("c").expect("c bound");
    assert!(p.listener("b").is_none());
    let refused = TcpStream::connect(lb).await;
    assert!(matches!(refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused));
    roundtrip(&mut on_a, b"a").await;
    roundtrip(&mut on_b, b"b drains").await;
    roundtrip(&mut tunnel(lc, &target).await, b"c").await;
    // Rename a to a2 on the same fixed address: the socket is handed over, no refusal window.
    let fixed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let with_fixed = doc(&w, &format!("{{name: a, bind: '{fixed}'}}"), "a.test", "");
    reload::apply(&p.inner, &with_fixed).await.unwrap();
    let renamed = doc(&w, &format!("{{name: a2, bind: '{fixed}'}}"), "a.test", "");
    reload::apply(&p.inner, &renamed).await.unwrap();
    assert_eq!(p.listener("a2"), Some(fixed));
    roundtrip(&mut tunnel(fixed, &target).await, b"renamed").await;
    assert_eq!(
        metric_when(p.admin, "tunnelgate_tunnel_requests_total{listener=\"a2\",result=\"established\"}", |v| v == 1.0)
            .await,
        1.0
    );
    // A listener that cannot bind fails the whole reload and changes nothing.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap();
    let (gen_before, _) = generation(&p).await;
    let failing = doc(&w, &format!("{{name: a2, bind: '{fixed}'}}, {{name: busy, bind: '{busy}'}}"), "b.test", "");
    let err = reload::apply(&p.inner, &failing).await.unwrap_err();
    let msg = tunnelgate_proxy::error::ErrorChain(&err).to_string();
    assert!(msg.contains("listeners[1] (busy): cannot bind") && msg.contains("in use"), "{msg}");
    assert_eq!(generation(&p).await.0, gen_before);
    assert_eq!(status_of(fixed, &w.echo_target("b.test")).await, 403, "old policy in force");
    roundtrip(&mut on_a, b"untouched").await;
}

/// Echo round trips of 1 KiB with a running hash both ways; returns whether all matched.
async fn pump<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, stop: Arc<std::sync::atomic::AtomicBool>) -> (bool, usize) {
    let mut sent = Sha256::new();
    let mut got = Sha256::new();
    let mut buf = vec![0u8; 1024];
    let mut back = vec![0u8; 1024];
    let mut n = 0usize;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i + n) as u8;
        }
        if s.write_all(&buf).await.is_err() || s.read_exact(&mut back).await.is_err() {
            return (false, n);
        }
        sent.update(&buf);
        got.update(&back);
        n += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (sent.finalize() == got.finalize(), n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l02_reload_under_1000_active_tunnels_drops_none() {
    let _ = rlimit::increase_nofile_limit(65_536);
    let w = World::new().await;
    setup_names(&w);
    let docs = [doc(&w, ONE, "a.test", ""), doc(&w, ONE, "a.test, b.test", ""), doc(&w, ONE, "b.test, a.test", "")];
    let p = start_proxy(&docs[0]).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut pumps = Vec::new();
    for _ in 0..1000 {
        let s = tunnel(addr(&p), &w.echo_target("a.test")).await;
        pumps.push(tokio::spawn(pump(s, stop.clone())));
    }
    for i in 0..5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        reload::apply(&p.inner, &format!("{}# {i}\n", docs[i % 3])).await.unwrap();
        assert_eq!(status_of(addr(&p), &w.echo_target(if i % 3 == 0 { "a.test" } else { "b.test" })).await, 200);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut rounds = 0;
    for t in pumps {
        let (ok, n) = t.await.unwrap();
        assert!(ok, "a stream broke or its hash differs");
        rounds += n;
    }
    assert_eq!(generation(&p).await.0, 6);
    assert!(rounds >= 1000, "pumps made progress: {rounds}");
}

/// A kubelet-style projected directory: `config.yaml -> ..data/config.yaml`, `..data -> ..<version>`.
struct Projected {
    dir: TempDir,
    n: usize,
}

impl Projected {
    fn new(files: &[(&str, &[u8])]) -> Projected {
        let mut p = Projected { dir: TempDir::new("projected"), n: 0 };
        p.swap(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), p.dir.0.join(name)).unwrap();
        }
        p
    }

    /// Writes a new version directory and swaps `..data` atomically (rename of a symlink).
    fn swap(&mut self, files: &[(&str, &[u8])]) {
        self.n += 1;
        let version = format!("..2026_{}", self.n);
        std::fs::create_dir(self.dir.0.join(&version)).unwrap();
        for (name, content) in files {
            std::fs::write(self.dir.0.join(&version).join(name), content).unwrap();
        }
        let tmp = self.dir.0.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.0.join("..data")).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }
}

async fn wait_generation(p: &ProxyHandle, want: u64) {
    assert!(
        eventually(5, || async { generation(p).await.0 == want }).await,
        "generation {want} not reached: {:?}",
        generation(p).await
    );
}

#[tokio::test]
async fn l04_symlink_swap_in_place_edit_and_recreate_are_all_seen() {
    let w = World::new().await;
    setup_names(&w);
    let first = doc(&w, ONE, "a.test", "");
    let mut proj = Projected::new(&[("config.yaml", first.as_bytes())]);
    let p = start_proxy(&first).await;
    // Poll only hourly: what follows must be seen through file events.
    let _trigger = reload::spawn_file_source(p.inner.clone(), proj.path("config.yaml"), Duration::from_secs(3600));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = doc(&w, ONE, "b.test", "");
    proj.swap(&[("config.yaml", second.as_bytes())]);
    wait_generation(&p, 2).await;
    assert_eq!(generation(&p).await.1, sha(&second));
    assert_eq!(status_of(addr(&p), &w.echo_target("b.test")).await, 200);
    assert_eq!(status_of(addr(&p), &w.echo_target("a.test")).await, 403);
    // A plain file: edited in place, replaced by mv, deleted and recreated.
    let plain = TempDir::new("plain");
    let f = plain.0.join("proxy.yaml");
    std::fs::write(&f, &second).unwrap();
    let q = start_proxy(&second).await;
    let _t2 = reload::spawn_file_source(q.inner.clone(), f.clone(), Duration::from_secs(3600));
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::write(&f, format!("{first}# edit\n")).unwrap();
    wait_generation(&q, 2).await;
    std::fs::write(plain.0.join("new.yaml"), format!("{second}# mv\n")).unwrap();
    std::fs::rename(plain.0.join("new.yaml"), &f).unwrap();
    wait_generation(&q, 3).await;
    std::fs::remove_file(&f).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(generation(&q).await.0, 3, "a missing file keeps the last good config");
    std::fs::write(&f, format!("{first}# recreated\n")).unwrap();
    wait_generation(&q, 4).await;
    assert_eq!(generation(&q).await.1, sha(&format!("{first}# recreated\n")));
}

#[tokio::test]
async fn l05_a_reload_storm_settles_on_the_last_write() {
    let w = World::new().await;
    setup_names(&w);
    let a = doc(&w, ONE, "a.test", "");
    let b = doc(&w, ONE, "b.test", "");
    let mut proj = Projected::new(&[("config.yaml", a.as_bytes())]);
    let p = start_proxy(&a).await;
    let _t = reload::spawn_file_source(p.inner.clone(), proj.path("config.yaml"), Duration::from_secs(3600));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut last = String::new();
    for i in 0..50 {
        last = format!("{}# write {i}\n", if i % 2 == 0 { &a } else { &b });
        proj.swap(&[("config.yaml", last.as_bytes())]);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(eventually(5, || async { generation(&p).await.1 == sha(&last) }).await);
    // Writes were coalesced: far fewer generations than writes.
    let gen = generation(&p).await.0;
    assert!(gen < 50, "generation {gen}");
    assert_eq!(metric_when(p.admin, "tunnelgate_config_reloads_total{result=\"failure\"}", |v| v == 0.0).await, 0.0);
    // The last write (odd index: b) is what is enforced.
    assert_eq!(status_of(addr(&p), &w.echo_target("b.test")).await, 200);
    assert_eq!(status_of(addr(&p), &w.echo_target("a.test")).await, 403);
}

fn self_signed(name: &str, expired: bool) -> (String, String, CertificateDer<'static>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    if expired {
        params.not_before = rcgen::date_time_ymd(2019, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 1);
    }
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem(), cert.der().clone())
}

/// Handshakes (trusting any of `cas`) and returns the certificate the proxy presented.
async fn presented(addr: SocketAddr, cas: &[CertificateDer<'static>]) -> CertificateDer<'static> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let s = crate::tls::connector(cas).connect(ServerName::try_from("proxy.test").unwrap(), tcp).await.unwrap();
    s.get_ref().1.peer_certificates().unwrap()[0].clone()
}

fn tls_doc(w: &World, dir: &Path) -> String {
    format!(
        "version: 1\nlisteners: [{{name: secure, bind: '127.0.0.1:0', tls: {{certFile: '{d}/tls.crt', keyFile: '{d}/tls.key'}}}}]\nadmin: {{bind: '127.0.0.1:0'}}\ndns: {{nameservers: ['{}']}}\nlimits: {{drainDelay: 0s}}\npolicy:\n  rules:\n    - {{name: echo, action: allow, cidrs: ['127.0.0.2/32']}}\n",
        w.dns.addr,
        d = dir.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t04_certificate_rotation_mid_traffic() {
    let w = World::new().await;
    let (c1, k1, d1) = self_signed("proxy.test", false);
    let mut proj = Projected::new(&[("tls.crt", c1.as_bytes()), ("tls.key", k1.as_bytes())]);
    let text = tls_doc(&w, &proj.dir.0);
    let cfgdir = TempDir::new("tlscfg");
    std::fs::write(cfgdir.0.join("c.yaml"), &text).unwrap();
    let p = start_proxy(&text).await;
    let _t = reload::spawn_file_source(p.inner.clone(), cfgdir.0.join("c.yaml"), Duration::from_secs(3600));
    let mut cas = vec![d1.clone()];
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut pumps = Vec::new();
    for _ in 0..20 {
        let tcp = TcpStream::connect(addr(&p)).await.unwrap();
        let mut s = crate::tls::connector(std::slice::from_ref(&d1))
            .connect(ServerName::try_from("proxy.test").unwrap(), tcp)
            .await
            .unwrap();
        s.write_all(format!("CONNECT {} HTTP/1.1\r\n\r\n", w.echo.addr).as_bytes()).await.unwrap();
        assert_eq!(read_head(&mut s).await.0, 200);
        pumps.push(tokio::spawn(pump(s, stop.clone())));
    }
    for i in 0..3 {
        let (c, k, d) = self_signed("proxy.test", false);
        proj.swap(&[("tls.crt", c.as_bytes()), ("tls.key", k.as_bytes())]);
        cas.push(d.clone());
        let seen = eventually(5, || async { presented(addr(&p), &cas).await == d }).await;
        assert!(seen, "rotation {i}: new handshakes present the new certificate");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in pumps {
        assert!(t.await.unwrap().0, "an established TLS session broke during rotation");
    }
}

#[tokio::test]
async fn t05_broken_certificate_on_reload_keeps_the_last_good_one() {
    let w = World::new().await;
    let (c1, k1, d1) = self_signed("proxy.test", false);
    let mut proj = Projected::new(&[("tls.crt", c1.as_bytes()), ("tls.key", k1.as_bytes())]);
    let text = tls_doc(&w, &proj.dir.0);
    let cfgdir = TempDir::new("tlscfg5");
    std::fs::write(cfgdir.0.join("c.yaml"), &text).unwrap();
    let p = start_proxy(&text).await;
    let _t = reload::spawn_file_source(p.inner.clone(), cfgdir.0.join("c.yaml"), Duration::from_secs(3600));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (c2, k2, d2) = self_signed("proxy.test", false);
    let (ce, ke, de) = self_signed("proxy.test", true);
    let broken: Vec<(String, String)> = vec![
        (String::new(), k1.clone()),
        (c1[..c1.len() / 2].to_owned(), k1.clone()),
        (c1.clone(), k2.clone()),
        (ce.clone(), ke.clone()),
        (c2.clone(), String::new()),
    ];
    for (i, (c, k)) in broken.iter().enumerate() {
        proj.swap(&[("tls.crt", c.as_bytes()), ("tls.key", k.as_bytes())]);
        let failures = (i + 1) as f64;
        assert!(
            eventually(5, || async {
                metric(p.admin, "tunnelgate_config_reloads_total{result=\"failure\"}").await >= failures
            })
            .await,
            "broken pair {i} not refused"
        );
        assert_eq!(
            presented(addr(&p), &[d1.clone(), d2.clone(), de.clone()]).await,
            d1,
            "pair {i}: old certificate still served"
        );
        assert_eq!(admin_get(p.admin, "/readyz").await.0, 200);
    }
    assert_eq!(generation(&p).await.0, 1);
    // A good pair later is picked up.
    proj.swap(&[("tls.crt", c2.as_bytes()), ("tls.key", k2.as_bytes())]);
    assert!(eventually(5, || async { presented(addr(&p), &[d1.clone(), d2.clone()]).await == d2 }).await);
}

/// `/config` reports the operator's render number and the last reload's failure, and long-polls
/// until either changes (the operator's rollout view).
#[tokio::test]
async fn config_reports_the_render_and_long_polls_for_changes() {
    let w = World::new().await;
    let good = format!("# tunnelgate-render: 7\n{}", w.config(""));
    let p = start_proxy(&good).await;
    let doc = |body: String| serde_json::from_str::<serde_json::Value>(&body).unwrap();
    let (_, body) = admin_get(p.admin, "/config").await;
    let first = doc(body);
    assert_eq!(first["render"], 7);
    assert_eq!(first["lastReload"]["failed"], false);
    assert_eq!(metric_when(p.admin, "tunnelgate_config_render", |v| v == 7.0).await, 7.0);
    let since = first["changes"].as_u64().unwrap();
    // A long-poll returns as soon as a reload fails, with the reason.
    let admin = p.admin;
    let poll = tokio::spawn(async move { admin_get(admin, &format!("/config?since={since}&timeout=20")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!poll.is_finished(), "nothing changed yet: the poll waits");
    let _ = reload::apply(&p.inner, "version: 1\nlisteners: []\n").await;
    let failed = doc(tokio::time::timeout(Duration::from_secs(5), poll).await.unwrap().unwrap().1);
    assert_eq!(failed["lastReload"], serde_json::json!({"failed": true, "reason": "invalid"}));
    assert_eq!(failed["render"], 7, "the last good configuration stays in force");
    assert_eq!(metric_when(p.admin, "tunnelgate_config_last_reload_success ", |v| v == 0.0).await, 0.0);
    let next = good.replace("render: 7", "render: 8");
    reload::apply(&p.inner, &next).await.unwrap();
    let (_, body) = admin_get(p.admin, "/config").await;
    let now = doc(body);
    assert_eq!((now["render"].as_u64(), now["lastReload"]["failed"].as_bool()), (Some(8), Some(false)));
    assert_eq!(metric_when(p.admin, "tunnelgate_config_last_reload_success ", |v| v == 1.0).await, 1.0);
    let prefix = &now["sha256"].as_str().unwrap()[..12];
    let (_, metrics) = admin_get(p.admin, "/metrics").await;
    let info: Vec<&str> = metrics.lines().filter(|l| l.starts_with("tunnelgate_config_info{")).collect();
    assert_eq!(info, [format!("tunnelgate_config_info{{sha256=\"{prefix}\"}} 1")], "one series: the config in force");
}

/// With `admin.configTokenFile`, `/config` (plain and long-polled) answers only the request that
/// carries the token; probes and metrics stay open; a token file that cannot be used is refused at
/// reload, naming the field, and the token in force stays; a new token in the file is the token
/// from the next reload on.
#[tokio::test]
async fn config_answers_only_the_admin_token_when_one_is_configured() {
    let w = World::new().await;
    let dir = std::env::temp_dir().join(format!("tg-it-admin-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, "s3cret-token-of-the-operator\n").unwrap();
    let yaml = w.config("").replace(
        r#"admin: {bind: "127.0.0.1:0"}"#,
        &format!(r#"admin: {{bind: "127.0.0.1:0", configTokenFile: "{}"}}"#, token_file.display()),
    );
    let p = start_proxy(&yaml).await;
    let get = |path: &str, token: Option<&str>| {
        let (admin, path, token) = (p.admin, path.to_owned(), token.map(str::to_owned));
        async move {
            let mut s = TcpStream::connect(admin).await.unwrap();
            let header = token.map(|t| format!("X-Tunnelgate-Admin-Token: {t}\r\n")).unwrap_or_default();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{header}Connection: close\r\n\r\n").as_bytes())
                .await
                .unwrap();
            read_to_close(&mut s).await
        }
    };
    let (status, text) = get("/config", None).await;
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("x-tunnelgate-admin-token") && !text.contains("generation"), "{text}");
    assert_eq!(get("/config?since=0&timeout=5", Some("wrong-token-wrong-token")).await.0, 401);
    let (status, text) = get("/config", Some("s3cret-token-of-the-operator")).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"generation\":1"), "{text}");
    // Probes and metrics are not behind the token.
    assert_eq!(get("/healthz", None).await.0, 200);
    assert_eq!(get("/readyz", None).await.0, 200);
    assert_eq!(get("/metrics", None).await.0, 200);
    // A file too short to be a token is refused at reload; the token in force stays.
    std::fs::write(&token_file, "short\n").unwrap();
    let err = reload::apply(&p.inner, &yaml).await.unwrap_err();
    assert_eq!(err.reason(), "admin-token");
    let mut chain = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(e) = source {
        chain.push_str(&format!(": {e}"));
        source = e.source();
    }
    assert!(chain.contains("admin.configTokenFile") && chain.contains("at least 16"), "{chain}");
    assert_eq!(get("/config", Some("s3cret-token-of-the-operator")).await.0, 200);
    // A rotated token is the one from the next reload on.
    std::fs::write(&token_file, "the-rotated-token-0123456789\n").unwrap();
    reload::apply(&p.inner, &yaml).await.unwrap();
    assert_eq!(get("/config", Some("s3cret-token-of-the-operator")).await.0, 401);
    assert_eq!(get("/config", Some("the-rotated-token-0123456789")).await.0, 200);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// One request on a keep-alive connection; returns the status.
async fn get_on(s: &mut TcpStream, target: &str, authority: &str, extra: &str) -> u16 {
    s.write_all(format!("GET {target} HTTP/1.1\r\nHost: {authority}\r\n{extra}\r\n").as_bytes()).await.unwrap();
    let (status, _) = read_head(s).await;
    if status == 200 {
        // The echo-free upstream below answers 5 bytes.
        let mut body = [0u8; 5];
        s.read_exact(&mut body).await.unwrap();
    }
    status
}

/// An HTTP upstream on 127.0.0.2 answering every request with 200 and 5 bytes, keep-alive.
async fn hello_upstream() -> Upstream {
    Upstream::start("127.0.0.2", |mut s| async move {
        let mut buf = vec![0u8; 8192];
        let mut have = Vec::new();
        loop {
            while let Some(i) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                have.drain(..i + 4);
                if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello").await.is_err() {
                    return;
                }
            }
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => have.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
}

/// Every request on a keep-alive connection is judged by the configuration in force when it
/// arrives: after a reload that denies the target, a GET and a CONNECT on the connection opened
/// before it are refused (403), and a narrowed request rate applies to it at once.
#[tokio::test]
async fn requests_on_an_old_keepalive_connection_follow_the_configuration_in_force() {
    let w = World::new().await;
    let up = hello_upstream().await;
    let yaml = w.config("");
    let p = start_proxy(&yaml).await;
    let authority = format!("allowed.test:{}", up.addr.port());
    let target = format!("http://{authority}/");
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    assert_eq!(get_on(&mut s, &target, &authority, "").await, 200);

    // The platform denies the target: the connection opened before is refused on its next request.
    let denying = yaml.replace("hosts: [denied.test]", "hosts: [denied.test, allowed.test]");
    assert!(matches!(reload::apply(&p.inner, &denying).await.unwrap(), ReloadOutcome::Applied { .. }));
    assert_eq!(get_on(&mut s, &target, &authority, "").await, 403, "GET on the old connection");
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    // Allowed again, a request goes through; then denied again: a CONNECT on that connection opens
    // no new tunnel to the denied target.
    assert!(matches!(reload::apply(&p.inner, &yaml).await.unwrap(), ReloadOutcome::Applied { .. }));
    assert_eq!(get_on(&mut s, &target, &authority, "").await, 200);
    assert!(matches!(reload::apply(&p.inner, &denying).await.unwrap(), ReloadOutcome::Applied { .. }));
    let t = w.echo_target("allowed.test");
    s.write_all(format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n\r\n").as_bytes()).await.unwrap();
    assert_eq!(read_head(&mut s).await.0, 403, "CONNECT on the old connection");

    // A narrowed request rate applies to a connection accepted before it.
    assert!(matches!(reload::apply(&p.inner, &yaml).await.unwrap(), ReloadOutcome::Applied { .. }));
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    assert_eq!(get_on(&mut s, &target, &authority, "").await, 200);
    let narrowed = yaml.replace(
        "limits: {drainDelay: 0s, requestHeadTimeout: 5s}",
        "limits: {drainDelay: 0s, requestHeadTimeout: 5s, requestsPerSecond: 1, requestBurst: 1}",
    );
    assert!(matches!(reload::apply(&p.inner, &narrowed).await.unwrap(), ReloadOutcome::Applied { .. }));
    let statuses = [get_on(&mut s, &target, &authority, "").await, get_on(&mut s, &target, &authority, "").await];
    assert_eq!(statuses, [200, 429], "the new bucket (burst 1) holds the old connection");
}
