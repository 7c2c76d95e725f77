//! The kind end-to-end suite: runs against a real cluster where `e2e/kind/run.sh` installed the
//! chart. Every test is `#[ignore]` (no cluster on the development machines) and, when run with
//! `--ignored`, fails — never skips — on any error. Each test uses a fresh namespace and waits on
//! conditions with bounded polling, never fixed sleeps.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub, reason = "test harness")]

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{Api, DeleteParams, LogParams, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::json;
use tokio::time::Instant;
use tunnelgate_operator::crd::TunnelPolicy;

const RELEASE_NS: &str = "tunnelgate";
const PROXY: &str = "http://tunnelgate-proxy.tunnelgate:3128";
const CURL: &str = "curlimages/curl:8.10.1";

async fn client() -> Client {
    assert!(
        std::env::var_os("TUNNELGATE_KIND").is_some(),
        "run through e2e/kind/run.sh (needs a kind cluster with the chart installed)"
    );
    Client::try_default().await.expect("kubeconfig for the kind cluster")
}

/// A fresh namespace, deleted when dropped.
struct TempNs {
    name: String,
    client: Client,
}

impl TempNs {
    async fn new(client: &Client, prefix: &str) -> TempNs {
        let name = format!("{prefix}-{}", std::process::id() % 100_000);
        let nss = Api::<Namespace>::all(client.clone());
        nss.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap())
            .await
            .unwrap();
        TempNs { name, client: client.clone() }
    }
}

impl Drop for TempNs {
    fn drop(&mut self) {
        let (c, n) = (self.client.clone(), self.name.clone());
        tokio::spawn(async move {
            let _ = Api::<Namespace>::all(c).delete(&n, &DeleteParams::default()).await;
        });
    }
}

async fn until<F, Fut>(what: &str, secs: u64, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("timed out after {secs}s waiting for {what}");
}

/// An HTTP echo server and its Service in `ns`.
async fn echo_server(client: &Client, ns: &str) {
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    pods.create(&PostParams::default(), &serde_json::from_value(json!({
        "metadata": {"name": "echo", "labels": {"app": "echo"}},
        "spec": {"containers": [{"name": "echo", "image": "busybox:1.36",
            "command": ["sh", "-c", "mkdir -p /www && echo hello > /www/index.html && dd if=/dev/zero of=/www/big bs=1M count=2 && httpd -f -p 8080 -h /www"],
            "ports": [{"containerPort": 8080}]}]}
    })).unwrap()).await.unwrap();
    Api::<Service>::namespaced(client.clone(), ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "echo"},
                "spec": {"selector": {"app": "echo"}, "ports": [{"port": 8080}]}
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    until("echo running", 120, || async {
        pods.get("echo").await.ok().and_then(|p| p.status?.phase).as_deref() == Some("Running")
    })
    .await;
}

/// Runs curl through the proxy (CONNECT, `-p`) in a pod with `labels`; returns (exit code, output).
async fn curl(client: &Client, ns: &str, name: &str, labels: &[(&str, &str)], args: &[&str]) -> (i32, String) {
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    let mut cmd = vec!["curl", "-sS", "-p", "-x", PROXY, "--max-time", "60"];
    cmd.extend(args);
    let _ = pods.delete(name, &DeleteParams::default().grace_period(0)).await;
    until("old curl pod gone", 60, || async { pods.get_opt(name).await.unwrap().is_none() }).await;
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"restartPolicy": "Never", "containers": [{"name": "curl", "image": CURL, "command": cmd}]}
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    let exit_code = |p: Pod| {
        p.status
            .and_then(|s| s.container_statuses)
            .and_then(|c| c.first().cloned())
            .and_then(|c| c.state)
            .and_then(|s| s.terminated)
            .map(|t| t.exit_code)
    };
    until("curl finished", 120, || async { exit_code(pods.get(name).await.unwrap()).is_some() }).await;
    let code = exit_code(pods.get(name).await.unwrap()).unwrap_or(-1);
    let logs = pods.logs(name, &LogParams::default()).await.unwrap_or_default();
    (code, logs)
}

