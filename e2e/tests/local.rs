//! Local end-to-end: the real `tunnelgate-operator`, `tunnelgate-proxy` and `kubectl-tunnelgate`
//! binaries against a real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager
//! built from their Go modules by controlplane/build.sh) with the chart installed by helm; the
//! operator and the proxies authenticate with tokens of the chart's ServiceAccounts, so they have
//! exactly the chart's RBAC. The test plays the kubelet: pods get 127.0.0.x addresses in their
//! status and the test binds its client sockets to them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub, reason = "test harness")]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use e2e::controlplane::Options;
use e2e::netns::Network;
use e2e::release::Release;
use e2e::scratch::Dir;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::json;
use testkit::{free_port, until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tunnelgate_operator::crd::{ClusterTunnelPolicy, TunnelPolicy};

use e2e::workspace_bin as bin;

/// A control plane with the chart installed (with `values`, as `helm --set`), for one test; the
/// `namespaces` are created beside the release's.
async fn cluster(dir: &Path, namespaces: &[&str], values: &[&str]) -> Release {
    Release::install(&dir.join("cluster"), namespaces, values, Options::default())
        .await
        .unwrap_or_else(|e| panic!("control plane: {e}"))
}

/// Creates `pod` and then reports its status as the kubelet would (the API server ignores the
/// status of a create).
async fn run_pod(api: &Api<Pod>, pod: Pod) {
    let name = pod.metadata.name.clone().unwrap();
    let status = pod.status.clone();
    api.create(&PostParams::default(), &pod).await.unwrap();
    if let Some(status) = status {
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(json!({ "status": status }))).await.unwrap();
    }
}

fn spawn(bin: &Path, args: &[&str], kubeconfig: &Path, log: &Path) -> Child {
    start(Command::new(bin), args, kubeconfig, log)
}

/// [`spawn`] inside network namespace `ns` (a pod of the test's own network).
fn spawn_in(ns: &str, bin: &Path, args: &[&str], kubeconfig: &Path, log: &Path) -> Child {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(bin);
    start(cmd, args, kubeconfig, log)
}

fn start(mut cmd: Command, args: &[&str], kubeconfig: &Path, log: &Path) -> Child {
    cmd.args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("TUNNELGATE_LOG", std::env::var("E2E_LOG").unwrap_or_else(|_| "info".into()))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// One operator replica of the release, with leader election on short leases (4 s, renewed 2 s
/// before expiry) so that failovers in the tests are quick.
fn replica(rel: &Release, admin_bind: &str, identity: &str, log: &Path) -> Child {
    let args = [
        "--namespace",
        "tunnelgate",
        "--release",
        "tunnelgate",
        "--admin-bind",
        admin_bind,
        "--debounce",
        "100ms",
        "--identity",
        identity,
        "--lease-duration",
        "4",
        "--lease-grace",
        "2",
    ];
    spawn(&bin("tunnelgate-operator"), &args, &rel.operator_kubeconfig, log)
}

/// CONNECT from `client_ip` through the proxy; returns the status code.
async fn connect_from(client_ip: &str, proxy: SocketAddr, target: SocketAddr) -> u16 {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{client_ip}:0").parse().unwrap()).unwrap();
    let Ok(mut s) = sock.connect(proxy).await else { return 0 };
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\n\r\n").as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
            Ok(Ok(1)) => head.push(b[0]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&head);
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    if status == 200 {
        s.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ping", "tunnel relays data");
    }
    status
}

fn pod(name: &str, app: &str, ip: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "labels": { "app": app } },
        "spec": { "containers": [{ "name": "c", "image": "busybox" }] },
        "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] }
    }))
    .unwrap()
}

/// A running proxy pod of the release (what the operator's rollout view long-polls).
fn proxy_pod(name: &str, node: &str, ip: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app.kubernetes.io/instance": "tunnelgate", "app.kubernetes.io/component": "proxy"}},
        "spec": {"nodeName": node, "containers": [{"name": "proxy", "image": "tunnelgate"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    }))
    .unwrap()
}

/// The base document of the rollout tests: a proxy whose admin port listens on `admin_ip` (the
/// address its pod has, where the operator long-polls it), echo traffic granted to `payments`.
fn rollout_base(listen: u16, admin_ip: &str, admin_port: u16) -> String {
    format!(
        "version: 1\nlisteners: [{{name: forward, bind: '127.0.0.1:{listen}'}}]\nadmin: {{bind: '{admin_ip}:{admin_port}'}}\npolicy: {{defaultAction: deny}}\naddressGrants: [{{namespaces: [payments], cidrs: ['127.0.0.2/32']}}]\nlimits: {{drainDelay: 0s, drainTimeout: 1s}}\n"
    )
}

