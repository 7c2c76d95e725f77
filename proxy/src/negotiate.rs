//! Reads the first request head of a connection (bounded in bytes and time): a CONNECT is parsed
//! here, strictly, and the bytes that follow its head are handed back to be relayed, never parsed;
//! any other request is handed on, with every byte read so far, to the HTTP forward path. Also
//! writes the error answers of the CONNECT path.

use std::io;

use proxy_config::Authority;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout_at, Duration, Instant};

use crate::error::{Side, TunnelError};

/// Longest request line accepted before the head is answered with 414 (RFC 9112 §3 asks
/// for at least 8000 octets).
pub const MAX_REQUEST_LINE: usize = 8192;
/// Most header fields accepted (hyper's and HAProxy's default is about 100).
pub const MAX_HEADERS: usize = 100;
/// Bytes read per `read` call while waiting for the head.
const READ_CHUNK: usize = 4096;

/// A valid CONNECT request and the bytes the client sent after its head.
#[derive(Debug)]
pub struct ConnectRequest {
    pub authority: Authority,
    /// Early data: pipelined after the head, to be forwarded to the upstream first.
    pub leftover: Vec<u8>,
    /// The `Proxy-Authorization` value, if any (never logged, never forwarded).
    pub credentials: Option<Vec<u8>>,
}

/// The first request of a connection.
#[derive(Debug)]
pub enum Head {
    Connect(ConnectRequest),
    /// Not a CONNECT: the bytes read so far (a complete head and whatever followed it), for the
    /// HTTP forward path to parse.
    Other(Vec<u8>),
}

/// Reads one request head from `io` before `deadline`, with at most `max_head` bytes.
pub async fn read_head<S: AsyncRead + Unpin>(
    io: &mut S,
    max_head: usize,
    deadline: Instant,
) -> Result<Head, TunnelError> {
    match timeout_at(deadline, read_head_inner(io, max_head)).await {
        Ok(r) => r,
        Err(_) => Err(TunnelError::HeadTimeout),
    }
}

async fn read_head_inner<S: AsyncRead + Unpin>(io: &mut S, max_head: usize) -> Result<Head, TunnelError> {
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK.min(max_head));
    let mut scanned = 0;
    loop {
        let room = max_head - buf.len();
        if room == 0 {
            return Err(too_large(&buf));
        }
        let start = buf.len();
        buf.resize(start + room.min(READ_CHUNK), 0);
        let n = match io.read(&mut buf[start..]).await {
            Ok(n) => n,
            Err(e) => return Err(TunnelError::Io { side: Side::Client, source: e }),
        };
        buf.truncate(start + n);
        if n == 0 {
            return Err(if buf.is_empty() {
                TunnelError::ClientClosed
            } else {
                TunnelError::MalformedRequest("incomplete request head")
            });
        }
        // Only parse once a blank line has arrived, so a trickling client costs linear CPU.
        if let Some(end) = find_head_end(&buf, scanned) {
            return match parse_connect(&buf[..end]) {
                Ok((authority, credentials)) => {
                    Ok(Head::Connect(ConnectRequest { authority, leftover: buf[end..].to_vec(), credentials }))
                }
                Err(TunnelError::MethodNotAllowed) => Ok(Head::Other(buf)),
                Err(e) => Err(e),
            };
        }
        scanned = buf.len().saturating_sub(3);
        if !buf[..buf.len().min(MAX_REQUEST_LINE + 1)].contains(&b'\n')
            && buf.len() > MAX_REQUEST_LINE.min(max_head - 1)
        {
            return Err(TunnelError::UriTooLong);
        }
    }
}

fn too_large(buf: &[u8]) -> TunnelError {
    if buf.contains(&b'\n') {
        TunnelError::HeadTooLarge
    } else {
        TunnelError::UriTooLong
    }
}

/// Index just past the blank line ending the head (CRLFCRLF, or bare LFs), searching from `from`.
/// Leading empty lines before the request line are skipped (RFC 9112 §2.2).
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let lead = buf.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
    let from = from.max(lead);
    let mut i = from;
    while i < buf.len() {
        if buf[i] == b'\n' {
            if buf.get(i + 1) == Some(&b'\n') {
                return Some(i + 2);
            }
            if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
                return Some(i + 3);
            }
        }
        i += 1;
    }
    None
}

