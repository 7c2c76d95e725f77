//! The Helm chart against a real Kubernetes control plane (controlplane/build.sh): `helm install`
//! of every topology with monitoring on, upgrade and uninstall; the CRDs' schema and CEL rules as
//! the API server admits them; and the chart's RBAC, least privilege both ways.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, unreachable_pub, reason = "test harness")]

use e2e::controlplane::{repo_root, Access, ControlPlane, Options};
use e2e::kubelet::Kubelet;
use e2e::release::Release;
use e2e::scratch::Dir;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::{ApiResource, Discovery};
use kube::Client;
use serde::Deserialize as _;
use serde_json::json;
use testkit::until;

fn dir(tag: &str) -> Dir {
    Dir::new(&format!("chart-{tag}")).unwrap()
}

async fn helm(cp: &ControlPlane, args: &[&str]) -> String {
    let out = cp.helm(args).await.unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "helm {args:?}:\n{text}");
    text
}

/// The PrometheusRule and ServiceMonitor CRDs (generated from prometheus-operator's types by
/// controlplane/monitoring/gen.sh), as a cluster with the Prometheus operator has them.
async fn install_monitoring_crds(c: &Client) {
    let crds = Api::<CustomResourceDefinition>::all(c.clone());
    let dir = repo_root().join("controlplane/monitoring/crds");
    for f in ["monitoring.coreos.com_prometheusrules.yaml", "monitoring.coreos.com_servicemonitors.yaml"] {
        let crd: CustomResourceDefinition =
            serde_yaml::from_str(&std::fs::read_to_string(dir.join(f)).unwrap()).unwrap();
        crds.create(&PostParams::default(), &crd).await.unwrap();
    }
    until("monitoring CRDs established", 30, || async {
        let mut n = 0;
        for name in ["prometheusrules.monitoring.coreos.com", "servicemonitors.monitoring.coreos.com"] {
            let crd = crds.get(name).await.unwrap();
            let conds = crd.status.and_then(|s| s.conditions).unwrap_or_default();
            n += usize::from(conds.iter().any(|c| c.type_ == "Established" && c.status == "True"));
        }
        n == 2
    })
    .await;
}

/// Every object of every namespaced and cluster-scoped kind that carries the release's instance
/// label, as `Kind/namespace/name` (CRDs left out: the chart keeps them on uninstall).
async fn objects_of(c: &Client, instance: &str) -> Vec<String> {
    let discovery = Discovery::new(c.clone()).run().await.unwrap();
    let mut out = Vec::new();
    let selector = ListParams::default().labels(&format!("app.kubernetes.io/instance={instance}"));
    for group in discovery.groups() {
        for (ar, caps) in group.recommended_resources() {
            if !caps.supports_operation(kube::discovery::verbs::LIST) || ar.kind == "CustomResourceDefinition" {
                continue;
            }
            // Events and the API server's own records are not the chart's objects.
            if ["Event", "Lease", "EndpointSlice", "Endpoints", "ControllerRevision"].contains(&ar.kind.as_str()) {
                continue;
            }
            let api: Api<DynamicObject> = Api::all_with(c.clone(), &ar);
            let Ok(list) = api.list(&selector).await else { continue };
            for o in list {
                out.push(format!(
                    "{}/{}/{}",
                    ar.kind,
                    o.metadata.namespace.unwrap_or_default(),
                    o.metadata.name.unwrap_or_default()
                ));
            }
        }
    }
    out.sort();
    out
}

