//! Rollout truth: which proxies have loaded a policy, per node and whole.

use crate::harness::*;

/// Rollout truth: one real proxy and one that keeps failing its reloads (a
/// stand-in answering `/config` like a proxy stuck on an old render); the policy's status says
/// `1/2`, `Stuck` on that node, and `1/1`, `Loaded` once that proxy pod is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_truth_counts_the_proxies_that_loaded_a_policy() {
    // The pods live on a network of the test's own: the API server's pod proxy, through which
    // `kubectl tunnelgate status` reads each proxy's /config, dials no loopback address.
    // A fixed name: a run killed outright leaves this network behind, and the next run replaces it.
    let mut net = Network::create("rollout", [10, 232, 0]).unwrap();
    let host = net.host();
    let opts = Options { bind: host.into(), ..Options::default() };
    let World { dir, rel } = World::boot_with("e2e-rollout", &["payments"], &[], opts).await;
    let c = rel.admin.clone();
    let target = echo_upstream(&host.to_string()).await;
    let (listen, admin_port, op_admin) = (free_port(), free_port(), free_port());
    // The admin token the chart generated, as the kubelet would mount it for proxy and operator.
    let secret = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(c.clone(), "tunnelgate")
        .get("tunnelgate-admin-token")
        .await
        .unwrap();
    let token = String::from_utf8(secret.data.unwrap()["token"].0.clone()).unwrap();
    let token_file = dir.0.join("admin-token");
    std::fs::write(&token_file, &token).unwrap();
    // A stuck proxy (proxy-b), same admin port as the real one; like a real proxy, it answers
    // /config only with the token.
    let stuck = TcpListener::bind((net.host_address(32).unwrap(), admin_port)).await.unwrap();
    let want = format!("x-tunnelgate-admin-token: {token}\r\n").to_ascii_lowercase();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = stuck.accept().await {
            let want = want.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                if !String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase().contains(&want) {
                    let _ = s
                        .write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await;
                    return;
                }
                if String::from_utf8_lossy(&buf[..n]).contains("since=") {
                    // A long-poll: nothing changes on this proxy.
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                let body = r#"{"generation": 1, "sha256": "old", "render": 0, "lastReload": {"failed": true, "reason": "tls"}, "changes": 3}"#;
                let _ = s
                    .write_all(
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                            .as_bytes(),
                    )
                    .await;
            });
        }
    });
    let base = format!(
        "version: 1\nlisteners: [{{name: forward, bind: '0.0.0.0:{listen}'}}]\nadmin: {{bind: '0.0.0.0:{admin_port}', configTokenFile: '{}'}}\npolicy: {{defaultAction: deny}}\naddressGrants: [{{namespaces: [payments], cidrs: ['{host}/32']}}]\nlimits: {{drainDelay: 0s, drainTimeout: 1s}}\n",
        token_file.display()
    );
    let port_arg = admin_port.to_string();
    let token_arg = token_file.display().to_string();
    let _operator = operator_with(
        &rel,
        &dir.0,
        &base,
        "/unused",
        op_admin,
        &[
            "--proxy-admin-port",
            &port_arg,
            "--proxy-admin-token-file",
            &token_arg,
            "--dry-run-event-interval",
            "1s",
            "--behind-warning-after",
            "1s",
        ],
    )
    .await;
    // proxy-a: the real proxy, in its pod's network namespace.
    let proxy_ns = net.pod(31).unwrap();
    let _proxy = spawn_in(
        &proxy_ns,
        &bin("tunnelgate-proxy"),
        &["--config-map", "tunnelgate/tunnelgate-proxy"],
        &rel.proxy_kubeconfig,
        &dir.0.join("proxy.log"),
    );
    let system = Api::<Pod>::namespaced(c.clone(), "tunnelgate");
    run_pod(&system, proxy_pod("proxy-a", "node-a", &net.addr(31).to_string())).await;
    run_pod(&system, proxy_pod("proxy-b", "node-b", &net.addr(32).to_string())).await;
    let client_ip = net.host_address(11).unwrap().to_string();
    run_pod(&Api::<Pod>::namespaced(c.clone(), "payments"), pod("checkout-1", "checkout", &client_ip)).await;
    let tps = Api::<TunnelPolicy>::namespaced(c.clone(), "payments");
    tps.create(
        &PostParams::default(),
        &policy("allow-echo", "checkout", json!({"cidrs": [format!("{host}/32")], "ports": [target.port()]})),
    )
    .await
    .unwrap();
    let enforced = || async {
        let p = tps.get("allow-echo").await.unwrap();
        let st = p.status.clone().unwrap_or_default();
        (st.loaded, condition(&p, "Enforced"))
    };
    until("1/2, stuck on node-b", 20, || async {
        let (loaded, c) = enforced().await;
        loaded.as_deref() == Some("1/2") && c.is_some_and(|c| c.1 == "Stuck" && c.2.contains("node-b"))
    })
    .await;
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(c.clone(), "tunnelgate");
    until("ReloadFailing event on the stuck proxy", 20, || async {
        events.list(&Default::default()).await.unwrap().items.iter().any(|e| {
            e.reason.as_deref() == Some("ReloadFailing")
                && e.note.as_deref().is_some_and(|n| n.contains("node-b") && n.contains("tls"))
        })
    })
    .await;
    // The kubectl plugin: status names the proxies and the policy not yet everywhere.
    let kc = rel.inspector_kubeconfig().await.unwrap();
    let plugin = |args: &[&str]| {
        let out = std::process::Command::new(bin("kubectl-tunnelgate"))
            .arg("--kubeconfig")
            .arg(&kc)
            .args(args)
            .output()
            .unwrap();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, out) = plugin(&["status", "--proxy-admin-port", &port_arg]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("proxy-a") && out.contains("node-b") && out.contains("payments/allow-echo: Stuck"), "{out}");
    // Each proxy's own report came through the API server's pod proxy: the stand-in's failed reload.
    let row_b = out.lines().find(|l| l.starts_with("proxy-b")).unwrap_or_default();
    assert!(row_b.contains("failed (tls)"), "proxy-b's /config through pods/proxy: {out}");
    let row_a = out.lines().find(|l| l.starts_with("proxy-a")).unwrap_or_default();
    assert!(row_a.contains(" ok"), "proxy-a's /config through pods/proxy: {out}");
    // Without the token, the real proxy's /config refuses the same request through the pod proxy.
    let bare = c
        .request_text(
            http::Request::get(format!("/api/v1/namespaces/tunnelgate/pods/proxy-a:{admin_port}/proxy/config"))
                .body(Vec::new())
                .unwrap(),
        )
        .await;
    assert!(matches!(bare, Err(kube::Error::Api(ref e)) if e.code == 401), "{bare:?}");
    system.delete("proxy-b", &DeleteParams::default()).await.unwrap();
    // A proxy pod that never answers (nothing listens on its address) is behind, not failing:
    // after the threshold (1 s here) a ProxyBehind event names its node, without any change.
    run_pod(&system, proxy_pod("proxy-c", "node-c", &net.addr(33).to_string())).await;
    until("ProxyBehind event on the silent proxy", 20, || async {
        events.list(&Default::default()).await.unwrap().items.iter().any(|e| {
            e.reason.as_deref() == Some("ProxyBehind")
                && e.note.as_deref().is_some_and(|n| n.contains("node-c"))
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("proxy-c")
        })
    })
    .await;
    // `status` reports it unreachable (the pod proxy answers 503 for it) instead of retrying.
    let (_, out) = plugin(&["status", "--proxy-admin-port", &port_arg]);
    let row_c = out.lines().find(|l| l.starts_with("proxy-c")).unwrap_or_default();
    assert!(row_c.contains("unreachable"), "{out}");
    system.delete("proxy-c", &DeleteParams::default()).await.unwrap();
    until("1/1, Loaded", 20, || async {
        let (loaded, c) = enforced().await;
        loaded.as_deref() == Some("1/1") && c.is_some_and(|c| c.0 == "True" && c.1 == "Loaded")
    })
    .await;
    // A DryRun Deny: nothing refused, and its status counts what it would have refused.
    let mut dry = policy("would-block", "checkout", json!({ "cidrs": [format!("{host}/32")] }));
    dry.spec.action = tunnelgate_operator::crd::PolicyAction::Deny;
    dry.spec.enforcement = Some(tunnelgate_operator::crd::Enforcement::DryRun);
    tps.create(&PostParams::default(), &dry).await.unwrap();
    let proxy_addr = SocketAddr::from((net.addr(31), listen));
    until("dry-run counted in the policy's status", 20, || async {
        connect_from(&client_ip, proxy_addr, target).await == 200
            && tps.get("would-block").await.unwrap().status.and_then(|s| s.dry_run).is_some_and(|d| d.would_deny >= 1)
    })
    .await;
    let since = tps.get("would-block").await.unwrap().status.and_then(|s| s.dry_run).and_then(|d| d.since);
    assert!(since.is_some(), "status.dryRun.since says when counting started");
    // One aggregated Normal event per interval (1 s here), naming no client and no target.
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(c.clone(), "payments");
    until("a DryRun event", 20, || async {
        let _ = connect_from(&client_ip, proxy_addr, target).await;
        events.list(&Default::default()).await.unwrap().items.iter().any(|e| {
            e.reason.as_deref() == Some("DryRun")
                && e.type_.as_deref() == Some("Normal")
                && e.note.as_deref().is_some_and(|n| n.contains("would have denied") && !n.contains(&client_ip))
        })
    })
    .await;
    let later = tps.get("would-block").await.unwrap().status.and_then(|s| s.dry_run).and_then(|d| d.since);
    assert_eq!(later, since, "since stays put while counting goes on");
    // explain: the decision for the pod, by the rule the proxies have, and its rollout.
    let target_arg = target.to_string();
    let (code, out) = plugin(&["explain", "-n", "payments", "pod/checkout-1", &target_arg]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("decision: allow") && out.contains("rule: payments/allow-echo") && out.contains("loaded on: 1/1"),
        "{out}"
    );
    let (_, out) = plugin(&["explain", "-n", "payments", "pod/checkout-1", &target_arg, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(
        (v["decision"].as_str(), v["rule"].as_str(), v["loaded"].as_str()),
        (Some("allow"), Some("payments/allow-echo"), Some("1/1"))
    );
    let (code, out) = plugin(&["explain", "-n", "payments", "-l", "app=checkout", &target_arg]);
    assert!(code == 0 && out.contains("pod payments/checkout-1"), "a selector names a running pod: {out}");
    let (code, out) = plugin(&["explain", "-n", "payments", "checkout-1", "127.0.0.3:22"]);
    assert_eq!(code, 1, "denied: {out}");
    assert!(out.contains("decision: deny (403)"), "{out}");
}

/// Per-node documents: the operator renders `tunnelgate-proxy-node-<node>` with only that node's
/// pods; a proxy started with `--node-name` enforces its own node's document (a pod of another node
/// is not listed there), a pod change rewrites only its node's document, and rollout truth counts
/// the proxy as current when it has its node's latest document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_node_documents_carry_only_their_nodes_pods() {
    // The chart with per-node documents: the proxy Role then reads its node's document too.
    let World { dir, rel } = World::boot("e2e-pernode", &["payments"], &["proxy.configPerNode=true"]).await;
    let c = rel.admin.clone();
    let target = echo_upstream("127.0.0.2").await;
    let (listen, admin_port, op_admin) = (free_port(), free_port(), free_port());
    let base = rollout_base(listen, "127.0.0.41", admin_port);
    let port_arg = admin_port.to_string();
    let _operator = operator_with(
        &rel,
        &dir.0,
        &base,
        "/unused",
        op_admin,
        &["--proxy-admin-port", &port_arg, "--config-per-node", "true"],
    )
    .await;
    let _proxy = spawn(
        &bin("tunnelgate-proxy"),
        &["--config-map", "tunnelgate/tunnelgate-proxy", "--node-name", "node-a"],
        &rel.proxy_kubeconfig,
        &dir.0.join("proxy.log"),
    );
    let on = |name: &str, app: &str, ip: &str, node: &str| -> Pod {
        let mut p = pod(name, app, ip);
        p.spec.as_mut().unwrap().node_name = Some(node.to_owned());
        p
    };
    run_pod(&Api::<Pod>::namespaced(c.clone(), "tunnelgate"), proxy_pod("proxy-a", "node-a", "127.0.0.41")).await;
    let pods = Api::<Pod>::namespaced(c.clone(), "payments");
    run_pod(&pods, on("web-a", "web", "127.0.0.11", "node-a")).await;
    run_pod(&pods, on("web-b", "web", "127.0.0.12", "node-b")).await;
    let tps = Api::<TunnelPolicy>::namespaced(c.clone(), "payments");
    tps.create(
        &PostParams::default(),
        &policy("allow-web", "web", json!({"cidrs": ["127.0.0.2/32"], "ports": [target.port()]})),
    )
    .await
    .unwrap();
    let proxy_addr: SocketAddr = format!("127.0.0.1:{listen}").parse().unwrap();
    until("web-a allowed by node-a's document", 20, || async {
        connect_from("127.0.0.11", proxy_addr, target).await == 200
    })
    .await;
    assert_eq!(
        connect_from("127.0.0.12", proxy_addr, target).await,
        403,
        "web-b runs on node-b: not in node-a's document"
    );
    let cms = Api::<ConfigMap>::namespaced(c.clone(), "tunnelgate");
    let doc = |node: &'static str| {
        let cms = cms.clone();
        async move { cms.get(&format!("tunnelgate-proxy-node-{node}")).await.unwrap() }
    };
    let (a, b) = (doc("node-a").await, doc("node-b").await);
    let text = |cm: &ConfigMap| cm.data.as_ref().unwrap()["config.yaml"].clone();
    assert!(text(&a).contains("127.0.0.11") && !text(&a).contains("127.0.0.12"), "{}", text(&a));
    assert!(text(&b).contains("127.0.0.12") && !text(&b).contains("127.0.0.11"), "{}", text(&b));
    // The proxy of node-a has its node's latest document: the policy is Loaded there.
    until("1/1, Loaded", 20, || async {
        let p = tps.get("allow-web").await.unwrap();
        p.status.clone().unwrap_or_default().loaded.as_deref() == Some("1/1")
            && condition(&p, "Enforced").is_some_and(|c| c.0 == "True")
    })
    .await;
    // A pod change on node-b rewrites node-b's document only.
    run_pod(&pods, on("web-b2", "web", "127.0.0.13", "node-b")).await;
    until("node-b's document lists the new pod", 20, || async { text(&doc("node-b").await).contains("127.0.0.13") })
        .await;
    assert_eq!(
        doc("node-a").await.metadata.resource_version,
        a.metadata.resource_version,
        "node-a's document untouched"
    );
    assert_eq!(connect_from("127.0.0.11", proxy_addr, target).await, 200);
    // `kubectl tunnelgate explain` decides against the pod's own node's document.
    let kc = rel.inspector_kubeconfig().await.unwrap();
    let out = std::process::Command::new(bin("kubectl-tunnelgate"))
        .arg("--kubeconfig")
        .arg(&kc)
        .args(["explain", "-n", "payments", "pod/web-b", &target.to_string()])
        .output()
        .unwrap();
    let text_out = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text_out}");
    assert!(
        text_out.contains("rule: payments/allow-web")
            && text_out.contains("config: tunnelgate/tunnelgate-proxy-node-node-b"),
        "{text_out}"
    );
    until("still 1/1, Loaded", 20, || async {
        let p = tps.get("allow-web").await.unwrap();
        p.status.clone().unwrap_or_default().loaded.as_deref() == Some("1/1")
            && condition(&p, "Enforced").is_some_and(|c| c.0 == "True")
    })
    .await;
    // node-b's last pods go (and it has no Node object): its document is removed, node-a's stays.
    for name in ["web-b", "web-b2"] {
        pods.delete(name, &Default::default()).await.unwrap();
    }
    until("node-b's document removed", 20, || async {
        cms.get_opt("tunnelgate-proxy-node-node-b").await.unwrap().is_none()
    })
    .await;
    assert!(cms.get_opt("tunnelgate-proxy-node-node-a").await.unwrap().is_some());
    assert_eq!(connect_from("127.0.0.11", proxy_addr, target).await, 200);
}
