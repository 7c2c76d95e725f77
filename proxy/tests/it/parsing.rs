//! P-*: the CONNECT request head.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// Every input must get `want` and a closed connection, and never reach the echo upstream.
async fn expect_all(w: &World, proxy: std::net::SocketAddr, cases: &[Vec<u8>], want: u16) {
    let before = w.echo.count();
    for c in cases {
        let (status, text) = exchange(proxy, c).await;
        assert_eq!(status, want, "input {:?} got {text:?}", String::from_utf8_lossy(c));
        assert!(text.contains("Connection: close\r\n"), "{text}");
    }
    assert_eq!(w.echo.count(), before, "a rejected request reached the upstream");
}

fn req(target: &str) -> Vec<u8> {
    format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").into_bytes()
}

#[tokio::test]
async fn p01_baseline_connect() {
    let w = World::new().await;
    let p = w.proxy("").await;
    let mut s = tunnel(addr(&p), &w.echo_target("allowed.test")).await;
    roundtrip(&mut s, b"hello through the tunnel").await;
    // A literal address allowed by CIDR works too.
    let mut s = tunnel(addr(&p), &w.echo_target("127.0.0.2")).await;
    roundtrip(&mut s, b"x").await;
}

#[tokio::test]
async fn p02_missing_or_empty_port() {
    let w = World::new().await;
    let p = w.proxy("").await;
    let cases = vec![
        b"CONNECT example.com HTTP/1.1\r\nHost: example.com\r\n\r\n".to_vec(),
        b"CONNECT example.com: HTTP/1.1\r\nHost: example.com\r\n\r\n".to_vec(),
        b"CONNECT :443 HTTP/1.1\r\n\r\n".to_vec(),
    ];
    expect_all(&w, addr(&p), &cases, 400).await;
    assert_eq!(w.dns.total_queries(), 0, "no DNS query for a malformed target");
}

#[tokio::test]
async fn p03_strict_port_grammar() {
    let w = World::new().await;
    let p = w.proxy("").await;
    let cases: Vec<Vec<u8>> =
        ["0", "0443", "00443", "65536", "99999999999999999999", "-1", "+443", "0x1bb", "https", "443:443"]
            .iter()
            .map(|port| req(&format!("allowed.test:{port}")))
            .chain(std::iter::once(b"CONNECT allowed.test:443  HTTP/1.1\r\n\r\n".to_vec()))
            .collect();
    expect_all(&w, addr(&p), &cases, 400).await;
}

#[tokio::test]
async fn p04_userinfo_rejected() {
    let w = World::new().await;
    let p = w.proxy("").await;
    let t = w.echo.addr.port();
    let cases: Vec<Vec<u8>> = [
        format!("user:pass@allowed.test:{t}"),
        format!("allowed.test@evil.test:{t}"),
        format!("allowed.test:{t}@evil.test:{t}"),
        format!("user%40x@allowed.test:{t}"),
    ]
    .iter()
    .map(|s| req(s))
    .collect();
    expect_all(&w, addr(&p), &cases, 400).await;
}

#[tokio::test]
async fn p05_ipv6_literals() {
    let w = World::new().await;
    let p = w.proxy("").await;
    let bad: Vec<Vec<u8>> = [
        "2001:db8::1:443",
        "::1:443",
        "[::1:443",
        "::1]:443",
        "[[::1]]:443",
        "[127.0.0.1]:443",
        "[allowed.test]:443",
        "[v1.fe80::a]:443",
        "[fe80::1%25eth0]:443",
        "[fe80::1%eth0]:443",
        "[fe80::1%251]:443",
    ]
    .iter()
    .map(|s| req(s))
    .collect();
    expect_all(&w, addr(&p), &bad, 400).await;
    // Valid literals are parsed and classified: loopback and mapped loopback are refused.
    let denied: Vec<Vec<u8>> =
        ["[::1]:443", "[::ffff:127.0.0.1]:443", "[2001:DB8::1]:443"].iter().map(|s| req(s)).collect();
    expect_all(&w, addr(&p), &denied, 403).await;
}