/// `helm install` of the three topologies into one real API server, with monitoring on: every
/// object admitted (CRDs by the real schema and CEL cost checks), the DaemonSet's pods admitted at
/// `system-node-critical`, an upgrade that changes the proxy RBAC, a second release beside the
/// first, and uninstalls that leave nothing of the release behind but the kept CRDs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_installs_upgrades_and_uninstalls_every_topology() {
    let d = dir("install");
    let cp = ControlPlane::start(&d.0.join("cluster"), Options::default()).await.unwrap();
    let c = cp.admin_client().await.unwrap();
    let _kubelet = Kubelet::start(c.clone());
    install_monitoring_crds(&c).await;
    let chart = repo_root().join("charts/tunnelgate");
    let chart = chart.to_str().unwrap();

    // Node-local DaemonSet, with every monitoring object.
    let monitoring = [
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "grafanaDashboard.enabled=true",
        "--set",
        "networkPolicyExample.enabled=true",
        "--set",
        "networkPolicyExample.namespace=payments",
    ];
    cp.namespace("payments").await.unwrap();
    let mut args = vec!["install", "node", chart, "--namespace", "egress", "--create-namespace"];
    args.extend(monitoring);
    helm(&cp, &args).await;
    let installed = objects_of(&c, "node").await;
    for want in [
        "NetworkPolicy/egress/node-tunnelgate-proxy",
        "Service/egress/node-tunnelgate-proxy-metrics",
        "DaemonSet/egress/node-tunnelgate-proxy",
        "Deployment/egress/node-tunnelgate-operator",
        "PrometheusRule/egress/node-tunnelgate",
        "ServiceMonitor/egress/node-tunnelgate-proxy",
        "ClusterRole//node-tunnelgate-operator",
        "Role/egress/node-tunnelgate-proxy",
    ] {
        assert!(installed.iter().any(|o| o == want), "{want} not installed: {installed:#?}");
    }
    // The admin port is not on the Service pods use for egress, and the NetworkPolicy opens it
    // only to the operator and the monitoring namespace.
    let svc: serde_json::Value = c
        .request(
            http::Request::get("/api/v1/namespaces/egress/services/node-tunnelgate-proxy").body(Vec::new()).unwrap(),
        )
        .await
        .unwrap();
    let ports: Vec<&str> = svc["spec"]["ports"].as_array().unwrap().iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(ports, ["proxy"], "{svc}");
    let np: serde_json::Value = c
        .request(
            http::Request::get("/apis/networking.k8s.io/v1/namespaces/egress/networkpolicies/node-tunnelgate-proxy")
                .body(Vec::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let admin_rule = &np["spec"]["ingress"][1];
    assert_eq!(admin_rule["ports"][0]["port"], "admin", "{np}");
    assert_eq!(admin_rule["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"], "operator", "{np}");
    assert_eq!(admin_rule["from"][1]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], "monitoring");
    assert!(np["spec"]["ingress"][0].get("from").is_none(), "the proxy port stays open to every pod: {np}");
    // A node joins: the DaemonSet controller makes its proxy pod, admitted at system-node-critical.
    Api::<Node>::all(c.clone())
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "node-1"}})).unwrap())
        .await
        .unwrap();
    let pods = Api::<Pod>::namespaced(c.clone(), "egress");
    let proxies = ListParams::default().labels("app.kubernetes.io/instance=node,app.kubernetes.io/component=proxy");
    until("the DaemonSet's pod for node-1", 30, || async { !pods.list(&proxies).await.unwrap().items.is_empty() })
        .await;
    let pod = pods.list(&proxies).await.unwrap().items.remove(0);
    let spec = pod.spec.unwrap();
    assert_eq!(spec.priority_class_name.as_deref(), Some("system-node-critical"));
    assert_eq!(spec.priority, Some(2_000_001_000), "the Priority admission plugin resolved the class");

    // Upgrade to per-node documents: the proxy Role widens to the release's ConfigMaps; the admin
    // token generated at install is kept (proxies and operator keep agreeing on it).
    let secrets = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(c.clone(), "egress");
    let token = || async {
        let s = secrets.get("node-tunnelgate-admin-token").await.unwrap();
        s.data.unwrap_or_default().get("token").map(|t| t.0.clone()).unwrap_or_default()
    };
    let installed_token = token().await;
    assert_eq!(installed_token.len(), 48, "a generated token");
    let mut args = vec!["upgrade", "node", chart, "--namespace", "egress", "--set", "proxy.configPerNode=true"];
    args.extend(monitoring);
    helm(&cp, &args).await;
    assert_eq!(token().await, installed_token, "the token survives an upgrade");
    let role: serde_json::Value = c
        .request(
            http::Request::get("/apis/rbac.authorization.k8s.io/v1/namespaces/egress/roles/node-tunnelgate-proxy")
                .body(Vec::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(role["rules"][0].get("resourceNames").is_none(), "{role}");

    // An egress gateway beside it: a second release, CRDs and policy status left to the first.
    let mut args = vec!["install", "gw", chart, "--namespace", "gateway", "--create-namespace"];
    args.extend(e2e::release::SECOND_RELEASE_GATEWAY);
    args.extend([
        "--set",
        "proxy.gateway.hostNetwork=true",
        "--set",
        "proxy.gateway.autoscaling.enabled=true",
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        "serviceMonitor.enabled=true",
    ]);
    helm(&cp, &args).await;
    let gw = objects_of(&c, "gw").await;
    for want in ["Deployment/gateway/gw-tunnelgate-proxy", "HorizontalPodAutoscaler/gateway/gw-tunnelgate-proxy"] {
        assert!(gw.iter().any(|o| o == want), "{want} not installed: {gw:#?}");
    }
    let gw_pods = Api::<Pod>::namespaced(c.clone(), "gateway");
    // The Deployment leaves its size to the HorizontalPodAutoscaler (no autoscaler runs here: one).
    until("the gateway Deployment's pod", 30, || async {
        !gw_pods
            .list(&ListParams::default().labels("app.kubernetes.io/component=proxy"))
            .await
            .unwrap()
            .items
            .is_empty()
    })
    .await;

    // Uninstall: nothing of either release is left but the kept CRDs.
    for (release, ns) in [("gw", "gateway"), ("node", "egress")] {
        helm(&cp, &["uninstall", release, "--namespace", ns]).await;
    }
    until("nothing of either release left", 60, || async {
        objects_of(&c, "node").await.is_empty() && objects_of(&c, "gw").await.is_empty()
    })
    .await;
    until("the releases' pods collected", 60, || async {
        pods.list(&Default::default()).await.unwrap().items.is_empty()
            && gw_pods.list(&Default::default()).await.unwrap().items.is_empty()
    })
    .await;
    let crds = Api::<CustomResourceDefinition>::all(c.clone());
    assert!(crds.get_opt("tunnelpolicies.tunnelgate.io").await.unwrap().is_some(), "CRDs are kept");
}

fn example_docs(kind_dir: &str, validity: &str) -> Vec<(String, serde_json::Value)> {
    let dir = repo_root().join("examples").join(kind_dir).join(validity);
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_json::to_value(serde_yaml::Value::deserialize(doc).unwrap()).unwrap();
            if !v.is_null() {
                out.push((f.file_name().unwrap().to_string_lossy().into_owned(), v));
            }
        }
    }
    out
}

