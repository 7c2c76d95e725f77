//! T-*: the TLS listener (clients speak TLS to the proxy).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tunnelgate_proxy::app::ProxyHandle;

use crate::support::*;

struct TlsWorld {
    w: World,
    p: ProxyHandle,
    ca: CertificateDer<'static>,
    _dir: TempDir,
}

pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("tunnelgate-test-{tag}-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
        ^ (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64)
}

async fn tls_world(extra_limits: &str) -> TlsWorld {
    let w = World::new().await;
    let dir = TempDir::new("tls");
    let ck = rcgen::generate_simple_self_signed(vec!["proxy.test".into(), "unknown.test".into(), "127.0.0.1".into()])
        .unwrap();
    std::fs::write(dir.0.join("tls.crt"), ck.cert.pem()).unwrap();
    std::fs::write(dir.0.join("tls.key"), ck.signing_key.serialize_pem()).unwrap();
    let yaml = format!(
        "version: 1\nlisteners: [{{name: secure, bind: '127.0.0.1:0', tls: {{certFile: '{d}/tls.crt', keyFile: '{d}/tls.key'}}}}]\nadmin: {{bind: '127.0.0.1:0'}}\ndns: {{nameservers: ['{dns}']}}\nlimits: {{drainDelay: 0s{extra_limits}}}\npolicy:\n  rules:\n    - {{name: echo, action: allow, hosts: [allowed.test], cidrs: ['127.0.0.2/32']}}\n",
        d = dir.0.display(),
        dns = w.dns.addr
    );
    let p = start_proxy(&yaml).await;
    TlsWorld { w, p, ca: ck.cert.der().clone(), _dir: dir }
}

/// A TLS client trusting exactly `cas`.
pub fn connector(cas: &[CertificateDer<'static>]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots.add(ca.clone()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(cfg))
}

async fn tls_connect(
    ca: &CertificateDer<'static>,
    addr: SocketAddr,
    name: ServerName<'static>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    connector(std::slice::from_ref(ca)).connect(name, tcp).await.unwrap()
}

/// Sends raw bytes to the TLS port and returns what came back before the close.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await.expect("closed");
    out
}

/// A TLS 1.0-only ClientHello with one cipher suite and no extensions.
fn tls10_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x01];
    body.extend([0x42u8; 32]);
    body.push(0); // session id
    body.extend([0x00, 0x02, 0x00, 0x2f]); // TLS_RSA_WITH_AES_128_CBC_SHA
    body.extend([0x01, 0x00]); // null compression
    let mut hs = vec![0x01, 0x00, (body.len() >> 8) as u8, body.len() as u8];
    hs.extend(body);
    let mut rec = vec![0x16, 0x03, 0x01, (hs.len() >> 8) as u8, hs.len() as u8];
    rec.extend(hs);
    rec
}