#[tokio::test]
async fn p06_idn_case_trailing_dot() {
    let w = World::new().await;
    let p = w.proxy("").await;
    let t = w.echo.addr.port();
    let bad: Vec<Vec<u8>> = vec![
        format!("CONNECT b\u{fc}cher.test:{t} HTTP/1.1\r\n\r\n").into_bytes(),
        format!("CONNECT allowed\u{ff0e}test:{t} HTTP/1.1\r\n\r\n").into_bytes(),
        req(&format!("xn--:{t}")),
        req(&format!("allowed.test..:{t}")),
        req(&format!(".allowed.test:{t}")),
    ];
    expect_all(&w, addr(&p), &bad, 400).await;
    // Case and one trailing dot normalize to the allowed name...
    let mut s = tunnel(addr(&p), &format!("Allowed.TEST.:{t}")).await;
    roundtrip(&mut s, b"ok").await;
    // ...and cannot bypass a deny.
    expect_all(&w, addr(&p), &[req(&format!("denied.test.:{t}")), req(&format!("DENIED.test:{t}"))], 403).await;
}

#[tokio::test]
async fn p07_long_hosts_and_targets() {
    let w = World::new().await;
    let p = w.proxy("").await;
    let label64 = format!("{}.test:443", "a".repeat(64));
    let name254 = format!("{}.test:443", vec!["a".repeat(49); 5].join("."));
    expect_all(&w, addr(&p), &[req(&label64), req(&name254)], 400).await;
    assert_eq!(w.dns.total_queries(), 0);
    let huge = format!("CONNECT {}.test:443 HTTP/1.1\r\n\r\n", "a".repeat(70 * 1024)).into_bytes();
    let host64k = format!("CONNECT {}:443 HTTP/1.1\r\n\r\n", "a".repeat(64 * 1024)).into_bytes();
    expect_all(&w, addr(&p), &[huge, host64k], 414).await;
}

#[tokio::test]
async fn p08_control_chars_and_escapes() {
    let w = World::new().await;
    let p = w.proxy("").await;
    let t = w.echo.addr.port();
    let cases: Vec<Vec<u8>> = [
        format!("CONNECT allo\0wed.test:{t} HTTP/1.1\r\n\r\n"),
        format!("CONNECT allowed.test\r:{t} HTTP/1.1\r\n\r\n"),
        format!("CONNECT allo wed.test:{t} HTTP/1.1\r\n\r\n"),
        format!("CONNECT allowed.test\t:{t} HTTP/1.1\r\n\r\n"),
        format!("CONNECT allowed.test\x7f:{t} HTTP/1.1\r\n\r\n"),
        format!("CONNECT allowed.test%00.evil:{t} HTTP/1.1\r\n\r\n"),
        format!("CONNECT %61llowed.test:{t} HTTP/1.1\r\n\r\n"),
    ]
    .iter()
    .map(|s| s.clone().into_bytes())
    .collect();
    expect_all(&w, addr(&p), &cases, 400).await;
}

#[tokio::test]
async fn p09_metacharacters_and_wrong_forms() {
    let w = World::new().await;
    let p = w.proxy("").await;
    let cases: Vec<Vec<u8>> = [
        "allowed.test/x:443",
        "allowed.test?x:443",
        "allowed.test#x:443",
        "evil.test\\@allowed.test:443",
        "a.test,b.test:443",
        "http://allowed.test:443",
        "/",
        "*",
    ]
    .iter()
    .map(|s| req(s))
    .collect();
    expect_all(&w, addr(&p), &cases, 400).await;
}

#[tokio::test]
async fn p11_duplicate_host() {
    let w = World::new().await;
    let p = w.proxy("").await;
    let t = w.echo_target("allowed.test");
    let cases = vec![
        format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\r\nHost: evil.test:443\r\n\r\n").into_bytes(),
        format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\r\nHost: {t}\r\n\r\n").into_bytes(),
        format!("CONNECT {t} HTTP/1.1\r\nHost: {t}, evil.test:443\r\n\r\n").into_bytes(),
    ];
    expect_all(&w, addr(&p), &cases, 400).await;
    // Decision 2: CONNECT without Host is accepted.
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    s.write_all(format!("CONNECT {t} HTTP/1.1\r\n\r\n").as_bytes()).await.unwrap();
    assert_eq!(read_head(&mut s).await.0, 200);
}

