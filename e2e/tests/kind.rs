//! The kind end-to-end suite: runs against a real cluster where `e2e/kind/run.sh` installed the
//! chart. Every test is `#[ignore]` (no cluster on the development machines) and, when run with
//! `--ignored`, fails — never skips — on any error. Each test uses a fresh namespace and waits on
//! conditions with bounded polling, never fixed sleeps.
//!
//! Client pods are long-lived (`sleep`) and curl runs in them with `kubectl exec`, only after every
//! proxy has loaded a configuration that lists the pod's IP: a pod that curls as it starts races the
//! operator (it has to see the pod Running with an IP, render, and the proxies have to reload), and
//! every retry in a new pod would lose the same race with a new IP.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub, reason = "test harness")]

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::json;
use sha2::{Digest, Sha256};
use testkit::until;
use tokio::time::Instant;
use tunnelgate_operator::crd::{ClusterTunnelPolicy, TunnelPolicy};

const RELEASE_NS: &str = "tunnelgate";
const PROXY_CONFIG_MAP: &str = "tunnelgate-proxy";
const PROXY: &str = "http://tunnelgate-proxy.tunnelgate:3128";
const CURL: &str = "curlimages/curl:8.10.1";

async fn client() -> Client {
    assert!(
        std::env::var_os("TUNNELGATE_KIND").is_some(),
        "run through e2e/kind/run.sh (needs a kind cluster with the chart installed)"
    );
    Client::try_default().await.expect("kubeconfig for the kind cluster")
}

/// A fresh namespace, deleted when dropped (also when the test panics).
struct TempNs {
    name: String,
}

impl TempNs {
    async fn new(client: &Client, prefix: &str) -> TempNs {
        let name = format!("{prefix}-{}", std::process::id() % 100_000);
        let nss = Api::<Namespace>::all(client.clone());
        nss.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap())
            .await
            .unwrap();
        TempNs { name }
    }
}

impl Drop for TempNs {
    fn drop(&mut self) {
        // Synchronous on purpose: the test's runtime may already be shutting down, and a task
        // spawned on it would never run.
        let _ = std::process::Command::new("kubectl")
            .args(["delete", "namespace", &self.name, "--wait=false", "--ignore-not-found"])
            .status();
    }
}

async fn create<K>(api: &Api<K>, value: serde_json::Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    api.create(&PostParams::default(), &serde_json::from_value(value).unwrap()).await.unwrap();
}

