//! Tunnel listeners (`mode: tunnel`): a fixed TCP or Unix-socket upstream, plain or behind TLS
//! termination, through the tunnel relay.

use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener};

use crate::support::*;
use crate::tls::{connector, TempDir};

fn config(w: &World, listener: &str) -> String {
    format!(
        "version: 1\nlisteners: [{listener}]\nadmin: {{bind: '127.0.0.1:0'}}\ndns: {{nameservers: ['{}']}}\nlimits: {{drainDelay: 0s}}\n",
        w.dns.addr
    )
}

async fn unix_echo(path: &std::path::Path) {
    let l = UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
}

#[tokio::test]
async fn tcp_tunnel_relays_to_the_fixed_upstream_with_half_close() {
    let w = World::new().await;
    let p = start_proxy(&config(
        &w,
        &format!("{{name: db, bind: '127.0.0.1:0', mode: tunnel, upstream: 'allowed.test:{}'}}", w.echo.addr.port()),
    ))
    .await;
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    roundtrip(&mut s, b"no HTTP here\r\n\r\n").await;
    assert_eq!(metric(p.admin, "tunnelgate_tunnels_active{listener=\"db\"}").await, 1.0);
    // Half-close: the client's FIN reaches the upstream, whose answer and FIN still come back.
    s.write_all(b"last words").await.unwrap();
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert_eq!(rest, b"last words");
    assert!(
        eventually(5, || async { metric(p.admin, "tunnelgate_tunnels_active{listener=\"db\"}").await == 0.0 }).await
    );
    assert_eq!(metric(p.admin, "tunnelgate_tunnel_requests_total{listener=\"db\",result=\"established\"}").await, 1.0);
}

#[tokio::test]
async fn unix_socket_upstream_missing_closes_promptly_and_recovers() {
    let w = World::new().await;
    let dir = TempDir::new("unix");
    let sock = dir.0.join("app.sock");
    let p = start_proxy(&config(
        &w,
        &format!("{{name: app, bind: '127.0.0.1:0', mode: tunnel, upstream: 'unix:{}'}}", sock.display()),
    ))
    .await;
    // No socket yet: the client is closed at once, and counted.
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await.expect("closed promptly");
    assert!(matches!(r, Ok(0) | Err(_)));
    assert_eq!(
        metric(p.admin, "tunnelgate_tunnel_requests_total{listener=\"app\",result=\"upstream_unreachable\"}").await,
        1.0
    );
    // The backend appears: the next connection goes through.
    unix_echo(&sock).await;
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    roundtrip(&mut s, b"over a unix socket").await;
}

#[tokio::test]
async fn tls_termination_in_front_of_a_unix_socket() {
    let w = World::new().await;
    let dir = TempDir::new("term");
    let sock = dir.0.join("app.sock");
    unix_echo(&sock).await;
    let ck = rcgen::generate_simple_self_signed(vec!["app.test".into()]).unwrap();
    std::fs::write(dir.0.join("tls.crt"), ck.cert.pem()).unwrap();
    std::fs::write(dir.0.join("tls.key"), ck.signing_key.serialize_pem()).unwrap();
    let d = dir.0.display();
    let p = start_proxy(&config(
        &w,
        &format!("{{name: app, bind: '127.0.0.1:0', mode: tunnel, upstream: 'unix:{d}/app.sock', tls: {{certFile: '{d}/tls.crt', keyFile: '{d}/tls.key'}}}}"),
    ))
    .await;
    let tcp = TcpStream::connect(addr(&p)).await.unwrap();
    let name = ServerName::try_from("app.test").unwrap();
    let mut tls = connector(std::slice::from_ref(ck.cert.der())).connect(name, tcp).await.unwrap();
    roundtrip(&mut tls, b"GET / HTTP/1.1\r\n\r\n is just bytes here").await;
    assert_eq!(metric(p.admin, "tunnelgate_tls_handshakes_total{listener=\"app\",result=\"success\"}").await, 1.0);
    // close_notify from the client ends the upstream's input; its FIN comes back as close_notify.
    tls.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await.unwrap();
    assert!(r.is_ok(), "a clean TLS close: {r:?}");
}
