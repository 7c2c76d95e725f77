//! One decision, three places: for the same configuration and request, the running proxy,
//! `tunnelgate-proxy explain` and `kubectl tunnelgate explain` (its decision, on the document it
//! reads from the cluster) give the same verdict, the same deciding rule and the same dry-run
//! report. Loopback only: every allowed target is a local listener; every name is decided by the
//! name alone (checked before the request is sent), so no DNS query is ever made.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, reason = "test harness")]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use e2e::scratch::Dir;
use e2e::workspace_bin;
use proxy_config::decide::Request;
use proxy_config::ProxyConfig;
use testkit::{free_port, until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tunnelgate_operator::plugin::{judge, Explanation};

/// What each of the three says: `allow`/`deny`, the deciding rule, the dry-run rule if any.
type Said = (String, String, Option<String>);

async fn through_proxy(proxy: SocketAddr, admin: SocketAddr, target: &str, user: &str) -> Said {
    use base64::Engine;
    let before = metrics(admin).await;
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let credentials = base64::engine::general_purpose::STANDARD.encode(format!("{user}:secret-{user}"));
    s.write_all(
        format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {credentials}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    let status: u16 = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    drop(s);
    // The deciding rule and any dry-run verdict, from the counters this request moved.
    let after = metrics(admin).await;
    let moved: Vec<&String> = after.iter().filter(|l| !before.contains(l)).collect();
    let label = |line: &str, key: &str| {
        line.split(&format!("{key}=\"")).nth(1).and_then(|r| r.split('"').next()).map(str::to_owned)
    };
    let rule = moved
        .iter()
        .find(|l| l.starts_with("tunnelgate_policy_decisions_total{"))
        .and_then(|l| label(l, "rule"))
        .unwrap_or_else(|| panic!("no decision counted for {target}: {head}"));
    let dry_run =
        moved.iter().find(|l| l.starts_with("tunnelgate_policy_dry_run_total{")).and_then(|l| label(l, "rule"));
    let verdict = match status {
        200 => "allow",
        403 => "deny",
        other => panic!("{target}: unexpected status {other}: {head}"),
    };
    (verdict.to_owned(), rule, dry_run)
}

async fn metrics(admin: SocketAddr) -> Vec<String> {
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    text.lines().filter(|l| l.starts_with("tunnelgate_policy_")).map(str::to_owned).collect()
}

async fn proxy_explain(config: &std::path::Path, target: &str, user: &str) -> Said {
    let out = tokio::process::Command::new(workspace_bin("tunnelgate-proxy"))
        .args(["explain", "--config", config.to_str().unwrap(), "--client", "127.0.0.1", "--target", target])
        .args(["--user", user])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let line = |key: &str| text.lines().find_map(|l| l.strip_prefix(key)).map(str::to_owned);
    let verdict = match out.status.code() {
        Some(0) => "allow",
        Some(1) => "deny",
        other => panic!("explain {target}: exit {other:?}: {text}"),
    };
    let rule = line("rule: ").unwrap_or_default();
    // `rule: none (the address is refused by default)` is the default's decision.
    let rule = if rule.starts_with("none") { "default".to_owned() } else { rule };
    let dry_run = line("dry run: rule ").and_then(|l| l.split(' ').next().map(str::to_owned));
    (verdict.to_owned(), rule, dry_run)
}

fn plugin_explain(cfg: &ProxyConfig, target: &str, user: &str) -> Said {
    let target = proxy_config::host::parse_target(target).unwrap();
    let client: IpAddr = "127.0.0.1".parse().unwrap();
    let mut e = Explanation::default();
    // The proxies' own addresses: the one this proxy listens on.
    let code = judge(cfg, &[client], &Request { client, user: Some(user), target: &target }, &[], &mut e);
    let verdict = match code {
        0 => "allow",
        1 => "deny",
        other => panic!("plugin explain: exit {other}: {e:?}"),
    };
    let dry_run = e.dry_run.and_then(|d| d.strip_prefix("rule ").and_then(|r| r.split(' ').next()).map(str::to_owned));
    (verdict.to_owned(), e.rule.unwrap_or_default(), dry_run)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_and_both_explains_decide_alike() {
    let dir = Dir::new("e2e-agreement").unwrap();
    // The allowed targets: one port on 127.0.0.1 and 127.0.0.3.
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = upstream.local_addr().unwrap().port();
    let second = TcpListener::bind(("127.0.0.3", up)).await.unwrap();
    for l in [upstream, second] {
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                drop(s);
            }
        });
    }
    let (port, admin_port) = (free_port(), free_port());
    let hash = |u: &str| bcrypt::hash(format!("secret-{u}"), 4).unwrap();
    std::fs::write(dir.0.join("htpasswd"), format!("alice:{}\nbob:{}\n", hash("alice"), hash("bob"))).unwrap();
    let config = format!(
        "version: 1\n\
         listeners: [{{name: forward, bind: '127.0.0.1:{port}'}}]\n\
         admin: {{bind: '127.0.0.1:{admin_port}'}}\n\
         auth: {{htpasswdFile: {}}}\n\
         policy:\n  defaultAction: deny\n  rules:\n\
         \x20 - {{name: block, action: deny, hosts: [blocked.example]}}\n\
         \x20 - {{name: loop, action: allow, cidrs: [127.0.0.1/32], ports: [{up}, {port}, {admin_port}]}}\n\
         \x20 - {{name: alice-only, action: allow, cidrs: [127.0.0.3/32], users: [alice], ports: [{up}]}}\n\
         \x20 - {{name: try, action: allow, cidrs: [127.0.0.4/32], ports: [{up}], dryRun: true}}\n\
         \x20 - {{name: try-name, action: allow, hosts: [soon.example], dryRun: true}}\n",
        dir.0.join("htpasswd").display()
    );
    let path = dir.0.join("config.yaml");
    std::fs::write(&path, &config).unwrap();
    let cfg = ProxyConfig::from_yaml(&config).unwrap();
    let mut proxy = tokio::process::Command::new(workspace_bin("tunnelgate-proxy"))
        .args(["--config", path.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.0.join("proxy.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (proxy_addr, admin): (SocketAddr, SocketAddr) =
        (format!("127.0.0.1:{port}").parse().unwrap(), format!("127.0.0.1:{admin_port}").parse().unwrap());
    until("the proxy listens", 20, || async { TcpStream::connect(proxy_addr).await.is_ok() }).await;

    let cases: Vec<(String, &str, Said)> = vec![
        (format!("127.0.0.1:{up}"), "bob", said("allow", "loop", None)),
        (format!("127.0.0.2:{up}"), "bob", said("deny", "default", None)),
        ("blocked.example:443".into(), "bob", said("deny", "block", None)),
        ("unknown.example:443".into(), "bob", said("deny", "default", None)),
        ("soon.example:443".into(), "bob", said("deny", "default", Some("try-name"))),
        (format!("127.0.0.1:{port}"), "bob", said("deny", "self", None)),
        (format!("127.0.0.1:{admin_port}"), "bob", said("deny", "self", None)),
        (format!("127.0.0.3:{up}"), "alice", said("allow", "alice-only", None)),
        (format!("127.0.0.3:{up}"), "bob", said("deny", "default", None)),
        (format!("127.0.0.4:{up}"), "bob", said("deny", "default", Some("try"))),
    ];
    for (target, user, expected) in &cases {
        // Never a DNS query: every name here must be decided by the name alone (the CIDR rules
        // list only the local ports, so no name on 443 could be allowed once resolved).
        let parsed = proxy_config::host::parse_target(target).unwrap();
        let request = Request { client: "127.0.0.1".parse().unwrap(), user: Some(user), target: &parsed };
        assert!(
            !matches!(request.start(&cfg.policy), proxy_config::decide::Start::Resolve(_)),
            "{target} would need DNS: the table must decide names by name"
        );
        let proxy_said = through_proxy(proxy_addr, admin, target, user).await;
        let explain_said = proxy_explain(&path, target, user).await;
        let plugin_said = plugin_explain(&cfg, target, user);
        assert_eq!(proxy_said, *expected, "the proxy, {target} as {user}");
        assert_eq!(explain_said, *expected, "tunnelgate-proxy explain, {target} as {user}");
        assert_eq!(plugin_said, *expected, "kubectl tunnelgate explain, {target} as {user}");
    }
    proxy.kill().await.unwrap();
}

fn said(verdict: &str, rule: &str, dry_run: Option<&str>) -> Said {
    (verdict.to_owned(), rule.to_owned(), dry_run.map(str::to_owned))
}
