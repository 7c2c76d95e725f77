//! S-*: which destinations may be reached, checked on the addresses actually dialled.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

use crate::support::*;

fn req(target: &str) -> Vec<u8> {
    format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").into_bytes()
}

async fn statuses(p: std::net::SocketAddr, targets: &[String]) -> Vec<(String, u16)> {
    let mut out = Vec::new();
    for t in targets {
        let (status, text) = exchange(p, &req(t)).await;
        assert!(text.contains("Connection: close") || status == 200, "{t}: {text}");
        out.push((t.clone(), status));
    }
    out
}

fn all(got: &[(String, u16)], want: u16) {
    for (t, s) in got {
        assert_eq!(*s, want, "{t}");
    }
}

#[tokio::test]
async fn s01_loopback_unspecified_and_self() {
    let w = World::new().await;
    let p2 = w.proxy("").await;
    all(
        &statuses(
            addr(&p2),
            &[
                "127.0.0.1:22",
                "127.255.255.254:443",
                "[::1]:443",
                "localhost:443",
                "anything.localhost:443",
                "0.0.0.0:22",
                "[::]:22",
            ]
            .map(String::from),
        )
        .await,
        403,
    );
    // A loopback range opens nothing: loopback is opened only by naming the address exactly.
    let range = w.proxy("    - {name: loop, action: allow, cidrs: [\"127.0.0.0/8\", \"::1/128\"]}\n").await;
    all(&statuses(addr(&range), &["127.0.0.1:22", "127.0.0.3:443"].map(String::from)).await, 403);
    assert_eq!(
        metric_when(
            range.admin,
            "tunnelgate_policy_decisions_total{decision=\"deny\",reason=\"private_address\",rule=\"default\"}",
            |v| v == 2.0
        )
        .await,
        2.0
    );
    // Even a rule that names loopback exactly must not let a client reach the proxy itself.
    let with_self = w.proxy("    - {name: loop, action: allow, cidrs: [\"127.0.0.1/32\", \"::1/128\"]}\n").await;
    let own2 = addr(&with_self).port();
    all(
        &statuses(
            addr(&with_self),
            &[
                format!("127.0.0.1:{own2}"),
                format!("localhost:{own2}"),
                format!("127.0.0.1:{}", with_self.admin.port()),
            ],
        )
        .await,
        403,
    );
    assert_eq!(
        metric_when(
            with_self.admin,
            "tunnelgate_policy_decisions_total{decision=\"deny\",reason=\"self\",rule=\"self\"}",
            |v| v == 3.0
        )
        .await,
        3.0
    );
    // The unspecified addresses are never a destination (RFC 1122 3.2.1.3), whatever the policy
    // opens: they reach this host, on any port (the admin port bound to loopback included).
    let open = start_proxy(
        &w.config("    - {name: anywhere, action: allow, cidrs: [\"0.0.0.0/0\", \"::/0\"]}\n")
            .replace("  defaultAction: deny\n", "  defaultAction: deny\n  denyPrivateAddresses: false\n"),
    )
    .await;
    let (own, admin) = (addr(&open).port(), open.admin.port());
    all(
        &statuses(
            addr(&open),
            &[
                format!("0.0.0.0:{admin}"),
                format!("[::]:{own}"),
                format!("[::ffff:0.0.0.0]:{admin}"),
                "0.0.0.0:22".into(),
            ],
        )
        .await,
        403,
    );
    assert_eq!(
        metric_when(
            open.admin,
            "tunnelgate_policy_decisions_total{decision=\"deny\",reason=\"self\",rule=\"self\"}",
            |v| v == 4.0
        )
        .await,
        4.0
    );
}

#[tokio::test]
async fn s02_metadata_endpoints() {
    let w = World::new().await;
    let p = w.proxy("").await;
    all(
        &statuses(
            addr(&p),
            &[
                "169.254.169.254:80",
                "169.254.170.2:80",
                "metadata.google.internal:80",
                "100.100.100.200:80",
                "[fd00:ec2::254]:80",
            ]
            .map(String::from),
        )
        .await,
        403,
    );
}

