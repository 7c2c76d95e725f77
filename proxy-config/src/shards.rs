//! The whole-cluster document in shards: when it would not fit one ConfigMap (1 MiB), the
//! operator writes it as several documents (`NAME-shard-K`, each a valid configuration holding
//! some rules, or some clients of a very large rule) and an index in `NAME` (key
//! [`INDEX_KEY`]) naming each shard's SHA-256 and the render number; a proxy merges the shards
//! once every one it sees matches the index, so it never applies half of a render. Both sides use
//! these definitions.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::raw::{RawConfig, RawRule};
use crate::status::stamp_render;

/// The key of the shard index in the whole-cluster document's ConfigMap (which then has no
/// configuration key, so nothing reads a part as the whole).
pub const INDEX_KEY: &str = "shards.json";

/// The label on each shard's ConfigMap, naming the document it is part of.
pub const SHARD_LABEL: &str = "tunnelgate.io/shard-of";

/// Shards of the whole-cluster document, at most (the chart's proxy Role names each of them, so a
/// proxy reads exactly its documents): past this it is not written (node documents still are).
pub const MAX_SHARDS: usize = 64;

/// The ConfigMap of shard `k` of the whole-cluster document `whole`.
pub fn shard_document_name(whole: &str, k: usize) -> String {
    format!("{whole}-shard-{k}")
}

/// What the whole-cluster document is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardIndex {
    /// The render these shards belong to (the merged document is stamped with it).
    pub render: u64,
    pub shards: Vec<ShardRef>,
}

/// One shard: its ConfigMap and the SHA-256 of its document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRef {
    pub name: String,
    pub sha256: String,
}

/// Hex SHA-256 of a shard's document, as the index names it.
pub fn digest(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Why shards could not be merged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error("shard index: {0}")]
    Index(String),
    #[error("shard {name}: {message}")]
    Shard { name: String, message: String },
}

/// Reads an index.
pub fn parse_index(text: &str) -> Result<ShardIndex, ShardError> {
    let index: ShardIndex = serde_json::from_str(text).map_err(|e| ShardError::Index(e.to_string()))?;
    if index.shards.is_empty() {
        return Err(ShardError::Index("names no shard".into()));
    }
    Ok(index)
}

/// The whole document from its shards, when `texts` (by ConfigMap name) holds every shard the
/// index names with the digest it names: `Ok(None)` while one is missing or not yet the indexed
/// version (a watch may show the shards before the index or after it). Everything but the rules
/// must be the same in every shard; a rule in several shards (a very large one, split by clients)
/// must be the same apart from its clients, which are joined.
pub fn assemble(index: &ShardIndex, texts: &BTreeMap<String, String>) -> Result<Option<String>, ShardError> {
    let mut set = ShardSet::default();
    for (name, text) in texts {
        set.insert(name, text);
    }
    set.assemble(index)
}

/// Shards as they arrive, each parsed once (a change of one shard parses that one only).
#[derive(Debug, Default)]
pub struct ShardSet {
    parts: BTreeMap<String, Part>,
}

#[derive(Debug)]
struct Part {
    sha256: String,
    /// The document, its trailing comments and a digest of everything but its rules, or why it
    /// does not parse.
    parsed: Result<Parsed, String>,
}

#[derive(Debug)]
struct Parsed {
    doc: RawConfig,
    /// The document without its rules, and its digest.
    bare: RawConfig,
    base: String,
    comments: String,
}

impl ShardSet {
    /// Takes shard `name`'s document (parsed unless it is the one already held).
    pub fn insert(&mut self, name: &str, text: &str) {
        let sha256 = digest(text);
        if self.parts.get(name).is_some_and(|p| p.sha256 == sha256) {
            return;
        }
        let parsed = serde_yaml::from_str::<RawConfig>(text).map_err(|e| e.to_string()).map(|doc| {
            // The trailing comments (certificate, users and parents' files digests) make a
            // rotation a change of the merged text, as they do in one document.
            let comments = text.lines().skip(1).filter(|l| l.starts_with("# ") && !l.starts_with("# Rendered")).fold(
                String::new(),
                |mut acc, l| {
                    acc.push_str(l);
                    acc.push('\n');
                    acc
                },
            );
            let mut bare = doc.clone();
            bare.policy.rules.clear();
            let base = digest(&serde_json::to_string(&bare).unwrap_or_default());
            Parsed { doc, bare, base, comments }
        });
        self.parts.insert(name.to_owned(), Part { sha256, parsed });
    }

    pub fn remove(&mut self, name: &str) {
        self.parts.remove(name);
    }

    /// Keeps the shards `keep` says to.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.parts.retain(|name, _| keep(name));
    }

    /// [`assemble`] from the shards held.
    pub fn assemble(&self, index: &ShardIndex) -> Result<Option<String>, ShardError> {
        let mut parts = Vec::with_capacity(index.shards.len());
        for s in &index.shards {
            match self.parts.get(&s.name) {
                Some(p) if p.sha256 == s.sha256 => match &p.parsed {
                    Ok(p) => parts.push((s.name.as_str(), p)),
                    Err(e) => return Err(ShardError::Shard { name: s.name.clone(), message: e.clone() }),
                },
                _ => return Ok(None),
            }
        }
        merge(index.render, &parts).map(Some)
    }
}