#[tokio::test]
async fn t01_handshake_garbage_and_old_versions() {
    let t = tls_world("").await;
    let a = addr(&t.p);
    let plaintext = raw(a, format!("CONNECT {} HTTP/1.1\r\n\r\n", t.w.echo.addr).as_bytes()).await;
    assert!(!plaintext.starts_with(b"HTTP/"), "no HTTP parsing on the TLS port");
    let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    assert!(!raw(a, &noise).await.starts_with(b"HTTP/"));
    // A record header announcing far more than a record may hold.
    assert!(!raw(a, b"\x16\x03\x01\xff\xff").await.starts_with(b"HTTP/"));
    // SSLv2-style hello.
    assert!(!raw(a, b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10").await.starts_with(b"HTTP/"));
    // TLS 1.0 only: a fatal alert (record type 21), then close.
    let out = raw(a, &tls10_client_hello()).await;
    assert_eq!(out.first(), Some(&0x15), "alert expected, got {out:?}");
    assert!(
        metric_when(t.p.admin, "tunnelgate_tls_handshakes_total{listener=\"secure\",result=\"failure\"", |v| v >= 5.0)
            .await
            >= 5.0
    );
    // A good client still gets through.
    let mut s = tls_connect(&t.ca, a, ServerName::try_from("proxy.test").unwrap()).await;
    s.write_all(format!("CONNECT {} HTTP/1.1\r\n\r\n", t.w.echo.addr).as_bytes()).await.unwrap();
    assert_eq!(read_head(&mut s).await.0, 200);
    roundtrip(&mut s, b"over tls").await;
}

#[tokio::test(start_paused = true)]
async fn t02_handshake_timeout() {
    let t = tls_world(", tlsHandshakeTimeout: 10s, requestHeadTimeout: 30s").await;
    let a = addr(&t.p);
    // Silent client.
    let start = Instant::now();
    let mut s = TcpStream::connect(a).await.unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let e = start.elapsed();
    assert!(e >= Duration::from_secs(10) && e < Duration::from_secs(11), "{e:?}");
    // A ClientHello at one byte per second.
    let start = Instant::now();
    let s = TcpStream::connect(a).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let hello = tls10_client_hello();
    let trickle = tokio::spawn(async move {
        for b in hello.iter().take(40) {
            if w.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let _ = r.read_to_end(&mut buf).await;
    trickle.abort();
    let e = start.elapsed();
    assert!(e >= Duration::from_secs(10) && e < Duration::from_secs(11), "{e:?}");
}

#[tokio::test]
async fn t03_missing_or_unknown_sni_gets_the_default_certificate() {
    let t = tls_world("").await;
    let a = addr(&t.p);
    for name in
        [ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()), ServerName::try_from("unknown.test").unwrap()]
    {
        let mut s = tls_connect(&t.ca, a, name).await;
        s.write_all(format!("CONNECT {} HTTP/1.1\r\n\r\n", t.w.echo.addr).as_bytes()).await.unwrap();
        assert_eq!(read_head(&mut s).await.0, 200);
    }
}

#[tokio::test]
async fn t08_early_data_through_the_tls_listener() {
    let t = tls_world("").await;
    let mut s = tls_connect(&t.ca, addr(&t.p), ServerName::try_from("proxy.test").unwrap()).await;
    let mut payload =
        format!("CONNECT allowed.test:{} HTTP/1.1\r\nHost: allowed.test\r\n\r\n", t.w.echo.addr.port()).into_bytes();
    let early: Vec<u8> = (0..517u32).map(|i| (i % 256) as u8).collect();
    payload.extend(&early);
    // One write, so head and early data travel in one TLS record.
    s.write_all(&payload).await.unwrap();
    assert_eq!(read_head(&mut s).await.0, 200);
    let mut got = vec![0u8; early.len()];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(got, early);
    // Errors are answered over TLS too.
    let mut s = tls_connect(&t.ca, addr(&t.p), ServerName::try_from("proxy.test").unwrap()).await;
    s.write_all(b"CONNECT 10.0.0.1:443 HTTP/1.1\r\n\r\n").await.unwrap();
    assert_eq!(read_head(&mut s).await.0, 403);
}

#[tokio::test]
async fn tls_listener_with_a_key_that_does_not_match_fails_to_start() {
    let dir = TempDir::new("badkey");
    let a = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
    let b = rcgen::generate_simple_self_signed(vec!["b.test".into()]).unwrap();
    std::fs::write(dir.0.join("tls.crt"), a.cert.pem()).unwrap();
    std::fs::write(dir.0.join("tls.key"), b.signing_key.serialize_pem()).unwrap();
    std::fs::write(dir.0.join("empty.crt"), "").unwrap();
    for (cert, key, want) in [
        ("tls.crt", "tls.key", "cannot be used together"),
        ("empty.crt", "tls.key", "no PEM certificate"),
        ("missing.crt", "tls.key", "cannot read"),
    ] {
        let yaml = format!(
            "version: 1\nlisteners: [{{name: s, bind: '127.0.0.1:0', tls: {{certFile: '{d}/{cert}', keyFile: '{d}/{key}'}}}}]\nadmin: {{bind: '127.0.0.1:0'}}\n",
            d = dir.0.display()
        );
        let cfg = proxy_config::ProxyConfig::from_yaml(&yaml).unwrap();
        let err = tunnelgate_proxy::app::start(cfg, &yaml).await.err().expect("must fail");
        let chain = tunnelgate_proxy::error::ErrorChain(&err).to_string();
        assert!(chain.contains("listeners[0] (s)") && chain.contains(want), "{chain}");
    }
}

/// Runs openssl (installed by .ci/run when missing) in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let st = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "openssl {args:?}");
}

#[tokio::test]
async fn tls_accepts_pkcs8_pkcs1_rsa_and_sec1_keys() {
    let w = World::new().await;
    let dir = TempDir::new("keys");
    let d = dir.0.as_path();
    let subj = [
        "-subj",
        "/CN=proxy.test",
        "-addext",
        "subjectAltName=DNS:proxy.test",
        "-addext",
        "basicConstraints=critical,CA:FALSE",
        "-days",
        "2",
    ];
    // RSA, PKCS#8 ("BEGIN PRIVATE KEY") and PKCS#1 ("BEGIN RSA PRIVATE KEY").
    openssl(
        d,
        &[&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rsa8.key", "-out", "rsa.crt"][..], &subj]
            .concat(),
    );
    openssl(d, &["rsa", "-in", "rsa8.key", "-traditional", "-out", "rsa1.key"]);
    // EC, SEC1 ("BEGIN EC PRIVATE KEY").
    openssl(d, &["ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", "ec1.key"]);
    openssl(d, &[&["req", "-x509", "-new", "-key", "ec1.key", "-out", "ec.crt"][..], &subj].concat());
    for (cert, key, marker) in [
        ("rsa.crt", "rsa8.key", "BEGIN PRIVATE KEY"),
        ("rsa.crt", "rsa1.key", "BEGIN RSA PRIVATE KEY"),
        ("ec.crt", "ec1.key", "BEGIN EC PRIVATE KEY"),
    ] {
        assert!(std::fs::read_to_string(d.join(key)).unwrap().contains(marker));
        let yaml = format!(
            "version: 1\nlisteners: [{{name: s, bind: '127.0.0.1:0', tls: {{certFile: '{d}/{cert}', keyFile: '{d}/{key}'}}}}]\nadmin: {{bind: '127.0.0.1:0'}}\npolicy:\n  rules:\n    - {{name: echo, action: allow, cidrs: ['127.0.0.2/32']}}\n",
            d = d.display()
        );
        let p = start_proxy(&yaml).await;
        let pem = std::fs::read(d.join(cert)).unwrap();
        let ca = rustls_pemfile::certs(&mut pem.as_slice()).next().unwrap().unwrap();
        let mut s = tls_connect(&ca, addr(&p), ServerName::try_from("proxy.test").unwrap()).await;
        s.write_all(format!("CONNECT {} HTTP/1.1\r\n\r\n", w.echo.addr).as_bytes()).await.unwrap();
        assert_eq!(read_head(&mut s).await.0, 200, "{key}");
        roundtrip(&mut s, key.as_bytes()).await;
    }
}

/// A TLS 1.2 ClientHello carrying `sni` as its server_name, with suites rustls serves.
fn client_hello_with_sni(sni: &[u8]) -> Vec<u8> {
    let mut name = vec![0u8];
    name.extend((sni.len() as u16).to_be_bytes());
    name.extend(sni);
    let mut list = (name.len() as u16).to_be_bytes().to_vec();
    list.extend(name);
    let mut ext = vec![0x00, 0x00];
    ext.extend((list.len() as u16).to_be_bytes());
    ext.extend(list);
    // supported_groups (x25519, secp256r1) and signature_algorithms (ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256)
    ext.extend([0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]);
    ext.extend([0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x08, 0x04]);
    ext.extend([0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]); // ec_point_formats: uncompressed
    let mut body = vec![0x03, 0x03];
    body.extend([0x17u8; 32]);
    body.push(0);
    body.extend([0x00, 0x04, 0xc0, 0x2b, 0xc0, 0x2f]);
    body.extend([0x01, 0x00]);
    body.extend((ext.len() as u16).to_be_bytes());
    body.extend(ext);
    let mut hs = vec![0x01, 0x00, (body.len() >> 8) as u8, body.len() as u8];
    hs.extend(body);
    let mut rec = vec![0x16, 0x03, 0x01, (hs.len() >> 8) as u8, hs.len() as u8];
    rec.extend(hs);
    rec
}

/// The first bytes the server answers with (without waiting for it to close).
async fn first_answer(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("an answer").unwrap_or(0);
    buf.truncate(n);
    buf
}

#[tokio::test]
async fn t03_odd_sni_values_never_break_the_listener() {
    let t = tls_world("").await;
    let a = addr(&t.p);
    // Sanity: a well-formed hello with an ordinary name gets a ServerHello (handshake record).
    let ok = first_answer(a, &client_hello_with_sni(b"proxy.test")).await;
    assert_eq!(ok.first(), Some(&0x16), "{ok:?}");
    // Non-ASCII and over-long names: an alert, never an HTTP answer, never a crash.
    for sni in [b"b\xc3\xbccher.test".to_vec(), vec![b'a'; 300], b"bad name.test".to_vec()] {
        let out = raw(a, &client_hello_with_sni(&sni)).await;
        assert_eq!(out.first(), Some(&0x15), "alert for SNI {:?}: {out:?}", String::from_utf8_lossy(&sni));
    }
    // A trailing dot and an IP literal are accepted and served the default certificate.
    for sni in [b"proxy.test.".to_vec(), b"127.0.0.1".to_vec()] {
        let out = first_answer(a, &client_hello_with_sni(&sni)).await;
        assert_eq!(out.first(), Some(&0x16), "SNI {:?} gets a ServerHello: {out:?}", String::from_utf8_lossy(&sni));
    }
    // The listener is intact.
    let mut s = tls_connect(&t.ca, a, ServerName::try_from("proxy.test").unwrap()).await;
    s.write_all(format!("CONNECT {} HTTP/1.1\r\n\r\n", t.w.echo.addr).as_bytes()).await.unwrap();
    assert_eq!(read_head(&mut s).await.0, 200);
}
