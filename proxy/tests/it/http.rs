//! F-*, D-05 and the plain-HTTP forward path: raw sockets for malformed input, an upstream that
//! records exactly the bytes it received, curl against the real binary, and a real WebSocket
//! client and server through the proxy.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::binary::Proc;
use crate::support::*;

/// An upstream on 127.0.0.2 that records every request it receives, byte for byte (head and
/// body, framed by Content-Length or chunked), and answers each with `respond(head)`.
struct Recorder {
    up: Upstream,
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Recorder {
    async fn start(respond: fn(&str) -> Vec<u8>) -> Recorder {
        let requests: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let reqs = requests.clone();
        let up = Upstream::start("127.0.0.2", move |mut s| {
            let reqs = reqs.clone();
            async move {
                let mut buf: Vec<u8> = Vec::new();
                loop {
                    let Some(req) = read_request(&mut s, &mut buf).await else { return };
                    let head = String::from_utf8_lossy(&req).into_owned();
                    reqs.lock().unwrap().push(req);
                    let answer = respond(&head);
                    if s.write_all(&answer).await.is_err()
                        || String::from_utf8_lossy(&answer).contains("Connection: close")
                    {
                        return;
                    }
                }
            }
        })
        .await;
        Recorder { up, requests }
    }

    fn target(&self, path: &str) -> String {
        format!("http://allowed.test:{}{path}", self.up.addr.port())
    }

    fn authority(&self) -> String {
        format!("allowed.test:{}", self.up.addr.port())
    }

    fn seen(&self) -> Vec<String> {
        self.requests.lock().unwrap().iter().map(|r| String::from_utf8_lossy(r).into_owned()).collect()
    }
}

/// Reads one request (head + body) from `s`, keeping what follows in `buf`.
async fn read_request<S: tokio::io::AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut tmp = [0u8; 16384];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut tmp).await.ok().filter(|n| *n > 0)?;
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let len =
        head.lines().find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0)));
    let total = if let Some(len) = len {
        while buf.len() < head_end + len {
            let n = s.read(&mut tmp).await.ok().filter(|n| *n > 0)?;
            buf.extend_from_slice(&tmp[..n]);
        }
        head_end + len
    } else if head.contains("transfer-encoding: chunked") {
        let mut from = head_end;
        loop {
            if let Some(i) = buf[from..].windows(5).position(|w| w == b"0\r\n\r\n") {
                break from + i + 5;
            }
            from = buf.len().saturating_sub(4).max(head_end);
            let n = s.read(&mut tmp).await.ok().filter(|n| *n > 0)?;
            buf.extend_from_slice(&tmp[..n]);
        }
    } else {
        head_end
    };
    let req = buf[..total].to_vec();
    buf.drain(..total);
    Some(req)
}

fn ok_hello(_: &str) -> Vec<u8> {
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_vec()
}

/// Sends `bytes` on a new connection and reads until the proxy closes it.
async fn raw(p: &tunnelgate_proxy::app::ProxyHandle, bytes: &[u8]) -> (u16, String) {
    exchange(addr(p), bytes).await
}

/// Reads one response (head, and a Content-Length or chunked body) from `s`.
async fn read_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> (u16, String) {
    let mut buf = Vec::new();
    let Some(req) = read_request(s, &mut buf).await else {
        panic!("no complete response; got {:?}", String::from_utf8_lossy(&buf[..buf.len().min(2000)]))
    };
    let text = String::from_utf8_lossy(&req).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

#[tokio::test]
async fn absolute_form_get_is_forwarded_in_origin_form_with_a_regenerated_host() {
    let w = World::new().await;
    let up = Recorder::start(ok_hello).await;
    let p = w.proxy("").await;
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    let req = format!("GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: t\r\n\r\n", up.target("/a/b?q=1"), up.authority());
    s.write_all(req.as_bytes()).await.unwrap();
    let (status, text) = read_response(&mut s).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.ends_with("hello") && text.contains("Via: 1.1 tunnelgate"), "{text}");
    // Keep-alive: a second request, to another path, on the same client connection.
    s.write_all(format!("GET {} HTTP/1.1\r\nHost: {}\r\n\r\n", up.target("/c"), up.authority()).as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut s).await.0, 200);
    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    assert!(seen[0].starts_with("GET /a/b?q=1 HTTP/1.1\r\n"), "{}", seen[0]);
    assert!(seen[0].contains(&format!("Host: {}\r\n", up.authority())), "{}", seen[0]);
    assert!(seen[0].contains("Via: 1.1 tunnelgate\r\n"), "{}", seen[0]);
    assert!(!seen[0].to_ascii_lowercase().contains("x-forwarded-for"), "client addresses stay private by default");
    assert!(!seen[0].to_ascii_lowercase().contains("forwarded:"));
    assert_eq!(up.up.count(), 1, "the upstream connection was reused for the second request");
    assert_eq!(
        metric_when(
            p.admin,
            "tunnelgate_http_requests_total{code_class=\"2xx\",listener=\"forward\",method=\"GET\"}",
            |v| v == 2.0
        )
        .await,
        2.0
    );
}

