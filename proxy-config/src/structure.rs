//! Deserializing a document into its raw types while collecting every structural error (unknown
//! fields, wrong types, missing fields) in one pass, instead of stopping at the first.
//!
//! serde stops at the first error, so the sweep removes the offending node and tries again, at
//! most [`MAX_ERRORS`] times. Paths are reported as written (a removed list item does not shift
//! the indices of the items after it), and a field removed that way is never reported again as
//! missing: an object that loses a required field to an earlier error is dropped silently.

use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;
use serde_yaml::Value;

use crate::error::ConfigError;

/// Structural errors reported per document; past this the rest is not worth reading.
const MAX_ERRORS: usize = 50;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Index(usize),
    Key(String),
}

/// A document with structural errors: the errors, and what is left of it once the offending nodes
/// are removed (when that deserializes), so its semantic errors can be reported too.
pub(crate) struct Partial<T> {
    pub(crate) errors: Vec<ConfigError>,
    pub(crate) rest: Option<T>,
    sweep: Sweep,
}

impl<T> Partial<T> {
    /// An error found in `rest`, with its path as written in the document.
    pub(crate) fn as_written(&self, e: ConfigError) -> ConfigError {
        ConfigError::new(render(&self.sweep.original(&parse(&e.path))), e.message)
    }
}

/// `value` as `T`, or every structural error with its path.
pub(crate) fn deserialize<T: DeserializeOwned>(mut value: Value) -> Result<T, Partial<T>> {
    let mut errors: Vec<ConfigError> = Vec::new();
    let mut sweep = Sweep::default();
    for _ in 0..MAX_ERRORS * 2 {
        match serde_path_to_error::deserialize::<_, T>(&value) {
            Ok(t) if errors.is_empty() => return Ok(t),
            Ok(t) => return Err(Partial { errors, rest: Some(t), sweep }),
            Err(e) => {
                let Some(now) = e.path().iter().map(step).collect::<Option<Vec<Step>>>() else {
                    errors.push(ConfigError::new("", e.into_inner().to_string()));
                    break;
                };
                let message = e.into_inner().to_string();
                let original = sweep.original(&now);
                // "missing field" of an object whose field an earlier error removed: derived.
                let derived = message.starts_with("missing field")
                    && sweep.removed.iter().any(|r| r.len() == original.len() + 1 && r.starts_with(&original));
                if !derived {
                    errors.push(ConfigError::new(render(&original), message));
                }
                if now.is_empty() || !remove(&mut value, &now) || errors.len() >= MAX_ERRORS {
                    break;
                }
                sweep.removed.push(original);
            }
        }
    }
    Err(Partial { errors, rest: None, sweep })
}

/// The steps of a rendered path (`a.b[2].c`); keys of this format never hold `.` or `[`.
fn parse(path: &str) -> Vec<Step> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let mut pieces = part.split('[');
        if let Some(key) = pieces.next().filter(|k| !k.is_empty()) {
            out.push(Step::Key(key.to_owned()));
        }
        for idx in pieces {
            match idx.trim_end_matches(']').parse() {
                Ok(i) => out.push(Step::Index(i)),
                Err(_) => out.push(Step::Key(format!("[{idx}"))),
            }
        }
    }
    out
}

/// What the sweep took out, in the document's own coordinates.
#[derive(Default)]
struct Sweep {
    removed: Vec<Vec<Step>>,
}

impl Sweep {
    /// The path as written, from a path in the document with earlier list items removed.
    fn original(&self, now: &[Step]) -> Vec<Step> {
        let mut out: Vec<Step> = Vec::with_capacity(now.len());
        for s in now {
            match s {
                Step::Key(k) => out.push(Step::Key(k.clone())),
                Step::Index(i) => {
                    // Items removed earlier from this same list, by their original index.
                    let mut gone: Vec<usize> = self
                        .removed
                        .iter()
                        .filter(|r| r.len() == out.len() + 1 && r.starts_with(&out))
                        .filter_map(|r| match r.last() {
                            Some(Step::Index(g)) => Some(*g),
                            _ => None,
                        })
                        .collect();
                    gone.sort_unstable();
                    let mut idx = *i;
                    for g in gone {
                        if g <= idx {
                            idx += 1;
                        }
                    }
                    out.push(Step::Index(idx));
                }
            }
        }
        out
    }
}

