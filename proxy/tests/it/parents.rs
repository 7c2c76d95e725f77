//! Parent proxies, against a real parent: Debian's Squid (and stunnel in front of it for TLS).
//! Squid resolves only the names of its own hosts file (its name server is 127.0.0.1, where
//! nothing answers), so no test here ever asks a real resolver.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use testkit::squid::Squid;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::*;

/// `doc` with loopback open to every allow rule, so that the rule matching the name decides (in
/// refused space, the rule that opens the address would) and its route is taken.
fn loopback_open(doc: &str) -> String {
    doc.replace("defaultAction: deny", "defaultAction: deny\n  denyPrivateAddresses: false")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// CONNECT to `target` through the proxy; the status and the whole head.
async fn connect(proxy: std::net::SocketAddr, target: &str) -> (u16, String, TcpStream) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).await.unwrap();
    let (status, head) = read_head(&mut s).await;
    (status, head, s)
}

/// A tunnel routed through Squid: Squid is sent the address the proxy resolved and checked (the
/// default), or the name with `sendTarget: name`; bytes flow both ways; the route is counted.
#[tokio::test]
async fn connect_tunnels_leave_through_squid_by_address_or_by_name() {
    let w = World::new().await;
    let squid = Squid::start("connect", "http_access allow all").await;
    let extra = format!(
        "parents:\n  - {{name: squid, address: '127.0.0.1:{p}'}}\n  - {{name: squid-names, address: '127.0.0.1:{p}', sendTarget: name}}\n",
        p = squid.port
    );
    let doc = loopback_open(&w.config(&extra).replace(
        "{name: allow-test, action: allow, hosts: [allowed.test, \"*.allowed.test\"]}",
        "{name: allow-test, action: allow, hosts: [allowed.test], route: squid}\n    - {name: by-name, action: allow, hosts: [\"*.allowed.test\"], route: squid-names}",
    ));
    w.dns.set("www.allowed.test", Answer::Addrs(vec!["127.0.0.2".parse().unwrap()]));
    let p = start_proxy(&doc).await;
    let port = w.echo.addr.port();
    let (status, head, mut s) = connect(addr(&p), &format!("allowed.test:{port}")).await;
    assert_eq!(status, 200, "{head}");
    roundtrip(&mut s, b"through the parent").await;
    let (status, _, mut s2) = connect(addr(&p), &format!("www.allowed.test:{port}")).await;
    assert_eq!(status, 200);
    roundtrip(&mut s2, b"by name").await;
    drop((s, s2));
    let seen = squid.requests(2).await;
    assert!(seen.contains(&format!("CONNECT 127.0.0.2:{port}")), "the checked address, not the name: {seen:?}");
    assert!(seen.contains(&format!("CONNECT www.allowed.test:{port}")), "sendTarget: name: {seen:?}");
    assert_eq!(w.echo.count(), 2, "both tunnels reached the upstream, through Squid");
    let established =
        metric(p.admin, "tunnelgate_parent_requests_total{parent=\"squid\",result=\"established\"}").await;
    assert_eq!(established, 1.0);
    assert_eq!(metric(p.admin, "tunnelgate_parent_up{parent=\"squid\"}").await, 1.0);
    // A rule without a route leaves directly: Squid sees nothing more.
    let (status, _, mut s3) = connect(addr(&p), &format!("127.0.0.2:{port}")).await;
    assert_eq!(status, 200);
    roundtrip(&mut s3, b"direct").await;
    assert_eq!(squid.requests(2).await.len(), 2, "the direct rule's tunnel did not go through Squid");
}

