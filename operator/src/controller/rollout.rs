//! Rollout truth: which render each proxy of the release has in force. One long-poll per proxy pod
//! on its admin `/config` (it answers when its render or reload outcome changes, or after 30 s), so
//! the cost at 1,000 nodes is 1,000 idle connections, not a polling storm; a pod that goes away
//! stops counting. The aggregation per policy is pure ([`policy_rollout`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::status::Rollout;

/// What one proxy said last.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Report {
    /// Render number in force (`None`: not reachable yet, or a document without one).
    pub(super) render: Option<u64>,
    /// Closed-set reason of its last failed reload.
    pub(super) failed: Option<String>,
    /// Dry-run verdicts by rule name since the proxy started: (would deny, would allow).
    pub(super) dry_run: std::collections::BTreeMap<String, (u64, u64)>,
}

/// A proxy pod to watch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Endpoint {
    pub(super) pod: String,
    pub(super) node: String,
    pub(super) ip: IpAddr,
}

/// The running long-polls and what they learned.
pub(super) struct Proxies {
    port: u16,
    token_file: Option<Arc<Path>>,
    wake: Arc<Notify>,
    reports: Arc<Mutex<HashMap<String, Report>>>,
    polls: HashMap<Endpoint, JoinHandle<()>>,
}

impl Drop for Proxies {
    fn drop(&mut self) {
        for h in self.polls.values() {
            h.abort();
        }
    }
}

impl Proxies {
    pub(super) fn new(port: u16, token_file: Option<PathBuf>, wake: Arc<Notify>) -> Proxies {
        Proxies { port, token_file: token_file.map(Arc::from), wake, reports: Arc::default(), polls: HashMap::new() }
    }

    /// Polls exactly `endpoints` from now on.
    pub(super) fn sync(&mut self, endpoints: &[Endpoint]) {
        self.polls.retain(|ep, h| {
            let keep = endpoints.contains(ep);
            if !keep {
                h.abort();
            }
            keep
        });
        let mut reports = self.reports.lock().unwrap_or_else(PoisonError::into_inner);
        reports.retain(|pod, _| endpoints.iter().any(|e| &e.pod == pod));
        drop(reports);
        for ep in endpoints {
            if !self.polls.contains_key(ep) {
                let task = tokio::spawn(poll(
                    ep.pod.clone(),
                    SocketAddr::new(ep.ip, self.port),
                    self.token_file.clone(),
                    self.reports.clone(),
                    self.wake.clone(),
                ));
                self.polls.insert(ep.clone(), task);
            }
        }
    }

    /// Each endpoint with its last report.
    pub(super) fn view(&self, endpoints: &[Endpoint]) -> Vec<(Endpoint, Report)> {
        let reports = self.reports.lock().unwrap_or_else(PoisonError::into_inner);
        endpoints.iter().map(|e| (e.clone(), reports.get(&e.pod).cloned().unwrap_or_default())).collect()
    }
}

