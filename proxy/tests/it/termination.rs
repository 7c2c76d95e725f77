//! TLS termination on tunnel listeners: certificates by SNI, strict SNI, ALPN, the TLS 1.3
//! floor, client certificates (T-06), close_notify / FIN mapping and truncation (T-07), the SSL
//! TLV of PROXY v2 (T-10) and certificate rotation under load (T-04).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio_rustls::TlsConnector;
use tunnelgate_proxy::reload;

use crate::support::*;
use crate::tls::TempDir;

/// A test CA that signs server and client certificates.
struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

/// A certificate with its key, as PEM and DER.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A CRL revoking `serials`.
    fn crl(&self, serials: &[u64]) -> String {
        let params = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2024, 1, 1),
            next_update: rcgen::date_time_ymd(2099, 1, 1),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(*s),
                    revocation_time: rcgen::date_time_ymd(2024, 1, 1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer).unwrap().pem().unwrap()
    }

    /// A leaf for `names` (the first is also the CN); `expired` puts it in 2019.
    fn leaf(&self, names: &[&str], expired: bool) -> Leaf {
        self.leaf_with_serial(names, expired, None)
    }

    fn leaf_with_serial(&self, names: &[&str], expired: bool, serial: Option<u64>) -> Leaf {
        let until = expired.then_some((2019, 2020));
        self.leaf_valid(names, until, serial)
    }

    /// A leaf valid from January 1st of the first year to January 1st of the second.
    fn leaf_valid(&self, names: &[&str], years: Option<(i32, i32)>, serial: Option<u64>) -> Leaf {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.serial_number = serial.map(rcgen::SerialNumber::from);
        params.distinguished_name.push(rcgen::DnType::CommonName, names[0]);
        if let Some((from, until)) = years {
            params.not_before = rcgen::date_time_ymd(from, 1, 1);
            params.not_after = rcgen::date_time_ymd(until, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
        }
    }
}

fn write_pair(dir: &Path, stem: &str, leaf: &Leaf) -> String {
    std::fs::write(dir.join(format!("{stem}.crt")), &leaf.cert_pem).unwrap();
    std::fs::write(dir.join(format!("{stem}.key")), &leaf.key_pem).unwrap();
    format!("{{certFile: '{d}/{stem}.crt', keyFile: '{d}/{stem}.key'}}", d = dir.display())
}

fn doc(w: &World, listeners: &str) -> String {
    format!(
        "version: 1\nlisteners: [{listeners}]\nadmin: {{bind: '127.0.0.1:0'}}\ndns: {{nameservers: ['{}']}}\nlimits: {{drainDelay: 0s}}\n",
        w.dns.addr
    )
}

/// A client trusting `ca`, offering `alpn`, with an optional client certificate, limited to
/// `versions`.
fn client(
    ca: &CertificateDer<'static>,
    alpn: &[&str],
    cert: Option<&Leaf>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match cert {
        Some(l) => b
            .with_client_auth_cert(
                vec![l.der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(l.key_der.clone())),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    TlsConnector::from(Arc::new(cfg))
}

async fn handshake(
    c: &TlsConnector,
    addr: std::net::SocketAddr,
    sni: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    let mut s = c.connect(name, tcp).await?;
    // TLS 1.3 servers report a refused client certificate after the client's Finished: one
    // round trip through the backend shows whether the session really stands.
    s.write_all(b"ping").await?;
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await?;
    Ok(s)
}

async fn tcp_echo() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    a
}

fn leaf_of<S>(s: &tokio_rustls::client::TlsStream<S>) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().unwrap()[0].clone()
}

