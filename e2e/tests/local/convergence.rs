//! Policies reach the proxies: changes enforced within a second, server-side apply beside the
//! operator's status writes, two releases sharing the policies.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_and_proxy_converge_on_policy_changes() {
    let World { dir, rel } = World::boot("e2e", &["payments"], &[]).await;
    let c = rel.admin.clone();

    // An echo upstream on 127.0.0.2, the destination the policies talk about.
    let target = echo_upstream("127.0.0.2").await;

    // The base ConfigMap the chart owns, with this test's ports.
    let (listen, proxy_admin, op_admin) = (free_port(), free_port(), free_port());
    let proxy_addr: SocketAddr = format!("127.0.0.1:{listen}").parse().unwrap();
    let base = format!(
        "version: 1\nlisteners: [{{name: forward, bind: '127.0.0.1:{listen}'}}]\nadmin: {{bind: '127.0.0.1:{proxy_admin}'}}\npolicy: {{defaultAction: deny, denyPrivateAddresses: true}}\naddressGrants: [{{namespaces: [payments], cidrs: ['127.0.0.2/32']}}]\nlimits: {{drainDelay: 0s, drainTimeout: 1s}}\n"
    );
    rel.set_base(&base).await.unwrap();
    let cms = Api::<ConfigMap>::namespaced(c.clone(), "tunnelgate");

    let mut operator = replica(&rel, &format!("127.0.0.1:{op_admin}"), "op-0", &dir.0.join("operator.log"));
    // A second replica: it must wait for the Lease and never write while the first holds it.
    let op2_admin = free_port();
    let mut operator2 = replica(&rel, &format!("127.0.0.1:{op2_admin}"), "op-1", &dir.0.join("operator2.log"));
    let _proxy = whole_document_proxy(&rel, &dir.0);
    let logs = || {
        format!(
            "--- operator\n{}\n--- proxy\n{}",
            std::fs::read_to_string(dir.0.join("operator.log")).unwrap_or_default(),
            std::fs::read_to_string(dir.0.join("proxy.log")).unwrap_or_default()
        )
    };

    // The operator renders the base with no policy (explicit default deny); the proxy starts on it.
    let rendered = rendered_configmap(&cms).await;
    assert!(rendered.data.unwrap()["config.yaml"].contains("defaultAction: deny"));
    until("proxy listening", 20, || async { tokio::net::TcpStream::connect(proxy_addr).await.is_ok() }).await;
    // The first answers may come before the proxy has its first configuration from the API.
    until("default deny answered", 20, || async { connect_from("127.0.0.11", proxy_addr, target).await == 403 }).await;

    // Pods: checkout at 127.0.0.11, other at 127.0.0.12.
    let pods = Api::<Pod>::namespaced(c.clone(), "payments");
    run_pod(&pods, pod("checkout-1", "checkout", "127.0.0.11")).await;
    run_pod(&pods, pod("other-1", "other", "127.0.0.12")).await;

    // A policy for checkout: enforced for exactly its pods.
    let tps = Api::<TunnelPolicy>::namespaced(c.clone(), "payments");
    let dest = json!({ "cidrs": ["127.0.0.2/32"], "ports": [target.port()] });
    let t0 = Instant::now();
    tps.create(&PostParams::default(), &policy("allow-echo", "checkout", dest.clone())).await.unwrap();
    until("checkout allowed", 20, || async { connect_from("127.0.0.11", proxy_addr, target).await == 200 }).await;
    let to_enforcement = t0.elapsed();
    println!("API write to enforcement: {} ms", to_enforcement.as_millis());
    assert_eq!(
        connect_from("127.0.0.12", proxy_addr, target).await,
        403,
        "pods the policy does not select stay denied"
    );
    until("status Accepted and Ready", 10, || async {
        let p = tps.get("allow-echo").await.unwrap();
        condition(&p, "Accepted").map(|c| c.0) == Some("True".into())
            && condition(&p, "Ready").map(|c| c.0) == Some("True".into())
    })
    .await;
    let p = tps.get("allow-echo").await.unwrap();
    let st = p.status.as_ref().unwrap();
    assert_eq!(st.matched_pods, Some(1));
    assert_eq!(st.observed_generation, p.metadata.generation);

    // Loopback space the base grants nobody: accepted, left out, and said so in the status.
    let ungranted = json!({ "cidrs": ["127.0.0.3/32"], "ports": [target.port()] });
    tps.create(&PostParams::default(), &policy("allow-ungranted", "checkout", ungranted)).await.unwrap();
    until("status Restricted", 10, || async {
        let p = tps.get("allow-ungranted").await.unwrap();
        condition(&p, "Restricted").is_some_and(|c| c.0 == "True" && c.2.contains("127.0.0.3/32"))
            && condition(&p, "Accepted").map(|c| c.0) == Some("True".into())
    })
    .await;
    tps.delete("allow-ungranted", &Default::default()).await.unwrap();

    // Change the selector: enforcement follows.
    let t1 = Instant::now();
    tps.patch(
        "allow-echo",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"podSelector": {"matchLabels": {"app": "other"}}}})),
    )
    .await
    .unwrap();
    until("other allowed after update", 20, || async { connect_from("127.0.0.12", proxy_addr, target).await == 200 })
        .await;
    println!("API update to enforcement: {} ms", t1.elapsed().as_millis());
    assert_eq!(connect_from("127.0.0.11", proxy_addr, target).await, 403);

    // A pod that starts Pending with no IP (as every real pod does) is not a client yet; when the
    // kubelet reports it Running with its IP, the proxy follows.
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": { "name": "other-late", "namespace": "payments", "labels": { "app": "other" } },
            "spec": { "containers": [{ "name": "c", "image": "busybox" }] },
            "status": { "phase": "Pending" }
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(connect_from("127.0.0.13", proxy_addr, target).await, 403, "an address no pod has yet");
    until("policy status counts only the Running pod", 10, || async {
        tps.get("allow-echo").await.unwrap().status.and_then(|s| s.matched_pods) == Some(1)
    })
    .await;
    let t2 = Instant::now();
    pods.patch_status(
        "other-late",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running", "podIP": "127.0.0.13", "podIPs": [{"ip": "127.0.0.13"}]}})),
    )
    .await
    .unwrap();
    until("late pod allowed once Running", 20, || async {
        connect_from("127.0.0.13", proxy_addr, target).await == 200
    })
    .await;
    println!("pod Running to enforcement: {} ms", t2.elapsed().as_millis());
    until("policy status counts the late pod", 10, || async {
        tps.get("allow-echo").await.unwrap().status.and_then(|s| s.matched_pods) == Some(2)
    })
    .await;
    pods.delete("other-late", &DeleteParams::default()).await.unwrap();
    until("deleted pod denied again", 20, || async { connect_from("127.0.0.13", proxy_addr, target).await == 403 })
        .await;

    // Admission refuses what the CRD's schema can tell is wrong, and names the field.
    match tps.create(&PostParams::default(), &policy("bad-host", "checkout", json!({ "hosts": ["a.*.test"] }))).await {
        Err(kube::Error::Api(e)) => {
            assert!(e.code == 422 && e.message.contains("spec.destinations[0].hosts[0]"), "{e:?}");
        }
        other => panic!("the API server admitted a.*.test: {other:?}"),
    }
    // What only the operator can judge (a reversed port range matches the schema's pattern) is
    // rejected in that policy's status, with the field named, and does not block a valid policy
    // created beside it.
    let reversed = json!({ "cidrs": ["127.0.0.2/32"], "ports": ["9000-8000"] });
    tps.create(&PostParams::default(), &policy("broken", "checkout", reversed)).await.unwrap();
    // A legal 253-character name, too long for a rule name with its namespace: refused alone.
    let long = "l".repeat(253);
    tps.create(&PostParams::default(), &policy(&long, "checkout", dest.clone())).await.unwrap();
    tps.create(&PostParams::default(), &policy("allow-checkout", "checkout", dest.clone())).await.unwrap();
    until("checkout allowed by the valid policy", 20, || async {
        connect_from("127.0.0.11", proxy_addr, target).await == 200
    })
    .await;
    until("broken rejected", 10, || async {
        let p = tps.get("broken").await.unwrap();
        condition(&p, "Accepted")
            .is_some_and(|c| c.0 == "False" && c.1 == "Invalid" && c.2.contains("spec.destinations[0].ports[0]"))
    })
    .await;
    until("the long-named policy refused on its name", 10, || async {
        let p = tps.get(&long).await.unwrap();
        condition(&p, "Accepted").is_some_and(|c| c.0 == "False" && c.1 == "Invalid" && c.2.contains("metadata.name"))
    })
    .await;
    tps.delete(&long, &DeleteParams::default()).await.unwrap();
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(c.clone(), "payments");
    until("InvalidSpec event", 10, || async {
        events.list(&Default::default()).await.unwrap().items.iter().any(|e| {
            e.reason.as_deref() == Some("InvalidSpec")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("broken")
        })
    })
    .await;
    // A policy written for a newer CRD than this operator knows (the platform upgraded the CRD
    // first: here an action `Permit`) does not deserialize: it is reported, and the watch goes on,
    // so the changes below are still rendered.
    let crds = Api::<CustomResourceDefinition>::all(c.clone());
    let mut crd = serde_json::to_value(crds.get("tunnelpolicies.tunnelgate.io").await.unwrap()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["action"]["enum"]
        .as_array_mut()
        .unwrap()
        .push(json!("Permit"));
    crds.replace("tunnelpolicies.tunnelgate.io", &PostParams::default(), &serde_json::from_value(crd).unwrap())
        .await
        .unwrap();
    let ar = kube::discovery::ApiResource::erase::<TunnelPolicy>(&());
    let raw = Api::<kube::api::DynamicObject>::namespaced_with(c.clone(), "payments", &ar);
    let mut newer = serde_json::to_value(policy("newer", "checkout", dest.clone())).unwrap();
    newer["spec"]["action"] = json!("Permit");
    let newer: kube::api::DynamicObject = serde_json::from_value(newer).unwrap();
    until("the newer CRD admits Permit", 20, || async { raw.create(&PostParams::default(), &newer).await.is_ok() })
        .await;
    until("unreadable policy reported", 10, || async {
        let p = raw.get("newer").await.unwrap();
        let conds = p.data["status"]["conditions"].as_array().cloned().unwrap_or_default();
        conds.iter().any(|c| {
            c["type"] == "Accepted"
                && c["status"] == "False"
                && c["reason"] == "Unreadable"
                && c["message"].as_str().is_some_and(|m| m.contains("spec.action") && m.contains("Permit"))
        })
    })
    .await;
    until("Unreadable event", 10, || async {
        events.list(&Default::default()).await.unwrap().items.iter().any(|e| {
            e.reason.as_deref() == Some("Unreadable")
                && e.type_.as_deref() == Some("Warning")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("newer")
        })
    })
    .await;

    // Pod churn: checkout's pod goes away, so the valid policy renders no rule for it.
    pods.delete("checkout-1", &DeleteParams::default()).await.unwrap();
    until("deleted pod denied", 20, || async { connect_from("127.0.0.11", proxy_addr, target).await == 403 }).await;

    // Delete the remaining policies: default deny for everyone.
    tps.delete("allow-echo", &DeleteParams::default()).await.unwrap();
    until("other denied after delete", 20, || async { connect_from("127.0.0.12", proxy_addr, target).await == 403 })
        .await;

    // Exactly one replica leads; the standby never wrote.
    let admins = [format!("127.0.0.1:{op_admin}"), format!("127.0.0.1:{op2_admin}")];
    let mut leaders = Vec::new();
    for a in &admins {
        if reqwest_get(a, "/metrics").await.lines().any(|l| l == "tunnelgate_operator_leader 1") {
            leaders.push(a.clone());
        }
    }
    assert_eq!(leaders.len(), 1, "exactly one leader: {leaders:?}");
    let leader_is_first = leaders[0] == admins[0];
    let (lead_admin, standby_admin) = if leader_is_first { (&admins[0], &admins[1]) } else { (&admins[1], &admins[0]) };
    let body = reqwest_get(lead_admin, "/metrics").await;
    assert!(body.contains("tunnelgate_operator_policies{state=\"rejected\"} 2"), "broken and newer: {body}");
    assert!(!body.contains("tunnelgate_operator_config_writes_total{result=\"applied\"} 0"), "{body}");
    let standby = reqwest_get(standby_admin, "/metrics").await;
    assert!(
        standby.contains("tunnelgate_operator_config_writes_total{result=\"applied\"} 0"),
        "the standby wrote:\n{standby}"
    );
    // The proxy reports the generations it went through.
    let cfg = reqwest_get(&format!("127.0.0.1:{proxy_admin}"), "/config").await;
    let v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    assert!(v["generation"].as_u64().unwrap() >= 4, "{cfg}");
    assert!(to_enforcement < Duration::from_secs(5), "enforcement took {to_enforcement:?}\n{}", logs());

    // Graceful shutdown of the leader releases the Lease; the standby takes over and reconciles.
    let (leader_proc, standby_proc) =
        if leader_is_first { (&mut operator, &mut operator2) } else { (&mut operator2, &mut operator) };
    let pid = leader_proc.id().unwrap().to_string();
    std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let st = tokio::time::timeout(Duration::from_secs(10), leader_proc.wait()).await.expect("operator exits").unwrap();
    assert_eq!(st.code(), Some(0));
    until("standby becomes leader", 30, || async {
        reqwest_get(standby_admin, "/metrics").await.lines().any(|l| l == "tunnelgate_operator_leader 1")
    })
    .await;
    run_pod(&pods, pod("checkout-2", "checkout", "127.0.0.13")).await;
    until("new leader renders the new pod", 20, || async {
        connect_from("127.0.0.13", proxy_addr, target).await == 200
    })
    .await;
    // A leader killed outright releases nothing: a third replica takes over when the Lease
    // expires (4 s here), and policy changes keep reaching the proxy.
    let op3_admin = free_port();
    let op3_bind = format!("127.0.0.1:{op3_admin}");
    let _operator3 = replica(&rel, &op3_bind, "op-2", &dir.0.join("operator3.log"));
    let pid = standby_proc.id().unwrap().to_string();
    std::process::Command::new("kill").args(["-KILL", &pid]).status().unwrap();
    until("the third replica leads after the Lease expired", 30, || async {
        tokio::net::TcpStream::connect(&op3_bind).await.is_ok()
            && reqwest_get(&op3_bind, "/metrics").await.lines().any(|l| l == "tunnelgate_operator_leader 1")
    })
    .await;
    pods.delete("checkout-2", &DeleteParams::default()).await.unwrap();
    run_pod(&pods, pod("checkout-3", "checkout", "127.0.0.14")).await;
    until("the third leader revokes the deleted pod", 20, || async {
        connect_from("127.0.0.13", proxy_addr, target).await == 403
    })
    .await;
    until("the third leader renders the new pod", 20, || async {
        connect_from("127.0.0.14", proxy_addr, target).await == 200
    })
    .await;

    // Losing the API: the proxy keeps enforcing the last good configuration.
    let mut rel = rel;
    rel.cp.stop_apiserver();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(connect_from("127.0.0.14", proxy_addr, target).await, 200);
    assert_eq!(connect_from("127.0.0.13", proxy_addr, target).await, 403);
    assert!(reqwest_get(&format!("127.0.0.1:{proxy_admin}"), "/readyz").await.starts_with("ready"));
}

