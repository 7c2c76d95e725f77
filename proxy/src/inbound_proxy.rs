//! The PROXY protocol header a load balancer in front sends (v1 or v2, parsed with `ppp`): read only
//! from the peers a listener names in `acceptProxyProtocolFrom`, never guessed; its source address
//! is then the client's for policy, limits and logs.

use std::net::{IpAddr, SocketAddr};

use ppp::{v1, v2, HeaderResult};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::error::{Side, TunnelError};

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\x00\r\nQUIT\n";
/// Longest v1 header (proxy-protocol.txt §2.1).
const V1_MAX: usize = 107;
/// Longest v2 header accepted (16 fixed bytes plus addresses and TLVs).
const V2_MAX: usize = 16 + 1024;

fn bad(why: &'static str) -> TunnelError {
    TunnelError::MalformedRequest(why)
}

/// Reads exactly one header from `io` (nothing after it); returns the client's address, or
/// `None` for a LOCAL / UNKNOWN header (the connection's own peer stands).
pub async fn read<S: AsyncRead + Unpin>(io: &mut S) -> Result<Option<SocketAddr>, TunnelError> {
    let mut buf = Vec::with_capacity(64);
    let mut byte = [0u8; 1];
    // The first 12 bytes tell the version: read them one at a time (v1 may be shorter).
    loop {
        let n = io.read(&mut byte).await.map_err(|source| TunnelError::Io { side: Side::Client, source })?;
        if n == 0 {
            return Err(bad("connection closed inside the PROXY protocol header"));
        }
        buf.push(byte[0]);
        if buf.starts_with(b"PROXY ") && buf.ends_with(b"\r\n") {
            break;
        }
        if buf.len() == 16 && buf.starts_with(V2_SIGNATURE) {
            let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
            if 16 + len > V2_MAX {
                return Err(bad("PROXY protocol v2 header too long"));
            }
            let mut rest = vec![0u8; len];
            io.read_exact(&mut rest).await.map_err(|source| TunnelError::Io { side: Side::Client, source })?;
            buf.extend_from_slice(&rest);
            break;
        }
        let prefix_ok =
            b"PROXY ".starts_with(&buf[..buf.len().min(6)]) || V2_SIGNATURE.starts_with(&buf[..buf.len().min(12)]);
        if !prefix_ok || (buf.starts_with(b"PROXY ") && buf.len() >= V1_MAX) {
            return Err(bad("expected a PROXY protocol header from this peer"));
        }
    }
    match HeaderResult::parse(&buf) {
        HeaderResult::V1(Ok(h)) => Ok(match h.addresses {
            v1::Addresses::Tcp4(a) => Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port)),
            v1::Addresses::Tcp6(a) => Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port)),
            v1::Addresses::Unknown => None,
        }),
        HeaderResult::V2(Ok(h)) => Ok(match (h.command, h.addresses) {
            (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
            }
            (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
            }
            _ => None,
        }),
        _ => Err(bad("invalid PROXY protocol header")),
    }
}