async fn create(c: &Client, doc: &serde_json::Value) -> Result<(), kube::Error> {
    let gvk = GroupVersionKind::gvk("tunnelgate.io", "v1alpha1", doc["kind"].as_str().unwrap());
    let plural = if gvk.kind == "TunnelPolicy" { "tunnelpolicies" } else { "clustertunnelpolicies" };
    let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
    let api: Api<DynamicObject> = match doc["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(c.clone(), ns, &ar),
        None => Api::all_with(c.clone(), &ar),
    };
    api.create(&PostParams::default(), &serde_json::from_value(doc.clone()).unwrap()).await.map(|_| ())
}

/// The example manifests against the CRDs as the API server admits them: every valid one
/// accepted, every invalid one refused (422) with a message naming the field under `spec`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_admits_the_valid_examples_and_refuses_the_invalid_ones() {
    let d = dir("examples");
    let opts = Options { controllers: false, ..Options::default() };
    let rel = Release::install(&d.0.join("cluster"), &["payments", "platform"], &[], opts).await.unwrap();
    for kind in ["tunnelpolicies", "clustertunnelpolicies"] {
        for (file, doc) in example_docs(kind, "valid") {
            if let Some(ns) = doc["metadata"]["namespace"].as_str() {
                rel.cp.namespace(ns).await.unwrap();
            }
            if let Err(e) = create(&rel.admin, &doc).await {
                panic!("{kind}/valid/{file} refused: {e}");
            }
        }
        let invalid = example_docs(kind, "invalid");
        assert!(invalid.len() >= 2, "{kind}: invalid examples exist");
        for (file, doc) in invalid {
            match create(&rel.admin, &doc).await {
                Err(kube::Error::Api(e)) => {
                    assert_eq!(e.code, 422, "{kind}/invalid/{file}: {e:?}");
                    assert!(e.message.contains("spec"), "{kind}/invalid/{file} names no field: {}", e.message);
                }
                other => panic!("{kind}/invalid/{file} admitted: {other:?}"),
            }
        }
    }
    // The CEL rules' own messages reach the user.
    let ports_only =
        example_docs("tunnelpolicies", "invalid").into_iter().find(|(f, _)| f == "ports-only.yaml").unwrap().1;
    let Err(kube::Error::Api(e)) = create(&rel.admin, &ports_only).await else { panic!("ports-only admitted") };
    assert!(e.message.contains("a destination needs hosts or cidrs"), "{}", e.message);
}

