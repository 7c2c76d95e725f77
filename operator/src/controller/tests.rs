//! API call order of a write, against kube's tower-test mock service (controller-rs pattern).

use std::collections::BTreeMap;

use http::{Method, Request, Response};
use kube::client::Body;
use prometheus::Registry;

use serde_json::json;

use super::*;

fn settings() -> Settings {
    Settings {
        namespace: "tg".into(),
        release: "tunnelgate".into(),
        tls_dir: "/etc/tunnelgate/tls".into(),
        debounce: Duration::from_millis(1),
        debounce_max: Duration::from_millis(1),
        namespace_churn_interval: Duration::from_secs(2),
        proxy_admin_port: None,
        proxy_admin_token_file: None,
        proxy_instance: "tunnelgate".into(),
        dry_run_event_interval: Duration::from_secs(300),
        status_writes_per_second: 100,
        policy_status: true,
        config_per_node: false,
        behind_warning_after: Duration::from_secs(120),
        identity: "t".into(),
    }
}

fn rendered(tls: bool) -> render::Rendered {
    let mut tls_data = BTreeMap::new();
    if tls {
        tls_data.insert("secure.crt".to_owned(), "CERT".to_owned());
        tls_data.insert("secure.key".to_owned(), "KEY".to_owned());
    }
    render::Rendered {
        config: "version: 1\n".into(),
        hash: "abc123".into(),
        tls_data,
        annotations: BTreeMap::new(),
        nodes: BTreeMap::new(),
        shards: Vec::new(),
    }
}

/// Serves the expected calls in order and records what was asked.
async fn scenario(
    expect: Vec<(Method, &'static str, serde_json::Value)>,
) -> (Client, tokio::task::JoinHandle<Vec<String>>) {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let task = tokio::spawn(async move {
        let mut seen = Vec::new();
        for (method, path, reply) in expect {
            let (req, send) = handle.next_request().await.expect("a request");
            assert_eq!(req.method(), method, "call {} to {}", seen.len(), req.uri());
            assert_eq!(req.uri().path(), path);
            if method == Method::PATCH {
                let q = req.uri().query().unwrap_or_default();
                assert!(q.contains("fieldManager=tunnelgate-operator") && q.contains("force=true"), "{q}");
                let ct = req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
                assert_eq!(ct, "application/apply-patch+yaml");
            }
            seen.push(format!("{} {}", req.method(), req.uri().path()));
            let body = serde_json::to_vec(&reply).unwrap();
            send.send_response(
                Response::builder()
                    .status(if reply["code"] == 404 { 404 } else { 200 })
                    .body(Body::from(body))
                    .unwrap(),
            );
        }
        seen
    });
    (Client::new(svc, "default"), task)
}

fn not_found() -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"})
}

fn cm(hash: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tunnelgate-proxy", "namespace": "tg", "annotations": {HASH_ANNOTATION: hash}}})
}

#[tokio::test]
async fn first_write_reads_then_applies_secret_before_configmap() {
    let (client, calls) = scenario(vec![
        (Method::GET, "/api/v1/namespaces/tg/configmaps/tunnelgate-proxy", not_found()),
        (
            Method::PATCH,
            "/api/v1/namespaces/tg/secrets/tunnelgate-proxy-tls",
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tunnelgate-proxy-tls"}}),
        ),
        // Node documents left from per-node rendering are looked for (and would be removed).
        (
            Method::GET,
            "/api/v1/namespaces/tg/configmaps",
            json!({"apiVersion": "v1", "kind": "ConfigMapList", "metadata": {}, "items": []}),
        ),
        (Method::PATCH, "/api/v1/namespaces/tg/configmaps/tunnelgate-proxy", cm("abc123")),
    ])
    .await;
    let metrics = Metrics::register(&Registry::new()).unwrap();
    let mut state = apply::Writer::default();
    apply(&client, &settings(), &metrics, &mut state, &rendered(true)).await.unwrap();
    assert_eq!(calls.await.unwrap().len(), 4);
    assert_eq!(state.last_hash(), Some("abc123"));
    assert_eq!(metrics.config_writes.with_label_values(&["applied"]).get(), 1);
    assert_eq!(metrics.render.get(), 1, "the render number written");
}