/// Parses a complete head (ending in a blank line) into the CONNECT target. Pure.
pub fn parse_head(head: &[u8]) -> Result<Authority, TunnelError> {
    parse_connect(head).map(|(authority, _)| authority)
}

/// [`parse_head`], also returning the (first) `Proxy-Authorization` value, read in the same pass.
fn parse_connect(head: &[u8]) -> Result<(Authority, Option<Vec<u8>>), TunnelError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(TunnelError::MalformedRequest("incomplete request head")),
        Err(httparse::Error::TooManyHeaders) => return Err(TunnelError::HeadTooLarge),
        Err(_) => return Err(TunnelError::MalformedRequest("invalid HTTP request head")),
    }
    let method = req.method.unwrap_or_default();
    if method != "CONNECT" {
        return Err(TunnelError::MethodNotAllowed);
    }
    if !matches!(req.version, Some(0 | 1)) {
        return Err(TunnelError::MalformedRequest("unsupported HTTP version"));
    }
    let target = req.path.unwrap_or_default();
    let authority: Authority = target.parse().map_err(|_| TunnelError::MalformedRequest("invalid CONNECT target"))?;
    let mut hosts = 0;
    let mut credentials = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("proxy-authorization") {
            credentials = credentials.or_else(|| Some(h.value.to_vec()));
        } else if h.name.eq_ignore_ascii_case("host") {
            hosts += 1;
            if hosts > 1 {
                return Err(TunnelError::MalformedRequest("more than one Host header"));
            }
            let ok = !h.value.is_empty()
                && h.value
                    .iter()
                    .all(|&b| b.is_ascii_graphic() && !matches!(b, b',' | b'@' | b'\\' | b'/' | b'?' | b'#'));
            if !ok {
                return Err(TunnelError::MalformedRequest("invalid Host header"));
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            // A CONNECT request has no content (RFC 9110 §9.3.6); a zero length is harmless.
            if h.value != b"0" {
                return Err(TunnelError::MalformedRequest("CONNECT with a body"));
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(TunnelError::MalformedRequest("CONNECT with a body"));
        }
    }
    Ok((authority, credentials))
}

/// The reason phrase of an error status.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        414 => "URI Too Long",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// The complete error response for `err`, or `None` if nothing should be sent.
/// Every error response closes the connection (RFC 9110 §9.3.6: no tunnel was formed).
pub fn error_response(err: &TunnelError) -> Option<Vec<u8>> {
    let status = err.status()?;
    let body = format!("{status} {}: {err}\n", reason_phrase(status));
    let mut extra = String::new();
    if status == 405 {
        extra.push_str("Allow: CONNECT\r\n");
    }
    if let TunnelError::AuthRequired(realm) = err {
        extra.push_str(&format!("Proxy-Authenticate: Basic realm=\"{realm}\"\r\n"));
    }
    if let Some(secs) = err.retry_after() {
        extra.push_str(&format!("Retry-After: {secs}\r\n"));
    }
    extra.push_str(&format!("Proxy-Status: {}\r\n", err.proxy_status()));
    Some(
        format!(
            "HTTP/1.1 {status} {}\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{extra}\r\n{body}",
            reason_phrase(status),
            body.len()
        )
        .into_bytes(),
    )
}

/// The success answer: no Content-Length or Transfer-Encoding (RFC 9110 §9.3.6).
pub const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

/// Longest time and most bytes read (and discarded) after an error response, so the client
/// reads our answer instead of a reset (RFC 9112 §9.6 staged close).
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 256 * 1024;

/// Writes `response`, half-closes, drains input for a bounded time and byte count, then returns
/// (dropping the stream closes it).
pub async fn reject<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S, response: &[u8]) -> io::Result<()> {
    let deadline = Instant::now() + LINGER_TIME;
    timeout_at(deadline, async {
        io.write_all(response).await?;
        io.flush().await?;
        io.shutdown().await?;
        // On the heap: this future is part of every connection task, and most never reject.
        let mut sink = vec![0u8; 4096];
        let mut drained = 0;
        while drained < LINGER_BYTES {
            match io.read(&mut sink).await? {
                0 => break,
                n => drained += n,
            }
        }
        Ok(())
    })
    .await
    .unwrap_or(Ok(()))
}

#[cfg(test)]
mod tests;