fn policy(name: &str, app: &str, ns: &str) -> TunnelPolicy {
    serde_json::from_value(json!({
        "apiVersion": "tunnelgate.io/v1alpha1", "kind": "TunnelPolicy", "metadata": {"name": name, "namespace": ns},
        "spec": {"podSelector": {"matchLabels": {"app": app}}, "action": "Allow",
                 "destinations": [{"hosts": [format!("echo.{ns}.svc.cluster.local")], "cidrs": ["10.0.0.0/8"], "ports": [8080]}]}
    }))
    .unwrap()
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
    let tps = Api::<TunnelPolicy>::namespaced(c.clone(), &ns.name);
    tps.create(&PostParams::default(), &policy("allow-echo", "client", &ns.name)).await.unwrap();
    until("policy Ready", 60, || async {
        let p = tps.get("allow-echo").await.unwrap();
        p.status.is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Accepted" && c.status == "True"))
    })
    .await;
    // Selected pod: allowed. Bounded retries: the first pod IP reaches the rules after the pod runs.
    let target = url(&ns.name, "/");
    let mut ok = (0, String::new());
    for i in 0..10 {
        ok = curl(&c, &ns.name, &format!("client-{i}"), &[("app", "client")], &[&target]).await;
        if ok.0 == 0 {
            break;
        }
    }
    assert_eq!(ok.0, 0, "allowed pod: {}", ok.1);
    assert!(ok.1.contains("hello"));
    let denied = curl(&c, &ns.name, "other", &[("app", "other")], &[&target]).await;
    assert_ne!(denied.0, 0);
    assert!(denied.1.contains("403"), "denied pod gets 403: {}", denied.1);
    let p = tps.get("allow-echo").await.unwrap();
    let st = p.status.unwrap();
    assert!(st.matched_pods.unwrap_or(0) >= 1);
    assert_eq!(st.observed_generation, p.metadata.generation);
}

#[tokio::test]
#[ignore = "needs a kind cluster: e2e/kind/run.sh"]
async fn policy_update_and_delete_are_enforced() {
    let c = client().await;
    let ns = TempNs::new(&c, "tg-update").await;
    echo_server(&c, &ns.name).await;
    let tps = Api::<TunnelPolicy>::namespaced(c.clone(), &ns.name);
    tps.create(&PostParams::default(), &policy("p", "a", &ns.name)).await.unwrap();
    let target = url(&ns.name, "/");
    let mut last = (0, String::new());
    for i in 0..10 {
        last = curl(&c, &ns.name, &format!("a-{i}"), &[("app", "a")], &[&target]).await;
        if last.0 == 0 {
            break;
        }
    }
    assert_eq!(last.0, 0, "{}", last.1);
    tps.patch(
        "p",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"podSelector": {"matchLabels": {"app": "b"}}}})),
    )
    .await
    .unwrap();
    let mut denied_a = false;
    for i in 0..10 {
        if curl(&c, &ns.name, &format!("a2-{i}"), &[("app", "a")], &[&target]).await.0 != 0 {
            denied_a = true;
            break;
        }
    }
    assert!(denied_a, "after the update, app=a is denied");
    tps.delete("p", &DeleteParams::default()).await.unwrap();
    let mut denied_b = false;
    for i in 0..10 {
        let r = curl(&c, &ns.name, &format!("b-{i}"), &[("app", "b")], &[&target]).await;
        if r.0 != 0 && r.1.contains("403") {
            denied_b = true;
            break;
        }
    }
    assert!(denied_b, "after the delete, default deny");
}

