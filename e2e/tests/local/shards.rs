//! A whole-cluster document past one ConfigMap is written in shards that a proxy merges, on the
//! proxies' own Role.

use crate::harness::*;

/// A policy of 200 long host names: about 50 KiB of rules, inside the per-policy budget.
fn big_policy(name: &str, app: &str, tag: usize) -> TunnelPolicy {
    let label = "x".repeat(60);
    let hosts: Vec<String> = (0..200).map(|i| format!("h{i}-{tag}.{label}.{label}.{label}.example")).collect();
    policy(name, app, json!({"hosts": hosts, "ports": [443]}))
}

/// 24 such policies (six namespaces, four each) make the whole document about 1.2 MB: it is
/// written as shards and an index, and the proxy — reading only its Role's ConfigMaps — enforces
/// their merge: a policy in any shard allows, its deletion refuses. When the document fits again,
/// it is one document and the shards are deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_past_one_configmap_is_sharded_and_merged_by_the_proxy() {
    let namespaces = ["t0", "t1", "t2", "t3", "t4", "t5"];
    let World { dir, rel } = World::boot("e2e-shards", &namespaces, &[]).await;
    let c = rel.admin.clone();
    let world = Loopback::start_granting(&rel, &dir.0, &namespaces).await;
    let (target, proxy) = (world.target, world.proxy);
    for (n, ns) in namespaces.iter().enumerate() {
        let pods = Api::<Pod>::namespaced(c.clone(), ns);
        run_pod(&pods, pod("client", "client", &format!("127.0.0.{}", 40 + n))).await;
        let tps = Api::<TunnelPolicy>::namespaced(c.clone(), ns);
        for k in 0..4 {
            tps.create(&PostParams::default(), &big_policy(&format!("big-{k}"), "client", n * 4 + k)).await.unwrap();
        }
    }
    let dest = json!({"cidrs": ["127.0.0.2/32"], "ports": [target.port()]});
    let t5 = Api::<TunnelPolicy>::namespaced(c.clone(), "t5");
    t5.create(&PostParams::default(), &policy("allow-echo", "client", dest)).await.unwrap();
    until("the pod of t5 is allowed through the merged shards", 60, || async {
        connect_from("127.0.0.45", proxy, target).await == 200
    })
    .await;
    let cms = Api::<ConfigMap>::namespaced(c.clone(), "tunnelgate");
    let index = cms.get("tunnelgate-proxy").await.unwrap();
    let data = index.data.clone().unwrap_or_default();
    assert!(data.contains_key("shards.json") && !data.contains_key("config.yaml"), "{:?}", data.keys());
    let shards: proxy_config::shards::ShardIndex = serde_json::from_str(&data["shards.json"]).unwrap();
    assert!(shards.shards.len() >= 2, "{shards:?}");
    for s in &shards.shards {
        let cm = cms.get(&s.name).await.unwrap();
        let text = &cm.data.unwrap()["config.yaml"];
        assert!(text.len() < 1024 * 1024, "{}: {} bytes", s.name, text.len());
        proxy_config::ProxyConfig::from_yaml(text).unwrap_or_else(|e| panic!("{}: {e}", s.name));
    }
    assert_eq!(connect_from("127.0.0.46", proxy, target).await, 403, "no pod there: refused");

    // A deletion while sharded is enforced.
    t5.delete("allow-echo", &DeleteParams::default()).await.unwrap();
    until("the deletion is enforced", 60, || async { connect_from("127.0.0.45", proxy, target).await == 403 }).await;

    // Most big policies gone: one document again, and no shard left behind.
    for ns in &namespaces[1..] {
        let tps = Api::<TunnelPolicy>::namespaced(c.clone(), ns);
        for k in 0..4 {
            tps.delete(&format!("big-{k}"), &DeleteParams::default()).await.unwrap();
        }
    }
    let dest = json!({"cidrs": ["127.0.0.2/32"], "ports": [target.port()]});
    t5.create(&PostParams::default(), &policy("allow-echo", "client", dest)).await.unwrap();
    until("allowed again from one document", 60, || async { connect_from("127.0.0.45", proxy, target).await == 200 })
        .await;
    until("the shards are deleted", 30, || async {
        let whole = cms.get("tunnelgate-proxy").await.unwrap().data.unwrap_or_default();
        let left = cms
            .list(&kube::api::ListParams::default().labels("tunnelgate.io/shard-of=tunnelgate-proxy"))
            .await
            .unwrap();
        whole.contains_key("config.yaml") && left.items.is_empty()
    })
    .await;
}
