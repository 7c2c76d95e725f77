//! The documents: the base with the rules, TLS files and users, whole or per node, checked with
//! the proxy's parser; policies left out, in a fixed order, while they would not fit a ConfigMap.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use proxy_config::raw::RawConfig;
use proxy_config::raw::RawRule;
use proxy_config::ProxyConfig;
use sha2::{Digest, Sha256};

use super::base::{cluster_networks, ParentFile};
use super::rules::{text_len, Optional, Rule};
use super::{Input, NodeDoc, PolicyOutcome, RenderError, Rendered, MAX_CONFIG_BYTES};

/// The documents with `rules`; while they would not fit in a ConfigMap, whole policies are left
/// out, in this order, until they do: dry-run policies first (they decide nothing), then Allow
/// policies, those of the namespace adding the most first, the largest first within it, then by
/// namespace and name. Denies and ClusterTunnelPolicies are never left out: leaving out an Allow
/// only ever refuses more. Each policy left out says so in its status.
pub(super) fn fit(
    input: &Input<'_>,
    doc: RawConfig,
    rules: Vec<Rule>,
    mut optional: Vec<Optional>,
    namespace_bytes: &HashMap<&str, usize>,
    outcomes: &mut [PolicyOutcome],
    built: &mut Built,
) -> Result<Rendered, RenderError> {
    built.nodes = 0;
    built.shards = 0;
    let ns_of = |o: &Optional| outcomes[o.outcome].id.namespace().unwrap_or_default().to_owned();
    optional.sort_by(|a, b| {
        let (na, nb) = (ns_of(a), ns_of(b));
        let used = |ns: &str| namespace_bytes.get(ns).copied().unwrap_or(0);
        b.dry_run
            .cmp(&a.dry_run)
            .then(used(&nb).cmp(&used(&na)))
            .then(b.bytes.cmp(&a.bytes))
            .then(na.cmp(&nb))
            .then(outcomes[a.outcome].id.name().cmp(outcomes[b.outcome].id.name()))
    });
    let mut next = optional.into_iter();
    let mut dropped = vec![false; rules.len()];
    let mut left_out: Vec<usize> = Vec::new();
    loop {
        let live = || rules.iter().zip(&dropped).filter(|(_, d)| !**d).map(|(r, _)| r);
        let attempt = match input.per_node {
            None => whole(input, doc.clone(), &live().collect::<Vec<_>>(), built),
            Some(nodes) => per_node(input, doc.clone(), &live().collect::<Vec<_>>(), nodes, built),
        };
        let Err(RenderError::TooLarge { bytes }) = attempt else {
            for &i in &left_out {
                if let Ok(a) = &mut outcomes[i].result {
                    a.rules.clear();
                    a.over_budget = Some(format!(
                        "not rendered: with every policy in it, the proxies' configuration would exceed the {MAX_CONFIG_BYTES}-byte limit of a ConfigMap; dry-run policies, then the Allow policies of the namespaces whose policies add the most, are left out first"
                    ));
                }
            }
            return attempt;
        };
        // Leave out enough to cover the excess (an estimate: the loop tries again until it fits).
        let excess = bytes.saturating_sub(MAX_CONFIG_BYTES).max(1);
        let mut freed = 0;
        let before = left_out.len();
        for o in next.by_ref() {
            for r in o.rules.clone() {
                dropped[r] = true;
            }
            freed += o.bytes;
            left_out.push(o.outcome);
            if freed >= excess {
                break;
            }
        }
        if left_out.len() == before {
            // Nothing more may be left out: the Denies and cluster policies alone do not fit.
            return Err(RenderError::TooLarge { bytes });
        }
    }
}

