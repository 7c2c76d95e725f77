//! What a redirected connection's first bytes say, read without answering anything: a TLS
//! ClientHello (parsed by rustls, as a TLS listener parses it) gives the SNI; an HTTP/1 request
//! head (parsed by httparse) gives the Host; anything else gives no name. The bytes read are
//! kept, to be relayed to the upstream first.

use rustls::server::Acceptor;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use crate::error::{Side, TunnelError};

/// Most bytes read before deciding (a ClientHello with many extensions, a large request head).
pub(crate) const MAX_FIRST_BYTES: usize = 16 * 1024;

/// The protocol the client opened with, and the name it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opening {
    /// A TLS ClientHello; its SNI, when it has one (with Encrypted ClientHello, the outer,
    /// client-facing public name).
    Tls { sni: Option<String> },
    /// An HTTP/1 request head; its Host header's name (without the port), when it has one.
    Http { host: Option<String> },
    /// Anything else, or nothing before the deadline (a protocol whose server speaks first).
    Other,
}

/// Reads until the opening is known, `max` bytes, or `deadline`.
pub(crate) async fn read(
    stream: &mut TcpStream,
    max: usize,
    deadline: Instant,
) -> Result<(Vec<u8>, Opening), TunnelError> {
    let mut buf: Vec<u8> = Vec::with_capacity(2048);
    loop {
        if let Some(opening) = classify(&buf, buf.len() >= max) {
            return Ok((buf, opening));
        }
        let read = timeout_at(deadline, stream.read_buf(&mut buf)).await;
        match read {
            // Nothing yet: a protocol whose server speaks first; anything partial is refused.
            Err(_) if buf.is_empty() => return Ok((buf, Opening::Other)),
            Err(_) => return Err(TunnelError::HeadTimeout),
            Ok(Ok(0)) => return Err(TunnelError::ClientClosed),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(TunnelError::Io { side: Side::Client, source: e }),
        }
    }
}

/// The opening `buf` shows, or `None` while more bytes are needed (`full`: no more will be read).
pub fn classify(buf: &[u8], full: bool) -> Option<Opening> {
    let first = *buf.first()?;
    // A TLS handshake record (content type 22).
    if first == 0x16 {
        return tls(buf, full);
    }
    if looks_like_http(buf) {
        return http(buf, full);
    }
    Some(Opening::Other)
}

fn tls(buf: &[u8], full: bool) -> Option<Opening> {
    let mut acceptor = Acceptor::default();
    let mut rest = buf;
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return Some(Opening::Tls { sni: None }),
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let sni = accepted.client_hello().server_name().map(str::to_owned);
                return Some(Opening::Tls { sni });
            }
            Ok(None) => {}
            // Not a ClientHello rustls accepts: no name to decide by.
            Err(_) => return Some(Opening::Tls { sni: None }),
        }
    }
    full.then_some(Opening::Tls { sni: None })
}

/// An HTTP/1 request line starts with a method token and a space.
fn looks_like_http(buf: &[u8]) -> bool {
    let token = buf.iter().take(16).take_while(|b| b.is_ascii_uppercase()).count();
    token > 0 && (buf.get(token) == Some(&b' ') || (token == buf.len() && token < 16))
}

fn http(buf: &[u8], full: bool) -> Option<Opening> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {
            let host = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .map(|v| host_name(v.trim()).to_owned());
            Some(Opening::Http { host })
        }
        Ok(httparse::Status::Partial) if !full => None,
        // Too large or not HTTP after all: no name to decide by.
        _ => Some(Opening::Http { host: None }),
    }
}

/// The name of a Host value (`name`, `name:port`, `[v6]`, `[v6]:port`), without the port.
fn host_name(value: &str) -> &str {
    if let Some(rest) = value.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default();
    }
    value.rsplit_once(':').map_or(value, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http_head_gives_its_host_without_the_port() {
        let head = b"GET / HTTP/1.1\r\nHost: Allowed.Test:8080\r\nUser-Agent: t\r\n\r\n";
        assert_eq!(classify(head, false), Some(Opening::Http { host: Some("Allowed.Test".into()) }));
        assert_eq!(classify(&head[..20], false), None, "an incomplete head needs more bytes");
        assert_eq!(classify(b"GET / HTTP/1.1\r\n\r\n", false), Some(Opening::Http { host: None }));
        assert_eq!(host_name("[2001:db8::1]:80"), "2001:db8::1");
    }

    #[test]
    fn other_protocols_have_no_name() {
        assert_eq!(classify(b"SSH-2.0-OpenSSH_9.6\r\n", false), Some(Opening::Other));
        assert_eq!(classify(b"\x00\x01binary", false), Some(Opening::Other));
        assert_eq!(classify(b"", false), None);
        // A truncated TLS record with nothing more coming: TLS, no name.
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x00], true), Some(Opening::Tls { sni: None }));
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x00], false), None);
    }
}