#[tokio::test]
async fn f01_content_length_with_transfer_encoding_is_refused_and_closes() {
    let w = World::new().await;
    let up = Recorder::start(ok_hello).await;
    let p = w.proxy("").await;
    let a = up.authority();
    for body in [
        format!("POST {} HTTP/1.1\r\nHost: {a}\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG", up.target("/")),
        format!("POST {} HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\nG", up.target("/")),
        format!(
            "POST {} HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\nContent-Length: 31\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
            up.target("/")
        ),
    ] {
        let input = format!("{body}GET {} HTTP/1.1\r\nHost: {a}\r\n\r\n", up.target("/second"));
        let (status, text) = raw(&p, input.as_bytes()).await;
        // hyper's reading of RFC 9112 §6.1 (as HAProxy's): chunked framing wins, the length is
        // dropped, and the connection closes after the response. Envoy answers 400; both are safe.
        assert!(status == 400 || status == 200, "{text}");
        assert!(text.contains("Connection: close"), "{text}");
        assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "/second is never processed: {text}");
    }
    for r in up.seen() {
        let lower = r.to_ascii_lowercase();
        assert!(!lower.contains("content-length"), "the upstream never sees both framings: {r}");
        assert!(r.ends_with("0\r\n\r\n"), "the body ended at the last chunk: {r:?}");
    }
    assert!(!up.seen().iter().any(|r| r.contains("/second") || r.contains("/smuggled") || r.starts_with('G')));
}

#[tokio::test]
async fn f02_transfer_encoding_variants_and_http10_are_refused() {
    let w = World::new().await;
    let up = Recorder::start(ok_hello).await;
    let p = w.proxy("").await;
    let a = up.authority();
    for te in ["chunked, chunked", "chunked, gzip, chunked", "gzip", "chunked, identity", "xchunked", "chunked,", ""] {
        let input =
            format!("POST {} HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: {te}\r\n\r\n0\r\n\r\n", up.target("/"));
        let (status, text) = raw(&p, input.as_bytes()).await;
        assert_eq!(status, 400, "{te:?}: {text}");
    }
    let two = format!(
        "POST {} HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        up.target("/")
    );
    assert_eq!(raw(&p, two.as_bytes()).await.0, 400);
    let http10 =
        format!("POST {} HTTP/1.0\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", up.target("/"));
    assert_eq!(raw(&p, http10.as_bytes()).await.0, 400);
    assert!(up.seen().is_empty(), "{:?}", up.seen());
    // Valid spellings are accepted and re-serialized as chunked.
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    let ok = format!(
        "POST {} HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding:\tCHUNKED\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        up.target("/")
    );
    s.write_all(ok.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut s).await.0, 200);
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].contains("Transfer-Encoding: chunked\r\n") && seen[0].ends_with("3\r\nabc\r\n0\r\n\r\n"),
        "{}",
        seen[0]
    );
}

#[tokio::test]
async fn f03_malformed_content_length_is_refused() {
    let w = World::new().await;
    let up = Recorder::start(ok_hello).await;
    let p = w.proxy("").await;
    let a = up.authority();
    for cl in [
        "Content-Length: +5",
        "Content-Length: -1",
        "Content-Length: 0x5",
        "Content-Length: 5 5",
        "Content-Length: 5,6",
        "Content-Length: 5\r\nContent-Length: 6",
        "Content-Length: 99999999999999999999",
        "Content-Length: ",
        "Content-Length : 5",
    ] {
        let input = format!("POST {} HTTP/1.1\r\nHost: {a}\r\n{cl}\r\n\r\nhello", up.target("/"));
        let (status, text) = raw(&p, input.as_bytes()).await;
        assert_eq!(status, 400, "{cl:?}: {text}");
    }
    assert!(up.seen().is_empty(), "{:?}", up.seen());
    // `5, 5`: RFC 9112 §6.3 lets a recipient reject the list or reduce it; hyper rejects it.
    let input = format!("POST {} HTTP/1.1\r\nHost: {a}\r\nContent-Length: 5, 5\r\n\r\nhello", up.target("/"));
    assert_eq!(raw(&p, input.as_bytes()).await.0, 400);
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    s.write_all(format!("POST {} HTTP/1.1\r\nHost: {a}\r\nContent-Length: 5\r\n\r\nhello", up.target("/")).as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut s).await.0, 200);
    let seen = up.seen();
    assert!(seen[0].contains("Content-Length: 5\r\n") && seen[0].ends_with("\r\n\r\nhello"), "{}", seen[0]);
}

#[tokio::test]
async fn f04_chunked_decoder_abuse_never_smuggles() {
    let w = World::new().await;
    let up = Recorder::start(ok_hello).await;
    let p = w.proxy("").await;
    let a = up.authority();
    let sneaky = "GET /sneaky HTTP/1.1\r\nHost: x\r\n\r\n";
    for body in [
        format!("f0000000000000003\r\nabc\r\n0\r\n\r\n{sneaky}"),
        format!("\r\nabc\r\n0\r\n\r\n{sneaky}"),
        format!("0x5\r\nhello\r\n0\r\n\r\n{sneaky}"),
        format!("-5\r\nhello\r\n0\r\n\r\n{sneaky}"),
        format!("5;{}\r\nhello\r\n0\r\n\r\n{sneaky}", "e".repeat(1 << 20)),
    ] {
        let input =
            format!("POST {} HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\n\r\n{body}", up.target("/"));
        let (status, text) = raw(&p, input.as_bytes()).await;
        assert!(status == 400 || status == 0, "{}", &text[..text.len().min(300)]);
    }
    assert!(!up.seen().iter().any(|r| r.contains("/sneaky")), "/sneaky reached the upstream");
    // A hundred thousand one-byte chunks: linear, and delivered whole.
    let s = TcpStream::connect(addr(&p)).await.unwrap();
    let mut input =
        format!("POST {} HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\n\r\n", up.target("/many")).into_bytes();
    for _ in 0..100_000 {
        input.extend_from_slice(b"1\r\nx\r\n");
    }
    input.extend_from_slice(b"0\r\n\r\n");
    let (mut r, mut wr) = s.into_split();
    let writer = tokio::spawn(async move { wr.write_all(&input).await.unwrap() });
    assert_eq!(read_response(&mut r).await.0, 200);
    writer.await.unwrap();
    let many = up.seen().into_iter().find(|r| r.contains("/many")).unwrap();
    assert_eq!(many.matches('x').count(), 100_000);
}