/// The whole document (when it fits) and one per node, whose rules list only that node's pods: a
/// pod change rewrites its node's document, and no proxy holds the whole cluster's rules.
pub(super) fn per_node(
    input: &Input<'_>,
    doc: RawConfig,
    rules: &[&Rule],
    nodes: &[String],
    built: &mut Built,
) -> Result<Rendered, RenderError> {
    let (names, by_node) = clients_by_node(input, rules, nodes);
    let shared_digest = shared_digest(input, &doc);
    let enrolled = enrolled_by_node(input, &doc);
    // Each rule's body digested once, for every node that carries it.
    let bodies: Vec<[u8; 32]> =
        rules.iter().map(|r| Sha256::digest(serde_json::to_vec(&r.body).unwrap_or_default()).into()).collect();
    let mut docs = BTreeMap::new();
    let mut shared = None;
    for (node, own) in names.iter().zip(by_node) {
        let mut fp = shared_digest.clone();
        for (r, ips) in &own {
            fp.update(bodies[*r]);
            for ip in ips {
                match ip {
                    IpAddr::V4(a) => fp.update(a.octets()),
                    IpAddr::V6(a) => fp.update(a.octets()),
                }
            }
            fp.update([0xff]);
        }
        let own_enrolled = enrolled.get(*node).cloned().unwrap_or_default();
        for ip in &own_enrolled {
            fp.update(ip.as_bytes());
            fp.update([0]);
        }
        let fingerprint = hex::encode(fp.finalize());
        if let Some(prior) = input.prior_nodes.and_then(|p| p.get(*node)).filter(|d| d.fingerprint == fingerprint) {
            docs.insert((*node).to_owned(), prior.clone());
            continue;
        }
        let own_rules = own.iter().map(|(r, ips)| rules[*r].raw(ips)).collect();
        let mut node_doc = doc.clone();
        if let Some(r) = node_doc.redirect.as_mut() {
            r.enrolled = own_enrolled;
        }
        let d = document(input, node_doc, own_rules)?;
        built.nodes += 1;
        docs.insert((*node).to_owned(), NodeDoc { config: d.config, hash: d.hash, fingerprint });
        shared.get_or_insert((d.tls_data, d.annotations));
    }
    if shared.is_none() {
        // Every node document came from the previous render: the TLS data is that of a document
        // with no rules (it does not depend on them).
        let d = document(input, doc.clone(), Vec::new())?;
        shared = Some((d.tls_data, d.annotations));
    }
    let mut whole = match whole(input, doc, rules, built) {
        Ok(w) => w,
        Err(RenderError::TooLarge { bytes }) => {
            // Not even in shards (more than the shard limit): node documents only.
            let Some((tls_data, annotations)) = shared else { return Err(RenderError::TooLarge { bytes }) };
            Rendered { config: String::new(), hash: String::new(), tls_data, annotations, ..Rendered::default() }
        }
        Err(e) => return Err(e),
    };
    let mut h = Sha256::new();
    h.update(whole.hash.as_bytes());
    for (node, d) in &docs {
        h.update(node.as_bytes());
        h.update(d.hash.as_bytes());
    }
    whole.hash = hex::encode(h.finalize());
    whole.nodes = docs;
    Ok(whole)
}

/// One node's rules: each rule's index with its clients on that node.
type NodeRules = Vec<(usize, Vec<IpAddr>)>;

/// The nodes to render for (`nodes`, and every node a pod runs on), and per node the indexes of
/// the rules with clients there and those clients, in one pass over all clients (not one per
/// node), as addresses: only the documents that changed are formatted.
fn clients_by_node<'a>(input: &'a Input<'_>, rules: &[&Rule], nodes: &'a [String]) -> (Vec<&'a str>, Vec<NodeRules>) {
    let mut names: std::collections::BTreeSet<&str> = nodes.iter().map(String::as_str).collect();
    names.extend(input.pods.iter().filter(|p| !p.node.is_empty()).map(|p| p.node.as_str()));
    let names: Vec<&str> = names.into_iter().collect();
    let index: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let mut node_of: HashMap<IpAddr, usize> = HashMap::new();
    for pod in input.pods.iter().filter(|p| p.eligible && !p.node.is_empty()) {
        if let Some(&i) = index.get(pod.node.as_str()) {
            node_of.extend(pod.ips.iter().map(|ip| (*ip, i)));
        }
    }
    let mut by_node: Vec<Vec<(usize, Vec<IpAddr>)>> = vec![Vec::new(); names.len()];
    for (r, rule) in rules.iter().enumerate() {
        for ip in &rule.clients {
            let Some(&node) = node_of.get(ip) else { continue };
            let own = &mut by_node[node];
            match own.last_mut() {
                Some((last, ips)) if *last == r => ips.push(*ip),
                // A rule without clients on a node is left out there (no clients would mean any client).
                _ => own.push((r, vec![*ip])),
            }
        }
    }
    (names, by_node)
}