/// A user name and its groups.
type Subject = (String, Vec<String>);
/// Who, verb, resource, namespace, name, and whether it must be allowed.
type Check<'a> = (&'a str, &'a Subject, &'a str, &'a str, Option<&'a str>, Option<&'a str>, bool);

fn sa(ns: &str, name: &str) -> Subject {
    (
        format!("system:serviceaccount:{ns}:{name}"),
        vec!["system:serviceaccounts".into(), format!("system:serviceaccounts:{ns}"), "system:authenticated".into()],
    )
}

async fn can(
    cp: &ControlPlane,
    who: &(String, Vec<String>),
    verb: &str,
    resource: &str,
    ns: Option<&str>,
    name: Option<&str>,
) -> bool {
    let groups: Vec<&str> = who.1.iter().map(String::as_str).collect();
    cp.can(&Access { user: &who.0, groups: &groups, verb, resource, namespace: ns, name }).await.unwrap()
}

/// The chart's RBAC, least privilege both ways (as `kubectl auth can-i --as`): each component may
/// do what it needs and nothing the threat model forbids; the user roles aggregate into Kubernetes'
/// `view`, `edit` and `admin`, and ClusterTunnelPolicies stay with cluster and platform admins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_rbac_grants_what_each_needs_and_nothing_more() {
    let d = dir("rbac");
    let rel = Release::install(&d.0.join("cluster"), &["payments", "shop"], &[], Options::default()).await.unwrap();
    let cp = &rel.cp;
    let op = sa("tunnelgate", "tunnelgate-operator");
    let proxy = sa("tunnelgate", "tunnelgate-proxy");
    let rel_ns = Some("tunnelgate");
    let checks: Vec<Check<'_>> = vec![
        // The operator: what it needs...
        ("operator", &op, "list", "pods", None, None, true),
        ("operator", &op, "watch", "tunnelpolicies.tunnelgate.io", None, None, true),
        ("operator", &op, "patch", "tunnelpolicies.tunnelgate.io/status", Some("payments"), None, true),
        ("operator", &op, "get", "secrets", rel_ns, Some("proxy-cert"), true),
        ("operator", &op, "patch", "configmaps", rel_ns, Some("tunnelgate-proxy"), true),
        ("operator", &op, "create", "events.events.k8s.io", Some("payments"), None, true),
        ("operator", &op, "update", "leases.coordination.k8s.io", rel_ns, Some("tunnelgate-operator"), true),
        // ...and not more: no Secrets outside its namespace, no other namespaces' ConfigMaps, no
        // policy writes, no pod changes, no other Lease.
        ("operator", &op, "get", "secrets", Some("payments"), Some("db"), false),
        ("operator", &op, "list", "secrets", None, None, false),
        ("operator", &op, "get", "secrets", Some("kube-system"), None, false),
        ("operator", &op, "get", "configmaps", Some("payments"), None, false),
        ("operator", &op, "update", "tunnelpolicies.tunnelgate.io", Some("payments"), None, false),
        ("operator", &op, "delete", "pods", Some("payments"), None, false),
        ("operator", &op, "update", "leases.coordination.k8s.io", rel_ns, Some("someone-else"), false),
        // The proxy reads its ConfigMap (and the shards of it, by name) and writes nothing.
        ("proxy", &proxy, "watch", "configmaps", rel_ns, Some("tunnelgate-proxy"), true),
        ("proxy", &proxy, "watch", "configmaps", rel_ns, Some("tunnelgate-proxy-shard-0"), true),
        ("proxy", &proxy, "watch", "configmaps", rel_ns, Some("tunnelgate-proxy-shard-63"), true),
        ("proxy", &proxy, "watch", "configmaps", rel_ns, Some("tunnelgate-proxy-shard-64"), false),
        ("proxy", &proxy, "get", "configmaps", rel_ns, Some("tunnelgate-base"), false),
        ("proxy", &proxy, "patch", "configmaps", rel_ns, Some("tunnelgate-proxy"), false),
        ("proxy", &proxy, "get", "secrets", rel_ns, Some("tunnelgate-proxy-tls"), false),
        ("proxy", &proxy, "list", "pods", None, None, false),
        ("proxy", &proxy, "get", "configmaps", Some("payments"), None, false),
    ];
    let mut wrong = Vec::new();
    for (who, subject, verb, resource, ns, name, want) in checks {
        if can(cp, subject, verb, resource, ns, name).await != want {
            wrong.push(format!("{who} {verb} {resource} in {ns:?} name {name:?}: expected {want}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");

    // People: namespace-scoped bindings to Kubernetes' own roles, which the chart's roles extend.
    for (user, role, ns) in [("alice", "edit", "payments"), ("bob", "view", "payments"), ("carol", "admin", "payments")]
    {
        rel.create_raw(
            &format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings"),
            &json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": user},
                "subjects": [{"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}],
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role}}),
        )
        .await
        .unwrap();
    }
    rel.create_raw(
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        &json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "pat"},
            "subjects": [{"kind": "User", "name": "pat", "apiGroup": "rbac.authorization.k8s.io"}],
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "tunnelgate-platform-admin"}}),
    )
    .await
    .unwrap();
    let user = |n: &str| (n.to_owned(), vec!["system:authenticated".to_owned()]);
    let (alice, bob, carol, pat, eve) = (user("alice"), user("bob"), user("carol"), user("pat"), user("eve"));
    let tp = "tunnelpolicies.tunnelgate.io";
    let ctp = "clustertunnelpolicies.tunnelgate.io";
    // Aggregation is the controller-manager's work: wait for it.
    until("edit aggregates the chart's edit role", 30, || async {
        can(cp, &alice, "create", tp, Some("payments"), None).await
    })
    .await;
    let people: Vec<Check<'_>> = vec![
        ("edit", &alice, "create", tp, Some("payments"), None, true),
        ("edit", &alice, "create", tp, Some("shop"), None, false),
        ("edit", &alice, "patch", "tunnelpolicies.tunnelgate.io/status", Some("payments"), None, false),
        ("edit", &alice, "create", ctp, None, None, false),
        ("view", &bob, "list", tp, Some("payments"), None, true),
        ("view", &bob, "create", tp, Some("payments"), None, false),
        ("admin", &carol, "delete", tp, Some("payments"), None, true),
        ("admin", &carol, "create", ctp, None, None, false),
        ("platform-admin", &pat, "create", ctp, None, None, true),
        ("nobody", &eve, "list", tp, Some("payments"), None, false),
    ];
    let mut wrong = Vec::new();
    for (role, who, verb, resource, ns, name, want) in people {
        if can(cp, who, verb, resource, ns, name).await != want {
            wrong.push(format!("{role} ({}) {verb} {resource} in {ns:?}: expected {want}", who.0));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");

    // The on-call inspector: the proxies' /config through the pod proxy in the release namespace
    // only, with the admin token's Secret and no other, no writes.
    let oncall = sa("ops", "oncall");
    rel.inspector_kubeconfig().await.unwrap();
    for (verb, resource, ns, name, want) in [
        ("get", "pods/proxy", rel_ns, None, true),
        ("get", "pods/proxy", Some("payments"), None, false),
        ("get", "configmaps", rel_ns, None, true),
        ("get", "secrets", rel_ns, Some("tunnelgate-admin-token"), true),
        ("get", "secrets", rel_ns, Some("tunnelgate-proxy-tls"), false),
        ("list", "secrets", rel_ns, None, false),
        ("create", tp, Some("payments"), None, false),
        ("list", ctp, None, None, true),
    ] {
        assert_eq!(
            can(cp, &oncall, verb, resource, ns, name).await,
            want,
            "inspector {verb} {resource} {name:?} in {ns:?}"
        );
    }
}