#[tokio::test]
async fn f05_absolute_form_authority_confusion() {
    let w = World::new().await;
    let up = Recorder::start(ok_hello).await;
    let p = w.proxy("").await;
    let port = up.up.addr.port();
    for target in [
        format!("http://allowed.test@evil.test:{port}/"),
        format!("http://user:pw@allowed.test:{port}/"),
        format!("http://evil.test\\@allowed.test:{port}/"),
        format!("http://evil.test%2f@allowed.test:{port}/"),
        format!("http://allowed.test:{port}@evil.test:{port}/"),
        format!("http://0x7f.1:{port}/"),
        format!("http://127.1:{port}/"),
        format!("http://[fe80::1%25eth0]:{port}/"),
    ] {
        let (status, text) = raw(&p, format!("GET {target} HTTP/1.1\r\nHost: allowed.test\r\n\r\n").as_bytes()).await;
        assert_eq!(status, 400, "{target}: {text}");
    }
    let (status, _) = raw(&p, b"GET http://[::ffff:a9fe:a9fe]/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status, 403, "the IPv4-mapped metadata literal");
    // `#` ends the authority (URL semantics): the target is evil.test, and that is what the policy
    // judges and what would be dialled; here it resolves to a refused address.
    w.dns.set("evil.test", Answer::Addrs(vec!["127.0.0.3".parse().unwrap()]));
    let input = format!("GET http://evil.test#@allowed.test:{port}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let (status, text) = raw(&p, input.as_bytes()).await;
    assert!(status == 400 || status == 403, "{text}");
    assert_eq!(w.sink.count(), 0);
    assert!(up.seen().is_empty());
}

#[tokio::test]
async fn f06_host_header_never_routes() {
    let w = World::new().await;
    let up = Recorder::start(ok_hello).await;
    let p = w.proxy("").await;
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    s.write_all(format!("GET {} HTTP/1.1\r\nHost: internal.attacker.test\r\n\r\n", up.target("/")).as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut s).await.0, 200);
    let seen = up.seen();
    assert!(
        seen[0].contains(&format!("Host: {}\r\n", up.authority())),
        "Host is regenerated from the target: {}",
        seen[0]
    );
    assert!(!seen[0].contains("internal.attacker.test"));
    let dup = format!("GET {} HTTP/1.1\r\nHost: {}\r\nHost: internal.test\r\n\r\n", up.target("/"), up.authority());
    assert_eq!(raw(&p, dup.as_bytes()).await.0, 400);
    assert_eq!(w.sink.count(), 0);
}

#[tokio::test]
async fn f07_schemes_other_than_http_and_origin_form_are_refused() {
    let w = World::new().await;
    let up = Recorder::start(ok_hello).await;
    let p = w.proxy("").await;
    let port = up.up.addr.port();
    for target in [
        format!("https://allowed.test:{port}/"),
        format!("ftp://allowed.test:{port}/"),
        "gopher://allowed.test:70/_x".to_owned(),
        "file:///etc/passwd".to_owned(),
        format!("//allowed.test:{port}/"),
        "/".to_owned(),
        "*".to_owned(),
    ] {
        let (status, text) = raw(&p, format!("GET {target} HTTP/1.1\r\nHost: allowed.test\r\n\r\n").as_bytes()).await;
        assert!(status == 400 || status == 405, "{target}: {text}");
        assert!(text.contains("onnection: close"), "{target}: {text}");
    }
    assert!(up.seen().is_empty());
}

#[tokio::test]
async fn f08_hop_by_hop_fields_and_credentials_never_reach_the_upstream() {
    let w = World::new().await;
    let up = Recorder::start(ok_hello).await;
    let p = w.proxy("").await;
    let a = up.authority();
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {a}\r\nConnection: keep-alive, X-Internal-Auth\r\nX-Internal-Auth: secret\r\nProxy-Authorization: Basic dTpw\r\nProxy-Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: h2c\r\nX-A: 1\r\n\r\n",
        up.target("/")
    );
    s.write_all(req.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut s).await.0, 200);
    // Bare LF, odd case, extra OWS: re-encoded with CRLF and trimmed values.
    let lf = format!("GET {} HTTP/1.1\nhOsT: {a}\nX-B:  v  \nX-A: 1\nX-C: 2\nX-A: 3\n\n", up.target("/lf"));
    s.write_all(lf.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut s).await.0, 200);
    let seen = up.seen();
    let first = seen[0].to_ascii_lowercase();
    for gone in [
        "x-internal-auth",
        "proxy-authorization",
        "proxy-connection",
        "keep-alive",
        "\r\nte:",
        "upgrade",
        "connection:",
    ] {
        assert!(!first.contains(gone), "{gone} in {}", seen[0]);
    }
    assert!(seen[0].contains("X-A: 1\r\n"));
    let second = &seen[1];
    assert!(!second.contains("\n\n") && second.contains("X-B: v\r\n"), "re-encoded: {second:?}");
    assert!(second.contains("X-A: 1\r\nX-A: 3\r\n"), "repeated fields keep their order: {second:?}");
}