/// The enrolled addresses (the whole document's `redirect.enrolled`) by the node their pod runs
/// on: a node's proxy redirects its own pods only.
fn enrolled_by_node<'a>(input: &'a Input<'_>, doc: &RawConfig) -> HashMap<&'a str, Vec<String>> {
    let mut out: HashMap<&str, Vec<String>> = HashMap::new();
    let Some(all) = doc.redirect.as_ref().map(|r| &r.enrolled).filter(|e| !e.is_empty()) else { return out };
    // Compared as addresses: only the enrolled ones are written out as text.
    let all: std::collections::HashSet<IpAddr> = all.iter().filter_map(|a| a.parse().ok()).collect();
    for pod in input.pods.iter().filter(|p| p.eligible && !p.node.is_empty()) {
        for ip in pod.ips.iter().filter(|ip| all.contains(ip)) {
            out.entry(pod.node.as_str()).or_default().push(ip.to_string());
        }
    }
    for list in out.values_mut() {
        list.sort();
        list.dedup();
    }
    out
}

/// A digest of what every node document shares (the base, TLS and users): with a node's own rules
/// it fingerprints the document, so only the nodes whose inputs changed are rendered again.
fn shared_digest(input: &Input<'_>, doc: &RawConfig) -> Sha256 {
    let mut shared_digest = Sha256::new();
    // Without the enrolled addresses: each node's own are part of its fingerprint.
    let mut shared = doc.clone();
    if let Some(r) = shared.redirect.as_mut() {
        r.enrolled.clear();
    }
    shared_digest.update(serde_json::to_vec(&shared).unwrap_or_default());
    shared_digest.update(input.tls_dir.as_bytes());
    for (listener, t) in input.tls {
        shared_digest.update(listener.as_bytes());
        shared_digest.update(t.sha256.as_bytes());
    }
    shared_digest.update(input.htpasswd.unwrap_or_default().as_bytes());
    for (file, content) in input.parent_files {
        shared_digest.update(file.as_bytes());
        shared_digest.update(content.as_bytes());
    }
    shared_digest
}