#[tokio::test]
async fn unchanged_hash_in_force_writes_nothing() {
    // After a restart the operator learns what is in force and does not rewrite it (no reload storm).
    let (client, calls) =
        scenario(vec![(Method::GET, "/api/v1/namespaces/tg/configmaps/tunnelgate-proxy", cm("abc123"))]).await;
    let metrics = Metrics::register(&Registry::new()).unwrap();
    let mut state = apply::Writer::default();
    apply(&client, &settings(), &metrics, &mut state, &rendered(false)).await.unwrap();
    // And with the hash known, not even a read.
    apply(&client, &settings(), &metrics, &mut state, &rendered(false)).await.unwrap();
    assert_eq!(calls.await.unwrap(), vec!["GET /api/v1/namespaces/tg/configmaps/tunnelgate-proxy".to_owned()]);
    assert_eq!(metrics.config_writes.with_label_values(&["unchanged"]).get(), 2);
}

/// The debounce is a quiet period bounded by a maximum wait: a lone change waits `quiet`, a
/// stream of changes never delays the reconcile past `max`.
#[tokio::test(start_paused = true)]
async fn settle_is_a_quiet_period_with_a_maximum_wait() {
    let wake = Arc::new(Notify::new());
    let stop = CancellationToken::new();
    let (quiet, max) = (Duration::from_millis(50), Duration::from_millis(250));
    let t0 = tokio::time::Instant::now();
    assert!(settle(&wake, quiet, max, &stop).await);
    assert_eq!(t0.elapsed(), quiet);
    // Changes every 30 ms, for a second: the reconcile still runs at 250 ms.
    let w = wake.clone();
    let churn = tokio::spawn(async move {
        for _ in 0..33 {
            tokio::time::sleep(Duration::from_millis(30)).await;
            w.notify_one();
        }
    });
    let t1 = tokio::time::Instant::now();
    assert!(settle(&wake, quiet, max, &stop).await);
    let waited = t1.elapsed();
    assert!(waited >= max && waited < max + Duration::from_millis(30), "{waited:?}");
    churn.abort();
    stop.cancel();
    assert!(!settle(&wake, quiet, max, &stop).await, "shutdown ends the wait");
}

/// A whole document in shards: each shard is written before the index that names it, unchanged
/// shards are not written again, and shards past the new count are deleted after the index.
#[tokio::test]
async fn shards_are_written_before_their_index_and_extra_ones_removed_after_it() {
    let list = json!({"apiVersion": "v1", "kind": "ConfigMapList", "metadata": {}, "items": []});
    let shard = |n: &str| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": n, "namespace": "tg"}});
    let (client, calls) = scenario(vec![
        (Method::GET, "/api/v1/namespaces/tg/configmaps/tunnelgate-proxy", not_found()),
        (Method::GET, "/api/v1/namespaces/tg/configmaps", list.clone()),
        (Method::PATCH, "/api/v1/namespaces/tg/configmaps/tunnelgate-proxy-shard-0", shard("tunnelgate-proxy-shard-0")),
        (Method::PATCH, "/api/v1/namespaces/tg/configmaps/tunnelgate-proxy-shard-1", shard("tunnelgate-proxy-shard-1")),
        (Method::PATCH, "/api/v1/namespaces/tg/configmaps/tunnelgate-proxy", cm("h1")),
        // The next render: shard 0 unchanged, shard 1 gone.
        (Method::PATCH, "/api/v1/namespaces/tg/configmaps/tunnelgate-proxy", cm("h2")),
        (
            Method::DELETE,
            "/api/v1/namespaces/tg/configmaps/tunnelgate-proxy-shard-1",
            shard("tunnelgate-proxy-shard-1"),
        ),
    ])
    .await;
    let metrics = Metrics::register(&Registry::new()).unwrap();
    let mut state = apply::Writer::default();
    let sharded = |hash: &str, shards: &[&str]| render::Rendered {
        config: String::new(),
        hash: hash.into(),
        shards: shards.iter().map(|s| (*s).to_owned()).collect(),
        ..rendered(false)
    };
    apply(&client, &settings(), &metrics, &mut state, &sharded("h1", &["version: 1\n# a\n", "version: 1\n# b\n"]))
        .await
        .unwrap();
    apply(&client, &settings(), &metrics, &mut state, &sharded("h2", &["version: 1\n# a\n"])).await.unwrap();
    assert_eq!(calls.await.unwrap().len(), 7);
}