#[tokio::test]
async fn f09_only_a_101_to_an_upgrade_request_switches() {
    fn upgrade_echo_200(head: &str) -> Vec<u8> {
        let _ = head;
        b"HTTP/1.1 200 OK\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: 2\r\n\r\nok".to_vec()
    }
    let w = World::new().await;
    let up = Recorder::start(upgrade_echo_200).await;
    let p = w.proxy("").await;
    let a = up.authority();
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    let smuggle = "GET /admin HTTP/1.1\r\nHost: allowed.test\r\n\r\n";
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {a}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: {}\r\n\r\n{smuggle}",
        up.target("/"),
        smuggle.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let (status, text) = read_response(&mut s).await;
    assert_eq!(status, 200, "{text}");
    assert!(!text.to_ascii_lowercase().contains("upgrade"), "a 200 does not switch: {text}");
    // Still HTTP: the next request is parsed as a request, not relayed raw.
    s.write_all(format!("GET {} HTTP/1.1\r\nHost: {a}\r\n\r\n", up.target("/next")).as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut s).await.0, 200);
    let seen = up.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen[0].ends_with(smuggle), "the body went as a body");
    assert!(!seen.iter().any(|r| r.starts_with("GET /admin")), "/admin was never a request");
    assert_eq!(metric_when(p.admin, "tunnelgate_tunnels_active", |v| v == 0.0).await, 0.0);
}

#[tokio::test]
async fn f09_an_unasked_101_is_a_bad_gateway() {
    fn switch(_: &str) -> Vec<u8> {
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n".to_vec()
    }
    let w = World::new().await;
    let up = Recorder::start(switch).await;
    let p = w.proxy("").await;
    let req = format!("GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", up.target("/"), up.authority());
    let (status, text) = raw(&p, req.as_bytes()).await;
    assert_eq!(status, 502, "{text}");
}

#[tokio::test]
async fn f10_upstream_smuggling_splitting_and_over_limit_responses() {
    fn respond(head: &str) -> Vec<u8> {
        if head.starts_with("GET /split") {
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 30\r\n\r\n0\r\n\r\nResponse splitting attach".to_vec()
        } else if head.starts_with("GET /fold") {
            b"HTTP/1.1 200 OK\r\nX-A: one\r\n two\r\nContent-Length: 2\r\n\r\nok".to_vec()
        } else if head.starts_with("GET /huge") {
            format!("HTTP/1.1 200 OK\r\nX-Big: {}\r\nContent-Length: 2\r\n\r\nok", "a".repeat(1 << 20)).into_bytes()
        } else if head.starts_with("GET /short") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\nhello".to_vec()
        } else {
            ok_hello(head)
        }
    }
    let w = World::new().await;
    let up = Recorder::start(respond).await;
    let p = w.proxy("").await;
    let a = up.authority();
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    s.write_all(format!("GET {} HTTP/1.1\r\nHost: {a}\r\n\r\n", up.target("/split")).as_bytes()).await.unwrap();
    let (status, text) = read_response(&mut s).await;
    assert_eq!(status, 200);
    assert!(!text.to_ascii_lowercase().contains("content-length"), "CL stripped: {text}");
    assert!(text.ends_with("0\r\n\r\n") && !text.contains("attach"), "one response, chunked: {text}");
    // The upstream connection with the stray bytes is not reused.
    let before = up.up.count();
    s.write_all(format!("GET {} HTTP/1.1\r\nHost: {a}\r\n\r\n", up.target("/after")).as_bytes()).await.unwrap();
    let (status, text) = read_response(&mut s).await;
    assert_eq!((status, text.ends_with("hello")), (200, true), "{text}");
    assert_eq!(up.up.count(), before + 1);
    for path in ["/fold", "/huge"] {
        let req = format!("GET {} HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\n\r\n", up.target(path));
        assert_eq!(raw(&p, req.as_bytes()).await.0, 502, "{path}");
    }
    // Truncated body: the client connection is closed, nothing is padded.
    let req = format!("GET {} HTTP/1.1\r\nHost: {a}\r\n\r\n", up.target("/short"));
    let (status, text) = raw(&p, req.as_bytes()).await;
    assert_eq!(status, 200);
    assert!(text.ends_with("\r\n\r\nhello"), "{text:?}");
}