/// The document: `doc` (the base without its grants) with the rules, TLS files and users.
pub(super) fn document(input: &Input<'_>, mut doc: RawConfig, rules: Vec<RawRule>) -> Result<Rendered, RenderError> {
    let mut tls_data = BTreeMap::new();
    let mut annotations = BTreeMap::new();
    let dir = input.tls_dir.trim_end_matches('/');
    for (index, l) in doc.listeners.iter_mut().enumerate() {
        let Some(tls) = l.tls.as_mut() else { continue };
        let Some(secret) = tls.secret_name.take() else { continue };
        let listener = l.name.clone();
        let Some(t) = input.tls.get(&listener) else {
            return Err(RenderError::MissingTls { index, listener, secret });
        };
        // The Secret becomes files; the listener's other TLS settings (ALPN, floor) stay.
        tls.cert_file = Some(format!("{dir}/{listener}.crt"));
        tls.key_file = Some(format!("{dir}/{listener}.key"));
        tls_data.insert(format!("{listener}.crt"), t.cert_pem.clone());
        tls_data.insert(format!("{listener}.key"), t.key_pem.clone());
        annotations.insert(format!("tunnelgate.io/tls-{listener}-sha256"), t.sha256.clone());
        annotations.insert(format!("tunnelgate.io/tls-{listener}-not-after"), t.not_after.clone());
    }
    // Proxy users: the validated file goes into the proxy's Secret, never into the ConfigMap.
    let mut auth_sha = None;
    if let Some(auth) = doc.auth.as_mut() {
        if let Some(secret) = auth.secret_name.take() {
            let Some(htpasswd) = input.htpasswd else { return Err(RenderError::MissingAuth { secret }) };
            auth.htpasswd_file = Some(format!("{dir}/htpasswd"));
            tls_data.insert("htpasswd".to_owned(), htpasswd.to_owned());
            auth_sha = Some(hex::encode(Sha256::digest(htpasswd.as_bytes())));
        }
    }
    // Parents' credentials and CAs: files in the proxy's Secret, like the users; their digests in
    // the document, so a rotation reaches every proxy as a config change.
    let mut parent_shas = Vec::new();
    for p in &mut doc.parents {
        let secrets = [
            (ParentFile::Credentials, p.credentials_secret.take(), "credentials"),
            (ParentFile::Ca, p.tls.as_mut().and_then(|t| t.ca_secret.take()), "CA certificates"),
        ];
        for (kind, secret, what) in secrets {
            let Some(secret) = secret else { continue };
            let file = kind.name(&p.name);
            let Some(content) = input.parent_files.get(&file) else {
                return Err(RenderError::MissingParentSecret { parent: p.name.clone(), secret, what });
            };
            let path = Some(format!("{dir}/{file}"));
            match kind {
                ParentFile::Credentials => p.credentials_file = path,
                ParentFile::Ca => {
                    if let Some(t) = p.tls.as_mut() {
                        t.ca_file = path;
                    }
                }
            }
            parent_shas.push((file.clone(), hex::encode(Sha256::digest(content.as_bytes()))));
            tls_data.insert(file, content.clone());
        }
    }
    let (networks, unparsed) = cluster_networks(input, &doc);
    let policy = &mut doc.policy;
    if !policy.rules.is_empty() {
        return Err(RenderError::Base("policy.rules must be empty: rules come from TunnelPolicies".into()));
    }
    // Written out even when the base leaves it implicit: no policy must never mean allow-all.
    policy.default_action.get_or_insert_with(|| "deny".to_owned());
    if !networks.is_empty() || !unparsed.is_empty() {
        let mut list: Vec<String> = networks.iter().map(ToString::to_string).collect();
        list.extend(unparsed);
        policy.cluster_networks = Some(list);
    }
    policy.rules = rules;
    let mut config =
        String::from("# Rendered by tunnelgate-operator from the base ConfigMap and TunnelPolicies. Do not edit.\n");
    config.push_str(&serde_yaml::to_string(&doc).map_err(|e| RenderError::Base(e.to_string()))?);
    for (listener, t) in input.tls {
        if tls_data.contains_key(&format!("{listener}.crt")) {
            // The certificate's identity is part of the document, so a rotation reaches every
            // proxy as a config change (a reload re-reads the mounted files).
            config.push_str(&format!("# tls {listener}: sha256={} notAfter={}\n", t.sha256, t.not_after));
        }
    }
    if let Some(sha) = auth_sha {
        // As for certificates: a change of users reaches every proxy as a config change.
        config.push_str(&format!("# auth htpasswd: sha256={sha}\n"));
    }
    for (file, sha) in parent_shas {
        config.push_str(&format!("# {file}: sha256={sha}\n"));
    }
    if config.len() > MAX_CONFIG_BYTES {
        return Err(RenderError::TooLarge { bytes: config.len() });
    }
    ProxyConfig::from_yaml(&config).map_err(RenderError::Invalid)?;
    let mut h = Sha256::new();
    h.update(config.as_bytes());
    for (k, v) in &tls_data {
        h.update(k.as_bytes());
        h.update([0]);
        h.update(v.as_bytes());
        h.update([0]);
    }
    Ok(Rendered {
        config,
        hash: hex::encode(h.finalize()),
        tls_data,
        annotations,
        nodes: BTreeMap::new(),
        shards: Vec::new(),
    })
}

/// What a render built again, and the shards it can reuse: kept in the memo between renders.
#[derive(Debug, Default)]
pub(super) struct Built {
    /// Node documents built by the last render (the others were reused).
    pub(super) nodes: usize,
    /// Shards built by the last render.
    pub(super) shards: usize,
    /// The last render's shards, reused where their inputs did not change.
    prior_shards: Vec<NodeDoc>,
}

/// The whole-cluster document: one document when it fits a ConfigMap, else in shards (each a
/// valid document holding whole rules, a very large rule's clients split among them), which
/// gateway proxies merge.
fn whole(input: &Input<'_>, doc: RawConfig, rules: &[&Rule], built: &mut Built) -> Result<Rendered, RenderError> {
    // Each client takes at least its text and `    - \n` in the document: past the limit by that
    // count alone, the one document is not built (at 100,000 pods it is megabytes of YAML).
    let floor: usize = rules.iter().flat_map(|r| r.clients.iter()).map(|ip| text_len(ip) + 7).sum();
    if floor <= MAX_CONFIG_BYTES {
        match document(input, doc.clone(), rules.iter().map(|r| r.raw(&r.clients)).collect()) {
            Err(RenderError::TooLarge { .. }) => {}
            other => {
                built.prior_shards.clear();
                return other;
            }
        }
    }
    sharded(input, doc, rules, built)
}

/// A piece of the whole view: a rule with some (or all) of its clients, and its size estimate.
struct Piece {
    rule: usize,
    clients: Vec<IpAddr>,
    /// Which chunk of its rule (0 for a rule kept whole): placed by rule name and chunk.
    chunk: u64,
    bytes: usize,
}