/// Server-side apply as the API server does it: a user applies a policy (field manager
/// `kubectl`), the operator writes its status through the status subresource, and the user's
/// next apply of a changed spec (without --force-conflicts) is accepted: they own disjoint fields
/// and never fight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_applies_and_operator_status_writes_never_conflict() {
    let World { dir, rel } = World::boot("e2e-ssa", &["payments"], &[]).await;
    let (listen, admin, op_admin) = (free_port(), free_port(), free_port());
    let _operator = single_operator(&rel, &dir.0, &rollout_base(listen, "127.0.0.1", admin), "/unused", op_admin).await;
    run_pod(&Api::<Pod>::namespaced(rel.admin.clone(), "payments"), pod("a-1", "a", "127.0.0.11")).await;
    let tps = Api::<TunnelPolicy>::namespaced(rel.admin.clone(), "payments");
    let applied = |port: u16| {
        let mut p =
            serde_json::to_value(policy("allow-a", "a", json!({"cidrs": ["127.0.0.2/32"], "ports": [port]}))).unwrap();
        p["metadata"]["namespace"] = json!("payments");
        p
    };
    let kubectl = PatchParams::apply("kubectl");
    tps.patch("allow-a", &kubectl, &Patch::Apply(applied(443))).await.unwrap();
    until("the operator wrote the status", 20, || async {
        condition(&tps.get("allow-a").await.unwrap(), "Accepted").is_some_and(|c| c.0 == "True")
    })
    .await;
    // The user changes the spec and applies again, without forcing.
    tps.patch("allow-a", &kubectl, &Patch::Apply(applied(8443))).await.unwrap();
    let p = tps.get("allow-a").await.unwrap();
    let generation = p.metadata.generation;
    until("the status follows the new generation", 20, || async {
        tps.get("allow-a").await.unwrap().status.and_then(|s| s.observed_generation) == generation
    })
    .await;
    let managers: Vec<(String, Option<String>)> = tps
        .get("allow-a")
        .await
        .unwrap()
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .map(|m| (m.manager.unwrap_or_default(), m.subresource))
        .collect();
    assert!(managers.contains(&("kubectl".into(), None)), "{managers:?}");
    assert!(
        managers.iter().any(|(m, sub)| m == "tunnelgate-operator" && sub.as_deref() == Some("status")),
        "the operator owns status only: {managers:?}"
    );
    assert!(!managers.iter().any(|(m, sub)| m == "tunnelgate-operator" && sub.is_none()), "{managers:?}");
}