fn policy(name: &str, app: &str, dest: serde_json::Value) -> TunnelPolicy {
    serde_json::from_value(json!({
        "apiVersion": "tunnelgate.io/v1alpha1", "kind": "TunnelPolicy",
        "metadata": { "name": name },
        "spec": { "podSelector": { "matchLabels": { "app": app } }, "action": "Allow", "destinations": [dest] }
    }))
    .unwrap()
}

fn condition(p: &TunnelPolicy, type_: &str) -> Option<(String, String, String)> {
    p.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_and_proxy_converge_on_policy_changes() {
    let dir = Dir::new("e2e").unwrap();
    let rel = cluster(&dir.0, &["payments"], &[]).await;
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
    let _proxy = spawn(
        &bin("tunnelgate-proxy"),
        &["--config-map", "tunnelgate/tunnelgate-proxy"],
        &rel.proxy_kubeconfig,
        &dir.0.join("proxy.log"),
    );
    let logs = || {
        format!(
            "--- operator\n{}\n--- proxy\n{}",
            std::fs::read_to_string(dir.0.join("operator.log")).unwrap_or_default(),
            std::fs::read_to_string(dir.0.join("proxy.log")).unwrap_or_default()
        )
    };

    // The operator renders the base with no policy (explicit default deny); the proxy starts on it.
    until("rendered ConfigMap", 20, || async { cms.get_opt("tunnelgate-proxy").await.unwrap().is_some() }).await;
    let rendered = cms.get("tunnelgate-proxy").await.unwrap();
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

/// A bare HTTP/1.1 GET; returns the body.
async fn reqwest_get(addr: &str, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()
}

fn tls_secret(name: &str, cert: &str, key: &str) -> k8s_openapi::api::core::v1::Secret {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": { "name": name },
        "data": { "tls.crt": b64(cert.as_bytes()), "tls.key": b64(key.as_bytes()) }
    }))
    .unwrap()
}

fn b64(data: &[u8]) -> String {
    serde_json::to_value(k8s_openapi::ByteString(data.to_vec())).unwrap().as_str().unwrap().to_owned()
}

/// The certificate the TLS listener presents.
async fn presented(addr: SocketAddr) -> Vec<u8> {
    #[derive(Debug)]
    struct AnyCert;
    impl rustls::client::danger::ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms.supported_schemes()
        }
    }
    let cfg =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(AnyCert))
            .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("proxy.test").unwrap();
    let s = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg)).connect(name, tcp).await.unwrap();
    s.get_ref().1.peer_certificates().unwrap()[0].as_ref().to_vec()
}