#[tokio::test]
async fn sni_chooses_exact_then_wildcard_then_the_first_certificate() {
    let w = World::new().await;
    let dir = TempDir::new("sni");
    let ca = Ca::new("sni ca");
    // The wildcard expires first (2040-01-01; the others run to rcgen's default, 4096).
    let wild = ca.leaf_valid(&["*.wild.test"], Some((2020, 2040)), None);
    let (a, other) = (ca.leaf(&["a.test"], false), ca.leaf(&["b.test"], false));
    let up = tcp_echo().await;
    let p = start_proxy(&doc(
        &w,
        &format!(
            "{{name: app, bind: '127.0.0.1:0', mode: tunnel, upstream: '{up}', tls: {{certificates: [{}, {}, {}]}}}}",
            write_pair(&dir.0, "a", &a),
            write_pair(&dir.0, "wild", &wild),
            write_pair(&dir.0, "b", &other)
        ),
    ))
    .await;
    let c = client(&ca.der(), &[], None, rustls::DEFAULT_VERSIONS);
    let at = addr(&p);
    assert_eq!(leaf_of(&handshake(&c, at, "a.test").await.unwrap()), a.der);
    assert_eq!(leaf_of(&handshake(&c, at, "B.TEST").await.unwrap()), other.der, "names are case-insensitive");
    assert_eq!(leaf_of(&handshake(&c, at, "x.wild.test").await.unwrap()), wild.der);
    // A wildcard covers exactly one label; anything unknown gets the first certificate.
    let deep = handshake(&c, at, "y.x.wild.test").await;
    assert!(deep.is_err(), "the default certificate (a.test) does not verify for y.x.wild.test");
    let no_verify_name = handshake(&c, at, "127.0.0.1").await; // an IP: no SNI is sent
    assert!(no_verify_name.is_err(), "no SNI: the default certificate, which does not name 127.0.0.1");
    assert!(
        metric_when(p.admin, "tunnelgate_tls_handshake_duration_seconds_count{listener=\"app\"}", |v| v >= 5.0).await
            >= 5.0
    );
    // Expiry alerts read the earliest notAfter of the listener's certificates: 2040-01-01.
    assert_eq!(
        metric_when(p.admin, "tunnelgate_tls_certificate_expiry_timestamp_seconds{listener=\"app\"}", |v| v
            == 2_208_988_800.0)
        .await,
        2_208_988_800.0
    );
}

#[tokio::test]
async fn strict_sni_refuses_unknown_names_with_unrecognized_name() {
    let w = World::new().await;
    let dir = TempDir::new("strict");
    let ca = Ca::new("strict ca");
    let a = ca.leaf(&["a.test"], false);
    let up = tcp_echo().await;
    let p = start_proxy(&doc(
        &w,
        &format!(
            "{{name: app, bind: '127.0.0.1:0', mode: tunnel, upstream: '{up}', tls: {{strictSni: true, certificates: [{}]}}}}",
            write_pair(&dir.0, "a", &a)
        ),
    ))
    .await;
    let c = client(&ca.der(), &[], None, rustls::DEFAULT_VERSIONS);
    assert!(handshake(&c, addr(&p), "a.test").await.is_ok());
    let err = handshake(&c, addr(&p), "other.test").await.unwrap_err();
    assert!(err.to_string().contains("UnrecognisedName"), "{err}");
    let err = handshake(&c, addr(&p), "127.0.0.1").await.unwrap_err();
    assert!(err.to_string().contains("UnrecognisedName"), "no SNI: {err}");
    assert_eq!(
        metric_when(p.admin, "tunnelgate_tls_handshakes_total{listener=\"app\",result=\"unrecognized_name\"", |v| v
            == 2.0)
        .await,
        2.0
    );
}