#[tokio::test]
async fn connect_after_http_on_the_same_connection() {
    let w = World::new().await;
    let up = Recorder::start(ok_hello).await;
    let p = w.proxy("").await;
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    s.write_all(format!("GET {} HTTP/1.1\r\nHost: {}\r\n\r\n", up.target("/"), up.authority()).as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut s).await.0, 200);
    let t = w.echo_target("allowed.test");
    s.write_all(format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n\r\n").as_bytes()).await.unwrap();
    let (status, head) = read_head(&mut s).await;
    assert_eq!(status, 200, "{head}");
    roundtrip(&mut s, b"through the tunnel").await;
    assert_eq!(metric_when(p.admin, "tunnelgate_tunnels_active{listener=\"forward\"}", |v| v == 1.0).await, 1.0);
    // Bytes sent in the same write as the CONNECT (read ahead with its head) go through first.
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    s.write_all(format!("GET {} HTTP/1.1\r\nHost: {}\r\n\r\n", up.target("/"), up.authority()).as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut s).await.0, 200);
    s.write_all(format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n\r\nsent early").as_bytes()).await.unwrap();
    let (status, head) = read_head(&mut s).await;
    assert_eq!(status, 200, "{head}");
    let mut early = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut early)).await.unwrap().unwrap();
    assert_eq!(&early, b"sent early");
    roundtrip(&mut s, b"and after").await;
}

#[tokio::test]
async fn denied_and_private_targets_get_403_and_nothing_is_dialled() {
    let w = World::new().await;
    let p = w.proxy("").await;
    let sink = w.sink.addr.port();
    for target in [
        format!("http://denied.test:{sink}/"),
        format!("http://internal.attacker.test:{sink}/"),
        format!("http://127.0.0.3:{sink}/"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://metadata.google.internal/".to_owned(),
    ] {
        let (status, text) =
            raw(&p, format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await;
        assert_eq!(status, 403, "{target}: {text}");
        // Refused by the policy (default deny here): the client learns that, nothing about the target.
        let lower = text.to_ascii_lowercase();
        assert!(lower.contains("proxy-status: tunnelgate; error=http_request_denied"), "{target}: {text}");
    }
    assert_eq!(w.sink.count(), 0);
    let (status, text) = raw(&p, b"GET http://nxdomain.test/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status, 502, "a name that does not resolve, as for CONNECT");
    assert!(text.to_ascii_lowercase().contains("proxy-status: tunnelgate; error=dns_error"), "{text}");
}

#[tokio::test]
async fn forwarded_for_only_when_the_listener_opts_in_and_via_pseudonym() {
    let w = World::new().await;
    let up = Recorder::start(ok_hello).await;
    let yaml = w.config("").replace(
        r#"{name: forward, bind: "127.0.0.1:0"}"#,
        r#"{name: forward, bind: "127.0.0.1:0", http: {forwardedFor: true, via: egress-1}}"#,
    );
    let p = start_proxy(&yaml).await;
    let req = format!("GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", up.target("/"), up.authority());
    let (status, text) = raw(&p, req.as_bytes()).await;
    assert_eq!(status, 200);
    assert!(text.contains("Via: 1.1 egress-1"), "{text}");
    let seen = up.seen();
    assert!(
        seen[0].contains("X-Forwarded-For: 127.0.0.1\r\n") && seen[0].contains("Forwarded: for=127.0.0.1\r\n"),
        "{}",
        seen[0]
    );
    assert!(seen[0].contains("Via: 1.1 egress-1\r\n"));
}

#[tokio::test]
async fn per_client_request_rate_limit_answers_429_with_retry_after() {
    let w = World::new().await;
    let up = Recorder::start(ok_hello).await;
    let yaml = w.config("").replace(
        "limits: {drainDelay: 0s, requestHeadTimeout: 5s}",
        "limits: {drainDelay: 0s, requestHeadTimeout: 5s, requestsPerSecond: 1, requestBurst: 2}",
    );
    let p = start_proxy(&yaml).await;
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    let req = format!("GET {} HTTP/1.1\r\nHost: {}\r\n\r\n", up.target("/"), up.authority());
    let mut statuses = Vec::new();
    for _ in 0..3 {
        s.write_all(req.as_bytes()).await.unwrap();
        let (status, text) = read_response(&mut s).await;
        if status == 429 {
            assert!(text.contains("Retry-After: 1\r\n"), "{text}");
        }
        statuses.push(status);
    }
    assert_eq!(statuses, [200, 200, 429]);
    // CONNECT draws from the same bucket.
    let (status, text) =
        raw(&p, format!("CONNECT {} HTTP/1.1\r\n\r\n", w.echo_target("allowed.test")).as_bytes()).await;
    assert_eq!(status, 429, "{text}");
    assert_eq!(up.seen().len(), 2);
}

/// A hyper upstream on 127.0.0.2: `/small` (5 bytes), `/chunked` (streamed, no length), `/sha`
/// (SHA-256 of the request body, streamed through), `/slow` (answers after 1.5 s).
pub(crate) async fn hyper_upstream() -> Upstream {
    Upstream::start("127.0.0.2", |s| async move {
        let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
            let path = req.uri().path().to_owned();
            let body: http_body_util::combinators::BoxBody<Bytes, Infallible> = match path.as_str() {
                "/chunked" => {
                    let chunks =
                        (0..100).map(|i| Ok::<_, Infallible>(Frame::data(Bytes::from(format!("chunk {i}\n")))));
                    BodyExt::boxed(StreamBody::new(futures::stream::iter(chunks)))
                }
                "/sha" => {
                    let mut h = Sha256::new();
                    let mut b = req.into_body();
                    while let Some(f) = b.frame().await {
                        if let Ok(d) = f.unwrap().into_data() {
                            h.update(&d);
                        }
                    }
                    Full::new(Bytes::from(hex::encode(h.finalize()))).boxed()
                }
                "/slow" => {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    Full::new(Bytes::from_static(b"slow")).boxed()
                }
                _ => Full::new(Bytes::from_static(b"small")).boxed(),
            };
            Ok::<_, Infallible>(Response::new(body))
        });
        let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
    })
    .await
}

fn curl(proxy: std::net::SocketAddr, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "120", "-x", &format!("http://{proxy}")])
        .args(args)
        .output()
        .expect("curl is installed (.ci/run installs it)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test]
async fn curl_through_the_binary_get_head_post_100mib_chunked_keepalive() {
    let w = World::new().await;
    let up = hyper_upstream().await;
    let p = Proc::start(&w, "").await;
    let base = format!("http://allowed.test:{}", up.addr.port());
    let listen = p.listen;
    let b = base.clone();
    let (code, out) = tokio::task::spawn_blocking(move || curl(listen, &[&format!("{b}/small")])).await.unwrap();
    assert_eq!((code, out.as_str()), (0, "small"));
    let b = base.clone();
    let (code, out) = tokio::task::spawn_blocking(move || curl(listen, &["-I", &format!("{b}/small")])).await.unwrap();
    assert!(code == 0 && out.starts_with("HTTP/1.1 200 OK") && out.contains("Content-Length: 5"), "{out}");
    let b = base.clone();
    let (code, out) = tokio::task::spawn_blocking(move || curl(listen, &[&format!("{b}/chunked")])).await.unwrap();
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 100);
    // 100 MiB streamed up, SHA-256 compared.
    let dir = crate::tls::TempDir::new("post");
    let file = dir.0.join("body.bin");
    let mut data = vec![0u8; 100 << 20];
    let mut x: u32 = 1;
    for byte in &mut data {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        *byte = (x >> 16) as u8;
    }
    std::fs::write(&file, &data).unwrap();
    let want = hex::encode(Sha256::digest(&data));
    drop(data);
    let b = base.clone();
    let f = file.to_str().unwrap().to_owned();
    let (code, out) = tokio::task::spawn_blocking(move || {
        curl(listen, &["-X", "POST", "-H", "Transfer-Encoding: chunked", "-T", &f, &format!("{b}/sha")])
    })
    .await
    .unwrap();
    assert_eq!((code, out), (0, want));
    // Keep-alive reuse: one client connection, five requests, one upstream connection.
    let before = up.count();
    let b = base.clone();
    let (code, out) = tokio::task::spawn_blocking(move || {
        let urls: Vec<String> = (0..5).map(|_| format!("{b}/small")).collect();
        let args: Vec<&str> = urls.iter().map(String::as_str).collect();
        curl(listen, &args)
    })
    .await
    .unwrap();
    assert_eq!((code, out.as_str()), (0, "smallsmallsmallsmallsmall"));
    assert!(up.count() <= before + 1, "at most one new upstream connection for five keep-alive requests");
}

