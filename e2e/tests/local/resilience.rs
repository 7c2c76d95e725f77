//! The operator and proxies through an API server restart and an etcd compaction.

use crate::harness::*;

/// The API server restarts and etcd is compacted behind the watches (every 5 s here, with churn
/// in between): while it is down the proxy enforces the last good configuration; after it, the
/// watches resume (relisting where their resource version was compacted: "410 Gone"), no policy is
/// lost, and a deletion and a new policy made after the restart are enforced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_survive_an_api_server_restart_and_compaction() {
    let opts = Options { compaction_interval: Some(Duration::from_secs(5)), ..Options::default() };
    let World { dir, mut rel } = World::boot_with("e2e-restart", &["payments", "churn"], &[], opts).await;
    let c = rel.admin.clone();
    let world = Loopback::start(&rel, &dir.0).await;
    let (target, proxy_addr) = (world.target, world.proxy);
    let pods = Api::<Pod>::namespaced(c.clone(), "payments");
    run_pod(&pods, pod("a-1", "a", "127.0.0.11")).await;
    run_pod(&pods, pod("b-1", "b", "127.0.0.12")).await;
    let tps = Api::<TunnelPolicy>::namespaced(c.clone(), "payments");
    let dest = json!({"cidrs": ["127.0.0.2/32"], "ports": [target.port()]});
    tps.create(&PostParams::default(), &policy("allow-a", "a", dest.clone())).await.unwrap();
    until("a allowed", 20, || async { connect_from("127.0.0.11", proxy_addr, target).await == 200 }).await;

    // The API server goes away for long enough that the clients back off; the proxy enforces the
    // last good configuration meanwhile.
    rel.cp.stop_apiserver();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(connect_from("127.0.0.11", proxy_addr, target).await, 200);
    assert_eq!(connect_from("127.0.0.12", proxy_addr, target).await, 403);
    rel.cp.start_apiserver().await.unwrap();
    // Churn and compaction behind the watches before they resume.
    let c = rel.cp.admin_client().await.unwrap();
    let churn = Api::<ConfigMap>::namespaced(c.clone(), "churn");
    for i in 0..40 {
        let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": format!("c{i}")}})).unwrap();
        churn.create(&PostParams::default(), &cm).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Changes after the restart reach the proxy: a deletion and a new policy.
    let tps = Api::<TunnelPolicy>::namespaced(c.clone(), "payments");
    tps.delete("allow-a", &DeleteParams::default()).await.unwrap();
    tps.create(&PostParams::default(), &policy("allow-b", "b", dest)).await.unwrap();
    until("a revoked after the restart", 30, || async { connect_from("127.0.0.11", proxy_addr, target).await == 403 })
        .await;
    until("b allowed after the restart", 30, || async { connect_from("127.0.0.12", proxy_addr, target).await == 200 })
        .await;
    until("b's status written after the restart", 20, || async {
        condition(&tps.get("allow-b").await.unwrap(), "Accepted").is_some_and(|c| c.0 == "True")
    })
    .await;
    // The scenario happened: a watch resumed from a compacted resource version and relisted.
    let logs = ["operator.log", "proxy.log"].map(|f| std::fs::read_to_string(dir.0.join(f)).unwrap_or_default());
    assert!(logs.iter().any(|l| l.contains("too old resource version")), "no watch met a compacted version");
}