#[tokio::test]
async fn alpn_is_negotiated_and_a_tls13_floor_refuses_tls12() {
    let w = World::new().await;
    let dir = TempDir::new("alpn");
    let ca = Ca::new("alpn ca");
    let pair = write_pair(&dir.0, "a", &ca.leaf(&["a.test"], false));
    let up = tcp_echo().await;
    let p = start_proxy(&doc(
        &w,
        &format!(
            "{{name: alpn, bind: '127.0.0.1:0', mode: tunnel, upstream: '{up}', tls: {{alpn: [h2, http/1.1], certificates: [{pair}]}}}}, {{name: modern, bind: '127.0.0.1:0', mode: tunnel, upstream: '{up}', tls: {{minVersion: '1.3', certificates: [{pair}]}}}}"
        ),
    ))
    .await;
    let alpn = p.listener("alpn").unwrap();
    let s = handshake(&client(&ca.der(), &["http/1.1"], None, rustls::DEFAULT_VERSIONS), alpn, "a.test").await.unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let s = handshake(&client(&ca.der(), &["h2", "http/1.1"], None, rustls::DEFAULT_VERSIONS), alpn, "a.test")
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "the server's preference");
    let s = handshake(&client(&ca.der(), &[], None, rustls::DEFAULT_VERSIONS), alpn, "a.test").await.unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), None, "a client without ALPN is served");
    let err = handshake(&client(&ca.der(), &["imap"], None, rustls::DEFAULT_VERSIONS), alpn, "a.test").await;
    assert!(err.unwrap_err().to_string().contains("NoApplicationProtocol"));

    let modern = p.listener("modern").unwrap();
    let tls12 = client(&ca.der(), &[], None, &[&rustls::version::TLS12]);
    let err = handshake(&tls12, modern, "a.test").await.unwrap_err();
    assert!(err.to_string().contains("ProtocolVersion"), "{err}");
    let s = handshake(&client(&ca.der(), &[], None, rustls::DEFAULT_VERSIONS), modern, "a.test").await.unwrap();
    assert_eq!(s.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    assert!(handshake(&tls12, alpn, "a.test").await.is_ok(), "the default floor is TLS 1.2");
    assert_eq!(
        metric_when(
            p.admin,
            "tunnelgate_tls_handshakes_total{listener=\"alpn\",result=\"success\",version=\"TLSv1.2\"}",
            |v| v == 1.0
        )
        .await,
        1.0
    );
}

