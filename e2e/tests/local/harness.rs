//! The world of the local end-to-end tests, shared by all of them: a control plane with the chart
//! installed ([`World`]), the operator and proxies started as processes with the chart's
//! credentials, the kubelet's part (pods and their status), loopback upstreams, and the clients.

#![allow(unused_imports, reason = "the common imports of every test module, re-exported once")]

pub(crate) use std::net::SocketAddr;
pub(crate) use std::path::Path;
pub(crate) use std::process::Stdio;
pub(crate) use std::time::Duration;

pub(crate) use e2e::controlplane::Options;
pub(crate) use e2e::netns::Network;
pub(crate) use e2e::release::Release;
pub(crate) use e2e::scratch::Dir;
pub(crate) use k8s_openapi::api::core::v1::{ConfigMap, Pod};
pub(crate) use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
pub(crate) use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
pub(crate) use kube::Client;
pub(crate) use serde_json::json;
pub(crate) use testkit::{free_port, until};
pub(crate) use tokio::io::{AsyncReadExt, AsyncWriteExt};
pub(crate) use tokio::net::{TcpListener, TcpSocket};
pub(crate) use tokio::process::{Child, Command};
pub(crate) use tokio::time::Instant;
pub(crate) use tunnelgate_operator::crd::{ClusterTunnelPolicy, TunnelPolicy};

pub(crate) use e2e::workspace_bin as bin;

/// One test's scratch directory and a control plane with the chart installed in it.
pub(crate) struct World {
    /// Declared first so that it is dropped first: the control plane stops before its directory
    /// is removed.
    pub(crate) rel: Release,
    pub(crate) dir: Dir,
}

impl World {
    /// A control plane with the chart installed (with `values`, as `helm --set`) in a scratch
    /// directory named after the test; the `namespaces` are created beside the release's.
    pub(crate) async fn boot(name: &str, namespaces: &[&str], values: &[&str]) -> World {
        World::boot_with(name, namespaces, values, Options::default()).await
    }

    /// [`World::boot`] with control-plane options (its address, etcd compaction).
    pub(crate) async fn boot_with(name: &str, namespaces: &[&str], values: &[&str], opts: Options) -> World {
        let dir = Dir::new(name).unwrap();
        let rel = Release::install(&dir.0.join("cluster"), namespaces, values, opts)
            .await
            .unwrap_or_else(|e| panic!("control plane: {e}"));
        World { rel, dir }
    }
}

/// Creates `pod` and then reports its status as the kubelet would (the API server ignores the
/// status of a create).
pub(crate) async fn run_pod(api: &Api<Pod>, pod: Pod) {
    let name = pod.metadata.name.clone().unwrap();
    let status = pod.status.clone();
    api.create(&PostParams::default(), &pod).await.unwrap();
    if let Some(status) = status {
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(json!({ "status": status }))).await.unwrap();
    }
}

/// A proxy reading the operator's whole-cluster document (`tunnelgate/tunnelgate-proxy`) on the
/// chart's proxy ServiceAccount, logging to `dir/proxy.log`.
pub(crate) fn whole_document_proxy(rel: &Release, dir: &Path) -> Child {
    spawn(
        &bin("tunnelgate-proxy"),
        &["--config-map", "tunnelgate/tunnelgate-proxy"],
        &rel.proxy_kubeconfig,
        &dir.join("proxy.log"),
    )
}

/// The operator's whole-cluster document, once it has written it.
pub(crate) async fn rendered_configmap(cms: &Api<ConfigMap>) -> ConfigMap {
    until("rendered ConfigMap", 20, || async { cms.get_opt("tunnelgate-proxy").await.ok().flatten().is_some() }).await;
    cms.get("tunnelgate-proxy").await.unwrap()
}

pub(crate) fn spawn(bin: &Path, args: &[&str], kubeconfig: &Path, log: &Path) -> Child {
    start(Command::new(bin), args, kubeconfig, log)
}

/// [`spawn`] inside network namespace `ns` (a pod of the test's own network).
pub(crate) fn spawn_in(ns: &str, bin: &Path, args: &[&str], kubeconfig: &Path, log: &Path) -> Child {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(bin);
    start(cmd, args, kubeconfig, log)
}

pub(crate) fn start(mut cmd: Command, args: &[&str], kubeconfig: &Path, log: &Path) -> Child {
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
pub(crate) fn replica(rel: &Release, admin_bind: &str, identity: &str, log: &Path) -> Child {
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
pub(crate) async fn connect_from(client_ip: &str, proxy: SocketAddr, target: SocketAddr) -> u16 {
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

pub(crate) fn pod(name: &str, app: &str, ip: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "labels": { "app": app } },
        "spec": { "containers": [{ "name": "c", "image": "busybox" }] },
        "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] }
    }))
    .unwrap()
}

/// A running proxy pod of the release (what the operator's rollout view long-polls).
pub(crate) fn proxy_pod(name: &str, node: &str, ip: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app.kubernetes.io/instance": "tunnelgate", "app.kubernetes.io/component": "proxy"}},
        "spec": {"nodeName": node, "containers": [{"name": "proxy", "image": "tunnelgate"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    }))
    .unwrap()
}