/// An HTTP echo server and its Service in `ns`.
async fn echo_server(client: &Client, ns: &str) {
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    create(&pods, json!({
        "metadata": {"name": "echo", "labels": {"app": "echo"}},
        "spec": {"containers": [{"name": "echo", "image": "busybox:1.36",
            "command": ["sh", "-c", "mkdir -p /www && echo hello > /www/index.html && dd if=/dev/zero of=/www/big bs=1M count=2 && httpd -f -p 8080 -h /www"],
            "ports": [{"containerPort": 8080}],
            "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}
    })).await;
    create(
        &Api::<Service>::namespaced(client.clone(), ns),
        json!({"metadata": {"name": "echo"}, "spec": {"selector": {"app": "echo"}, "ports": [{"port": 8080}]}}),
    )
    .await;
    until("echo ready", 120, || async { pod_ready(&pods, "echo").await }).await;
}

async fn pod_ready(pods: &Api<Pod>, name: &str) -> bool {
    let Ok(p) = pods.get(name).await else { return false };
    p.status.and_then(|s| s.conditions).is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A long-lived client pod with `labels`; returns its IP once it is Running.
async fn client_pod(client: &Client, ns: &str, name: &str, labels: &[(&str, &str)]) -> String {
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    create(
        &pods,
        json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"terminationGracePeriodSeconds": 0,
                     "containers": [{"name": "c", "image": CURL, "command": ["sleep", "3600"]}]}
        }),
    )
    .await;
    until(&format!("{name} running"), 120, || async { pod_ready(&pods, name).await }).await;
    pods.get(name).await.unwrap().status.unwrap().pod_ip.unwrap()
}

/// Runs curl through the proxy (CONNECT, `-p`) in pod `name`; returns (exit code, stdout + stderr).
async fn curl(ns: &str, name: &str, args: &[&str]) -> (i32, String) {
    let mut cmd = tokio::process::Command::new("kubectl");
    cmd.args(["exec", "-n", ns, name, "--", "curl", "-sS", "-p", "-x", PROXY, "--max-time", "60"]).args(args);
    let out = cmd.output().await.expect("kubectl exec");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// The rendered proxy configuration as the operator last wrote it.
async fn rendered(client: &Client) -> String {
    let cms = Api::<ConfigMap>::namespaced(client.clone(), RELEASE_NS);
    let cm = cms.get(PROXY_CONFIG_MAP).await.unwrap();
    cm.data.and_then(|mut d| d.remove("config.yaml")).unwrap_or_default()
}

/// Waits until the rendered configuration satisfies `want`, then until every proxy pod reports that
/// exact configuration in force (its `/config` sha256, read through the API server's pod proxy).
async fn until_enforced(client: &Client, what: &str, want: impl Fn(&str) -> bool) {
    let start = Instant::now();
    let text = loop {
        let text = rendered(client).await;
        if want(&text) {
            break text;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "timed out waiting for the operator to render {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let sha = hex::encode(Sha256::digest(text.as_bytes()));
    let pods = Api::<Pod>::namespaced(client.clone(), RELEASE_NS);
    let proxies = pods.list(&ListParams::default().labels("app.kubernetes.io/component=proxy")).await.unwrap();
    assert!(!proxies.items.is_empty(), "no proxy pods");
    for p in proxies.items {
        let name = p.metadata.name.unwrap();
        until(&format!("proxy {name} to load {what}"), 30, || async {
            let req = http::Request::get(format!("/api/v1/namespaces/{RELEASE_NS}/pods/{name}:9090/proxy/config"))
                .body(Vec::new())
                .unwrap();
            let body = client.request_text(req).await.unwrap_or_default();
            serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|v| v["sha256"] == sha.as_str())
        })
        .await;
    }
}

fn policy(name: &str, app: &str, ns: &str) -> serde_json::Value {
    json!({
        "apiVersion": "tunnelgate.io/v1alpha1", "kind": "TunnelPolicy", "metadata": {"name": name, "namespace": ns},
        "spec": {"podSelector": {"matchLabels": {"app": app}}, "action": "Allow",
                 "destinations": [{"hosts": [format!("echo.{ns}.svc.cluster.local")], "cidrs": ["10.0.0.0/8"], "ports": [8080]}]}
    })
}

/// Whether the rendered config has a rule from policy `ns/name` whose clients include `ip`.
fn lists_client(text: &str, ns: &str, name: &str, ip: &str) -> bool {
    let doc: serde_json::Value = serde_yaml::from_str(text).unwrap_or_default();
    let prefix = format!("{ns}/{name}");
    doc["policy"]["rules"].as_array().into_iter().flatten().any(|r| {
        r["name"].as_str().is_some_and(|n| n == prefix || n.starts_with(&format!("{prefix}/")))
            && r["clients"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c.as_str().is_some_and(|c| c == ip || c == format!("{ip}/32") || c == format!("{ip}/128")))
    })
}

fn has_policy(text: &str, ns: &str, name: &str) -> bool {
    let doc: serde_json::Value = serde_yaml::from_str(text).unwrap_or_default();
    let prefix = format!("{ns}/{name}");
    doc["policy"]["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|r| r["name"].as_str().is_some_and(|n| n == prefix || n.starts_with(&format!("{prefix}/"))))
}

fn url(ns: &str, path: &str) -> String {
    format!("http://echo.{ns}.svc.cluster.local:8080{path}")
}

#[tokio::test]
#[ignore = "needs a kind cluster: e2e/kind/run.sh"]
async fn allowed_and_denied_connects_and_status() {
    let c = client().await;
    let ns = TempNs::new(&c, "tg-allow").await;
    echo_server(&c, &ns.name).await;
    let ip = client_pod(&c, &ns.name, "client", &[("app", "client")]).await;
    client_pod(&c, &ns.name, "other", &[("app", "other")]).await;
    let tps = Api::<TunnelPolicy>::namespaced(c.clone(), &ns.name);
    create(&tps, policy("allow-echo", "client", &ns.name)).await;
    until_enforced(&c, "allow-echo with the client's IP", |t| lists_client(t, &ns.name, "allow-echo", &ip)).await;

    let target = url(&ns.name, "/");
    let ok = curl(&ns.name, "client", &[&target]).await;
    assert_eq!(ok.0, 0, "selected pod is allowed: {}", ok.1);
    assert!(ok.1.contains("hello"), "{}", ok.1);
    let denied = curl(&ns.name, "other", &[&target]).await;
    assert_ne!(denied.0, 0, "{}", denied.1);
    assert!(denied.1.contains("403"), "unselected pod gets 403: {}", denied.1);

    // Both pods are still running: exactly one matches.
    let p = tps.get("allow-echo").await.unwrap();
    let st = p.status.unwrap();
    assert_eq!(st.matched_pods, Some(1));
    assert_eq!(st.observed_generation, p.metadata.generation);
    assert!(st.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"), "{:?}", st.conditions);
}

#[tokio::test]
#[ignore = "needs a kind cluster: e2e/kind/run.sh"]
async fn policy_update_and_delete_are_enforced() {
    let c = client().await;
    let ns = TempNs::new(&c, "tg-update").await;
    echo_server(&c, &ns.name).await;
    let ip_a = client_pod(&c, &ns.name, "a", &[("app", "a")]).await;
    let ip_b = client_pod(&c, &ns.name, "b", &[("app", "b")]).await;
    let tps = Api::<TunnelPolicy>::namespaced(c.clone(), &ns.name);
    create(&tps, policy("p", "a", &ns.name)).await;
    let target = url(&ns.name, "/");

    until_enforced(&c, "p selecting a", |t| lists_client(t, &ns.name, "p", &ip_a)).await;
    assert_eq!(curl(&ns.name, "a", &[&target]).await.0, 0, "a is allowed before the update");
    assert!(curl(&ns.name, "b", &[&target]).await.1.contains("403"), "b is denied before the update");

    tps.patch(
        "p",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"podSelector": {"matchLabels": {"app": "b"}}}})),
    )
    .await
    .unwrap();
    until_enforced(&c, "p selecting b", |t| {
        lists_client(t, &ns.name, "p", &ip_b) && !lists_client(t, &ns.name, "p", &ip_a)
    })
    .await;
    let a = curl(&ns.name, "a", &[&target]).await;
    assert!(a.1.contains("403"), "after the update, a is denied: {}", a.1);
    let b = curl(&ns.name, "b", &[&target]).await;
    assert_eq!(b.0, 0, "after the update, b is allowed: {}", b.1);

    tps.delete("p", &DeleteParams::default()).await.unwrap();
    until_enforced(&c, "no rule of p", |t| !has_policy(t, &ns.name, "p")).await;
    let b = curl(&ns.name, "b", &[&target]).await;
    assert!(b.0 != 0 && b.1.contains("403"), "after the delete, the default denies b: {}", b.1);
}

#[tokio::test]
#[ignore = "needs a kind cluster: e2e/kind/run.sh"]
async fn invalid_policy_is_rejected_by_the_api_server() {
    let c = client().await;
    let ns = TempNs::new(&c, "tg-invalid").await;
    let tps = Api::<TunnelPolicy>::namespaced(c.clone(), &ns.name);
    for (bad, field) in [
        (json!({"hosts": ["a.*.test"]}), "hosts"),
        (json!({"cidrs": ["10.0.0.0/33"]}), "cidrs"),
        (json!({"hosts": ["x.test"], "ports": [0]}), "ports"),
        (json!({"hosts": ["x.test"], "ports": ["8000-70000"]}), "ports"),
        (json!({"ports": [443]}), "hosts or cidrs"),
    ] {
        let p: TunnelPolicy = serde_json::from_value(json!({
            "apiVersion": "tunnelgate.io/v1alpha1", "kind": "TunnelPolicy", "metadata": {"name": "bad"},
            "spec": {"podSelector": {}, "action": "Allow", "destinations": [bad]}
        }))
        .unwrap();
        match tps.create(&PostParams::default(), &p).await {
            Err(kube::Error::Api(e)) => {
                assert_eq!(e.code, 422, "{e:?}");
                assert!(e.message.contains(field), "the error names {field}: {}", e.message);
            }
            other => panic!("{bad} was admitted: {other:?}"),
        }
    }
    // The same shapes with good values are admitted (the schema is not simply refusing everything).
    create(&tps, policy("good", "x", &ns.name)).await;
}

/// A counter's value in a Prometheus text exposition (sum over the series that contain `labels`).
fn counter(body: &str, name: &str, labels: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
#[ignore = "needs a kind cluster: e2e/kind/run.sh"]
async fn proxy_metrics_count_this_tests_own_traffic() {
    let c = client().await;
    let ns = TempNs::new(&c, "tg-metrics").await;
    client_pod(&c, &ns.name, "scrape", &[("app", "scrape")]).await;
    // The Service keeps traffic on the node (internalTrafficPolicy: Local), so the CONNECT and the
    // scrape reach the same proxy.
    let scrape = || async {
        let mut cmd = tokio::process::Command::new("kubectl");
        cmd.args(["exec", "-n", &ns.name, "scrape", "--", "curl", "-sS", "--max-time", "30"]);
        let out = cmd.arg("http://tunnelgate-proxy.tunnelgate:9090/metrics").output().await.unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let before = scrape().await;
    assert!(before.contains("tunnelgate_config_generation"), "{before}");
    let denied_before = counter(&before, "tunnelgate_tunnel_requests_total", "result=\"denied\"");
    for _ in 0..3 {
        let r = curl(&ns.name, "scrape", &["https://example.invalid/"]).await;
        assert!(r.1.contains("403"), "no policy selects this pod: {}", r.1);
    }
    let after = scrape().await;
    let denied_after = counter(&after, "tunnelgate_tunnel_requests_total", "result=\"denied\"");
    assert!(denied_after >= denied_before + 3.0, "denied {denied_before} -> {denied_after}");
}

#[tokio::test]
#[ignore = "needs a kind cluster: e2e/kind/run.sh"]
async fn rolling_restart_keeps_a_tunnel_in_flight() {
    let c = client().await;
    let ns = TempNs::new(&c, "tg-rollout").await;
    echo_server(&c, &ns.name).await;
    let ip = client_pod(&c, &ns.name, "dl", &[("app", "dl")]).await;
    let ip2 = client_pod(&c, &ns.name, "poller", &[("app", "dl")]).await;
    let tps = Api::<TunnelPolicy>::namespaced(c.clone(), &ns.name);
    create(&tps, policy("p", "dl", &ns.name)).await;
    until_enforced(&c, "p with the clients' IPs", |t| {
        lists_client(t, &ns.name, "p", &ip) && lists_client(t, &ns.name, "p", &ip2)
    })
    .await;
    // New connections all along the rollout: a CONNECT every 200 ms for ~90 s, none may fail
    // (the new pod is Ready before the old one drains; the old one accepts during drainDelay).
    let poll = tokio::spawn({
        let (ns, target) = (ns.name.clone(), url(&ns.name, "/"));
        async move {
            let script = format!(
                "f=0; for i in $(seq 1 450); do curl -sS -p -x {PROXY} --max-time 5 -o /dev/null {target} || f=$((f+1)); sleep 0.2; done; echo failures=$f"
            );
            let out = tokio::process::Command::new("kubectl")
                .args(["exec", "-n", &ns, "poller", "--", "sh", "-c", &script])
                .output()
                .await
                .expect("kubectl exec");
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
        }
    });

    // A ~10 s download, then a DaemonSet restart while it runs.
    let big = url(&ns.name, "/big");
    let download = tokio::spawn({
        let ns = ns.name.clone();
        async move { curl(&ns, "dl", &["--limit-rate", "200k", "-o", "/dev/null", "-w", "%{size_download}", &big]).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!download.is_finished(), "the download must still run when the restart begins");
    let ds = Api::<DaemonSet>::namespaced(c.clone(), RELEASE_NS);
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let patched = ds
        .patch(
            "tunnelgate-proxy",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"template": {"metadata": {"annotations": {"e2e/restartedAt": now}}}}})),
        )
        .await
        .unwrap();
    let (code, out) = tokio::time::timeout(Duration::from_secs(180), download).await.unwrap().unwrap();
    assert_eq!(code, 0, "the tunnel survived the restart: {out}");
    assert_eq!(out.trim(), "2097152");
    // The rollout of this generation (not an earlier one) has finished on every node.
    let generation = patched.metadata.generation;
    until("rollout complete", 300, || async {
        let d = ds.get("tunnelgate-proxy").await.unwrap();
        let s = d.status.unwrap();
        s.observed_generation == generation
            && s.updated_number_scheduled == Some(s.desired_number_scheduled)
            && s.number_available == Some(s.desired_number_scheduled)
            && s.number_ready == s.desired_number_scheduled
    })
    .await;
    let polled = tokio::time::timeout(Duration::from_secs(300), poll).await.unwrap().unwrap();
    assert!(polled.contains("failures=0"), "every node kept egress during the rollout: {polled}");
}

/// The egress-gateway release `run.sh` installs beside the node-local one (`proxy.kind:
/// Deployment` in namespace tunnelgate-gw): pods of any node reach it through its cluster-wide
/// Service, and it enforces the same policies by the pods' own addresses.
#[tokio::test]
#[ignore = "needs a kind cluster: e2e/kind/run.sh"]
async fn egress_gateway_serves_pods_of_every_node() {
    const GATEWAY: &str = "http://tunnelgate-gw-proxy.tunnelgate-gw:3128";
    let c = client().await;
    let gw = Api::<Service>::namespaced(c.clone(), "tunnelgate-gw");
    let svc = gw.get("tunnelgate-gw-proxy").await.unwrap();
    assert_eq!(svc.spec.unwrap().internal_traffic_policy.as_deref(), Some("Cluster"));
    let ns = TempNs::new(&c, "tg-gw").await;
    echo_server(&c, &ns.name).await;
    let ip = client_pod(&c, &ns.name, "client", &[("app", "client")]).await;
    client_pod(&c, &ns.name, "other", &[("app", "other")]).await;
    let tps = Api::<TunnelPolicy>::namespaced(c.clone(), &ns.name);
    create(&tps, policy("allow-echo", "client", &ns.name)).await;
    let cms = Api::<ConfigMap>::namespaced(c.clone(), "tunnelgate-gw");
    until("the gateway's operator renders the policy", 60, || async {
        let text =
            cms.get("tunnelgate-gw-proxy").await.ok().and_then(|cm| cm.data).and_then(|mut d| d.remove("config.yaml"));
        text.is_some_and(|t| lists_client(&t, &ns.name, "allow-echo", &ip))
    })
    .await;
    let target = url(&ns.name, "/");
    let through = |pod: &'static str| {
        let (ns, target) = (ns.name.clone(), target.clone());
        async move {
            let out = tokio::process::Command::new("kubectl")
                .args(["exec", "-n", &ns, pod, "--", "curl", "-sS", "-p", "-x", GATEWAY, "--max-time", "30", &target])
                .output()
                .await
                .expect("kubectl exec");
            (
                out.status.code().unwrap_or(-1),
                format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
            )
        }
    };
    // The proxies reload within a second or two of the render; allow for it.
    until("the gateway allows the selected pod", 30, || async { through("client").await.0 == 0 }).await;
    let denied = through("other").await;
    assert!(denied.1.contains("403"), "the gateway sees the pod's own address, not a node's: {}", denied.1);
}