/// The server picks the cipher suite from its own order (AES-128-GCM with SHA-256 first), whatever
/// the client lists first; a client offering only other suites is still served.
#[tokio::test]
async fn the_server_order_picks_aes128_gcm_sha256_first() {
    let w = World::new().await;
    let dir = TempDir::new("suites");
    let ca = Ca::new("suites ca");
    let pair = write_pair(&dir.0, "a", &ca.leaf(&["a.test"], false));
    let up = tcp_echo().await;
    let p = start_proxy(&doc(
        &w,
        &format!("{{name: tls, bind: '127.0.0.1:0', mode: tunnel, upstream: '{up}', tls: {{certificates: [{pair}]}}}}"),
    ))
    .await;
    let addr = p.listener("tls").unwrap();
    let with_suites = |suites: Vec<rustls::SupportedCipherSuite>,
                       versions: &[&'static rustls::SupportedProtocolVersion]| {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der()).unwrap();
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        provider.cipher_suites = suites;
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsConnector::from(Arc::new(cfg))
    };
    use rustls::crypto::aws_lc_rs::cipher_suite as cs;
    let suite =
        |s: &tokio_rustls::client::TlsStream<TcpStream>| s.get_ref().1.negotiated_cipher_suite().unwrap().suite();
    let tls13 = with_suites(
        vec![cs::TLS13_AES_256_GCM_SHA384, cs::TLS13_CHACHA20_POLY1305_SHA256, cs::TLS13_AES_128_GCM_SHA256],
        &[&rustls::version::TLS13],
    );
    let s = handshake(&tls13, addr, "a.test").await.unwrap();
    assert_eq!(suite(&s), rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let tls12 = with_suites(
        vec![cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256],
        &[&rustls::version::TLS12],
    );
    let s = handshake(&tls12, addr, "a.test").await.unwrap();
    assert_eq!(suite(&s), rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256);
    let chacha = with_suites(vec![cs::TLS13_CHACHA20_POLY1305_SHA256], &[&rustls::version::TLS13]);
    let s = handshake(&chacha, addr, "a.test").await.unwrap();
    assert_eq!(suite(&s), rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
}

/// A backend that records the whole PROXY v2 header it receives (signature, fixed part and exactly
/// the announced length), then echoes.
pub(crate) async fn ppv2_recorder(path: &Path) -> tokio::sync::mpsc::Receiver<Vec<u8>> {
    let l = UnixListener::bind(path).unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut fixed = [0u8; 16];
                if s.read_exact(&mut fixed).await.is_err() {
                    return;
                }
                let mut rest = vec![0u8; u16::from_be_bytes([fixed[14], fixed[15]]) as usize];
                if s.read_exact(&mut rest).await.is_err() {
                    return;
                }
                let _ = tx.send([fixed.to_vec(), rest].concat()).await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    rx
}

/// TLVs after the 12 IPv4 address bytes: (type, value) in order, checking every length.
fn tlvs(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while !b.is_empty() {
        assert!(b.len() >= 3, "truncated TLV");
        let len = u16::from_be_bytes([b[1], b[2]]) as usize;
        assert!(b.len() >= 3 + len, "TLV length overruns the header");
        out.push((b[0], b[3..3 + len].to_vec()));
        b = &b[3 + len..];
    }
    out
}

#[tokio::test]
async fn t06_client_certificates_required_optional_and_ca_reload() {
    let w = World::new().await;
    let dir = TempDir::new("mtls");
    let (server_ca, client_ca, rogue_ca) = (Ca::new("server ca"), Ca::new("client ca"), Ca::new("rogue ca"));
    let pair = write_pair(&dir.0, "srv", &server_ca.leaf(&["app.test"], false));
    std::fs::write(dir.0.join("clients.pem"), client_ca.pem()).unwrap();
    std::fs::write(dir.0.join("clients.crl"), client_ca.crl(&[666])).unwrap();
    let mut rx = ppv2_recorder(&dir.0.join("app.sock")).await;
    let d = dir.0.display();
    let listeners = format!(
        "{{name: required, bind: '127.0.0.1:0', mode: tunnel, upstream: 'unix:{d}/app.sock', sendProxyProtocol: v2, tls: {{certificates: [{pair}], clientAuth: {{caFile: '{d}/clients.pem', crlFile: '{d}/clients.crl'}}}}}}, {{name: optional, bind: '127.0.0.1:0', mode: tunnel, upstream: 'unix:{d}/app.sock', sendProxyProtocol: v2, tls: {{certificates: [{pair}], clientAuth: {{caFile: '{d}/clients.pem', mode: optional}}}}}}"
    );
    let cfg = dir.0.join("proxy.yaml");
    std::fs::write(&cfg, doc(&w, &listeners)).unwrap();
    let p = start_proxy(&doc(&w, &listeners)).await;
    let _watch = reload::spawn_file_source(p.inner.clone(), cfg, Duration::from_secs(3600));
    let (required, optional) = (p.listener("required").unwrap(), p.listener("optional").unwrap());
    let good = client_ca.leaf(&["workload-a"], false);
    let with = |l: Option<&Leaf>| client(&server_ca.der(), &[], l, rustls::DEFAULT_VERSIONS);

    // A verified certificate: the session stands and the backend learns the CN and verify = 0.
    let mut kept = handshake(&with(Some(&good)), required, "app.test").await.unwrap();
    let header = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
    let ssl = tlvs(&header[16 + 12..]).into_iter().find(|(t, _)| *t == 0x20).expect("an SSL TLV").1;
    assert_eq!(ssl[0], 0x01 | 0x02, "client flags: SSL and a certificate on this connection");
    assert_eq!(&ssl[1..5], &[0, 0, 0, 0], "verify: 0, the certificate was verified");
    let subs = tlvs(&ssl[5..]);
    assert_eq!(subs[0], (0x21, b"TLSv1.3".to_vec()), "version sub-TLV");
    assert_eq!(subs[1].0, 0x23, "cipher sub-TLV");
    assert!(subs.contains(&(0x22, b"workload-a".to_vec())), "CN sub-TLV: {subs:?}");

    // Refused: no certificate, an unknown CA, an expired certificate, a revoked one.
    let revoked = client_ca.leaf_with_serial(&["stolen"], false, Some(666));
    assert!(handshake(&with(Some(&revoked)), required, "app.test").await.is_err());
    let fine = client_ca.leaf_with_serial(&["fine"], false, Some(667));
    assert!(handshake(&with(Some(&fine)), required, "app.test").await.is_ok());
    let header = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
    assert!(tlvs(&tlvs(&header[16 + 12..]).into_iter().find(|(t, _)| *t == 0x20).unwrap().1[5..])
        .contains(&(0x22, b"fine".to_vec())));
    assert!(handshake(&with(None), required, "app.test").await.is_err());
    assert!(handshake(&with(Some(&rogue_ca.leaf(&["rogue"], false))), required, "app.test").await.is_err());
    assert!(handshake(&with(Some(&client_ca.leaf(&["old"], true))), required, "app.test").await.is_err());
    // Optional: no certificate is served (verify != 0, no CN), a bad one still refused.
    handshake(&with(None), optional, "app.test").await.unwrap();
    let header = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
    let ssl = tlvs(&header[16 + 12..]).into_iter().find(|(t, _)| *t == 0x20).unwrap().1;
    assert_eq!(ssl[0], 0x01);
    assert_ne!(&ssl[1..5], &[0, 0, 0, 0]);
    assert!(!tlvs(&ssl[5..]).iter().any(|(t, _)| *t == 0x22));
    assert!(handshake(&with(Some(&rogue_ca.leaf(&["rogue"], false))), optional, "app.test").await.is_err());

    // The CA bundle now names only the rogue CA: new handshakes from the old CA fail, the
    // session that was verified before goes on.
    // (With a CRL file, every CA needs its list: an unknown revocation status is refused.)
    std::fs::write(dir.0.join("clients.crl"), rogue_ca.crl(&[])).unwrap();
    std::fs::write(dir.0.join("clients.pem"), rogue_ca.pem()).unwrap();
    assert!(
        eventually(10, || async { handshake(&with(Some(&good)), required, "app.test").await.is_err() }).await,
        "the removed CA is refused after the reload"
    );
    handshake(&with(Some(&rogue_ca.leaf(&["rogue"], false))), required, "app.test").await.unwrap();
    roundtrip(&mut kept, b"still here").await;
}

/// A backend that reads until EOF, waits, answers `reply` and closes.
async fn answer_after_eof_tcp(reply: &'static [u8]) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(answer_after_eof(s, reply));
        }
    });
    a
}

