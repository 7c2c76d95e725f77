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
            let Head::Connect(r) = r.unwrap() else { panic!("not a CONNECT") };
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

/// Every generated error says why in RFC 9209 terms, without naming a host or an address.
#[test]
fn error_responses_carry_a_proxy_status() {
    use proxy_config::{addr::SpecialRange, DenyReason};
    let status = |e: TunnelError| {
        let r = String::from_utf8(error_response(&e).unwrap()).unwrap();
        r.lines().find_map(|l| l.strip_prefix("Proxy-Status: ").map(str::to_owned)).unwrap()
    };
    let private = DenyReason::PrivateAddress { range: SpecialRange::Metadata, not_opened_by: None };
    assert_eq!(status(TunnelError::Denied(private)), "tunnelgate; error=destination_ip_prohibited");
    assert_eq!(status(TunnelError::Denied(DenyReason::Rule)), "tunnelgate; error=http_request_denied");
    assert_eq!(status(TunnelError::ResolveNotFound), "tunnelgate; error=dns_error; rcode=\"NXDOMAIN\"");
    assert_eq!(status(TunnelError::UpstreamTimeout), "tunnelgate; error=connection_timeout");
    assert_eq!(status(TunnelError::SelfConnect), "tunnelgate; error=proxy_loop_detected");
    assert_eq!(status(TunnelError::HeadTooLarge), "tunnelgate; error=http_request_error");
}

/// A small deterministic PRNG (xorshift), so the property tests need no extra crate.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const SEEDS: &[&[u8]] = &[
    b"CONNECT allowed.test:443 HTTP/1.1\r\nHost: allowed.test:443\r\n\r\nEARLY",
    b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\n\r\n",
    b"CONNECT user:pass@allowed.test:443 HTTP/1.1\r\n\r\n",
    b"CONNECT 0x7f.1:443 HTTP/1.1\nHost: x\n\n",
    b"GET http://allowed.test/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
    b"CONNECT allowed.test:443 HTTP/1.1\r\nContent-Length: 5\r\n\r\nabcde",
    b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\nCONNECT a:1 HTTP/1.1\r\n\r\n",
];

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(4) {
            0 if !v.is_empty() => {
                v.remove(at.min(v.len() - 1));
            }
            1 => v.insert(at, (rng.next() & 0xff) as u8),
            2 => {
                let meta = b":@[]%.\r\n \t/\\#?,*0x";
                v.insert(at, meta[rng.below(meta.len())]);
            }
            _ => {
                let i = at.min(v.len().saturating_sub(1));
                if let Some(b) = v.get_mut(i) {
                    *b = (rng.next() & 0xff) as u8;
                }
            }
        }
    }
    v
}

#[test]
fn p19_parser_properties_hold_for_mutated_inputs() {
    // No panic; reading is independent of how the bytes are split; every accepted target
    // round-trips to exactly the authority that would be dialled; normalization is idempotent.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    for i in 0..3000 {
        let input = mutate(&mut rng, SEEDS[i % SEEDS.len()]);
        let cut = rng.below(input.len() + 1);
        let (whole, split) = rt.block_on(async {
            let read = |chunks: Vec<Vec<u8>>| async move {
                let (mut a, mut b) = tokio::io::duplex(1 << 16);
                use tokio::io::AsyncWriteExt;
                for c in chunks {
                    b.write_all(&c).await.unwrap();
                    tokio::task::yield_now().await;
                }
                drop(b);
                read_head(&mut a, 16384, Instant::now() + Duration::from_secs(5)).await.and_then(|h| match h {
                    Head::Connect(r) => Ok(r.authority),
                    Head::Other(_) => Err(TunnelError::MethodNotAllowed),
                })
            };
            let whole = read(vec![input.clone()]).await;
            let split = read(vec![input[..cut].to_vec(), input[cut..].to_vec()]).await;
            (whole, split)
        });
        match (&whole, &split) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a, b, "split at {cut} changed the target: {:?}", String::from_utf8_lossy(&input));
                let again: proxy_config::Authority = a.to_string().parse().unwrap();
                assert_eq!(&again, a, "normalization is idempotent");
            }
            (Err(x), Err(y)) => assert_eq!(x.status(), y.status(), "{:?}", String::from_utf8_lossy(&input)),
            _ => panic!(
                "split at {cut} changed the outcome: {whole:?} vs {split:?} for {:?}",
                String::from_utf8_lossy(&input)
            ),
        }
    }
}
