//! A DNS server on loopback (or a test network's address) answering from a table: tests and the
//! benchmark resolve their made-up names through it, so nothing ever asks a real resolver.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;

/// How the stub answers a name.
#[derive(Clone, Debug)]
pub enum Answer {
    /// These addresses (A and AAAA by family), TTL 60.
    Addrs(Vec<IpAddr>),
    /// The n-th A query gets the n-th list (the last repeats), TTL 0: DNS rebinding.
    Sequence(Vec<Vec<IpAddr>>),
    ServFail,
    /// Never answers.
    Silent,
}

#[derive(Default)]
struct StubState {
    answers: HashMap<String, Answer>,
    /// A queries seen per name.
    a_queries: HashMap<String, usize>,
    total: usize,
}

/// A DNS server on 127.0.0.1 answering from a table; unknown names get NXDOMAIN.
#[derive(Clone)]
pub struct DnsStub {
    pub addr: SocketAddr,
    state: Arc<Mutex<StubState>>,
}

impl DnsStub {
    pub async fn start() -> DnsStub {
        DnsStub::start_on("127.0.0.1:0").await
    }

    /// [`DnsStub::start`] on `addr` (a test network's address, for a proxy in a namespace).
    pub async fn start_on(addr: &str) -> DnsStub {
        let sock =
            Arc::new(UdpSocket::bind(addr).await.unwrap_or_else(|e| panic!("DNS stub: cannot bind {addr}: {e}")));
        let addr = sock.local_addr().unwrap_or_else(|e| panic!("DNS stub: {e}"));
        let state = Arc::new(Mutex::new(StubState::default()));
        let st = state.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                if let Some(resp) = answer(&st, &q) {
                    let _ = sock.send_to(&resp, from).await;
                }
            }
        });
        DnsStub { addr, state }
    }

    pub fn set(&self, name: &str, a: Answer) {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).answers.insert(name.to_owned(), a);
    }

    /// A queries received for `name`.
    pub fn queries(&self, name: &str) -> usize {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).a_queries.get(name).copied().unwrap_or(0)
    }

    /// All queries received.
    pub fn total_queries(&self) -> usize {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).total
    }
}

fn answer(state: &Mutex<StubState>, q: &Message) -> Option<Vec<u8>> {
    let query = q.queries.first()?.clone();
    let name = query.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
    let qtype = query.query_type();
    let mut s = state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    s.total += 1;
    let n = if qtype == RecordType::A {
        let c = s.a_queries.entry(name.clone()).or_insert(0);
        *c += 1;
        *c
    } else {
        s.a_queries.get(&name).copied().unwrap_or(1).max(1)
    };
    let ans = s.answers.get(&name).cloned();
    drop(s);
    let mut resp = Message::new(q.metadata.id, MessageType::Response, q.metadata.op_code);
    resp.metadata.recursion_desired = q.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.metadata.authoritative = true;
    resp.add_query(query.clone());
    let (addrs, ttl) = match ans {
        None => {
            resp.metadata.response_code = ResponseCode::NXDomain;
            return resp.to_vec().ok();
        }
        Some(Answer::Silent) => return None,
        Some(Answer::ServFail) => {
            resp.metadata.response_code = ResponseCode::ServFail;
            return resp.to_vec().ok();
        }
        Some(Answer::Addrs(a)) => (a, 60),
        Some(Answer::Sequence(seq)) => (seq[(n - 1).min(seq.len() - 1)].clone(), 0),
    };
    for ip in addrs {
        let rdata = match (ip, qtype) {
            (IpAddr::V4(v4), RecordType::A) => RData::A(A(v4)),
            (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(v6)),
            _ => continue,
        };
        resp.add_answer(Record::from_rdata(query.name().clone(), ttl, rdata));
    }
    resp.to_vec().ok()
}
