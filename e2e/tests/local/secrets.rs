//! The Secrets a render uses: TLS listener certificates and proxy users, validated before use.

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_certificates_come_from_validated_secrets() {
    let World { dir, rel } = World::boot("e2e-tls", &["payments"], &[]).await;
    let tls_dir = dir.0.join("tls");
    std::fs::create_dir_all(&tls_dir).unwrap();
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
    let cm = rendered_configmap(&cms).await;
    let config = cm.data.as_ref().unwrap()["config.yaml"].clone();
    assert!(config.contains(&format!("certFile: {tls_dir_s}/secure.crt")), "{config}");
    assert!(!config.contains("PRIVATE KEY"), "no key material in the ConfigMap");
    assert!(cm.metadata.annotations.unwrap().contains_key("tunnelgate.io/tls-secure-not-after"));

    let _proxy = whole_document_proxy(&rel, &dir.0);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_users_come_from_a_validated_htpasswd_secret() {
    let World { dir, rel } = World::boot("e2e-auth", &["payments"], &[]).await;
    let tls_dir = dir.0.join("tls");
    std::fs::create_dir_all(&tls_dir).unwrap();
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
    let cm = rendered_configmap(&cms).await;
    let config = cm.data.as_ref().unwrap()["config.yaml"].clone();
    assert!(config.contains(&format!("htpasswdFile: {tls_dir_s}/htpasswd")), "{config}");
    assert!(!config.contains("$2b$"), "no password hashes in the ConfigMap");
    let _proxy = whole_document_proxy(&rel, &dir.0);
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