#[tokio::test]
async fn a_hundred_concurrent_clients() {
    let w = World::new().await;
    let up = hyper_upstream().await;
    let p = w.proxy("").await;
    let proxy = addr(&p);
    let port = up.addr.port();
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(proxy).await.unwrap();
                let req = format!("GET http://allowed.test:{port}/small?{i} HTTP/1.1\r\nHost: allowed.test\r\n\r\n");
                s.write_all(req.as_bytes()).await.unwrap();
                read_response(&mut s).await
            })
        })
        .collect();
    for t in tasks {
        let (status, text) = t.await.unwrap();
        assert!(status == 200 && text.ends_with("small"), "{text}");
    }
    assert_eq!(metric_when(p.admin, "tunnelgate_http_requests_total{code_class=\"2xx\"", |v| v == 100.0).await, 100.0);
}

#[tokio::test]
async fn d05_drain_closes_idle_keepalive_and_finishes_requests_in_flight_with_close() {
    let w = World::new().await;
    let up = hyper_upstream().await;
    let p = w.proxy("").await;
    let port = up.addr.port();
    // Idle keep-alive connections: one request done, then nothing.
    let mut idle = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(addr(&p)).await.unwrap();
        s.write_all(format!("GET http://allowed.test:{port}/small HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        assert_eq!(read_response(&mut s).await.0, 200);
        idle.push(s);
    }
    // Requests in flight: the upstream answers after 1.5 s.
    let mut busy = Vec::new();
    for _ in 0..5 {
        let mut s = TcpStream::connect(addr(&p)).await.unwrap();
        s.write_all(format!("GET http://allowed.test:{port}/slow HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        busy.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let inner = p.inner.clone();
    p.begin_shutdown();
    // Idle ones close at once (well before the in-flight answers).
    for mut s in idle {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(1), s.read(&mut b)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "idle keep-alive connection closed: {r:?}");
    }
    for mut s in busy {
        let (status, text) = read_to_close(&mut s).await;
        assert_eq!(status, 200, "{text}");
        assert!(text.contains("Connection: close") && text.ends_with("slow"), "{text}");
    }
    assert!(eventually(5, || async { inner.tracker.is_empty() }).await, "drained");
}

/// A WebSocket echo server on 127.0.0.2 (tokio-tungstenite).
pub(crate) async fn websocket_echo() -> Upstream {
    Upstream::start("127.0.0.2", |s| async move {
        let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else { return };
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                break;
            }
            if ws.send(msg).await.is_err() {
                return;
            }
        }
    })
    .await
}

/// Opens a WebSocket through the proxy with an absolute-form upgrade request.
pub(crate) async fn websocket_through(proxy: std::net::SocketAddr, port: u16) -> WebSocketStream<TcpStream> {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let req = format!(
        "GET http://allowed.test:{port}/chat HTTP/1.1\r\nHost: allowed.test:{port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let (status, head) = read_head(&mut s).await;
    assert_eq!(status, 101, "{head}");
    assert!(head.to_ascii_lowercase().contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n"), "{head}");
    WebSocketStream::from_raw_socket(s, Role::Client, None).await
}

#[tokio::test]
async fn websocket_messages_both_ways_close_handshake_counted_and_drained() {
    let w = World::new().await;
    let up = websocket_echo().await;
    let p = w.proxy("").await;
    let mut ws = websocket_through(addr(&p), up.addr.port()).await;
    for i in 0..10 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(format!("hello {i}")));
    }
    ws.send(Message::binary(vec![7u8; 100_000])).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap().into_data().len(), 100_000);
    assert_eq!(metric_when(p.admin, "tunnelgate_tunnels_active{listener=\"forward\"}", |v| v == 1.0).await, 1.0);
    // SIGTERM-like drain: the upgraded tunnel keeps the proxy alive while it is open.
    let inner = p.inner.clone();
    p.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(inner.tunnels.active(), 1, "the drain waits for the upgraded tunnel");
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("still here"));
    ws.close(None).await.unwrap();
    while let Some(Ok(m)) = ws.next().await {
        if m.is_close() {
            break;
        }
    }
    drop(ws);
    assert!(eventually(5, || async { inner.tunnels.active() == 0 && inner.tracker.is_empty() }).await);
}

