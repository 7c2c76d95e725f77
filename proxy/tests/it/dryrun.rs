//! Dry-run rules: they refuse and allow nothing, and count (and `explain` shows) what they would
//! have done.

use crate::support::*;

#[tokio::test]
async fn dry_run_rules_count_without_deciding() {
    let w = World::new().await;
    let p = w
        .proxy("    - {name: ns/dry-deny, action: deny, dryRun: true, hosts: [allowed.test]}\n    - {name: ns/dry-allow, action: allow, dryRun: true, hosts: [new.test]}\n")
        .await;
    // The dry-run Deny does not refuse: the tunnel is established.
    let mut s = tunnel(addr(&p), &w.echo_target("allowed.test")).await;
    roundtrip(&mut s, b"still allowed").await;
    // The dry-run Allow does not allow.
    w.dns.set("new.test", Answer::Addrs(vec!["93.184.216.34".parse().unwrap()]));
    let (status, _) =
        exchange(addr(&p), format!("CONNECT {} HTTP/1.1\r\n\r\n", w.echo_target("new.test")).as_bytes()).await;
    assert_eq!(status, 403);
    let m = |rule: &str, verdict: &str| {
        metric(
            p.admin,
            Box::leak(
                format!("tunnelgate_policy_dry_run_total{{rule=\"{rule}\",verdict=\"{verdict}\"}}").into_boxed_str(),
            ),
        )
    };
    assert_eq!(m("ns/dry-deny", "would_deny").await, 1.0);
    assert_eq!(m("ns/dry-allow", "would_allow").await, 1.0);
    // `/config` reports them; HEAD announces exactly the GET's document (counts included).
    let (_, cfg) = admin_get(p.admin, "/config").await;
    assert!(cfg.contains("\"ns/dry-deny\":{\"wouldDeny\":1,\"wouldAllow\":0}"), "{cfg}");
    let mut s = tokio::net::TcpStream::connect(p.admin).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, b"HEAD /config HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut head = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut s, &mut head).await.unwrap();
    assert!(head.to_ascii_lowercase().contains(&format!("content-length: {}\r\n", cfg.len())), "{head} / {cfg}");
}