async fn poll(
    pod: String,
    addr: SocketAddr,
    token_file: Option<Arc<Path>>,
    reports: Arc<Mutex<HashMap<String, Report>>>,
    wake: Arc<Notify>,
) {
    let mut since: Option<u64> = None;
    let mut failures = 0u32;
    loop {
        match fetch(addr, token_file.as_deref(), since).await {
            Some((report, counter)) => {
                failures = 0;
                since = Some(counter);
                let mut all = reports.lock().unwrap_or_else(PoisonError::into_inner);
                if all.get(&pod) != Some(&report) {
                    all.insert(pod.clone(), report);
                    drop(all);
                    wake.notify_one();
                }
            }
            None => {
                // Unreachable (starting, or gone and not yet out of the pod list): back off, with
                // jitter so a thousand proxies restarting together are not polled in step.
                failures = failures.saturating_add(1);
                since = None;
                let base = Duration::from_millis(500 * u64::from(failures.min(10)));
                let seed = pod.bytes().fold(u64::from(failures), |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
                let jitter = Duration::from_millis(seed % 500);
                tokio::time::sleep(base + jitter).await;
            }
        }
    }
}

/// One `/config` request (long-polled when `since` is known), with the admin token read from
/// `token_file` when there is one: the report and the change counter.
async fn fetch(addr: SocketAddr, token_file: Option<&Path>, since: Option<u64>) -> Option<(Report, u64)> {
    let path = match since {
        Some(n) => format!("/config?since={n}&timeout=30"),
        None => "/config".to_owned(),
    };
    let token = match token_file {
        Some(f) => {
            let t = tokio::fs::read_to_string(f).await.ok()?;
            // A token a header cannot carry is not sent (the proxy would refuse the file too).
            let t = t.trim();
            if t.bytes().any(|b| b.is_ascii_control()) {
                return None;
            }
            format!("{}: {t}\r\n", proxy_config::ADMIN_TOKEN_HEADER)
        }
        None => String::new(),
    };
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: proxy\r\n{token}Connection: close\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut raw = Vec::with_capacity(1024);
        // A /config document is a few hundred bytes; anything much larger is not a proxy.
        (&mut s).take(64 * 1024).read_to_end(&mut raw).await.ok()?;
        Some(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(45), exchange).await.ok()??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    let doc: proxy_config::status::ConfigStatus = serde_json::from_str(body).ok()?;
    let dry_run = doc.dry_run.into_iter().map(|(rule, c)| (rule, (c.would_deny, c.would_allow))).collect();
    let report = Report { render: doc.render, failed: doc.last_reload.reason, dry_run };
    Some((report, doc.changes))
}

/// The proxies that have a render at least `needed` loaded, out of all of them.
pub(super) fn policy_rollout(needed: u64, proxies: &[(Endpoint, Report)]) -> Rollout {
    let loaded = proxies.iter().filter(|(_, r)| r.render.is_some_and(|n| n >= needed)).count();
    let mut stuck_nodes: Vec<String> = proxies
        .iter()
        .filter(|(_, r)| r.render.is_none_or(|n| n < needed) && r.failed.is_some())
        .map(|(e, _)| e.node.clone())
        .collect();
    stuck_nodes.sort();
    Rollout { loaded, total: proxies.len(), stuck_nodes, dry_run: None }
}

/// Dry-run verdicts of the rules rendered for `policy`, summed over the proxies: (would deny,
/// would allow).
pub(super) fn dry_run_totals(policy: &proxy_config::origin::PolicyId, proxies: &[(Endpoint, Report)]) -> (u64, u64) {
    proxies
        .iter()
        .flat_map(|(_, r)| r.dry_run.iter())
        .filter(|(rule, _)| policy.owns_rule(rule))
        .fold((0, 0), |(d, a), (_, (dd, aa))| (d + dd, a + aa))
}

/// Proxies that are behind the latest render without a failed reload (or do not answer), and
/// since when: a proxy that stays behind longer than a threshold is worth a Warning event.
#[derive(Debug, Default)]
pub(super) struct Laggards {
    since: HashMap<String, tokio::time::Instant>,
}

impl Laggards {
    /// Updates from `view` at `now`; returns the proxies behind for at least `after`, and when
    /// the next one will be (so the loop can look again without a change).
    pub(super) fn update(
        &mut self,
        latest: u64,
        view: &[(Endpoint, Report)],
        now: tokio::time::Instant,
        after: Duration,
    ) -> (Vec<Endpoint>, Option<Duration>) {
        let behind: Vec<&Endpoint> = view
            .iter()
            .filter(|(_, r)| r.failed.is_none() && r.render.is_none_or(|n| n < latest))
            .map(|(e, _)| e)
            .collect();
        self.since.retain(|pod, _| behind.iter().any(|e| &e.pod == pod));
        let (mut overdue, mut next) = (Vec::new(), None::<Duration>);
        for e in behind {
            let since = *self.since.entry(e.pod.clone()).or_insert(now);
            let elapsed = now.saturating_duration_since(since);
            if elapsed >= after {
                overdue.push(e.clone());
            } else {
                let left = after - elapsed;
                next = Some(next.map_or(left, |n| n.min(left)));
            }
        }
        (overdue, next)
    }
}

/// With per-node documents, a node's document changes only when its own rules do: a proxy that
/// has its node's latest document (`node_docs`: hash and render per node) counts as having the
/// latest render `current`, so rollout truth compares each proxy with its own node's document.
pub(super) fn per_node_current(
    mut view: Vec<(Endpoint, Report)>,
    current: u64,
    node_docs: &HashMap<String, (String, u64)>,
) -> Vec<(Endpoint, Report)> {
    for (ep, report) in &mut view {
        if let (Some(have), Some((_, latest))) = (report.render, node_docs.get(&ep.node)) {
            if have >= *latest && report.failed.is_none() {
                report.render = Some(current);
            }
        }
    }
    view
}

/// Counts for `tunnelgate_operator_proxies{state}`: current (the latest render), behind, failing.
pub(super) fn proxy_states(current: u64, proxies: &[(Endpoint, Report)]) -> [(&'static str, i64); 3] {
    let mut n = [0i64; 3];
    for (_, r) in proxies {
        let i = match (r.render.is_some_and(|x| x >= current), r.failed.is_some()) {
            (true, _) => 0,
            (false, false) => 1,
            (false, true) => 2,
        };
        n[i] += 1;
    }
    [("current", n[0]), ("behind", n[1]), ("failing", n[2])]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(node: &str, render: Option<u64>, failed: Option<&str>) -> (Endpoint, Report) {
        (
            Endpoint { pod: format!("proxy-{node}"), node: node.into(), ip: [10, 0, 0, 1].into() },
            Report { render, failed: failed.map(Into::into), dry_run: Default::default() },
        )
    }

    #[test]
    fn rollout_table() {
        let proxies = [p("a", Some(7), None), p("b", Some(6), None), p("c", Some(5), Some("tls")), p("d", None, None)];
        assert_eq!(policy_rollout(5, &proxies), Rollout { loaded: 3, total: 4, stuck_nodes: vec![], dry_run: None });
        assert_eq!(
            policy_rollout(6, &proxies),
            Rollout { loaded: 2, total: 4, stuck_nodes: vec!["c".into()], dry_run: None }
        );
        assert_eq!(policy_rollout(8, &proxies).loaded, 0);
        assert_eq!(policy_rollout(1, &[]), Rollout { loaded: 0, total: 0, stuck_nodes: vec![], dry_run: None });
        assert_eq!(proxy_states(7, &proxies), [("current", 1), ("behind", 2), ("failing", 1)]);
    }

    #[test]
    fn a_proxy_behind_for_longer_than_the_threshold_is_overdue() {
        let t0 = tokio::time::Instant::now();
        let min = Duration::from_secs(60);
        let mut l = Laggards::default();
        let view = |renders: [Option<u64>; 3], failed_c: bool| {
            ["a", "b", "c"]
                .iter()
                .zip(renders)
                .map(|(pod, render)| {
                    let failed = (failed_c && *pod == "c").then(|| "tls".to_owned());
                    (
                        Endpoint { pod: (*pod).into(), node: format!("node-{pod}"), ip: "10.0.0.1".parse().unwrap() },
                        Report { render, failed, dry_run: Default::default() },
                    )
                })
                .collect::<Vec<_>>()
        };
        // a current, b behind, c failing (its own event) — b is tracked.
        let (due, next) = l.update(5, &view([Some(5), Some(4), Some(3)], true), t0, 2 * min);
        assert!(due.is_empty());
        assert_eq!(next, Some(2 * min));
        let (due, next) = l.update(5, &view([Some(5), Some(4), Some(3)], true), t0 + min, 2 * min);
        assert!(due.is_empty() && next == Some(min));
        // b still behind after 2 minutes; a unreachable proxy counts as behind from now on.
        let (due, _) = l.update(5, &view([None, Some(4), Some(3)], true), t0 + 2 * min, 2 * min);
        assert_eq!(due.iter().map(|e| e.pod.as_str()).collect::<Vec<_>>(), ["b"]);
        // b catches up: forgotten; falling behind again starts a new clock.
        let (due, _) = l.update(6, &view([Some(6), Some(6), Some(3)], true), t0 + 3 * min, 2 * min);
        assert!(due.is_empty());
        let (due, next) = l.update(7, &view([Some(7), Some(6), Some(3)], true), t0 + 4 * min, 2 * min);
        assert!(due.is_empty() && next == Some(2 * min));
    }

    #[test]
    fn per_node_a_proxy_with_its_own_latest_document_is_current() {
        let ep =
            |pod: &str, node: &str| Endpoint { pod: pod.into(), node: node.into(), ip: "10.0.0.1".parse().unwrap() };
        let rep = |render| Report { render: Some(render), failed: None, dry_run: Default::default() };
        let docs: HashMap<String, (String, u64)> =
            [("a".to_owned(), ("h".to_owned(), 9)), ("b".to_owned(), ("h".to_owned(), 4))].into();
        // Render 9 changed node a only: b's proxy at 4 has its node's latest; a's at 8 does not.
        let v =
            per_node_current(vec![(ep("pa", "a"), rep(8)), (ep("pb", "b"), rep(4)), (ep("gw", "c"), rep(9))], 9, &docs);
        let renders: Vec<Option<u64>> = v.iter().map(|(_, r)| r.render).collect();
        assert_eq!(renders, [Some(8), Some(9), Some(9)]);
        assert_eq!(policy_rollout(9, &v), Rollout { loaded: 2, total: 3, stuck_nodes: vec![], dry_run: None });
    }

    #[test]
    fn dry_run_counts_add_up_over_proxies_and_destinations() {
        let mut a = p("a", Some(1), None);
        a.1.dry_run =
            [("ns/p/0".to_owned(), (2, 0)), ("ns/p/1".to_owned(), (1, 0)), ("ns/pq".to_owned(), (9, 9))].into();
        let mut b = p("b", Some(1), None);
        b.1.dry_run = [("ns/p".to_owned(), (0, 4))].into();
        assert_eq!(
            dry_run_totals(&proxy_config::origin::PolicyId::namespaced("ns", "p"), &[a, b]),
            (3, 4),
            "ns/pq is another policy"
        );
    }
}
