//! What namespaces may open, and what one tenant cannot do to the others.

use crate::harness::*;

/// A namespace cannot open refused space (loopback stands in for the node network here) until a
/// ClusterTunnelPolicy delegates it; a cluster Deny then overrides the namespaced Allow within a
/// second, and a better-priority cluster Allow carves an exception out of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_policies_bound_what_namespaces_may_open() {
    let World { dir, rel } = World::boot("e2e-ctp", &["payments"], &[]).await;
    let c = rel.admin.clone();
    let target = echo_upstream("127.0.0.2").await;
    let (listen, admin, op_admin) = (free_port(), free_port(), free_port());
    let proxy_addr: SocketAddr = format!("127.0.0.1:{listen}").parse().unwrap();
    let base = format!(
        "version: 1\nlisteners: [{{name: forward, bind: '127.0.0.1:{listen}'}}]\nadmin: {{bind: '127.0.0.1:{admin}'}}\npolicy: {{defaultAction: deny, denyPrivateAddresses: true}}\nlimits: {{drainDelay: 0s, drainTimeout: 1s}}\n"
    );
    let _operator = single_operator(&rel, &dir.0, &base, "/unused", op_admin).await;
    let _proxy = whole_document_proxy(&rel, &dir.0);
    let namespaces = Api::<k8s_openapi::api::core::v1::Namespace>::all(c.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "shop", "labels": {"tier": "tenant"}}})).unwrap(),
        )
        .await
        .unwrap();
    run_pod(&Api::<Pod>::namespaced(c.clone(), "shop"), pod("web-1", "web", "127.0.0.13")).await;
    let tps = Api::<TunnelPolicy>::namespaced(c.clone(), "shop");
    let dest = json!({ "cidrs": ["127.0.0.2/32"], "ports": [target.port()] });
    tps.create(&PostParams::default(), &policy("echo", "web", dest)).await.unwrap();
    until("Restricted", 20, || async {
        condition(&tps.get("echo").await.unwrap(), "Restricted").is_some_and(|c| c.0 == "True")
    })
    .await;
    until("proxy up, refusing", 20, || async { connect_from("127.0.0.13", proxy_addr, target).await == 403 }).await;

    // Delegation: the platform lets tenant namespaces open this address.
    let ctps = Api::<ClusterTunnelPolicy>::all(c.clone());
    let ctp = |name: &str, spec: serde_json::Value| -> ClusterTunnelPolicy {
        serde_json::from_value(json!({"apiVersion": "tunnelgate.io/v1alpha1", "kind": "ClusterTunnelPolicy", "metadata": {"name": name}, "spec": spec})).unwrap()
    };
    let tenants = json!({"matchLabels": {"tier": "tenant"}});
    ctps.create(
        &PostParams::default(),
        &ctp("tenant-loopback", json!({"namespaceSelector": tenants, "action": "Allow", "delegate": true, "destinations": [{"cidrs": ["127.0.0.0/24"]}]})),
    )
    .await
    .unwrap();
    until("delegated", 20, || async { connect_from("127.0.0.13", proxy_addr, target).await == 200 }).await;
    until("Restricted condition gone", 10, || async {
        condition(&tps.get("echo").await.unwrap(), "Restricted").is_none()
    })
    .await;
    until("delegating policy Ready", 10, || async {
        ctps.get("tenant-loopback").await.unwrap().status.is_some_and(|s| {
            s.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True" && c.reason == "Delegated")
        })
    })
    .await;

    // A cluster Deny overrides the namespaced Allow.
    let t0 = Instant::now();
    ctps.create(
        &PostParams::default(),
        &ctp("no-echo", json!({"namespaceSelector": tenants, "action": "Deny", "priority": 100, "destinations": [{"cidrs": ["127.0.0.2/32"]}]})),
    )
    .await
    .unwrap();
    let cms = Api::<ConfigMap>::namespaced(c.clone(), "tunnelgate");
    if tokio::time::timeout(Duration::from_secs(10), async {
        while connect_from("127.0.0.13", proxy_addr, target).await != 403 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .is_err()
    {
        let cm = cms.get("tunnelgate-proxy").await.unwrap();
        panic!(
            "cluster Deny not enforced:\n{}\n{:?}",
            cm.data.unwrap()["config.yaml"],
            ctps.get("no-echo").await.unwrap().status
        );
    }
    println!("cluster Deny: API write to enforcement {} ms", t0.elapsed().as_millis());
    // A better-priority cluster Allow for the web pods carves the exception back out.
    ctps.create(
        &PostParams::default(),
        &ctp("web-echo", json!({"namespaceSelector": tenants, "podSelector": {"matchLabels": {"app": "web"}}, "action": "Allow", "priority": 10, "destinations": [{"cidrs": ["127.0.0.2/32"], "ports": [target.port()]}]})),
    )
    .await
    .unwrap();
    until("cluster Allow outranks", 20, || async { connect_from("127.0.0.13", proxy_addr, target).await == 200 }).await;
    // The status is written after the configuration: wait for it.
    until("cluster policy status", 10, || async {
        ctps.get("web-echo").await.unwrap().status.is_some_and(|st| st.matched_pods == Some(1))
    })
    .await;

    // A DryRun Deny counts what it would refuse, and refuses nothing.
    let mut dry = policy("would-block", "web", json!({ "cidrs": ["127.0.0.2/32"] }));
    dry.spec.action = tunnelgate_operator::crd::PolicyAction::Deny;
    dry.spec.enforcement = Some(tunnelgate_operator::crd::Enforcement::DryRun);
    tps.create(&PostParams::default(), &dry).await.unwrap();
    until("dry-run rule rendered", 20, || async {
        cms.get("tunnelgate-proxy").await.unwrap().data.unwrap()["config.yaml"].contains("dryRun: true")
    })
    .await;
    let metrics_addr = format!("127.0.0.1:{admin}");
    until("would_deny counted, nothing refused", 20, || async {
        connect_from("127.0.0.13", proxy_addr, target).await == 200
            && reqwest_get(&metrics_addr, "/metrics").await.lines().any(|l| {
                l.starts_with("tunnelgate_policy_dry_run_total{rule=\"shop/would-block\",verdict=\"would_deny\"}")
            })
    })
    .await;

    // The cluster's own networks follow the API: a node joins, the API server's Service exists.
    Api::<k8s_openapi::api::core::v1::Node>::all(c.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "node-1"}, "spec": {"podCIDRs": ["10.250.0.0/24", "fd00:250::/64"]},
                "status": {"addresses": [{"type": "InternalIP", "address": "10.0.5.1"}, {"type": "Hostname", "address": "node-1"}]}}))
            .unwrap(),
        )
        .await
        .unwrap();
    // The API server made the `kubernetes` Service (10.96.0.1) and the default ServiceCIDR
    // (10.96.0.0/16, --service-cluster-ip-range) itself; a second Service range is added.
    Api::<k8s_openapi::api::networking::v1::ServiceCIDR>::all(c.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "secondary"}, "spec": {"cidrs": ["fd00:96::/108"]}}))
                .unwrap(),
        )
        .await
        .unwrap();
    until("clusterNetworks rendered", 20, || async {
        let Some(cm) = cms.get_opt("tunnelgate-proxy").await.ok().flatten() else { return false };
        let policy = proxy_config::ProxyConfig::from_yaml(&cm.data.unwrap()["config.yaml"]).unwrap().policy;
        let nets: Vec<String> = policy.cluster_networks.iter().map(ToString::to_string).collect();
        nets == ["10.0.5.1/32", "10.96.0.0/16", "10.96.0.1/32", "10.250.0.0/24", "fd00:96::/108", "fd00:250::/64"]
    })
    .await;
    // A node with a global IPv6 pod range (as on EKS or GKE): the cluster's, though public. A
    // namespace naming it (the kubelet port of its pods) is restricted like refused space.
    Api::<k8s_openapi::api::core::v1::Node>::all(c.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "node-2"}, "spec": {"podCIDRs": ["2600:1f00:250::/64"]}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    until("the global pod range rendered as a cluster network", 20, || async {
        let Some(cm) = cms.get_opt("tunnelgate-proxy").await.ok().flatten() else { return false };
        cm.data.unwrap()["config.yaml"].contains("2600:1f00:250::/64")
    })
    .await;
    let kubelets = json!({ "cidrs": ["2600:1f00:250::/64"], "ports": [10250] });
    tps.create(&PostParams::default(), &policy("kubelets", "web", kubelets)).await.unwrap();
    until("the cluster's global range is Restricted for the namespace", 20, || async {
        condition(&tps.get("kubelets").await.unwrap(), "Restricted")
            .is_some_and(|c| c.0 == "True" && c.2.contains("2600:1f00:250::/64"))
    })
    .await;
}