#[tokio::test]
async fn websocket_idle_timeout_applies() {
    let w = World::new().await;
    let up = websocket_echo().await;
    let p = w.proxy("relay: {idleTimeout: 500ms}\n").await;
    let mut ws = websocket_through(addr(&p), up.addr.port()).await;
    ws.send(Message::text("x")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("x"));
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.expect("closed by the idle timeout");
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");
    assert!(
        eventually(5, || async {
            metric(p.admin, "tunnelgate_tunnel_duration_seconds_count{close=\"idle_timeout\"}").await == 1.0
        })
        .await
    );
}

#[tokio::test]
async fn an_upgraded_connection_keeps_its_slot_under_the_connection_caps() {
    let w = World::new().await;
    let up = websocket_echo().await;
    let yaml = w.config("").replace("limits: {drainDelay: 0s", "limits: {maxConnectionsPerClient: 1, drainDelay: 0s");
    let p = start_proxy(&yaml).await;
    let mut ws = websocket_through(addr(&p), up.addr.port()).await;
    ws.send(Message::text("x")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("x"));
    // The upgraded connection is still this client's one connection: a second one is refused.
    let t = w.echo_target("allowed.test");
    let (status, text) = exchange(addr(&p), format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n\r\n").as_bytes()).await;
    assert_eq!(status, 429, "{text}");
    // The refused connection is counted until its task ends, just after the client saw the close.
    assert_eq!(metric_when(p.admin, "tunnelgate_connections_open", |v| v == 1.0).await, 1.0);
    drop(ws);
    assert!(eventually(5, || async { metric(p.admin, "tunnelgate_connections_open").await == 0.0 }).await);
    let mut s = tunnel(addr(&p), &w.echo_target("allowed.test")).await;
    roundtrip(&mut s, b"the slot came back").await;
}

/// A refusal on the plain-HTTP path ends the connection, as on the CONNECT path: `Connection:
/// close`, and nothing pipelined behind the refused request is read.
#[tokio::test]
async fn refusals_on_the_plain_http_path_close_the_connection() {
    let w = World::new().await;
    let up = Recorder::start(ok_hello).await;
    let p = w.proxy("").await;
    let denied = format!("http://denied.test:{}/", up.up.addr.port());
    let pipelined = format!(
        "GET {denied} HTTP/1.1\r\nHost: x\r\n\r\nGET {} HTTP/1.1\r\nHost: {}\r\n\r\n",
        up.target("/after"),
        up.authority()
    );
    let (status, text) = raw(&p, pipelined.as_bytes()).await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("Connection: close\r\n"), "{text}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "the pipelined request was not served: {text}");
    assert!(up.seen().is_empty());
}

/// Idle upstream connections are kept per client: a second request of the same client reuses one,
/// another client's never does (with an upstream that ignores a GET's body, a request smuggled in
/// one client's body was answered to the next client on the shared connection).
#[tokio::test]
async fn upstream_connections_are_reused_only_by_the_client_that_opened_them() {
    let w = World::new().await;
    let up = Recorder::start(ok_hello).await;
    let p = w.proxy("").await;
    let get = |path: &str| {
        format!("GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", up.target(path), up.authority())
    };
    let from = |ip: &'static str, req: String| {
        let proxy = addr(&p);
        async move {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
            let mut s = sock.connect(proxy).await.unwrap();
            s.write_all(req.as_bytes()).await.unwrap();
            read_to_close(&mut s).await.0
        }
    };
    assert_eq!(from("127.0.0.1", get("/x1")).await, 200);
    assert_eq!(from("127.0.0.1", get("/x2")).await, 200);
    assert_eq!(up.up.count(), 1, "the same client reuses its idle upstream connection");
    assert_eq!(from("127.0.0.9", get("/y1")).await, 200);
    assert_eq!(up.up.count(), 2, "another client gets a connection of its own");
    assert_eq!(from("127.0.0.1", get("/x3")).await, 200);
    assert_eq!(up.up.count(), 2, "and the first client's is still there for it");
}

