//! Proxy authentication (407): htpasswd with bcrypt, users in rules, both forward paths, guessing
//! rate-limited, hot reload of the password file.

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::http::hyper_upstream;
use crate::support::*;
use crate::tls::TempDir;

fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

fn htpasswd(dir: &TempDir, users: &[(&str, &str)]) -> std::path::PathBuf {
    let path = dir.0.join("htpasswd");
    let text: String = users
        .iter()
        .map(|(u, p)| format!("{u}:{}\n", bcrypt::hash(p, 4).unwrap().replacen("$2b$", "$2y$", 1)))
        .collect();
    std::fs::write(&path, text).unwrap();
    path
}

async fn connect_as(p: std::net::SocketAddr, target: &str, auth: Option<String>) -> (u16, String, TcpStream) {
    let mut s = TcpStream::connect(p).await.unwrap();
    let header = auth.map(|a| format!("Proxy-Authorization: {a}\r\n")).unwrap_or_default();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{header}\r\n").as_bytes()).await.unwrap();
    let (status, head) = read_head(&mut s).await;
    (status, head, s)
}

fn config(w: &World, file: &std::path::Path) -> String {
    w.config(&format!(
        "    - {{name: alice-only, action: allow, users: [alice], hosts: [only-alice.test], cidrs: ['127.0.0.4/32']}}\nauth: {{htpasswdFile: '{}'}}\n",
        file.display()
    ))
}