/// Writes the rendered TLS Secret's keys as files, as the kubelet does for a Secret volume.
/// An echo server on `ip`:0; returns its address.
async fn echo_upstream(ip: &str) -> SocketAddr {
    let echo = TcpListener::bind((ip.parse::<std::net::IpAddr>().unwrap(), 0)).await.unwrap();
    let addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Creates the base ConfigMap and starts one operator (no leader election) rendering Secrets for
/// `tls_dir`.
async fn single_operator(rel: &Release, dir: &Path, base: &str, tls_dir: &str, admin: u16) -> Child {
    operator_with(rel, dir, base, tls_dir, admin, &[]).await
}

/// [`single_operator`] with extra arguments.
async fn operator_with(rel: &Release, dir: &Path, base: &str, tls_dir: &str, admin: u16, extra: &[&str]) -> Child {
    rel.set_base(base).await.unwrap();
    let admin = format!("127.0.0.1:{admin}");
    let args = [
        "--namespace",
        "tunnelgate",
        "--admin-bind",
        &admin,
        "--debounce",
        "100ms",
        "--tls-dir",
        tls_dir,
        "--leader-election",
        "false",
    ];
    let args: Vec<&str> = args.iter().chain(extra).copied().collect();
    spawn(&bin("tunnelgate-operator"), &args, &rel.operator_kubeconfig, &dir.join("operator.log"))
}

async fn project_secret(c: &Client, dir: &Path) -> bool {
    let secrets = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(c.clone(), "tunnelgate");
    let Some(s) = secrets.get_opt("tunnelgate-proxy-tls").await.unwrap() else { return false };
    for (k, v) in s.data.unwrap_or_default() {
        std::fs::write(dir.join(k), v.0).unwrap();
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_certificates_come_from_validated_secrets() {
    let dir = Dir::new("e2e-tls").unwrap();
    let tls_dir = dir.0.join("tls");
    std::fs::create_dir_all(&tls_dir).unwrap();
    let rel = cluster(&dir.0, &["payments"], &[]).await;
    let c = rel.admin.clone();
    let secrets = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(c.clone(), "tunnelgate");
    let first = rcgen::generate_simple_self_signed(vec!["proxy.test".into()]).unwrap();
    secrets
        .create(
            &PostParams::default(),
            &tls_secret("proxy-cert", &first.cert.pem(), &first.signing_key.serialize_pem()),
        )
        .await
        .unwrap();

    let (listen, admin, op_admin) = (free_port(), free_port(), free_port());
    let base = format!(
        "version: 1\nlisteners: [{{name: secure, bind: '127.0.0.1:{listen}', tls: {{secretName: proxy-cert}}}}]\nadmin: {{bind: '127.0.0.1:{admin}'}}\nlimits: {{drainDelay: 0s, drainTimeout: 1s}}\n"
    );
    let tls_dir_s = tls_dir.to_string_lossy().into_owned();
    let _operator = single_operator(&rel, &dir.0, &base, &tls_dir_s, op_admin).await;
    until("rendered TLS Secret", 20, || async { project_secret(&c, &tls_dir).await }).await;
    let cms = Api::<ConfigMap>::namespaced(c.clone(), "tunnelgate");
    // The Secret is written first, the ConfigMap right after it.
    until("rendered ConfigMap", 20, || async { cms.get_opt("tunnelgate-proxy").await.ok().flatten().is_some() }).await;
    let cm = cms.get("tunnelgate-proxy").await.unwrap();
    let config = cm.data.as_ref().unwrap()["config.yaml"].clone();
    assert!(config.contains(&format!("certFile: {tls_dir_s}/secure.crt")), "{config}");
    assert!(!config.contains("PRIVATE KEY"), "no key material in the ConfigMap");
    assert!(cm.metadata.annotations.unwrap().contains_key("tunnelgate.io/tls-secure-not-after"));

    let _proxy = spawn(
        &bin("tunnelgate-proxy"),
        &["--config-map", "tunnelgate/tunnelgate-proxy"],
        &rel.proxy_kubeconfig,
        &dir.0.join("proxy.log"),
    );
    let addr: SocketAddr = format!("127.0.0.1:{listen}").parse().unwrap();
    until("TLS listener up", 20, || async { tokio::net::TcpStream::connect(addr).await.is_ok() }).await;
    assert_eq!(presented(addr).await, first.cert.der().to_vec());

    // A Secret whose key does not match: Warning event, and the previous certificate stays.
    let other = rcgen::generate_simple_self_signed(vec!["proxy.test".into()]).unwrap();
    secrets
        .replace(
            "proxy-cert",
            &PostParams::default(),
            &tls_secret("proxy-cert", &first.cert.pem(), &other.signing_key.serialize_pem()),
        )
        .await
        .unwrap();
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(c.clone(), "tunnelgate");
    until("InvalidSecret event", 20, || async {
        events.list(&Default::default()).await.unwrap().items.iter().any(|e| {
            e.reason.as_deref() == Some("InvalidSecret")
                && e.note.as_deref().is_some_and(|n| n.contains("does not match"))
        })
    })
    .await;
    project_secret(&c, &tls_dir).await;
    assert_eq!(presented(addr).await, first.cert.der().to_vec(), "the previous certificate stays in use");

    // A valid rotation reaches the proxy: new handshakes present the new certificate.
    let second = rcgen::generate_simple_self_signed(vec!["proxy.test".into()]).unwrap();
    secrets
        .replace(
            "proxy-cert",
            &PostParams::default(),
            &tls_secret("proxy-cert", &second.cert.pem(), &second.signing_key.serialize_pem()),
        )
        .await
        .unwrap();
    until("rotated certificate served", 20, || async {
        project_secret(&c, &tls_dir).await;
        presented(addr).await == second.cert.der().to_vec()
    })
    .await;
}

fn htpasswd_secret(text: &str) -> k8s_openapi::api::core::v1::Secret {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": { "name": "proxy-users" },
        "data": { "htpasswd": b64(text.as_bytes()) }
    }))
    .unwrap()
}

