//! Parent proxies through the operator: the base names a parent whose credentials are a Secret the
//! operator copies to the proxies; TunnelPolicy traffic takes the default route, through a real
//! Squid that requires those credentials; a ClusterTunnelPolicy routes its traffic directly.

use testkit::squid::Squid;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_traffic_leaves_through_the_platforms_parent_and_a_cluster_policy_routes_directly() {
    let World { dir, rel } = World::boot("e2e-parents", &["payments"], &[]).await;
    let c = rel.admin.clone();
    let tls_dir = dir.0.join("tls");
    std::fs::create_dir_all(&tls_dir).unwrap();
    // Squid requires Basic credentials: a tunnel through it proves the Secret reached the proxy.
    let hash = std::process::Command::new("openssl").args(["passwd", "-1", "pw-from-secret"]).output().unwrap();
    let passwd = dir.0.join("passwd");
    std::fs::write(&passwd, format!("egress:{}", String::from_utf8(hash.stdout).unwrap().trim())).unwrap();
    std::process::Command::new("chmod").arg("a+rx").arg(&dir.0).status().unwrap();
    std::process::Command::new("chmod").arg("a+r").arg(&passwd).status().unwrap();
    let squid = Squid::start(
        "e2e",
        &format!(
            "auth_param basic program /usr/lib/squid/basic_ncsa_auth {}\nacl users proxy_auth REQUIRED\nhttp_access allow users\nhttp_access deny all",
            passwd.display()
        ),
    )
    .await;
    let secrets = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(c.clone(), "tunnelgate");
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "corp-proxy"},
        "stringData": {"credentials": "egress:pw-from-secret\n"}
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &secret).await.unwrap();

    let target = echo_upstream("127.0.0.2").await;
    let (listen, admin, op_admin) = (free_port(), free_port(), free_port());
    let base = base_granting(listen, "127.0.0.1", admin, &["payments"]).replace(
        "policy: {defaultAction: deny}",
        &format!(
            "parents: [{{name: corp, address: '127.0.0.1:{}', credentialsSecret: corp-proxy}}]\npolicy: {{defaultAction: deny, defaultRoute: corp}}",
            squid.port
        ),
    );
    let tls_dir_s = tls_dir.to_string_lossy().into_owned();
    let _operator = single_operator(&rel, &dir.0, &base, &tls_dir_s, op_admin).await;
    // The kubelet's part: the proxies' Secret projected into their directory.
    until("the proxies' Secret with the parent's credentials", 20, || async {
        project_secret(&c, &tls_dir).await && tls_dir.join("parent-corp.credentials").exists()
    })
    .await;
    let cms = Api::<ConfigMap>::namespaced(c.clone(), "tunnelgate");
    let config = rendered_configmap(&cms).await.data.unwrap().remove("config.yaml").unwrap();
    assert!(config.contains(&format!("credentialsFile: {tls_dir_s}/parent-corp.credentials")), "{config}");
    assert!(!config.contains("pw-from-secret") && !config.contains("credentialsSecret"), "{config}");
    let _proxy = whole_document_proxy(&rel, &dir.0);
    let proxy: SocketAddr = format!("127.0.0.1:{listen}").parse().unwrap();

    // A tenant's policy: its traffic takes the default route, through Squid, authenticated.
    run_pod(&Api::<Pod>::namespaced(c.clone(), "payments"), pod("app-1", "app", "127.0.0.5")).await;
    Api::<TunnelPolicy>::namespaced(c.clone(), "payments")
        .create(&PostParams::default(), &policy("echo", "app", json!({"cidrs": ["127.0.0.2/32"]})))
        .await
        .unwrap();
    until("the pod's tunnel through Squid", 30, || async { connect_from("127.0.0.5", proxy, target).await == 200 })
        .await;
    let through = squid.requests(1).await;
    assert!(through.contains(&format!("CONNECT {target}")), "{through:?}");

    // The platform routes this destination directly: Squid sees no more tunnels.
    let ctp: ClusterTunnelPolicy = serde_json::from_value(json!({
        "apiVersion": "tunnelgate.io/v1alpha1", "kind": "ClusterTunnelPolicy",
        "metadata": {"name": "echo-direct"},
        "spec": {"namespaceSelector": {}, "action": "Allow", "route": "direct",
                 "destinations": [{"cidrs": ["127.0.0.2/32"]}]}
    }))
    .unwrap();
    Api::<ClusterTunnelPolicy>::all(c.clone()).create(&PostParams::default(), &ctp).await.unwrap();
    let metrics_addr = format!("127.0.0.1:{admin}");
    let loaded = || async {
        let body = reqwest_get(&metrics_addr, "/metrics").await;
        body.lines()
            .any(|l| l.starts_with("tunnelgate_policy_decisions_total{") && l.contains("rule=\"cluster:echo-direct\""))
    };
    until("a tunnel decided by the cluster policy", 30, || async {
        connect_from("127.0.0.5", proxy, target).await == 200 && loaded().await
    })
    .await;
    let before = squid.requests(1).await.len();
    assert_eq!(connect_from("127.0.0.5", proxy, target).await, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(squid.requests(1).await.len(), before, "routed directly: Squid saw nothing more");
}
