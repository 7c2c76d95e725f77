//! Policies into rules: the pods a policy selects become its rules' clients, one rule per
//! destination, named after the policy.

use std::net::IpAddr;

use proxy_config::origin::PolicyId;
use proxy_config::raw::RawRule;

use super::PodIn;
use crate::validate::ValidPolicy;

/// The pods' IPs and how many pods `selects` picks (Running pods with an IP only).
pub(super) fn clients_of<'p>(
    pods: impl Iterator<Item = &'p PodIn>,
    selects: impl Fn(&PodIn) -> bool,
) -> (Vec<IpAddr>, usize) {
    let chosen: Vec<&PodIn> = pods.filter(|pod| pod.eligible && selects(pod)).collect();
    let mut ips: Vec<IpAddr> = chosen.iter().flat_map(|pod| pod.ips.iter().copied()).collect();
    ips.sort();
    ips.dedup();
    (ips, chosen.iter().filter(|pod| !pod.ips.is_empty()).count())
}

/// A rule before it becomes text: its body (everything but `clients`) and its clients' addresses,
/// which per-node rendering splits by node before any of them is formatted.
#[derive(Debug)]
pub(super) struct Rule {
    pub(super) body: RawRule,
    pub(super) clients: Vec<IpAddr>,
}

impl Rule {
    /// Bytes its body (without clients) takes in a document, roughly (as JSON).
    pub(super) fn body_bytes(&self) -> usize {
        serde_json::to_vec(&self.body).map_or(0, |v| v.len())
    }

    /// The rule as the document carries it, listing `clients`.
    pub(super) fn raw(&self, clients: &[IpAddr]) -> RawRule {
        RawRule { clients: Some(clients.iter().map(ToString::to_string).collect()), ..self.body.clone() }
    }
}

/// Bytes of an address as text, without building the text.
pub(super) fn text_len(ip: &IpAddr) -> usize {
    struct Count(usize);
    impl std::fmt::Write for Count {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0 += s.len();
            Ok(())
        }
    }
    let mut c = Count(0);
    let _ = std::fmt::write(&mut c, format_args!("{ip}"));
    c.0
}

/// One rule per rendered destination, named `<prefix>` or `<prefix>/<index>`.
/// Refuses a policy whose rule names (`prefix`, or `prefix/<index>` for several destinations)
/// the proxies' parser would refuse: one such policy must not make the whole document invalid
/// (a 253-character policy name is legal in the API, and its rule name is then too long).
pub(super) fn rule_names_fit(id: &PolicyId, destinations: usize) -> Result<(), Vec<crate::validate::FieldError>> {
    let longest = id.longest_rule_name(destinations);
    if proxy_config::config::valid_rule_name(&longest) {
        return Ok(());
    }
    Err(vec![crate::validate::FieldError {
        path: "metadata.name".into(),
        message: format!(
            "the rule name {:?}… is {} characters; the proxies accept at most 253 (namespace, name and destination index together): use a shorter name",
            longest.chars().take(40).collect::<String>(),
            longest.len()
        ),
    }])
}

pub(super) fn push_rules(
    rules: &mut Vec<Rule>,
    id: &PolicyId,
    v: &ValidPolicy,
    ips: &[IpAddr],
    priority: Option<u32>,
    skip: &[usize],
) -> Vec<String> {
    let mut names = Vec::new();
    // A policy that selects no pod renders nothing: an empty `clients` would mean any client.
    if ips.is_empty() {
        return names;
    }
    for (i, d) in v.destinations.iter().enumerate() {
        if skip.contains(&i) {
            continue;
        }
        let name = id.rule_name(i, v.destinations.len());
        let body = proxy_config::raw::RawRule {
            route: v.route.clone(),
            ..d.rule(name.clone(), v.action, priority, v.dry_run)
        };
        rules.push(Rule { body, clients: ips.to_vec() });
        names.push(name);
    }
    names
}

/// A namespaced policy whose rules may be left out when the documents would not fit otherwise.
pub(super) struct Optional {
    /// Its index in the outcomes.
    pub(super) outcome: usize,
    /// Its rules' indexes.
    pub(super) rules: std::ops::Range<usize>,
    /// What it adds to the whole document (rules and clients), roughly.
    pub(super) bytes: usize,
    pub(super) dry_run: bool,
}