#[tokio::test]
#[ignore = "needs a kind cluster: e2e/kind/run.sh"]
async fn cluster_deny_beats_a_namespaced_allow_and_the_api_admits_cluster_policies() {
    let c = client().await;
    let ns = TempNs::new(&c, "tg-ctp").await;
    echo_server(&c, &ns.name).await;
    let ip = client_pod(&c, &ns.name, "client", &[("app", "client")]).await;
    let tps = Api::<TunnelPolicy>::namespaced(c.clone(), &ns.name);
    create(&tps, policy("allow-echo", "client", &ns.name)).await;
    until_enforced(&c, "allow-echo", |t| lists_client(t, &ns.name, "allow-echo", &ip)).await;
    let target = url(&ns.name, "/");
    assert_eq!(curl(&ns.name, "client", &[&target]).await.0, 0);

    // The API server admits the cluster-scoped CRD; a cluster Deny for this namespace wins.
    let ctps = Api::<ClusterTunnelPolicy>::all(c.clone());
    let name = format!("{}-deny", ns.name);
    create(
        &ctps,
        json!({"apiVersion": "tunnelgate.io/v1alpha1", "kind": "ClusterTunnelPolicy", "metadata": {"name": name},
               "spec": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns.name}}, "action": "Deny",
                        "destinations": [{"hosts": [format!("echo.{}.svc.cluster.local", ns.name)]}]}}),
    )
    .await;
    let rule = format!("cluster:{name}");
    until_enforced(&c, "the cluster Deny", |t| t.contains(&rule)).await;
    let denied = curl(&ns.name, "client", &[&target]).await;
    assert!(denied.1.contains("403"), "{}", denied.1);
    // The API server refuses a priority out of range (schema), before the operator sees it.
    let bad = ctps
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"apiVersion": "tunnelgate.io/v1alpha1", "kind": "ClusterTunnelPolicy",
                "metadata": {"name": format!("{}-bad", ns.name)},
                "spec": {"namespaceSelector": {}, "action": "Deny", "priority": 5000, "destinations": [{"hosts": ["x.test"]}]}}))
            .unwrap(),
        )
        .await;
    assert!(bad.is_err(), "priority 5000 must be refused at admission");
    ctps.delete(&name, &DeleteParams::default()).await.unwrap();
    until_enforced(&c, "the cluster Deny removed", |t| !t.contains(&rule)).await;
    assert_eq!(curl(&ns.name, "client", &[&target]).await.0, 0);
}