fn sharded(input: &Input<'_>, doc: RawConfig, rules: &[&Rule], built: &mut Built) -> Result<Rendered, RenderError> {
    let empty = document(input, doc.clone(), Vec::new())?;
    // Room for rules in each shard, with headroom for the estimate (JSON sizes, YAML indents).
    let room = MAX_CONFIG_BYTES.saturating_sub(empty.config.len()) * 3 / 4;
    let mut pieces = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        let body = r.body_bytes() + 40;
        let clients: usize = r.clients.iter().map(|ip| text_len(ip) + 8).sum();
        if body + clients <= room / 2 {
            pieces.push(Piece { rule: i, clients: r.clients.clone(), chunk: 0, bytes: body + clients });
            continue;
        }
        // A very large rule: its clients in chunks by address, so a pod change moves one chunk.
        let per = (room / 2).saturating_sub(body).max(1);
        let chunks = u64::try_from(clients.div_ceil(per).max(1)).unwrap_or(1);
        let mut split: Vec<Piece> =
            (0..chunks).map(|c| Piece { rule: i, clients: Vec::new(), chunk: c, bytes: body }).collect();
        for ip in &r.clients {
            let c = stable_hash(&octets(ip), 0) % chunks;
            let p = &mut split[usize::try_from(c).unwrap_or(0)];
            p.clients.push(*ip);
            p.bytes += text_len(ip) + 8;
        }
        pieces.extend(split.into_iter().filter(|p| !p.clients.is_empty()));
    }
    let total: usize = pieces.iter().map(|p| p.bytes).sum();
    let mut k = total.div_ceil(room * 7 / 10).max(2);
    let placed = loop {
        if k > proxy_config::shards::MAX_SHARDS {
            return Err(RenderError::TooLarge { bytes: total + empty.config.len() });
        }
        let k64 = u64::try_from(k).unwrap_or(1);
        let mut sums = vec![0usize; k];
        let place: Vec<usize> = pieces
            .iter()
            .map(|p| {
                let s = usize::try_from(stable_hash(rules[p.rule].body.name.as_bytes(), p.chunk) % k64).unwrap_or(0);
                sums[s] += p.bytes;
                s
            })
            .collect();
        if sums.iter().all(|b| *b <= room) {
            break place;
        }
        k += 1;
    };
    let mut by_shard: Vec<Vec<&Piece>> = vec![Vec::new(); k];
    for (p, s) in pieces.iter().zip(placed) {
        by_shard[s].push(p);
    }
    let shared = shared_digest(input, &doc);
    // Each rule's body digested once, whatever the shards that carry it.
    let mut bodies: HashMap<usize, [u8; 32]> = HashMap::new();
    let mut shards = Vec::with_capacity(k);
    for (s, own) in by_shard.iter().enumerate() {
        let mut fp = shared.clone();
        fp.update(s.to_le_bytes());
        for p in own {
            let body = bodies
                .entry(p.rule)
                .or_insert_with(|| Sha256::digest(serde_json::to_vec(&rules[p.rule].body).unwrap_or_default()).into());
            fp.update(*body);
            for ip in &p.clients {
                fp.update(octets(ip));
            }
            fp.update([0xff]);
        }
        let fingerprint = hex::encode(fp.finalize());
        if let Some(prior) = built.prior_shards.get(s).filter(|d| d.fingerprint == fingerprint) {
            shards.push(prior.clone());
            continue;
        }
        let d = document(input, doc.clone(), own.iter().map(|p| rules[p.rule].raw(&p.clients)).collect())?;
        built.shards += 1;
        shards.push(NodeDoc { config: d.config, hash: d.hash, fingerprint });
    }
    built.prior_shards.clone_from(&shards);
    let mut h = Sha256::new();
    h.update(empty.hash.as_bytes());
    for d in &shards {
        h.update(d.hash.as_bytes());
    }
    Ok(Rendered {
        config: String::new(),
        hash: hex::encode(h.finalize()),
        tls_data: empty.tls_data,
        annotations: empty.annotations,
        nodes: BTreeMap::new(),
        shards: shards.into_iter().map(|d| d.config).collect(),
    })
}

/// An address as 16 bytes (IPv4 mapped), for hashing.
fn octets(ip: &IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

/// A hash that is the same in every process and release (placement must not move between
/// renders): FNV-1a over `key` and `n`.
fn stable_hash(key: &[u8], n: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.iter().copied().chain(n.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