fn step(s: &Segment) -> Option<Step> {
    match s {
        Segment::Seq { index } => Some(Step::Index(*index)),
        Segment::Map { key } | Segment::Enum { variant: key } => Some(Step::Key(key.clone())),
        Segment::Unknown => None,
    }
}

/// The dotted path the rest of the configuration errors use: `listeners[0].tls.certFile`.
fn render(path: &[Step]) -> String {
    let mut out = String::new();
    for s in path {
        match s {
            Step::Index(i) => out.push_str(&format!("[{i}]")),
            Step::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
        }
    }
    out
}

/// Removes the node at `path`; false when it is not there (then the sweep cannot go on).
fn remove(value: &mut Value, path: &[Step]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut node = value;
    for s in parents {
        let next = match s {
            Step::Index(i) => node.as_sequence_mut().and_then(|q| q.get_mut(*i)),
            Step::Key(k) => node.as_mapping_mut().and_then(|m| m.get_mut(k.as_str())),
        };
        match next {
            Some(n) => node = n,
            None => return false,
        }
    }
    match last {
        Step::Index(i) => match node.as_sequence_mut() {
            Some(q) if *i < q.len() => {
                q.remove(*i);
                true
            }
            _ => false,
        },
        Step::Key(k) => node.as_mapping_mut().is_some_and(|m| m.remove(k.as_str()).is_some()),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::ProxyConfig;

    fn report(doc: &str) -> Vec<String> {
        match ProxyConfig::from_yaml(doc) {
            Ok(_) => Vec::new(),
            Err(e) => e.errors().iter().map(|e| format!("{}: {}", e.path, e.message)).collect(),
        }
    }

    #[test]
    fn every_structural_and_semantic_error_in_one_report_with_paths_as_written() {
        let doc = "version: 1
listeners:
  - {name: a, bind: '127.0.0.1:1', colour: red}
  - {name: 7, bind: '127.0.0.1:2'}
  - {name: c, bind: '127.0.0.1:3', mode: sideways}
policy:
  rules:
    - {name: r1, action: allow, hosts: [ok.test, [nested], also.ok, 'bad host!']}
    - {name: r2, action: allow, cidrs: ['10.0.0.0/33'], portz: [443]}
relay: {idleTimeout: fast}
limits: {maxConnections: many}
";
        let r = report(doc);
        let has = |prefix: &str| r.iter().any(|l| l.starts_with(prefix));
        assert!(has("listeners[0].colour: unknown field `colour`"), "{r:#?}");
        assert!(has("listeners[1].name: invalid type"), "{r:#?}");
        assert!(has("listeners[2].mode: "), "an item after a removed one keeps its index: {r:#?}");
        assert!(has("policy.rules[0].hosts[1]: invalid type"), "{r:#?}");
        assert!(has("policy.rules[0].hosts[3]: forbidden character"), "index as written: {r:#?}");
        assert!(has("policy.rules[1].portz: unknown field"), "{r:#?}");
        assert!(has("policy.rules[1].cidrs[0]: "), "{r:#?}");
        assert!(has("relay.idleTimeout: invalid duration"), "{r:#?}");
        assert!(has("limits.maxConnections: invalid type"), "{r:#?}");
        // Nothing derived: no "missing field name" for listeners[1], no "rule has no destination".
        assert!(!r.iter().any(|l| l.contains("missing field") || l.contains("no destination")), "{r:#?}");
        assert_eq!(r.len(), 9, "{r:#?}");
    }
}