async fn answer_after_eof<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, reply: &'static [u8]) {
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = s.write_all(&[reply, &got].concat()).await;
    let _ = s.shutdown().await;
}

#[tokio::test]
async fn t07_close_notify_and_fin_mapping_over_tcp_and_unix_and_truncation() {
    let w = World::new().await;
    let dir = TempDir::new("t07");
    let ca = Ca::new("t07 ca");
    let pair = write_pair(&dir.0, "srv", &ca.leaf(&["app.test"], false));
    let tcp_up = answer_after_eof_tcp(b"reply:").await;
    let sock = dir.0.join("app.sock");
    let ul = UnixListener::bind(&sock).unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = ul.accept().await {
            tokio::spawn(answer_after_eof(s, b"reply:"));
        }
    });
    // Server-closes-first backend: greets, shuts its write side, keeps reading.
    let first = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let first_addr = first.local_addr().unwrap();
    let (seen_tx, mut seen) = tokio::sync::mpsc::channel::<Vec<u8>>(2);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = first.accept().await {
            let seen_tx = seen_tx.clone();
            tokio::spawn(async move {
                let _ = s.write_all(b"bye").await;
                let _ = s.shutdown().await;
                let mut got = Vec::new();
                let _ = s.read_to_end(&mut got).await;
                let _ = seen_tx.send(got).await;
            });
        }
    });
    let d = dir.0.display();
    let p = start_proxy(&doc(
        &w,
        &format!(
            "{{name: tcp, bind: '127.0.0.1:0', mode: tunnel, upstream: '{tcp_up}', tls: {{certificates: [{pair}]}}}}, {{name: unix, bind: '127.0.0.1:0', mode: tunnel, upstream: 'unix:{d}/app.sock', tls: {{certificates: [{pair}]}}}}, {{name: first, bind: '127.0.0.1:0', mode: tunnel, upstream: '{first_addr}', tls: {{certificates: [{pair}]}}}}"
        ),
    ))
    .await;
    let c = client(&ca.der(), &[], None, rustls::DEFAULT_VERSIONS);
    for listener in ["tcp", "unix"] {
        let tcp = TcpStream::connect(p.listener(listener).unwrap()).await.unwrap();
        let mut s = c.connect(ServerName::try_from("app.test").unwrap(), tcp).await.unwrap();
        s.write_all(b"question").await.unwrap();
        // close_notify: the backend sees EOF (it answers only then), the reply still arrives
        // over TLS, followed by the proxy's close_notify (a clean end: read_to_end is Ok).
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await.unwrap().unwrap();
        assert_eq!(rest, b"reply:question", "{listener}");
    }
    // The backend closes first: its FIN is a close_notify, and the client can still send.
    let tcp = TcpStream::connect(p.listener("first").unwrap()).await.unwrap();
    let mut s = c.connect(ServerName::try_from("app.test").unwrap(), tcp).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert_eq!(rest, b"bye");
    s.write_all(b"after your close").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(tokio::time::timeout(Duration::from_secs(5), seen.recv()).await.unwrap().unwrap(), b"after your close");

    // Truncation: a TCP FIN without close_notify still ends the backend's input, and the tunnel
    // is counted as truncated.
    let tcp = TcpStream::connect(p.listener("tcp").unwrap()).await.unwrap();
    let mut s = c.connect(ServerName::try_from("app.test").unwrap(), tcp).await.unwrap();
    s.write_all(b"cut").await.unwrap();
    s.flush().await.unwrap();
    s.get_mut().0.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await.unwrap();
    assert_eq!(rest, b"reply:cut", "the backend got the truncated stream's end and answered");
    assert!(
        eventually(5, || async {
            metric(p.admin, "tunnelgate_tunnel_duration_seconds_count{close=\"client_truncated\"}").await == 1.0
        })
        .await
    );
    assert_eq!(
        metric_when(p.admin, "tunnelgate_tunnel_duration_seconds_count{close=\"client_closed\"}", |v| v == 2.0).await,
        2.0
    );
    assert_eq!(
        metric_when(p.admin, "tunnelgate_tunnel_duration_seconds_count{close=\"upstream_closed\"}", |v| v == 1.0).await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t04_tunnel_listener_certificate_rotation_under_load() {
    let w = World::new().await;
    let dir = TempDir::new("t04t");
    let ca = Ca::new("rotation ca");
    let pair = write_pair(&dir.0, "srv", &ca.leaf(&["app.test"], false));
    let up = tcp_echo().await;
    let cfg = dir.0.join("proxy.yaml");
    let text = doc(
        &w,
        &format!("{{name: app, bind: '127.0.0.1:0', mode: tunnel, upstream: '{up}', tls: {{certificates: [{pair}]}}}}"),
    );
    std::fs::write(&cfg, &text).unwrap();
    let p = start_proxy(&text).await;
    let _watch = reload::spawn_file_source(p.inner.clone(), cfg, Duration::from_secs(3600));
    let at = addr(&p);
    let c = client(&ca.der(), &[], None, rustls::DEFAULT_VERSIONS);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut pumps = Vec::new();
    for i in 0..20u8 {
        let mut s = handshake(&c, at, "app.test").await.unwrap();
        let stop = stop.clone();
        pumps.push(tokio::spawn(async move {
            let mut rounds = 0u32;
            let msg = vec![i; 1024];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                s.write_all(&msg).await.unwrap();
                let mut back = vec![0u8; 1024];
                s.read_exact(&mut back).await.unwrap();
                assert_eq!(back, msg);
                rounds += 1;
            }
            rounds
        }));
    }
    for round in 0..3 {
        let next = ca.leaf(&["app.test"], false);
        // Kubernetes-style atomic replacement of both files.
        std::fs::write(dir.0.join("srv.crt.tmp"), &next.cert_pem).unwrap();
        std::fs::write(dir.0.join("srv.key.tmp"), &next.key_pem).unwrap();
        std::fs::rename(dir.0.join("srv.key.tmp"), dir.0.join("srv.key")).unwrap();
        std::fs::rename(dir.0.join("srv.crt.tmp"), dir.0.join("srv.crt")).unwrap();
        assert!(
            eventually(10, || async { handshake(&c, at, "app.test").await.is_ok_and(|s| leaf_of(&s) == next.der) })
                .await,
            "rotation {round}: new handshakes get the new certificate"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for pump in pumps {
        assert!(pump.await.unwrap() > 0, "every session kept pumping through the rotations");
    }
}