#[tokio::test]
#[ignore = "needs a kind cluster: e2e/kind/run.sh"]
async fn invalid_policy_is_rejected_by_the_api_server() {
    let c = client().await;
    let ns = TempNs::new(&c, "tg-invalid").await;
    let tps = Api::<TunnelPolicy>::namespaced(c.clone(), &ns.name);
    for bad in [
        json!({"hosts": ["a.*.test"]}),
        json!({"cidrs": ["10.0.0.0/33"]}),
        json!({"hosts": ["x.test"], "ports": [0]}),
        json!({}),
    ] {
        let p: TunnelPolicy = serde_json::from_value(json!({
            "apiVersion": "tunnelgate.io/v1alpha1", "kind": "TunnelPolicy", "metadata": {"name": "bad"},
            "spec": {"podSelector": {}, "action": "Allow", "destinations": [bad]}
        }))
        .unwrap();
        match tps.create(&PostParams::default(), &p).await {
            Err(kube::Error::Api(e)) => assert_eq!(e.code, 422, "{e:?}"),
            other => panic!("{bad} was admitted: {other:?}"),
        }
    }
}

#[tokio::test]
#[ignore = "needs a kind cluster: e2e/kind/run.sh"]
async fn proxy_metrics_are_scraped() {
    let c = client().await;
    let ns = TempNs::new(&c, "tg-metrics").await;
    let pods = Api::<Pod>::namespaced(c.clone(), &ns.name);
    pods.create(&PostParams::default(), &serde_json::from_value(json!({
        "metadata": {"name": "scrape"},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": CURL, "command": ["curl", "-sS", "--max-time", "30", "http://tunnelgate-proxy.tunnelgate:9090/metrics"]}]}
    })).unwrap()).await.unwrap();
    until("scrape done", 120, || async {
        pods.get("scrape").await.ok().and_then(|p| p.status?.phase).as_deref() == Some("Succeeded")
    })
    .await;
    let body = pods.logs("scrape", &LogParams::default()).await.unwrap();
    assert!(
        body.contains("tunnelgate_tunnel_requests_total") && body.contains("tunnelgate_config_generation"),
        "{body}"
    );
}

#[tokio::test]
#[ignore = "needs a kind cluster: e2e/kind/run.sh"]
async fn rolling_restart_keeps_a_tunnel_in_flight() {
    let c = client().await;
    let ns = TempNs::new(&c, "tg-rollout").await;
    echo_server(&c, &ns.name).await;
    let tps = Api::<TunnelPolicy>::namespaced(c.clone(), &ns.name);
    tps.create(&PostParams::default(), &policy("p", "dl", &ns.name)).await.unwrap();
    // Warm up until the policy is enforced for this pod's labels.
    let target = url(&ns.name, "/");
    for i in 0..10 {
        if curl(&c, &ns.name, &format!("warm-{i}"), &[("app", "dl")], &[&target]).await.0 == 0 {
            break;
        }
    }
    // A ~10 s download, then a DaemonSet restart while it runs.
    let pods = Api::<Pod>::namespaced(c.clone(), &ns.name);
    let big = url(&ns.name, "/big");
    let cmd =
        ["curl", "-sS", "-p", "-x", PROXY, "--limit-rate", "200k", "-o", "/dev/null", "-w", "%{size_download}", &big];
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "download", "labels": {"app": "dl"}},
            "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": CURL, "command": cmd}]}
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    until("download running", 120, || async {
        pods.get("download").await.ok().and_then(|p| p.status?.phase).as_deref() == Some("Running")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ds = Api::<DaemonSet>::namespaced(c.clone(), RELEASE_NS);
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    ds.patch(
        "tunnelgate-proxy",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"template": {"metadata": {"annotations": {"e2e/restartedAt": now}}}}})),
    )
    .await
    .unwrap();
    until("download finished", 180, || async {
        matches!(pods.get("download").await.ok().and_then(|p| p.status?.phase).as_deref(), Some("Succeeded" | "Failed"))
    })
    .await;
    let phase = pods.get("download").await.unwrap().status.unwrap().phase.unwrap();
    let out = pods.logs("download", &LogParams::default()).await.unwrap_or_default();
    assert_eq!(phase, "Succeeded", "the tunnel survived the restart: {out}");
    assert_eq!(out.trim(), "2097152");
    until("rollout complete", 300, || async {
        let d = ds.get("tunnelgate-proxy").await.unwrap();
        let s = d.status.unwrap();
        s.updated_number_scheduled == Some(s.desired_number_scheduled) && s.number_ready == s.desired_number_scheduled
    })
    .await;
}
