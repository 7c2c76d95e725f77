//! Head parsing: terminators, read-boundary independence (P-19), status mapping.
use super::*;

const T: &[u8] = b"CONNECT allowed.test:443 HTTP/1.1\r\nHost: allowed.test:443\r\n\r\nEARLY";

#[test]
fn head_end_is_found_for_crlf_and_bare_lf() {
    assert_eq!(find_head_end(T, 0), Some(T.len() - 5));
    assert_eq!(find_head_end(b"CONNECT a:1 HTTP/1.1\n\nx", 0), Some(22));
    assert_eq!(find_head_end(b"CONNECT a:1 HTTP/1.1\r\nHost: a\r\n", 0), None);
}

#[test]
fn parse_is_independent_of_read_boundaries() {
    // P-19: every split of the input gives the same target and the same leftover bytes.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for cut in 1..T.len() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        rt.block_on(async move {
            use tokio::io::AsyncWriteExt;
            let (first, second) = T.split_at(cut);
            b.write_all(first).await.unwrap();
            let writer = async {
                tokio::task::yield_now().await;
                b.write_all(second).await.unwrap();
            };
            let reader = read_head(&mut a, 16384, Instant::now() + Duration::from_secs(5));
            let ((), r) = tokio::join!(writer, reader);
            let r = r.unwrap();
            assert_eq!(r.authority.to_string(), "allowed.test:443");
            // Whatever was read past the head is handed back; the rest is still in the stream.
            drop(b);
            let mut rest = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut a, &mut rest).await.unwrap();
            assert_eq!([r.leftover, rest].concat(), b"EARLY");
        });
    }
}

#[test]
fn statuses_of_head_errors() {
    assert!(matches!(parse_head(b"GET / HTTP/1.1\r\n\r\n"), Err(TunnelError::MethodNotAllowed)));
    assert!(matches!(parse_head(b"connect a.test:1 HTTP/1.1\r\n\r\n"), Err(TunnelError::MethodNotAllowed)));
    assert!(matches!(parse_head(b"CONNECT a.test:1 HTTP/2.0\r\n\r\n"), Err(TunnelError::MalformedRequest(_))));
    let many = [b"CONNECT a.test:1 HTTP/1.1\r\n".to_vec(), b"a:b\r\n".repeat(101), b"\r\n".to_vec()].concat();
    assert!(matches!(parse_head(&many), Err(TunnelError::HeadTooLarge)));
}

#[test]
fn error_responses_close_and_carry_retry_after_where_due() {
    let r = String::from_utf8(error_response(&TunnelError::ClientLimit).unwrap()).unwrap();
    assert!(
        r.starts_with("HTTP/1.1 429 Too Many Requests\r\n")
            && r.contains("Retry-After: 1\r\n")
            && r.contains("Connection: close\r\n")
    );
    let r = String::from_utf8(error_response(&TunnelError::MethodNotAllowed).unwrap()).unwrap();
    assert!(r.contains("Allow: CONNECT\r\n"));
    assert!(error_response(&TunnelError::ClientClosed).is_none());
    assert!(!String::from_utf8_lossy(ESTABLISHED).to_ascii_lowercase().contains("content-length"));
}