#[tokio::test]
async fn s03_private_ranges_need_explicit_cidr() {
    let w = World::new().await;
    let p = w.proxy("").await;
    all(
        &statuses(
            addr(&p),
            &[
                "10.0.0.1:443",
                "172.16.0.1:443",
                "192.168.0.1:443",
                "100.64.0.1:443",
                "224.0.0.1:443",
                "255.255.255.255:443",
                "[fc00::1]:443",
                "[fe80::1]:443",
                "[ff02::2]:443",
            ]
            .map(String::from),
        )
        .await,
        403,
    );
}

#[tokio::test]
async fn s04_embedded_ipv4_forms() {
    let w = World::new().await;
    // Even with 127.0.0.2 listed, no IPv6 spelling reaches a non-listed private address.
    let p = w.proxy("").await;
    let t: Vec<String> = [
        "[::ffff:10.0.0.1]:443",
        "[::ffff:a00:1]:443",
        "[::ffff:127.0.0.1]:443",
        "[::ffff:169.254.169.254]:80",
        "[::127.0.0.1]:443",
        "[64:ff9b::a00:1]:443",
        "[2002:a00:1::1]:443",
        "[2001:0:4136:e378:8000:63bf:3fff:fdd2]:443",
    ]
    .map(String::from)
    .to_vec();
    all(&statuses(addr(&p), &t).await, 403);
    // The same values as AAAA answers.
    w.dns.set("v6.test", Answer::Addrs(vec!["::ffff:127.0.0.1".parse().unwrap()]));
    let p = w.proxy("    - {name: v6, action: allow, hosts: [v6.test]}\n").await;
    all(&statuses(addr(&p), &["v6.test:443".to_owned()]).await, 403);
}

#[tokio::test]
async fn s05_odd_ipv4_spellings_never_reach_the_resolver() {
    let w = World::new().await;
    let p = w.proxy("").await;
    let t: Vec<String> = [
        "2130706433",
        "0x7f000001",
        "0x7f.1",
        "127.1",
        "0177.0.0.1",
        "017700000001",
        "010.0.0.1",
        "127.0.0.1.",
        "1.2.3.4.5",
        "0x7f.0x0.0x0.0x1",
    ]
    .iter()
    .map(|h| format!("{h}:443"))
    .collect();
    all(&statuses(addr(&p), &t).await, 400);
    assert_eq!(w.dns.total_queries(), 0);
    // A name that merely starts with a digit is a name.
    w.dns.set("1password.allowed.test", Answer::Addrs(vec!["127.0.0.2".parse().unwrap()]));
    let mut s = tunnel(addr(&p), &w.echo_target("1password.allowed.test")).await;
    roundtrip(&mut s, b"1").await;
}

#[tokio::test]
async fn s06_dns_answer_with_private_address() {
    let w = World::new().await;
    w.dns.set("public-looking.test", Answer::Addrs(vec!["127.0.0.3".parse().unwrap()]));
    w.dns.set("meta.test", Answer::Addrs(vec!["169.254.169.254".parse().unwrap()]));
    w.dns.set("v6loop.test", Answer::Addrs(vec!["::1".parse().unwrap()]));
    let p = w.proxy("    - {name: broad, action: allow, hosts: [\"*.test\"]}\n").await;
    let t: Vec<String> = ["public-looking.test", "internal.attacker.test", "meta.test", "v6loop.test"]
        .iter()
        .map(|h| format!("{h}:{}", w.sink.addr.port()))
        .collect();
    all(&statuses(addr(&p), &t).await, 403);
    assert_eq!(w.sink.count(), 0, "no SYN may reach a refused address");
}