/// The base document of the rollout tests: a proxy whose admin port listens on `admin_ip` (the
/// address its pod has, where the operator long-polls it), echo traffic granted to `payments`.
pub(crate) fn rollout_base(listen: u16, admin_ip: &str, admin_port: u16) -> String {
    base_granting(listen, admin_ip, admin_port, &["payments"])
}

/// [`rollout_base`] with the echo upstream granted to `namespaces`.
pub(crate) fn base_granting(listen: u16, admin_ip: &str, admin_port: u16, namespaces: &[&str]) -> String {
    let granted = namespaces.join(", ");
    format!(
        "version: 1\nlisteners: [{{name: forward, bind: '127.0.0.1:{listen}'}}]\nadmin: {{bind: '{admin_ip}:{admin_port}'}}\npolicy: {{defaultAction: deny}}\naddressGrants: [{{namespaces: [{granted}], cidrs: ['127.0.0.2/32']}}]\nlimits: {{drainDelay: 0s, drainTimeout: 1s}}\n"
    )
}

pub(crate) fn policy(name: &str, app: &str, dest: serde_json::Value) -> TunnelPolicy {
    serde_json::from_value(json!({
        "apiVersion": "tunnelgate.io/v1alpha1", "kind": "TunnelPolicy",
        "metadata": { "name": name },
        "spec": { "podSelector": { "matchLabels": { "app": app } }, "action": "Allow", "destinations": [dest] }
    }))
    .unwrap()
}

pub(crate) fn condition(p: &TunnelPolicy, type_: &str) -> Option<(String, String, String)> {
    p.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// A bare HTTP/1.1 GET; returns the body.
pub(crate) async fn reqwest_get(addr: &str, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default()
}

pub(crate) fn tls_secret(name: &str, cert: &str, key: &str) -> k8s_openapi::api::core::v1::Secret {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": { "name": name },
        "data": { "tls.crt": b64(cert.as_bytes()), "tls.key": b64(key.as_bytes()) }
    }))
    .unwrap()
}

pub(crate) fn b64(data: &[u8]) -> String {
    serde_json::to_value(k8s_openapi::ByteString(data.to_vec())).unwrap().as_str().unwrap().to_owned()
}

/// The certificate the TLS listener presents.
pub(crate) async fn presented(addr: SocketAddr) -> Vec<u8> {
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
pub(crate) async fn echo_upstream(ip: &str) -> SocketAddr {
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
pub(crate) async fn single_operator(rel: &Release, dir: &Path, base: &str, tls_dir: &str, admin: u16) -> Child {
    operator_with(rel, dir, base, tls_dir, admin, &[]).await
}

/// [`single_operator`] with extra arguments.
pub(crate) async fn operator_with(
    rel: &Release,
    dir: &Path,
    base: &str,
    tls_dir: &str,
    admin: u16,
    extra: &[&str],
) -> Child {
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

pub(crate) async fn project_secret(c: &Client, dir: &Path) -> bool {
    let secrets = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(c.clone(), "tunnelgate");
    let Some(s) = secrets.get_opt("tunnelgate-proxy-tls").await.unwrap() else { return false };
    for (k, v) in s.data.unwrap_or_default() {
        std::fs::write(dir.join(k), v.0).unwrap();
    }
    true
}

pub(crate) fn htpasswd_secret(text: &str) -> k8s_openapi::api::core::v1::Secret {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": { "name": "proxy-users" },
        "data": { "htpasswd": b64(text.as_bytes()) }
    }))
    .unwrap()
}

/// CONNECT with optional credentials; returns the status.
pub(crate) async fn connect_with(proxy: SocketAddr, target: SocketAddr, credentials: Option<&str>) -> u16 {
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

/// One operator and one proxy on loopback, the proxy's base granting `payments` the echo upstream
/// on 127.0.0.2 (the world of the tests that need no pod network).
pub(crate) struct Loopback {
    pub(crate) target: SocketAddr,
    pub(crate) proxy: SocketAddr,
    pub(crate) operator_admin: u16,
    pub(crate) _operator: Child,
    pub(crate) _proxy: Child,
}

impl Loopback {
    pub(crate) async fn start(rel: &Release, dir: &Path) -> Loopback {
        Loopback::start_granting(rel, dir, &["payments"]).await
    }

    /// [`Loopback::start`] with the echo upstream granted to `namespaces`.
    pub(crate) async fn start_granting(rel: &Release, dir: &Path, namespaces: &[&str]) -> Loopback {
        let target = echo_upstream("127.0.0.2").await;
        let (listen, admin, operator_admin) = (free_port(), free_port(), free_port());
        let proxy = format!("127.0.0.1:{listen}").parse().unwrap();
        let base = base_granting(listen, "127.0.0.1", admin, namespaces);
        let _operator = single_operator(rel, dir, &base, "/unused", operator_admin).await;
        let _proxy = whole_document_proxy(rel, dir);
        Loopback { target, proxy, operator_admin, _operator, _proxy }
    }
}
