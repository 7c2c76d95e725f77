//! Transparent interception enrolled through the operator: a namespace label enrols its pods, the
//! operator renders their addresses into their node's document, the node's proxy writes its
//! redirect rules, and the pod — with no proxy settings — is held to its namespace's
//! TunnelPolicies; removing the label ends the interception.

use std::process::Command;

use crate::harness::*;

/// `ip` with `args`, which must succeed.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Namespaces a test made beside its `Network`, removed on drop.
struct Extra(Vec<String>);

impl Drop for Extra {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// `curl` in namespace `ns` with no proxy settings: (exit code, the response head and body).
fn curl(ns: &str, url: &str) -> (i32, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-sS", "-i", "--noproxy", "*", "--max-time", "5", url])
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A plain HTTP server inside namespace `ns` (python3's, from the test's venv or the system),
/// answering every GET with 200.
fn http_server(ns: &str, addr: &str, log: &std::path::Path) -> tokio::process::Child {
    let script = format!(
        "import http.server as h\n\
         class H(h.BaseHTTPRequestHandler):\n\
         \x20   def do_GET(self):\n\
         \x20       self.send_response(200); self.send_header('Content-Length', '7'); self.end_headers(); self.wfile.write(b'outside')\n\
         h.HTTPServer(('{addr}', 80), H).serve_forever()\n"
    );
    tokio::process::Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", &script])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_labelled_namespace_is_intercepted_through_its_nodes_proxy() {
    // The node is a namespace on the test's network (it reaches the API server there); behind it,
    // a pod on 10.236.1.0/24 and an "outside" with 192.168.77.2 and .3.
    let mut net = Network::create("transp", [10, 235, 0]).unwrap();
    let host = net.host();
    let opts = Options { bind: host.into(), ..Options::default() };
    // The chart's transparent mode: the proxies' RBAC for their DaemonSet, which keeps the rules.
    let values = ["proxy.transparent.enabled=true", "config.clusterNetworks={10.96.0.0/12}"];
    let World { dir, rel } = World::boot_with("e2e-transparent", &["legacy"], &values, opts).await;
    let c = rel.admin.clone();
    let node = net.pod(10).unwrap();
    let tag = std::process::id() % 100_000;
    let (pod_ns, out_ns) = (format!("tgx{tag}-pod"), format!("tgx{tag}-out"));
    let _extra = Extra(vec![pod_ns.clone(), out_ns.clone()]);
    for (ns, dev, net_prefix, extra) in
        [(&pod_ns, "xp", "10.236.1", None), (&out_ns, "xo", "192.168.77", Some("192.168.77.3/24"))]
    {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
        ip(&["netns", "add", ns]);
        ip(&["-n", &node, "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", ns]);
        ip(&["-n", &node, "addr", "add", &format!("{net_prefix}.1/24"), "dev", dev]);
        ip(&["-n", &node, "link", "set", dev, "up"]);
        ip(&["-n", ns, "addr", "add", &format!("{net_prefix}.2/24"), "dev", "eth0"]);
        if let Some(a) = extra {
            ip(&["-n", ns, "addr", "add", a, "dev", "eth0"]);
        }
        ip(&["-n", ns, "link", "set", "eth0", "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        ip(&["-n", ns, "route", "add", "default", "via", &format!("{net_prefix}.1")]);
    }
    assert!(Command::new("ip")
        .args(["netns", "exec", &node, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        .status()
        .unwrap()
        .success());
    let _server = http_server(&out_ns, "0.0.0.0", &dir.0.join("server.log"));

    // The base: a forward and a transparent listener, the redirect enrolling labelled namespaces,
    // and the outside granted to `legacy` (private space stands in for public addresses).
    let admin = net.addr(10);
    let base = format!(
        "version: 1\n\
         listeners:\n  - {{name: forward, bind: '0.0.0.0:3128'}}\n  - {{name: transparent, bind: '0.0.0.0:15001', mode: transparent}}\n\
         admin: {{bind: '{admin}:9090'}}\n\
         redirect: {{listener: transparent, enrollNamespaces: {{tunnelgate.io/transparent: enabled}}}}\n\
         addressGrants: [{{namespaces: [legacy], cidrs: ['192.168.77.0/24']}}]\n\
         policy: {{defaultAction: deny}}\n\
         limits: {{drainDelay: 0s, drainTimeout: 1s}}\n"
    );
    let op_admin = free_port();
    let _operator = operator_with(&rel, &dir.0, &base, "/unused", op_admin, &["--config-per-node", "true"]).await;
    // The node's proxy, as the chart runs it.
    let node_proxy = |n: u32| {
        spawn_in(
            &node,
            &bin("tunnelgate-proxy"),
            &[
                "--config-map",
                "tunnelgate/tunnelgate-proxy",
                "--node-name",
                "node-a",
                "--daemonset",
                "tunnelgate-proxy",
            ],
            &rel.proxy_kubeconfig,
            &dir.0.join(format!("proxy-{n}.log")),
        )
    };
    let mut proxy = node_proxy(1);
    // The pod, on node-a, in a namespace that is not enrolled yet; its policy allows .2 only.
    let mut app = pod("app-1", "app", "10.236.1.2");
    app.spec.as_mut().unwrap().node_name = Some("node-a".into());
    run_pod(&Api::<Pod>::namespaced(c.clone(), "legacy"), app).await;
    Api::<TunnelPolicy>::namespaced(c.clone(), "legacy")
        .create(
            &PostParams::default(),
            &policy("allow-outside", "app", json!({"cidrs": ["192.168.77.2/32"], "ports": [80]})),
        )
        .await
        .unwrap();
    // Not enrolled: the pod reaches both outside addresses directly.
    until("the pod reaches the outside directly", 30, || async { curl(&pod_ns, "http://192.168.77.3/").0 == 0 }).await;

    // The platform labels the namespace: the pod is intercepted and held to its policy.
    let namespaces = Api::<k8s_openapi::api::core::v1::Namespace>::all(c.clone());
    let label = |value: Option<&str>| json!({"metadata": {"labels": {"tunnelgate.io/transparent": value}}});
    namespaces.patch("legacy", &PatchParams::default(), &Patch::Merge(label(Some("enabled")))).await.unwrap();
    until("the pod is intercepted: .3 refused by its node's proxy", 30, || async {
        let (_, head) = curl(&pod_ns, "http://192.168.77.3/");
        head.starts_with("HTTP/1.1 403") && head.to_ascii_lowercase().contains("proxy-status: tunnelgate")
    })
    .await;
    let (code, body) = curl(&pod_ns, "http://192.168.77.2/");
    assert!(code == 0 && body.ends_with("outside"), "its policy allows .2: {body}");
    let cms = Api::<ConfigMap>::namespaced(c.clone(), "tunnelgate");
    let doc = cms.get("tunnelgate-proxy-node-node-a").await.unwrap();
    let text = doc.data.unwrap().remove("config.yaml").unwrap();
    assert!(text.contains("10.236.1.2") && !text.contains("enrollNamespaces"), "{text}");
    let operator_metrics = format!("127.0.0.1:{op_admin}");
    let enrolled = |n: u32| {
        let addr = operator_metrics.clone();
        async move { reqwest_get(&addr, "/metrics").await.contains(&format!("tunnelgate_operator_transparent_pods {n}")) }
    };
    until("the operator counts the enrolled pod", 10, || enrolled(1)).await;

    // The label removed: no longer intercepted.
    namespaces.patch("legacy", &PatchParams::default(), &Patch::Merge(label(None))).await.unwrap();
    until("the pod reaches .3 directly again", 30, || async { curl(&pod_ns, "http://192.168.77.3/").0 == 0 }).await;
    until("the operator counts none", 10, || enrolled(0)).await;

    // The rules' fate when the proxy exits. Enrolled again, then the proxy stops with its DaemonSet
    // in place (a rolling update, an eviction): the rules stay and the pod fails closed.
    namespaces.patch("legacy", &PatchParams::default(), &Patch::Merge(label(Some("enabled")))).await.unwrap();
    let intercepted = || async {
        let (_, head) = curl(&pod_ns, "http://192.168.77.3/");
        head.starts_with("HTTP/1.1 403")
    };
    until("intercepted again", 30, intercepted).await;
    terminate(&mut proxy).await;
    assert!(table_exists(&node), "a proxy stopped under its DaemonSet leaves the rules");
    let (code, body) = curl(&pod_ns, "http://192.168.77.3/");
    assert!(code != 0 && !body.contains("outside"), "with no proxy listening the pod fails closed: {code} {body}");

    // Transparent mode turned off (the DaemonSet loses its annotation): the exiting proxy removes them.
    let daemonsets = Api::<k8s_openapi::api::apps::v1::DaemonSet>::namespaced(c.clone(), "tunnelgate");
    let mut proxy = node_proxy(2);
    until("the next proxy intercepts", 30, intercepted).await;
    let annotation = |v: Option<&str>| json!({"metadata": {"annotations": {"tunnelgate.io/redirect-rules": v}}});
    daemonsets.patch("tunnelgate-proxy", &PatchParams::default(), &Patch::Merge(annotation(None))).await.unwrap();
    let released = |n: u32| {
        let log = dir.0.join(format!("proxy-{n}.log"));
        async move { std::fs::read_to_string(&log).unwrap_or_default().contains("no longer keeps the redirect rules") }
    };
    until("the proxy sees its DaemonSet release the rules", 10, || released(2)).await;
    terminate(&mut proxy).await;
    assert!(!table_exists(&node), "the rules leave with the proxy when its DaemonSet no longer keeps them");
    until("the pod reaches .3 directly", 10, || async { curl(&pod_ns, "http://192.168.77.3/").0 == 0 }).await;

    // The release uninstalled: the DaemonSet is deleted before its proxies stop, and its RBAC goes
    // with it; the proxy learned of the deletion while it could, and removes the rules as it exits.
    daemonsets
        .patch("tunnelgate-proxy", &PatchParams::default(), &Patch::Merge(annotation(Some("keep"))))
        .await
        .unwrap();
    let mut proxy = node_proxy(3);
    until("the third proxy intercepts", 30, intercepted).await;
    let out = rel.cp.helm(&["uninstall", "tunnelgate", "--namespace", "tunnelgate"]).await.unwrap();
    assert!(out.status.success(), "helm uninstall: {}", String::from_utf8_lossy(&out.stderr));
    until("the proxy sees its DaemonSet deleted", 10, || released(3)).await;
    assert!(table_exists(&node), "the rules stay while the proxy runs");
    terminate(&mut proxy).await;
    assert!(!table_exists(&node), "uninstalled: the rules leave with the proxy");
    let (code, body) = curl(&pod_ns, "http://192.168.77.3/");
    assert!(code == 0 && body.ends_with("outside"), "no interception after the uninstall: {body}");
}

/// Whether node namespace `ns` has the proxy's nftables table.
fn table_exists(ns: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns, "nft", "list", "table", "inet", "tunnelgate"])
        .output()
        .unwrap()
        .status
        .success()
}

/// Stops `proxy` as the kubelet does (SIGTERM) and waits for it to exit.
async fn terminate(proxy: &mut Child) {
    let pid = proxy.id().unwrap().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(15), proxy.wait()).await.expect("the proxy exits").unwrap();
    assert!(status.success(), "the proxy exits cleanly: {status}");
}