#[tokio::test]
async fn s02_a_catch_all_allow_opens_no_refused_address() {
    // "Anywhere" as people write it: it must allow the internet and nothing the defaults refused,
    // in either family and in the IPv6 forms that embed IPv4; nothing may even reach the sink.
    let w = World::new().await;
    w.dns.set("meta.attacker.test", Answer::Addrs(vec!["169.254.169.254".parse().unwrap()]));
    w.dns.set("sink.attacker.test", Answer::Addrs(vec!["127.0.0.3".parse().unwrap()]));
    let p = w
        .proxy(
            "    - {name: anyv4, action: allow, cidrs: [\"0.0.0.0/0\"]}\n    - {name: anyv6, action: allow, cidrs: [\"::/0\"]}\n    - {name: halves, action: allow, cidrs: [\"0.0.0.0/1\", \"8.0.0.0/5\", \"64:ff9b::/96\"]}\n",
        )
        .await;
    let sink = w.sink.addr.port();
    let targets: Vec<String> = [
        "169.254.169.254:80".to_string(),
        "10.0.0.5:443".to_string(),
        "127.0.0.1:22".to_string(),
        format!("127.0.0.3:{sink}"),
        "[fd00:ec2::254]:80".to_string(),
        "[::ffff:169.254.169.254]:80".to_string(),
        "[64:ff9b::a9fe:a9fe]:80".to_string(),
        format!("[::ffff:127.0.0.3]:{sink}"),
        "[::1]:22".to_string(),
        "100.100.100.200:80".to_string(),
        format!("meta.attacker.test:{sink}"),
        format!("sink.attacker.test:{sink}"),
    ]
    .to_vec();
    all(&statuses(addr(&p), &targets).await, 403);
    assert_eq!(w.sink.count(), 0, "no SYN may reach a refused address");
    let denied = targets.len() as f64;
    assert_eq!(
        metric_when(
            p.admin,
            "tunnelgate_policy_decisions_total{decision=\"deny\",reason=\"private_address\",rule=\"default\"}",
            |v| v == denied
        )
        .await,
        denied
    );
    // An address that is named exactly is opened by the same kind of rule.
    let named = w.proxy(&format!("    - {{name: anyv4, action: allow, cidrs: [\"0.0.0.0/0\"]}}\n    - {{name: sink, action: allow, cidrs: [\"127.0.0.3/32\"], ports: [{sink}]}}\n")).await;
    let _tunnel = tunnel(addr(&named), &format!("127.0.0.3:{sink}")).await;
}

#[tokio::test]
async fn s07_dns_rebinding_and_mixed_answers() {
    let w = World::new().await;
    let echo: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let sink: std::net::IpAddr = "127.0.0.3".parse().unwrap();
    w.dns.set("rebind.allowed.test", Answer::Sequence(vec![vec![echo], vec![sink]]));
    let p = w.proxy("").await;
    // First resolution says 127.0.0.2: it is checked and exactly it is dialled.
    let port = w.echo.addr.port();
    let mut s = tunnel(addr(&p), &format!("rebind.allowed.test:{port}")).await;
    roundtrip(&mut s, b"bound").await;
    assert_eq!(w.dns.queries("rebind.allowed.test"), 1, "one resolution per CONNECT");
    // Later answers point at 127.0.0.3: refused, and nothing reaches it.
    let (status, _) = exchange(addr(&p), &req(&format!("rebind.allowed.test:{port}"))).await;
    assert_eq!(status, 403);
    assert_eq!(w.sink.count(), 0);
    // Mixed answers fail closed (decision 9), in either order.
    w.dns.set("mixed1.allowed.test", Answer::Addrs(vec![echo, sink]));
    w.dns.set("mixed2.allowed.test", Answer::Addrs(vec!["10.0.0.1".parse().unwrap(), echo]));
    w.dns.set("mixed3.allowed.test", Answer::Addrs(vec![echo, "::1".parse().unwrap()]));
    all(&statuses(addr(&p), &["mixed1", "mixed2", "mixed3"].map(|m| format!("{m}.allowed.test:{port}"))).await, 403);
    assert_eq!(w.sink.count(), 0);
}

