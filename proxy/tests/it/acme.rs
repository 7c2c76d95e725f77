//! ACME end to end against Pebble (Let's Encrypt's test server) on loopback: a tunnel listener
//! obtains its certificate by TLS-ALPN-01 on itself, serves it, renews it before expiry, and a
//! restarted proxy serves the cached one at once. Pebble comes from Debian's `pebble` package
//! (installed by `.ci/run`); it resolves the domain through the tests' DNS stub.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

use crate::support::*;
use crate::tls::TempDir;

/// Pebble, resolving names through the test's DNS stub, killed on drop.
struct Pebble {
    _proc: Child,
    directory: String,
    management: u16,
    /// Pebble's own HTTPS certificate (PEM).
    api_cert: String,
}

impl Pebble {
    async fn start(dir: &Path, dns: SocketAddr, tls_port: u16, validity_secs: u64) -> Pebble {
        let api = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
        std::fs::write(dir.join("pebble.crt"), api.cert.pem()).unwrap();
        std::fs::write(dir.join("pebble.key"), api.signing_key.serialize_pem()).unwrap();
        let (listen, management) = (free_port(), free_port());
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{listen}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": dir.join("pebble.crt"),
            "privateKey": dir.join("pebble.key"),
            "httpPort": free_port(),
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "certificateValidityPeriod": validity_secs,
        }});
        std::fs::write(dir.join("pebble.json"), config.to_string()).unwrap();
        let pebble = Command::new("pebble")
            .args(["-config", dir.join("pebble.json").to_str().unwrap(), "-dnsserver", &dns.to_string()])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("pebble (Debian package pebble) must be installed");
        assert!(
            eventually(10, || async { TcpStream::connect(("127.0.0.1", listen)).await.is_ok() }).await,
            "pebble did not start"
        );
        Pebble {
            _proc: pebble,
            directory: format!("https://127.0.0.1:{listen}/dir"),
            management,
            api_cert: api.cert.pem(),
        }
    }

    /// The root that signs the certificates Pebble issues (random per Pebble run).
    fn issuing_root(&self, dir: &Path) -> CertificateDer<'static> {
        let out = std::process::Command::new("curl")
            .args(["-sf", "--cacert", dir.join("pebble.crt").to_str().unwrap()])
            .arg(format!("https://127.0.0.1:{}/roots/0", self.management))
            .output()
            .unwrap();
        assert!(out.status.success(), "pebble's root: {}", String::from_utf8_lossy(&out.stderr));
        let root = rustls_pemfile::certs(&mut &out.stdout[..]).next().unwrap().unwrap();
        root
    }
}

/// The certificate presented for `acme.test`, verified against `root`.
async fn presented(at: SocketAddr, root: &CertificateDer<'static>) -> Option<CertificateDer<'static>> {
    let tcp = TcpStream::connect(at).await.ok()?;
    let mut s = crate::tls::connector(std::slice::from_ref(root))
        .connect(ServerName::try_from("acme.test").unwrap(), tcp)
        .await
        .ok()?;
    s.write_all(b"ping").await.ok()?;
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await.ok()?;
    Some(s.get_ref().1.peer_certificates()?[0].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_issue_serve_restart_from_cache_and_renew() {
    let w = World::new().await;
    let dir = TempDir::new("acme");
    let port = free_port();
    // Short validity: rustls-acme renews a third of the validity before expiry.
    w.dns.set("acme.test", Answer::Addrs(vec![[127, 0, 0, 1].into()]));
    let pebble = Pebble::start(&dir.0, w.dns.addr, port, 12).await;
    let up = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = up.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = up.accept().await {
            tokio::spawn(async move {
                let (mut r, mut wr) = s.split();
                let _ = tokio::io::copy(&mut r, &mut wr).await;
            });
        }
    });
    std::fs::write(dir.0.join("api-ca.pem"), &pebble.api_cert).unwrap();
    let yaml = format!(
        "version: 1\nlisteners: [{{name: app, bind: '127.0.0.1:{port}', mode: tunnel, upstream: '{up_addr}', tls: {{acme: {{directory: '{}', domains: [acme.test], contact: ['mailto:ops@acme.test'], cacheDir: '{d}/cache', directoryCaFile: '{d}/api-ca.pem'}}}}}}]\nadmin: {{bind: '127.0.0.1:0'}}\ndns: {{nameservers: ['{}']}}\nlimits: {{drainDelay: 0s}}\n",
        pebble.directory,
        w.dns.addr,
        d = dir.0.display()
    );
    let root = pebble.issuing_root(&dir.0);
    let at: SocketAddr = ([127, 0, 0, 1], port).into();

    // Issue: the first certificate arrives through TLS-ALPN-01 on the listener itself.
    let p = start_proxy(&yaml).await;
    assert!(eventually(30, || async { presented(at, &root).await.is_some() }).await, "no certificate issued");
    let first = presented(at, &root).await.unwrap();
    assert_eq!(
        metric_when(p.admin, "tunnelgate_acme_events_total{listener=\"app\",result=\"issued\"}", |v| v == 1.0).await,
        1.0
    );
    assert!(
        metric_when(p.admin, "tunnelgate_tls_handshakes_total{listener=\"app\",result=\"acme_challenge\"", |v| v
            >= 1.0)
        .await
            >= 1.0
    );

    // Restart: the cached certificate is served at once, without a new order.
    p.begin_shutdown();
    p.wait().await;
    let p = start_proxy(&yaml).await;
    assert!(
        eventually(5, || async { presented(at, &root).await.as_ref() == Some(&first) }).await,
        "the cached certificate is served after a restart"
    );
    assert_eq!(
        metric_when(p.admin, "tunnelgate_acme_events_total{listener=\"app\",result=\"cached\"}", |v| v == 1.0).await,
        1.0
    );

    // Renewal before expiry: a new certificate replaces it while the listener keeps serving.
    assert!(
        eventually(30, || async { presented(at, &root).await.is_some_and(|c| c != first) }).await,
        "the certificate was renewed"
    );
    assert!(
        metric_when(p.admin, "tunnelgate_acme_events_total{listener=\"app\",result=\"issued\"}", |v| v >= 1.0).await
            >= 1.0
    );
}