/// A tenant with only the rights to write TunnelPolicies and pods in its namespace cannot freeze
/// policy for the cluster: with a policy whose name makes a rule name the proxy would refuse and two
/// ~460 KB policies (inside the CRD's bounds, together over what a ConfigMap holds) in place — each
/// refused or left out alone, and saying why — another namespace's new Allow is enforced, a cluster Deny applies and is lifted, and a
/// deletion is revoked, each within the usual time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_freeze_policy_for_the_cluster() {
    let World { dir, rel } = World::boot("e2e-tenant", &["payments", "tenant"], &[]).await;
    let c = rel.admin.clone();
    let world = Loopback::start(&rel, &dir.0).await;
    let (target, proxy_addr, op_admin) = (world.target, world.proxy, world.operator_admin);
    run_pod(&Api::<Pod>::namespaced(c.clone(), "payments"), pod("checkout-1", "checkout", "127.0.0.11")).await;
    run_pod(&Api::<Pod>::namespaced(c.clone(), "tenant"), pod("t-1", "t", "127.0.0.13")).await;
    until("proxy answers", 20, || async { connect_from("127.0.0.11", proxy_addr, target).await == 403 }).await;

    // The tenant's moves, through the real API server's admission.
    let tenant = Api::<TunnelPolicy>::namespaced(c.clone(), "tenant");
    let long_name = "n".repeat(253);
    tenant.create(&PostParams::default(), &policy(&long_name, "t", json!({"hosts": ["a.example.com"]}))).await.unwrap();
    let label = "l".repeat(60);
    let destinations: Vec<serde_json::Value> = (0..30)
        .map(|d| {
            let hosts: Vec<String> = (0..76).map(|h| format!("d{d}h{h}.{label}.{label}.{label}.example.com")).collect();
            json!({"hosts": hosts, "ports": [443]})
        })
        .collect();
    // Two of them: together over what one ConfigMap holds (the whole render failed before).
    for name in ["huge", "huge-2"] {
        let mut huge = policy(name, "t", json!({}));
        huge.spec.destinations = serde_json::from_value(json!(destinations)).unwrap();
        let bytes = serde_json::to_vec(&huge).unwrap().len();
        assert!(bytes > 460_000, "{bytes}");
        tenant.create(&PostParams::default(), &huge).await.unwrap();
    }

    // Another namespace's Allow is enforced all the same.
    let payments = Api::<TunnelPolicy>::namespaced(c.clone(), "payments");
    let dest = json!({"cidrs": ["127.0.0.2/32"], "ports": [target.port()]});
    payments.create(&PostParams::default(), &policy("allow-echo", "checkout", dest)).await.unwrap();
    until("payments' Allow enforced", 20, || async { connect_from("127.0.0.11", proxy_addr, target).await == 200 })
        .await;
    // The tenant's policies say why they are not in force.
    until("the long name refused alone", 20, || async {
        condition(&tenant.get(&long_name).await.unwrap(), "Accepted")
            .is_some_and(|c| c.0 == "False" && c.2.contains("metadata.name"))
    })
    .await;
    until("the huge policy over its budget", 20, || async {
        condition(&tenant.get("huge").await.unwrap(), "Ready")
            .is_some_and(|c| c.0 == "False" && c.1 == "OverBudget" && c.2.contains("one policy may add"))
    })
    .await;
    // A cluster Deny applies, and is lifted.
    let ctps = Api::<ClusterTunnelPolicy>::all(c.clone());
    let deny: ClusterTunnelPolicy = serde_json::from_value(json!({
        "apiVersion": "tunnelgate.io/v1alpha1", "kind": "ClusterTunnelPolicy", "metadata": {"name": "no-echo"},
        "spec": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "payments"}}, "action": "Deny",
                 "priority": 100, "destinations": [{"cidrs": ["127.0.0.2/32"]}]}
    }))
    .unwrap();
    ctps.create(&PostParams::default(), &deny).await.unwrap();
    until("cluster Deny enforced", 20, || async { connect_from("127.0.0.11", proxy_addr, target).await == 403 }).await;
    ctps.delete("no-echo", &DeleteParams::default()).await.unwrap();
    until("cluster Deny lifted", 20, || async { connect_from("127.0.0.11", proxy_addr, target).await == 200 }).await;
    // A delegation that says more than it can grant (one port) is refused, naming the field, and
    // grants nothing: the tenant's pod still cannot reach the loopback echo.
    let wide: ClusterTunnelPolicy = serde_json::from_value(json!({
        "apiVersion": "tunnelgate.io/v1alpha1", "kind": "ClusterTunnelPolicy", "metadata": {"name": "tenant-echo-port"},
        "spec": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "tenant"}}, "action": "Allow",
                 "delegate": true, "destinations": [{"cidrs": ["127.0.0.2/32"], "ports": [target.port()]}]}
    }))
    .unwrap();
    ctps.create(&PostParams::default(), &wide).await.unwrap();
    tenant
        .create(
            &PostParams::default(),
            &policy("echo", "t", json!({"cidrs": ["127.0.0.2/32"], "ports": [target.port()]})),
        )
        .await
        .unwrap();
    until("the over-wide delegation refused", 20, || async {
        ctps.get("tenant-echo-port").await.unwrap().status.is_some_and(|s| {
            s.conditions.iter().any(|c| {
                c.type_ == "Accepted" && c.status == "False" && c.message.contains("spec.destinations[0].ports")
            })
        })
    })
    .await;
    until("the tenant's echo policy Restricted", 20, || async {
        condition(&tenant.get("echo").await.unwrap(), "Restricted").is_some_and(|c| c.0 == "True")
    })
    .await;
    assert_eq!(connect_from("127.0.0.13", proxy_addr, target).await, 403, "nothing was granted");
    ctps.delete("tenant-echo-port", &DeleteParams::default()).await.unwrap();
    // Churn: the tenant flips its pod's label 8 times a second for 4 s, each flip changing the
    // document (a small policy selects the label). The writes stay at about one per churn interval
    // (2 s), and another namespace's deletion is revoked meanwhile within the usual time.
    tenant
        .create(&PostParams::default(), &policy("small", "t", json!({"hosts": ["small.example.com"]})))
        .await
        .unwrap();
    until("the small policy rendered", 20, || async {
        condition(&tenant.get("small").await.unwrap(), "Ready").is_some_and(|c| c.0 == "True")
    })
    .await;
    let op = format!("127.0.0.1:{op_admin}");
    let writes = || async {
        let body = reqwest_get(&op, "/metrics").await;
        body.lines()
            .find_map(|l| l.strip_prefix("tunnelgate_operator_config_writes_total{result=\"applied\"} "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let tenant_pods = Api::<Pod>::namespaced(c.clone(), "tenant");
    let before = writes().await;
    let flipper = tokio::spawn(async move {
        for i in 0..32 {
            let app = if i % 2 == 0 { "u" } else { "t" };
            let patch = json!({"metadata": {"labels": {"app": app}}});
            tenant_pods.patch("t-1", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(125)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    payments.delete("allow-echo", &DeleteParams::default()).await.unwrap();
    until("deletion revoked during the churn", 20, || async {
        connect_from("127.0.0.11", proxy_addr, target).await == 403
    })
    .await;
    println!("revocation during churn: {} ms", t0.elapsed().as_millis());
    flipper.await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let during = writes().await - before;
    // 32 document-changing flips over 4 s: the first at once, then one per 2 s interval, plus the
    // deletion's own write (which may carry held changes with it).
    assert!(during <= 5.0, "{during} ConfigMap writes for 32 flips");
    assert!(during >= 2.0, "the flips were rendered at all: {during}");
    // The rendered document never carried the oversized policy.
    let cm = Api::<ConfigMap>::namespaced(c.clone(), "tunnelgate").get("tunnelgate-proxy").await.unwrap();
    assert!(!cm.data.unwrap()["config.yaml"].contains("tenant/huge"));
}