fn merge(render: u64, parts: &[(&str, &Parsed)]) -> Result<String, ShardError> {
    let err = |name: &str, message: String| ShardError::Shard { name: name.to_owned(), message };
    let Some((first, head)) = parts.first() else { return Err(ShardError::Index("names no shard".into())) };
    let mut rules: BTreeMap<&str, RawRule> = BTreeMap::new();
    for (name, p) in parts {
        if p.base != head.base {
            return Err(err(name, format!("differs from shard {first:?} outside its rules")));
        }
        for rule in &p.doc.policy.rules {
            match rules.get_mut(rule.name.as_str()) {
                None => {
                    rules.insert(rule.name.as_str(), rule.clone());
                }
                Some(have) => {
                    // Any client (no list) is never split: it must not be narrowed by a join.
                    let same = have.clients.is_some()
                        && rule.clients.is_some()
                        && RawRule { clients: have.clients.clone(), ..rule.clone() } == *have;
                    if !same {
                        return Err(err(name, format!("rule {:?} differs from another shard's", rule.name)));
                    }
                    let clients = have.clients.get_or_insert_with(Vec::new);
                    clients.extend(rule.clients.iter().flatten().cloned());
                }
            }
        }
    }
    let mut doc = head.bare.clone();
    doc.policy.rules = rules
        .into_values()
        .map(|mut r| {
            if let Some(c) = r.clients.as_mut() {
                c.sort();
                c.dedup();
            }
            r
        })
        .collect();
    // JSON (which is YAML): megabytes at the largest sizes, read back by a JSON parser.
    let json = serde_json::to_string(&doc).map_err(|e| ShardError::Index(e.to_string()))?;
    Ok(stamp_render(
        render,
        &format!("# Merged by tunnelgate-proxy from {} shards.\n{}{json}\n", parts.len(), head.comments),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ProxyConfig;

    fn shard(rules: &str) -> String {
        stamp_render(
            7,
            &format!(
                "# Rendered by tunnelgate-operator. Do not edit.\nversion: 1\nlisteners:\n- name: forward\n  bind: 127.0.0.1:3128\npolicy:\n  defaultAction: deny\n  rules:\n{rules}# tls forward: sha256=ab notAfter=x\n"
            ),
        )
    }

    fn index(texts: &[&String]) -> (ShardIndex, BTreeMap<String, String>) {
        let shards: Vec<ShardRef> = texts
            .iter()
            .enumerate()
            .map(|(k, t)| ShardRef { name: shard_document_name("tg-proxy", k), sha256: digest(t) })
            .collect();
        let map = shards.iter().zip(texts).map(|(s, t)| (s.name.clone(), (*t).clone())).collect();
        (ShardIndex { render: 7, shards }, map)
    }

    #[test]
    fn shards_merge_into_one_document_once_every_one_is_the_indexed_version() {
        let a = shard("  - {name: ns/a, action: allow, clients: [10.0.0.1], hosts: [a.test]}\n  - {name: cluster:big, action: allow, clients: [10.0.0.2, 10.0.0.3], hosts: [b.test], priority: 10}\n");
        let b = shard("  - {name: cluster:big, action: allow, clients: [10.0.0.4], hosts: [b.test], priority: 10}\n  - {name: ns/c, action: deny, clients: [10.0.0.5], cidrs: [192.0.2.0/24]}\n");
        let (idx, mut texts) = index(&[&a, &b]);
        let merged = assemble(&idx, &texts).unwrap().unwrap();
        assert_eq!(crate::status::render_of(&merged), Some(7));
        assert!(merged.contains("# tls forward: sha256=ab"), "{merged}");
        let cfg = ProxyConfig::from_yaml(&merged).unwrap();
        let clients = |name: &str| -> Vec<String> {
            let r = cfg.policy.rules.iter().find(|r| r.name == name).unwrap();
            r.clients.iter().map(|c| c.addr().to_string()).collect()
        };
        assert_eq!(clients("cluster:big"), ["10.0.0.2", "10.0.0.3", "10.0.0.4"], "a split rule's clients joined");
        assert_eq!(clients("ns/a"), ["10.0.0.1"]);
        assert_eq!(clients("ns/c"), ["10.0.0.5"]);
        // A shard not yet at the indexed version, or missing: nothing yet.
        texts.insert(idx.shards[1].name.clone(), shard(""));
        assert_eq!(assemble(&idx, &texts), Ok(None));
        texts.remove(&idx.shards[1].name);
        assert_eq!(assemble(&idx, &texts), Ok(None));
    }

    #[test]
    fn shards_that_disagree_are_refused_with_the_shard_named() {
        let a = shard("  - {name: cluster:big, action: allow, clients: [10.0.0.2], hosts: [b.test]}\n");
        let b = shard("  - {name: cluster:big, action: allow, clients: [10.0.0.4], hosts: [c.test]}\n");
        let (idx, texts) = index(&[&a, &b]);
        let e = assemble(&idx, &texts).unwrap_err().to_string();
        assert!(e.contains("tg-proxy-shard-1") && e.contains("cluster:big"), "{e}");
        let c = shard("").replace("defaultAction: deny", "defaultAction: allow");
        let (idx, texts) = index(&[&a, &c]);
        let e = assemble(&idx, &texts).unwrap_err().to_string();
        assert!(e.contains("outside its rules"), "{e}");
        assert!(parse_index("{\"render\": 1, \"shards\": []}").is_err());
    }
}