/// A rule's relay limits hold for plain HTTP as for tunnels, per request: a download stops at
/// `maxTotalBytes` (the connection closes), an upload is cut there too (413 when no response had
/// begun) and never reaches the upstream past it, a request still running at `maxLifetime` is cut;
/// both directions are counted in `tunnelgate_relayed_bytes_total`.
#[tokio::test]
async fn relay_limits_of_the_rule_apply_to_plain_http_requests() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let w = World::new().await;
    let received = Arc::new(AtomicU64::new(0));
    let got = received.clone();
    let up = Upstream::start("127.0.0.2", move |s| {
        let got = got.clone();
        async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let got = got.clone();
                async move {
                    let body: http_body_util::combinators::BoxBody<Bytes, Infallible> = match req.uri().path() {
                        "/big" => Full::new(Bytes::from(vec![b'x'; 8 << 20])).boxed(),
                        "/upload" => {
                            let mut b = req.into_body();
                            while let Some(Ok(f)) = b.frame().await {
                                got.fetch_add(f.data_ref().map_or(0, |d| d.len() as u64), Ordering::SeqCst);
                            }
                            Full::new(Bytes::from_static(b"stored")).boxed()
                        }
                        _ => {
                            // A byte every 200 ms for 3 s.
                            let drip = futures::stream::iter(0..15).then(|_| async {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                Ok::<_, Infallible>(Frame::data(Bytes::from_static(b".")))
                            });
                            BodyExt::boxed(StreamBody::new(drip))
                        }
                    };
                    Ok::<_, Infallible>(Response::new(body))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
        }
    })
    .await;
    // The rule that opens the loopback upstream's address is the one whose limits apply.
    let yaml = w.config("").replace(
        r#"cidrs: ["127.0.0.2/32"]}"#,
        r#"cidrs: ["127.0.0.2/32"], relay: {maxTotalBytes: 100000, maxLifetime: 2s}}"#,
    );
    assert!(yaml.contains("maxTotalBytes"));
    let p = start_proxy(&yaml).await;
    let port = up.addr.port();
    let down_before = metric(p.admin, "tunnelgate_relayed_bytes_total{direction=\"downstream\"").await;

    // 8 MiB offered: 100,000 bytes of body arrive, then the connection closes.
    let req = format!("GET http://allowed.test:{port}/big HTTP/1.1\r\nHost: allowed.test\r\n\r\n");
    let (status, text) = raw(&p, req.as_bytes()).await;
    assert_eq!(status, 200);
    let body = text.split_once("\r\n\r\n").map_or(0, |(_, b)| b.len());
    assert_eq!(body, 100_000, "the download stops exactly at maxTotalBytes");
    let down = metric(p.admin, "tunnelgate_relayed_bytes_total{direction=\"downstream\"").await - down_before;
    assert_eq!(down, 100_000.0);

    // 5 MB up: the upstream never gets more than the budget; the client gets 413.
    let mut s = TcpStream::connect(addr(&p)).await.unwrap();
    let len = 5_000_000;
    s.write_all(
        format!(
            "POST http://allowed.test:{port}/upload HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: {len}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (mut r, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'u'; 65536];
        let mut sent = 0;
        while sent < len {
            if wr.write_all(&chunk[..chunk.len().min(len - sent)]).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
    });
    let (status, text) = read_to_close(&mut r).await;
    writer.abort();
    assert!(status == 413 || status == 0, "{text}");
    if status == 413 {
        assert!(text.contains("relay limit (byte_limit)") && text.contains("Connection: close"), "{text}");
    }
    assert!(eventually(5, || async { received.load(Ordering::SeqCst) > 0 }).await, "the upload began");
    assert!(
        received.load(Ordering::SeqCst) <= 100_000,
        "{} bytes reached the upstream",
        received.load(Ordering::SeqCst)
    );
    // What the proxy passed on is counted: at least what arrived, never past the budget.
    let up_bytes = metric(p.admin, "tunnelgate_relayed_bytes_total{direction=\"upstream\"").await;
    assert!(
        up_bytes >= received.load(Ordering::SeqCst) as f64 && up_bytes <= 100_000.0 && up_bytes > 0.0,
        "uploads are counted: {up_bytes}"
    );

    // A response that would take 3 s is cut at the 2 s lifetime: not every byte arrives.
    let req = format!("GET http://allowed.test:{port}/drip HTTP/1.1\r\nHost: allowed.test\r\n\r\n");
    let (status, text) = raw(&p, req.as_bytes()).await;
    assert_eq!(status, 200);
    let dots = text.matches('.').count();
    assert!(dots < 15, "the request outlived maxLifetime: {text:?}");
    // The next connection is served normally.
    let (status, _) = raw(
        &p,
        format!("GET http://allowed.test:{port}/big HTTP/1.1\r\nHost: allowed.test\r\nRange: x\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status, 200);
}