/// Two releases in one cluster (node-local proxies and an egress gateway), as the chart documents
/// it: the second installs no CRDs and writes no policy status (`operator.policyStatus=false`).
/// Both render every policy for their own proxies, which both enforce it; only the first writes
/// the policy's status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_releases_share_policies_and_one_owns_their_status() {
    let World { dir, rel } = World::boot("e2e-tworel", &["payments"], &[]).await;
    let chart = e2e::controlplane::repo_root().join("charts/tunnelgate");
    let mut args = vec!["install", "gw", chart.to_str().unwrap(), "--namespace", "gateway", "--create-namespace"];
    args.extend(e2e::release::SECOND_RELEASE_GATEWAY);
    let out = rel.cp.helm(&args).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let target = echo_upstream("127.0.0.2").await;
    let (listen_a, admin_a, op_a) = (free_port(), free_port(), free_port());
    let (listen_b, admin_b, op_b) = (free_port(), free_port(), free_port());
    let _operator_a =
        single_operator(&rel, &dir.0, &rollout_base(listen_a, "127.0.0.1", admin_a), "/unused", op_a).await;
    // The gateway release: its own base, operator and proxy, on its own ServiceAccounts' tokens.
    let base_b = rollout_base(listen_b, "127.0.0.1", admin_b);
    Api::<ConfigMap>::namespaced(rel.admin.clone(), "gateway")
        .patch("gw-tunnelgate-base", &PatchParams::default(), &Patch::Merge(json!({"data": {"config.yaml": base_b}})))
        .await
        .unwrap();
    let op_b_kc = rel.cp.service_account_kubeconfig("gateway", "gw-tunnelgate-operator").await.unwrap();
    let proxy_b_kc = rel.cp.service_account_kubeconfig("gateway", "gw-tunnelgate-proxy").await.unwrap();
    let op_b_admin = format!("127.0.0.1:{op_b}");
    let _operator_b = spawn(
        &bin("tunnelgate-operator"),
        &[
            "--namespace",
            "gateway",
            // As the chart passes them: the release's full name, and its instance label.
            "--release",
            "gw-tunnelgate",
            "--proxy-instance",
            "gw",
            "--admin-bind",
            &op_b_admin,
            "--debounce",
            "100ms",
            "--tls-dir",
            "/unused",
            "--leader-election",
            "false",
            "--policy-status",
            "false",
        ],
        &op_b_kc,
        &dir.0.join("operator-gw.log"),
    );
    let _proxy_a = whole_document_proxy(&rel, &dir.0);
    let _proxy_b = spawn(
        &bin("tunnelgate-proxy"),
        &["--config-map", "gateway/gw-tunnelgate-proxy"],
        &proxy_b_kc,
        &dir.0.join("proxy-gw.log"),
    );
    run_pod(&Api::<Pod>::namespaced(rel.admin.clone(), "payments"), pod("a-1", "a", "127.0.0.11")).await;
    let tps = Api::<TunnelPolicy>::namespaced(rel.admin.clone(), "payments");
    tps.create(
        &PostParams::default(),
        &policy("allow-a", "a", json!({"cidrs": ["127.0.0.2/32"], "ports": [target.port()]})),
    )
    .await
    .unwrap();
    for (name, listen) in [("node-local", listen_a), ("gateway", listen_b)] {
        let proxy: SocketAddr = format!("127.0.0.1:{listen}").parse().unwrap();
        until(&format!("{name} proxy enforces the policy"), 20, || async {
            connect_from("127.0.0.11", proxy, target).await == 200
        })
        .await;
    }
    until("status written by the first release", 20, || async {
        condition(&tps.get("allow-a").await.unwrap(), "Accepted").is_some_and(|c| c.0 == "True")
    })
    .await;
    let metrics = reqwest_get(&op_b_admin, "/metrics").await;
    let writes: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("tunnelgate_operator_status_writes_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(writes, 0.0, "the gateway release wrote policy status:\n{metrics}");
    assert!(metrics.contains("tunnelgate_operator_config_writes_total{result=\"applied\"}"), "{metrics}");
}