#[tokio::test]
async fn p13_whitespace_and_line_endings() {
    let w = World::new().await;
    let p = w.proxy("").await;
    let t = w.echo_target("allowed.test");
    let cases = vec![
        format!("CONNECT {t} HTTP/1.1\r\nHost : {t}\r\n\r\n").into_bytes(),
        format!("CONNECT {t} HTTP/1.1\r\nFoo\r\n\r\n").into_bytes(),
        format!("CONNECT {t} HTTP/1.1\r\n Host: x\r\n\r\n").into_bytes(),
        format!("CONNECT {t} HTTP/1.1\rHost: x\r\n\r\n").into_bytes(),
    ];
    expect_all(&w, addr(&p), &cases, 400).await;
    // Bare LF is accepted (RFC 9112 §2.2 MAY), consistently.
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    s.write_all(format!("CONNECT {t} HTTP/1.1\nHost: {t}\n\n").as_bytes()).await.unwrap();
    assert_eq!(read_head(&mut s).await.0, 200);
    roundtrip(&mut s, b"lf").await;
}

#[tokio::test]
async fn p15_connect_with_body_framing() {
    let w = World::new().await;
    let p = w.proxy("").await;
    let t = w.echo_target("allowed.test");
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    s.write_all(format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\r\nContent-Length: 0\r\n\r\n").as_bytes()).await.unwrap();
    assert_eq!(read_head(&mut s).await.0, 200);
    // The echo upstream has counted this tunnel once it answers through it.
    roundtrip(&mut s, b"x").await;
    let cases = vec![
        format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\r\nContent-Length: 5\r\n\r\nabcde").into_bytes(),
        format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n0\r\n\r\n")
            .into_bytes(),
    ];
    let before = w.echo.count();
    expect_all(&w, addr(&p), &cases, 400).await;
    assert_eq!(w.echo.count(), before);
}

#[tokio::test]
async fn p16_early_data_is_relayed_byte_for_byte() {
    let w = World::new().await;
    let p = w.proxy("").await;
    let t = w.echo_target("allowed.test");
    let head = format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n\r\n");
    let mut hello = vec![0x16, 0x03, 0x01, 0x02, 0x00];
    hello.extend((0..512u32).map(|i| (i % 251) as u8));
    // (a) one write: head + ClientHello
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    s.write_all(&[head.as_bytes(), &hello].concat()).await.unwrap();
    assert_eq!(read_head(&mut s).await.0, 200);
    let mut got = vec![0u8; hello.len()];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(got, hello);
    // (b) terminator split across writes
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    let bytes = [head.as_bytes(), &hello].concat();
    let cut = head.len() - 1;
    s.write_all(&bytes[..cut]).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    s.write_all(&bytes[cut..]).await.unwrap();
    assert_eq!(read_head(&mut s).await.0, 200);
    let mut got = vec![0u8; hello.len()];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(got, hello);
    // (c) 64 KiB of early data, more than one read buffer
    let big: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 253) as u8).collect();
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    let (mut r, mut wr) = s.split();
    let send = async {
        wr.write_all(&[head.as_bytes(), &big].concat()).await.unwrap();
    };
    let recv = async {
        assert_eq!(read_head(&mut r).await.0, 200);
        let mut got = vec![0u8; big.len()];
        r.read_exact(&mut got).await.unwrap();
        got
    };
    let ((), got) = tokio::join!(send, recv);
    assert!(got == big, "64 KiB early data corrupted");
}

#[tokio::test]
async fn p17_bytes_after_rejected_connect_are_never_parsed() {
    let w = World::new().await;
    // Allow the sink's address for everything except the CONNECT under test, so a parsed
    // pipelined request would be visible as a connection to it.
    let p = w.proxy("    - {name: sink, action: allow, cidrs: [\"127.0.0.3/32\"], ports: [1]}\n").await;
    let input = format!(
        "CONNECT 169.254.169.254:80 HTTP/1.1\r\nHost: 169.254.169.254:80\r\n\r\nGET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\nCONNECT {} HTTP/1.1\r\n\r\n",
        w.echo_target("allowed.test")
    );
    let (status, text) = exchange(addr(&p), input.as_bytes()).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("Connection: close"));
    assert_eq!(text.matches("HTTP/1.1").count(), 1, "exactly one response: {text}");
    let input =
        format!("CONNECT denied.test:443 HTTP/1.1\r\n\r\nCONNECT {} HTTP/1.1\r\n\r\n", w.echo_target("allowed.test"));
    let (status, text) = exchange(addr(&p), input.as_bytes()).await;
    assert_eq!(status, 403);
    assert_eq!(text.matches("HTTP/1.1").count(), 1, "{text}");
    assert_eq!(w.echo.count(), 0);
    assert_eq!(w.sink.count(), 0);
}