/// CONNECT with optional credentials; returns the status.
async fn connect_with(proxy: SocketAddr, target: SocketAddr, credentials: Option<&str>) -> u16 {
    use base64::Engine;
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let header = credentials
        .map(|c| format!("Proxy-Authorization: Basic {}\r\n", base64::engine::general_purpose::STANDARD.encode(c)))
        .unwrap_or_default();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\n{header}\r\n").as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
    String::from_utf8_lossy(&buf[..n]).split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_users_come_from_a_validated_htpasswd_secret() {
    let dir = Dir::new("e2e-auth").unwrap();
    let tls_dir = dir.0.join("tls");
    std::fs::create_dir_all(&tls_dir).unwrap();
    let rel = cluster(&dir.0, &["payments"], &[]).await;
    let c = rel.admin.clone();
    let secrets = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(c.clone(), "tunnelgate");
    let alice = format!("alice:{}\n", bcrypt::hash("wonderland", 4).unwrap());
    secrets.create(&PostParams::default(), &htpasswd_secret(&alice)).await.unwrap();
    let target = echo_upstream("127.0.0.1").await;
    let (listen, admin, op_admin) = (free_port(), free_port(), free_port());
    let base = format!(
        "version: 1\nlisteners: [{{name: forward, bind: '127.0.0.1:{listen}'}}]\nadmin: {{bind: '127.0.0.1:{admin}'}}\nauth: {{secretName: proxy-users}}\npolicy: {{defaultAction: allow, denyPrivateAddresses: false}}\nlimits: {{drainDelay: 0s, drainTimeout: 1s}}\n"
    );
    let tls_dir_s = tls_dir.to_string_lossy().into_owned();
    let _operator = single_operator(&rel, &dir.0, &base, &tls_dir_s, op_admin).await;
    until("rendered proxy Secret", 20, || async { project_secret(&c, &tls_dir).await }).await;
    // The Secret is written first, the ConfigMap right after it.
    let cms = Api::<ConfigMap>::namespaced(c.clone(), "tunnelgate");
    until("rendered ConfigMap", 20, || async { cms.get_opt("tunnelgate-proxy").await.ok().flatten().is_some() }).await;
    let cm = cms.get("tunnelgate-proxy").await.unwrap();
    let config = cm.data.as_ref().unwrap()["config.yaml"].clone();
    assert!(config.contains(&format!("htpasswdFile: {tls_dir_s}/htpasswd")), "{config}");
    assert!(!config.contains("$2b$"), "no password hashes in the ConfigMap");
    let _proxy = spawn(
        &bin("tunnelgate-proxy"),
        &["--config-map", "tunnelgate/tunnelgate-proxy"],
        &rel.proxy_kubeconfig,
        &dir.0.join("proxy.log"),
    );
    let proxy: SocketAddr = format!("127.0.0.1:{listen}").parse().unwrap();
    until("proxy listening", 20, || async { tokio::net::TcpStream::connect(proxy).await.is_ok() }).await;
    assert_eq!(connect_with(proxy, target, None).await, 407);
    assert_eq!(connect_with(proxy, target, Some("alice:wrong")).await, 407);
    assert_eq!(connect_with(proxy, target, Some("alice:wonderland")).await, 200);

    // A weak hash: Warning event, and alice keeps working.
    secrets.replace("proxy-users", &PostParams::default(), &htpasswd_secret("alice:$apr1$x$y\n")).await.unwrap();
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(c.clone(), "tunnelgate");
    until("InvalidSecret event", 20, || async {
        events.list(&Default::default()).await.unwrap().items.iter().any(|e| {
            e.reason.as_deref() == Some("InvalidSecret") && e.note.as_deref().is_some_and(|n| n.contains("htpasswd"))
        })
    })
    .await;
    project_secret(&c, &tls_dir).await;
    assert_eq!(connect_with(proxy, target, Some("alice:wonderland")).await, 200);
}

/// A namespace cannot open refused space (loopback stands in for the node network here) until a
/// ClusterTunnelPolicy delegates it; a cluster Deny then overrides the namespaced Allow within a
/// second, and a better-priority cluster Allow carves an exception out of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_policies_bound_what_namespaces_may_open() {
    let dir = Dir::new("e2e-ctp").unwrap();
    let rel = cluster(&dir.0, &["payments"], &[]).await;
    let c = rel.admin.clone();
    let target = echo_upstream("127.0.0.2").await;
    let (listen, admin, op_admin) = (free_port(), free_port(), free_port());
    let proxy_addr: SocketAddr = format!("127.0.0.1:{listen}").parse().unwrap();
    let base = format!(
        "version: 1\nlisteners: [{{name: forward, bind: '127.0.0.1:{listen}'}}]\nadmin: {{bind: '127.0.0.1:{admin}'}}\npolicy: {{defaultAction: deny, denyPrivateAddresses: true}}\nlimits: {{drainDelay: 0s, drainTimeout: 1s}}\n"
    );
    let _operator = single_operator(&rel, &dir.0, &base, "/unused", op_admin).await;
    let _proxy = spawn(
        &bin("tunnelgate-proxy"),
        &["--config-map", "tunnelgate/tunnelgate-proxy"],
        &rel.proxy_kubeconfig,
        &dir.0.join("proxy.log"),
    );
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

/// Rollout truth: one real proxy and one that keeps failing its reloads (a
/// stand-in answering `/config` like a proxy stuck on an old render); the policy's status says
/// `1/2`, `Stuck` on that node, and `1/1`, `Loaded` once that proxy pod is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_truth_counts_the_proxies_that_loaded_a_policy() {
    let dir = Dir::new("e2e-rollout").unwrap();
    // The pods live on a network of the test's own: the API server's pod proxy, through which
    // `kubectl tunnelgate status` reads each proxy's /config, dials no loopback address.
    // A fixed name: a run killed outright leaves this network behind, and the next run replaces it.
    let mut net = Network::create("rollout", [10, 232, 0]).unwrap();
    let host = net.host();
    let opts = Options { bind: host.into(), ..Options::default() };
    let rel = Release::install(&dir.0.join("cluster"), &["payments"], &[], opts).await.unwrap();
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
    let dir = Dir::new("e2e-pernode").unwrap();
    // The chart with per-node documents: the proxy Role then reads its node's document too.
    let rel = cluster(&dir.0, &["payments"], &["proxy.configPerNode=true"]).await;
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

/// The API server restarts and etcd is compacted behind the watches (every 5 s here, with churn
/// in between): while it is down the proxy enforces the last good configuration; after it, the
/// watches resume (relisting where their resource version was compacted: "410 Gone"), no policy is
/// lost, and a deletion and a new policy made after the restart are enforced.
/// One operator and one proxy on loopback, the proxy's base granting `payments` the echo upstream
/// on 127.0.0.2 (the world of the tests that need no pod network).
struct Loopback {
    target: SocketAddr,
    proxy: SocketAddr,
    operator_admin: u16,
    _operator: Child,
    _proxy: Child,
}

impl Loopback {
    async fn start(rel: &Release, dir: &Path) -> Loopback {
        let target = echo_upstream("127.0.0.2").await;
        let (listen, admin, operator_admin) = (free_port(), free_port(), free_port());
        let proxy = format!("127.0.0.1:{listen}").parse().unwrap();
        let base = rollout_base(listen, "127.0.0.1", admin);
        let _operator = single_operator(rel, dir, &base, "/unused", operator_admin).await;
        let _proxy = spawn(
            &bin("tunnelgate-proxy"),
            &["--config-map", "tunnelgate/tunnelgate-proxy"],
            &rel.proxy_kubeconfig,
            &dir.join("proxy.log"),
        );
        Loopback { target, proxy, operator_admin, _operator, _proxy }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_survive_an_api_server_restart_and_compaction() {
    let dir = Dir::new("e2e-restart").unwrap();
    let opts = Options { compaction_interval: Some(Duration::from_secs(5)), ..Options::default() };
    let mut rel = Release::install(&dir.0.join("cluster"), &["payments", "churn"], &[], opts).await.unwrap();
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

/// Server-side apply as the API server does it: a user applies a policy (field manager
/// `kubectl`), the operator writes its status through the status subresource, and the user's
/// next apply of a changed spec (without --force-conflicts) is accepted: they own disjoint fields
/// and never fight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_applies_and_operator_status_writes_never_conflict() {
    let dir = Dir::new("e2e-ssa").unwrap();
    let rel = cluster(&dir.0, &["payments"], &[]).await;
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
    let dir = Dir::new("e2e-tworel").unwrap();
    let rel = cluster(&dir.0, &["payments"], &[]).await;
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
    let _proxy_a = spawn(
        &bin("tunnelgate-proxy"),
        &["--config-map", "tunnelgate/tunnelgate-proxy"],
        &rel.proxy_kubeconfig,
        &dir.0.join("proxy.log"),
    );
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

/// A tenant with only the rights to write TunnelPolicies and pods in its namespace cannot freeze
/// policy for the cluster: with a policy whose name makes a rule name the proxy would refuse and two
/// ~460 KB policies (inside the CRD's bounds, together over what a ConfigMap holds) in place — each
/// refused or left out alone, and saying why — another namespace's new Allow is enforced, a cluster Deny applies and is lifted, and a
/// deletion is revoked, each within the usual time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_freeze_policy_for_the_cluster() {
    let dir = Dir::new("e2e-tenant").unwrap();
    let rel = cluster(&dir.0, &["payments", "tenant"], &[]).await;
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