#[tokio::test]
async fn connect_and_http_require_credentials_and_rules_match_users() {
    let w = World::new().await;
    let alices = Upstream::echo("127.0.0.4").await;
    w.dns.set("only-alice.test", Answer::Addrs(vec!["127.0.0.4".parse().unwrap()]));
    let dir = TempDir::new("auth");
    let file = htpasswd(&dir, &[("alice", "wonderland"), ("bob", "builder")]);
    let p = start_proxy(&config(&w, &file)).await;
    let t = w.echo_target("allowed.test");
    // Missing and wrong credentials: 407 with the challenge, and the connection closes.
    for auth in [None, Some(basic("alice", "wrong")), Some(basic("mallory", "x")), Some("Bearer abc".to_owned())] {
        let (status, head, mut s) = connect_as(addr(&p), &t, auth.clone()).await;
        assert_eq!(status, 407, "{auth:?}: {head}");
        assert!(
            head.contains("Proxy-Authenticate: Basic realm=\"tunnelgate\"\r\n") && head.contains("Connection: close")
        );
        let (_, rest) = read_to_close(&mut s).await;
        assert!(!rest.contains("HTTP/1.1 200"));
    }
    assert_eq!(w.echo.count(), 0);
    let (status, head, mut s) = connect_as(addr(&p), &t, Some(basic("alice", "wonderland"))).await;
    assert_eq!(status, 200, "{head}");
    roundtrip(&mut s, b"as alice").await;
    // Rules with users: only alice reaches only-alice.test; a rule without users serves both.
    let only = format!("only-alice.test:{}", alices.addr.port());
    assert_eq!(connect_as(addr(&p), &only, Some(basic("bob", "builder"))).await.0, 403);
    assert_eq!(connect_as(addr(&p), &only, Some(basic("alice", "wonderland"))).await.0, 200);
    assert_eq!(connect_as(addr(&p), &t, Some(basic("bob", "builder"))).await.0, 200);
    // The plain-HTTP path asks the same; Proxy-Authorization is never forwarded (F-08).
    let up = hyper_upstream().await;
    let url = format!("http://allowed.test:{}/small", up.addr.port());
    let (status, text) =
        exchange(addr(&p), format!("GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await;
    assert_eq!(status, 407, "{text}");
    assert!(text.contains("Proxy-Authenticate: Basic realm=\"tunnelgate\""), "{text}");
    let req = format!(
        "GET {url} HTTP/1.1\r\nHost: x\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
        basic("bob", "builder")
    );
    let (status, text) = exchange(addr(&p), req.as_bytes()).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.ends_with("small"));
}

#[tokio::test]
async fn guessing_is_rate_limited_per_client() {
    let w = World::new().await;
    let dir = TempDir::new("auth-rate");
    let file = htpasswd(&dir, &[("alice", "wonderland")]);
    let p = start_proxy(&config(&w, &file)).await;
    let t = w.echo_target("allowed.test");
    let mut statuses = Vec::new();
    for i in 0..12 {
        statuses.push(connect_as(addr(&p), &t, Some(basic("alice", &format!("guess{i}")))).await.0);
    }
    assert_eq!(&statuses[..10], &[407; 10]);
    assert_eq!(&statuses[10..], &[429, 429], "{statuses:?}");
}

#[tokio::test]
async fn the_password_file_is_hot_reloaded_and_a_bad_one_keeps_the_last_good() {
    let w = World::new().await;
    let dir = TempDir::new("auth-reload");
    let file = htpasswd(&dir, &[("alice", "old")]);
    let yaml = config(&w, &file);
    let p = start_proxy(&yaml).await;
    let t = w.echo_target("allowed.test");
    assert_eq!(connect_as(addr(&p), &t, Some(basic("alice", "old"))).await.0, 200);
    // A weak hash format is refused, naming the file and line; the users in force stay.
    std::fs::write(&file, "alice:$apr1$abc$def\n").unwrap();
    let err = tunnelgate_proxy::reload::apply(&p.inner, &yaml).await.unwrap_err();
    let chain = tunnelgate_proxy::error::ErrorChain(&err).to_string();
    assert!(chain.contains("auth.htpasswdFile") && chain.contains("htpasswd:1: not a bcrypt hash"), "{chain}");
    assert_eq!(connect_as(addr(&p), &t, Some(basic("alice", "old"))).await.0, 200);
    // A new password takes effect at the reload, and remembered credentials are forgotten.
    htpasswd(&dir, &[("alice", "new")]);
    tunnelgate_proxy::reload::apply(&p.inner, &yaml).await.unwrap();
    assert_eq!(connect_as(addr(&p), &t, Some(basic("alice", "old"))).await.0, 407);
    assert_eq!(connect_as(addr(&p), &t, Some(basic("alice", "new"))).await.0, 200);
}

/// A user removed from the password file is refused on a keep-alive connection opened before the
/// removal: each request is authenticated by the configuration in force when it arrives.
#[tokio::test]
async fn a_removed_user_is_refused_on_a_connection_opened_before() {
    let w = World::new().await;
    let dir = TempDir::new("auth-removed");
    let file = htpasswd(&dir, &[("alice", "wonderland"), ("bob", "builder")]);
    let yaml = config(&w, &file);
    let p = start_proxy(&yaml).await;
    let up = hyper_upstream().await;
    let url = format!("http://allowed.test:{}/small", up.addr.port());
    let get = format!("GET {url} HTTP/1.1\r\nHost: x\r\nProxy-Authorization: {}\r\n\r\n", basic("bob", "builder"));
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    s.write_all(get.as_bytes()).await.unwrap();
    let (status, head) = read_head(&mut s).await;
    assert_eq!(status, 200, "{head}");
    let mut body = [0u8; 5];
    tokio::io::AsyncReadExt::read_exact(&mut s, &mut body).await.unwrap();
    // bob leaves the file: refused on a new connection...
    htpasswd(&dir, &[("alice", "wonderland")]);
    tunnelgate_proxy::reload::apply(&p.inner, &yaml).await.unwrap();
    let fresh = get.replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n");
    assert_eq!(exchange(addr(&p), fresh.as_bytes()).await.0, 407);
    // ...and on the connection bob opened before the reload.
    s.write_all(get.as_bytes()).await.unwrap();
    assert_eq!(read_head(&mut s).await.0, 407, "bob's old connection");
}

/// The guessing budget is the client's, not the configuration generation's: reloads (which any
/// pod change can cause in a cluster) do not refill it.
#[tokio::test]
async fn reloads_do_not_refill_the_guessing_budget() {
    let w = World::new().await;
    let dir = TempDir::new("auth-rate-reload");
    let file = htpasswd(&dir, &[("alice", "wonderland")]);
    let yaml = config(&w, &file);
    let p = start_proxy(&yaml).await;
    let t = w.echo_target("allowed.test");
    let mut statuses = Vec::new();
    for i in 0..14 {
        if i % 3 == 2 {
            // A reload between guesses, with a document that differs (a new generation).
            let next = yaml.replace("limits: {", &format!("limits: {{maxConnections: {}, ", 10_000 + i));
            tunnelgate_proxy::reload::apply(&p.inner, &next).await.unwrap();
        }
        statuses.push(connect_as(addr(&p), &t, Some(basic("alice", &format!("guess{i}")))).await.0);
    }
    assert_eq!(&statuses[..10], &[407; 10]);
    assert_eq!(&statuses[10..], &[429; 4], "{statuses:?}");
}