#[tokio::test]
async fn p18_non_connect_methods_get_405() {
    // A listener kept CONNECT-only (`http.enabled: false`); on others these are plain-HTTP requests.
    let w = World::new().await;
    let yaml = w.config("").replace(
        r#"{name: forward, bind: "127.0.0.1:0"}"#,
        r#"{name: forward, bind: "127.0.0.1:0", http: {enabled: false}}"#,
    );
    let p = start_proxy(&yaml).await;
    for input in [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"GET http://allowed.test/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n".to_vec(),
        b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        [
            b"POST http://allowed.test/ HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: 1048576\r\n\r\n".to_vec(),
            vec![b'a'; 1 << 20],
        ]
        .concat(),
    ] {
        let (status, text) = exchange(addr(&p), &input).await;
        assert_eq!(status, 405, "{text}");
        assert!(text.contains("Allow: CONNECT\r\n"));
    }
    assert_eq!(w.echo.count(), 0);
}

#[tokio::test]
async fn t11_inbound_proxy_protocol_header_is_not_trusted() {
    let w = World::new().await;
    let p = w.proxy("").await;
    let t = w.echo_target("allowed.test");
    let v1 = format!("PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\nCONNECT {t} HTTP/1.1\r\n\r\n").into_bytes();
    let v2 = [
        b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec(),
        vec![10, 0, 0, 1, 10, 0, 0, 2, 0, 1, 0, 2],
        format!("CONNECT {t} HTTP/1.1\r\n\r\n").into_bytes(),
    ]
    .concat();
    let (status, _) = exchange(addr(&p), &v1).await;
    assert_eq!(status, 400);
    let (status, _) = exchange(addr(&p), &v2).await;
    assert_eq!(status, 400);
    assert_eq!(w.echo.count(), 0);
}

#[tokio::test]
async fn t11_a_trusted_load_balancer_names_the_client_in_v1_or_v2() {
    let w = World::new().await;
    let backend = Upstream::echo("127.0.0.4").await;
    w.dns.set("lbonly.test", Answer::Addrs(vec!["127.0.0.4".parse().unwrap()]));
    let yaml = w
        .config("    - {name: lb-client, action: allow, clients: ['10.244.1.17/32'], hosts: [lbonly.test], cidrs: ['127.0.0.4/32']}\n")
        .replace(
            r#"{name: forward, bind: "127.0.0.1:0"}"#,
            r#"{name: forward, bind: "127.0.0.1:0", acceptProxyProtocolFrom: ['127.0.0.1/32']}"#,
        );
    let p = start_proxy(&yaml).await;
    let t = format!("lbonly.test:{}", backend.addr.port());
    // v1 naming the allowed client: the policy sees 10.244.1.17.
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    s.write_all(format!("PROXY TCP4 10.244.1.17 127.0.0.1 5555 3128\r\nCONNECT {t} HTTP/1.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (status, head) = read_head(&mut s).await;
    assert_eq!(status, 200, "{head}");
    roundtrip(&mut s, b"as 10.244.1.17").await;
    // v2 naming another client: that client is denied.
    let mut v2 = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    v2.extend_from_slice(&[10, 9, 9, 9, 127, 0, 0, 1, 0x15, 0xb3, 0x0c, 0x38]);
    v2.extend_from_slice(format!("CONNECT {t} HTTP/1.1\r\n\r\n").as_bytes());
    assert_eq!(exchange(addr(&p), &v2).await.0, 403);
    // From the trusted peer, a connection without a header is closed unanswered.
    let (status, text) = exchange(addr(&p), format!("CONNECT {t} HTTP/1.1\r\n\r\n").as_bytes()).await;
    assert_eq!((status, text.as_str()), (0, ""));
}