/// Basic credentials from a file reach Squid; Squid's 407 (wrong credentials) and 403 (its own
/// policy) become a 502 naming the parent and its status, never the credentials.
#[tokio::test]
async fn squid_credentials_and_refusals_become_a_502_naming_the_parent() {
    let w = World::new().await;
    let dir = std::env::temp_dir().join(format!("tg-parent-creds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let hash = Command::new("openssl").args(["passwd", "-1", "s3cret-pw"]).output().unwrap();
    let hash = String::from_utf8(hash.stdout).unwrap();
    let passwd = write(&dir, "passwd", &format!("egress:{}", hash.trim()));
    Command::new("chmod").arg("-R").arg("a+rX").arg(&dir).status().unwrap();
    let access = format!(
        "auth_param basic program /usr/lib/squid/basic_ncsa_auth {}\nacl users proxy_auth REQUIRED\n\
         acl blocked dst 127.0.0.3\nhttp_access deny blocked\nhttp_access allow users\nhttp_access deny all",
        passwd.display()
    );
    let squid = Squid::start("auth", &access).await;
    let creds = write(&dir, "credentials", "egress:s3cret-pw\n");
    let extra = format!(
        "parents:\n  - {{name: corp, address: '127.0.0.1:{}', credentialsFile: '{}'}}\n",
        squid.port,
        creds.display()
    );
    let doc = w
        .config(&extra)
        .replace("defaultAction: deny", "defaultAction: deny\n  defaultRoute: corp")
        .replace("cidrs: [\"127.0.0.2/32\"]", "cidrs: [\"127.0.0.2/32\", \"127.0.0.3/32\"]");
    let path = write(&dir, "proxy.yaml", &doc);
    let p = start_proxy(&doc).await;
    let port = w.echo.addr.port();
    let (status, head, mut s) = connect(addr(&p), &format!("allowed.test:{port}")).await;
    assert_eq!(status, 200, "{head}");
    roundtrip(&mut s, b"authenticated").await;

    // Squid's own policy refuses 127.0.0.3: its 403 is the client's 502, naming Squid's answer.
    let (status, head, _) = connect(addr(&p), &format!("127.0.0.3:{}", w.sink.addr.port())).await;
    assert_eq!(status, 502, "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("error=http_request_denied; next-hop=\"corp\"; received-status=403"), "{head}");
    assert_eq!(w.sink.count(), 0);

    // Wrong credentials (the file changed; a reload reads it): Squid's 407 is a 502 to the
    // client, whose own request carried no credentials and must not be asked for any.
    std::fs::write(&creds, "egress:wrong\n").unwrap();
    let outcome = tunnelgate_proxy::reload::reload_file(&p.inner, &path).await.expect("reload");
    assert!(matches!(outcome, tunnelgate_proxy::reload::ReloadOutcome::Applied { .. }), "{outcome:?}");
    let (status, head, _) = connect(addr(&p), &format!("allowed.test:{port}")).await;
    assert_eq!(status, 502, "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("next-hop=\"corp\"; received-status=407"), "{head}");
    assert!(!lower.contains("proxy-authenticate") && !head.contains("wrong") && !head.contains("s3cret"), "{head}");
    // A plain-HTTP request likewise: Squid's 407 is never passed on as a 407.
    let (status, text) = exchange(
        addr(&p),
        format!("GET http://allowed.test:{port}/ HTTP/1.1\r\nHost: allowed.test:{port}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(status, 502, "{text}");
    assert!(text.to_ascii_lowercase().contains("next-hop=\"corp\"; received-status=407"), "{text}");
    let refused =
        metric(p.admin, "tunnelgate_parent_requests_total{parent=\"corp\",result=\"refused_by_parent\"}").await;
    assert_eq!(refused, 3.0, "the 403, and the 407 to a CONNECT and to a plain-HTTP request");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A dead parent is skipped for its group's retryAfter: the group fails over to Squid, the next
/// request goes straight to Squid, and the gauges say which member is in use.
#[tokio::test]
async fn a_dead_parent_fails_over_to_the_next_member_and_is_skipped_after() {
    let w = World::new().await;
    let squid = Squid::start("failover", "http_access allow all").await;
    let dead = free_port(); // nothing listens there
    let extra = format!(
        "parents:\n  - {{name: dead, address: '127.0.0.1:{dead}'}}\n  - {{name: squid, address: '127.0.0.1:{}'}}\nparentGroups:\n  - {{name: corp, members: [dead, squid], retryAfter: 1h}}\n",
        squid.port
    );
    let doc = w.config(&extra).replace("defaultAction: deny", "defaultAction: deny\n  defaultRoute: corp");
    let p = start_proxy(&doc).await;
    assert_eq!(metric(p.admin, "tunnelgate_parent_group_healthy_members{group=\"corp\"}").await, 2.0);
    let port = w.echo.addr.port();
    for _ in 0..2 {
        let (status, head, mut s) = connect(addr(&p), &format!("allowed.test:{port}")).await;
        assert_eq!(status, 200, "{head}");
        roundtrip(&mut s, b"failed over").await;
    }
    let unreachable = metric(p.admin, "tunnelgate_parent_requests_total{parent=\"dead\",result=\"unreachable\"}").await;
    assert_eq!(unreachable, 1.0, "tried once, then skipped");
    assert_eq!(metric(p.admin, "tunnelgate_parent_up{parent=\"dead\"}").await, 0.0);
    assert_eq!(metric(p.admin, "tunnelgate_parent_group_healthy_members{group=\"corp\"}").await, 1.0);
    assert_eq!(metric(p.admin, "tunnelgate_parent_group_active{group=\"corp\",parent=\"squid\"}").await, 1.0);
    assert_eq!(squid.requests(2).await.len(), 2);
}

/// Every parent of a route down: a 502 naming the last one tried, and nothing reaches the target.
#[tokio::test]
async fn no_usable_parent_is_a_502_and_nothing_leaves_directly() {
    let w = World::new().await;
    let extra = format!("parents:\n  - {{name: gone, address: '127.0.0.1:{}'}}\n", free_port());
    let doc = w.config(&extra).replace("defaultAction: deny", "defaultAction: deny\n  defaultRoute: gone");
    let p = start_proxy(&doc).await;
    let (status, head, _) = connect(addr(&p), &w.echo_target("allowed.test")).await;
    assert_eq!(status, 502, "{head}");
    assert!(head.contains("error=connection_refused; next-hop=\"gone\""), "{head}");
    assert_eq!(w.echo.count(), 0, "a route through a parent never falls back to dialling directly");
}

/// The policy decides before anything is sent to a parent: a name that resolves into refused
/// space (loopback here) is refused by the proxy, and Squid sees no request at all.
#[tokio::test]
async fn a_name_resolving_into_refused_space_never_reaches_the_parent() {
    let w = World::new().await;
    let squid = Squid::start("refused", "http_access allow all").await;
    let extra = format!("parents:\n  - {{name: squid, address: '127.0.0.1:{}', sendTarget: name}}\n", squid.port);
    let doc = w.config(&extra).replace("defaultAction: deny", "defaultAction: deny\n  defaultRoute: squid").replace(
        "hosts: [allowed.test, \"*.allowed.test\"]",
        "hosts: [allowed.test, \"*.allowed.test\", internal.attacker.test]",
    );
    let p = start_proxy(&doc).await;
    let (status, head, _) = connect(addr(&p), &format!("internal.attacker.test:{}", w.sink.addr.port())).await;
    assert_eq!(status, 403, "{head}");
    assert!(head.contains("destination_ip_prohibited"), "{head}");
    // A request Squid does see, so its log is known to be written.
    let (status, _, _) = connect(addr(&p), &w.echo_target("allowed.test")).await;
    assert_eq!(status, 200);
    let seen = squid.requests(1).await;
    assert_eq!(seen.len(), 1, "only the allowed request reached Squid: {seen:?}");
    assert_eq!(metric(p.admin, "tunnelgate_parent_requests_total").await, 1.0);
    assert_eq!(w.sink.count(), 0);
}

/// TLS to the parent: stunnel terminates it in front of Squid; the proxy verifies the parent's
/// certificate against the configured CA only (a parent with another CA fails TLS: 502).
#[tokio::test]
async fn tls_to_a_parent_behind_stunnel() {
    let w = World::new().await;
    let squid = Squid::start("tls", "http_access allow all").await;
    let dir = std::env::temp_dir().join(format!("tg-parent-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["parent.corp.test".to_owned()]).unwrap();
    let cert = write(&dir, "parent.crt", &ck.cert.pem());
    let key = write(&dir, "parent.key", &ck.signing_key.serialize_pem());
    let other = rcgen::generate_simple_self_signed(vec!["parent.corp.test".to_owned()]).unwrap();
    let other_ca = write(&dir, "other.crt", &other.cert.pem());
    let tls_port = free_port();
    let conf = write(
        &dir,
        "stunnel.conf",
        &format!(
            "foreground = yes\npid =\n[parent]\naccept = 127.0.0.1:{tls_port}\nconnect = 127.0.0.1:{}\ncert = {}\nkey = {}\n",
            squid.port,
            cert.display(),
            key.display()
        ),
    );
    let mut stunnel = Command::new("stunnel4")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stunnel.log")).unwrap())
        .spawn()
        .expect("stunnel4 (Debian's stunnel4 package)");
    assert!(eventually(20, || async { TcpStream::connect(("127.0.0.1", tls_port)).await.is_ok() }).await);
    let extra = format!(
        "parents:\n  - {{name: tls-parent, address: '127.0.0.1:{tls_port}', tls: {{caFile: '{}', serverName: parent.corp.test}}}}\n  - {{name: wrong-ca, address: '127.0.0.1:{tls_port}', tls: {{caFile: '{}', serverName: parent.corp.test}}}}\n",
        cert.display(),
        other_ca.display()
    );
    let doc = loopback_open(&w.config(&extra).replace(
        "{name: allow-test, action: allow, hosts: [allowed.test, \"*.allowed.test\"]}",
        "{name: allow-test, action: allow, hosts: [allowed.test], route: tls-parent}\n    - {name: other, action: allow, hosts: [\"*.allowed.test\"], route: wrong-ca}",
    ));
    w.dns.set("www.allowed.test", Answer::Addrs(vec!["127.0.0.2".parse().unwrap()]));
    let p = start_proxy(&doc).await;
    let (status, head, mut s) = connect(addr(&p), &w.echo_target("allowed.test")).await;
    assert_eq!(status, 200, "{head}");
    roundtrip(&mut s, b"over TLS to the parent").await;
    drop(s); // Squid logs a tunnel when it ends
    let (status, head, _) = connect(addr(&p), &w.echo_target("www.allowed.test")).await;
    assert_eq!(status, 502, "{head}");
    assert!(head.contains("error=tls_protocol_error; next-hop=\"wrong-ca\""), "{head}");
    assert_eq!(squid.requests(1).await.len(), 1, "only the verified parent's request reached Squid");
    let _ = stunnel.kill();
    let _ = stunnel.wait();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An HTTP origin on 127.0.0.2 that answers every request `200 hello`, keeping the connection.
async fn origin() -> Upstream {
    Upstream::start("127.0.0.2", |mut s| async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match tokio::io::AsyncReadExt::read(&mut s, &mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
            buf.drain(..end);
            if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello").await.is_err() {
                return;
            }
        }
    })
    .await
}

/// Plain-HTTP requests routed through Squid go to it in absolute form (naming the checked
/// address), on a pooled connection that the next request of the same client reuses; the
/// answer comes back with both proxies' Via.
#[tokio::test]
async fn plain_http_requests_go_to_squid_in_absolute_form_on_a_pooled_connection() {
    let w = World::new().await;
    let origin = origin().await;
    let squid = Squid::start("http", "http_access allow all").await;
    let extra = format!("parents:\n  - {{name: squid, address: '127.0.0.1:{}'}}\n", squid.port);
    let doc =
        loopback_open(&w.config(&extra).replace("defaultAction: deny", "defaultAction: deny\n  defaultRoute: squid"));
    let p = start_proxy(&doc).await;
    let port = origin.addr.port();
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    for path in ["/a?q=1", "/b"] {
        let req = format!("GET http://allowed.test:{port}{path} HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let (status, head) = read_head(&mut s).await;
        assert_eq!(status, 200, "{head}");
        assert!(head.contains("Via: 1.1 tg-test-parent") && head.contains("1.1 tunnelgate"), "{head}");
        let mut body = [0u8; 5];
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut body).await.unwrap();
        assert_eq!(&body, b"hello");
    }
    drop(s);
    let seen = squid.requests(2).await;
    assert_eq!(
        seen,
        vec![format!("GET http://127.0.0.2:{port}/a?q=1"), format!("GET http://127.0.0.2:{port}/b")],
        "absolute form, naming the checked address"
    );
    assert_eq!(metric(p.admin, "tunnelgate_upstream_connections_total{result=\"reused\"}").await, 1.0);
    assert_eq!(metric(p.admin, "tunnelgate_parent_requests_total{parent=\"squid\",result=\"established\"}").await, 1.0);
}

/// A tunnel listener's fixed upstream reached through a parent: Squid is sent the upstream as
/// configured (a trusted name, resolved by the parent).
#[tokio::test]
async fn a_tunnel_listener_reaches_its_upstream_through_squid() {
    let w = World::new().await;
    let squid = Squid::start("fixed", "http_access allow all").await;
    let port = w.echo.addr.port();
    let extra = format!("parents:\n  - {{name: squid, address: '127.0.0.1:{}'}}\n", squid.port);
    let doc = w.config(&extra).replace(
        "listeners: [{name: forward, bind: \"127.0.0.1:0\"}]",
        &format!("listeners:\n  - {{name: forward, bind: \"127.0.0.1:0\"}}\n  - {{name: fixed, bind: \"127.0.0.1:0\", mode: tunnel, upstream: 'allowed.test:{port}', route: squid}}"),
    );
    let p = start_proxy(&doc).await;
    let mut s = TcpStream::connect(p.listener("fixed").unwrap()).await.unwrap();
    roundtrip(&mut s, b"fixed upstream, through the parent").await;
    drop(s);
    assert_eq!(squid.requests(1).await, vec![format!("CONNECT allowed.test:{port}")]);
    assert_eq!(w.echo.count(), 1);
}

/// A WebSocket upgrade routed through Squid: the upgrade request goes to Squid in absolute form,
/// Squid's 101 comes back, and messages flow both ways over the parent.
#[tokio::test]
async fn websocket_upgrades_go_through_squid() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let w = World::new().await;
    let up = crate::http::websocket_echo().await;
    let squid = Squid::start(
        "ws",
        "http_upgrade_request_protocols websocket allow all\nhttp_upgrade_request_protocols WebSocket allow all\nhttp_access allow all",
    )
    .await;
    let extra = format!("parents:\n  - {{name: squid, address: '127.0.0.1:{}'}}\n", squid.port);
    let doc =
        loopback_open(&w.config(&extra).replace("defaultAction: deny", "defaultAction: deny\n  defaultRoute: squid"));
    let p = start_proxy(&doc).await;
    let mut ws = crate::http::websocket_through(addr(&p), up.addr.port()).await;
    for i in 0..3 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(format!("hello {i}")));
    }
    ws.close(None).await.unwrap();
    drop(ws);
    let seen = squid.requests(1).await;
    assert_eq!(seen, vec![format!("GET http://127.0.0.2:{}/chat", up.addr.port())], "through Squid, by address");
}