#[tokio::test]
async fn s09_port_policy() {
    let w = World::new().await;
    let port = w.echo.addr.port();
    let yaml = format!(
        "version: 1\nlisteners: [{{name: f, bind: '127.0.0.1:0'}}]\nadmin: {{bind: '127.0.0.1:0'}}\ndns: {{nameservers: ['{}']}}\npolicy:\n  rules:\n    - {{name: a, action: allow, hosts: [allowed.test], cidrs: ['127.0.0.2/32'], ports: [{port}]}}\n",
        w.dns.addr
    );
    let p = start_proxy(&yaml).await;
    all(&statuses(addr(&p), &[25, 22, 6379, 10250, 2379].map(|pt| format!("allowed.test:{pt}"))).await, 403);
    let mut s = tunnel(addr(&p), &format!("allowed.test:{port}")).await;
    roundtrip(&mut s, b"port ok").await;
}

#[tokio::test]
async fn s10_dns_and_upstream_failures() {
    let w = World::new().await;
    w.dns.set("servfail.allowed.test", Answer::ServFail);
    w.dns.set("silent.allowed.test", Answer::Silent);
    w.dns.set("zero.allowed.test", Answer::Addrs(vec!["0.0.0.0".parse().unwrap()]));
    let p = w.proxy("relay: {connectTimeout: 500ms}\n").await;
    // NXDOMAIN and SERVFAIL: 502; no answer: 504 within the DNS timeout; 0.0.0.0: 403.
    assert_eq!(exchange(addr(&p), &req("nothere.allowed.test:443")).await.0, 502);
    assert_eq!(exchange(addr(&p), &req("servfail.allowed.test:443")).await.0, 502);
    let t0 = tokio::time::Instant::now();
    assert_eq!(exchange(addr(&p), &req("silent.allowed.test:443")).await.0, 504);
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(exchange(addr(&p), &req("zero.allowed.test:443")).await.0, 403);
    // A closed port (RST): 502 at once.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        l.local_addr().unwrap().port()
    };
    assert_eq!(exchange(addr(&p), &req(&format!("127.0.0.2:{closed}"))).await.0, 502);
    // A listener whose backlog is full never completes the handshake: 504 at the connect timeout.
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let full = sock.listen(1).unwrap();
    let bh = full.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(bh)).await {
            fillers.push(s);
        }
    }
    assert_eq!(exchange(addr(&p), &req(&bh.to_string())).await.0, 504);
    // A client that leaves while the dial is pending leaves nothing behind.
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    s.write_all(&req(&bh.to_string())).await.unwrap();
    drop(s);
    assert!(eventually(5, || async { metric(p.admin, "tunnelgate_connections_open").await == 0.0 }).await);
    drop(full);
}

#[tokio::test]
async fn dns_answers_are_cached_no_longer_than_cache_ttl() {
    let w = World::new().await;
    // The stub answers with TTL 60; the proxy must not reuse an answer for more than cacheTtl.
    let yaml = w.config("").replace("timeout: 1s}", "timeout: 1s, cacheTtl: 1s}");
    let p = start_proxy(&yaml).await;
    let target = w.echo_target("allowed.test");
    for _ in 0..3 {
        let mut s = tunnel(addr(&p), &target).await;
        roundtrip(&mut s, b"c").await;
    }
    assert_eq!(w.dns.queries("allowed.test"), 1, "answers within the TTL come from the cache");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let mut s = tunnel(addr(&p), &target).await;
    roundtrip(&mut s, b"c").await;
    assert_eq!(w.dns.queries("allowed.test"), 2, "an answer older than cacheTtl is not reused");
    assert!(metric_when(p.admin, "tunnelgate_dns_lookups_total{result=\"success\"}", |v| v >= 4.0).await >= 4.0);
}
