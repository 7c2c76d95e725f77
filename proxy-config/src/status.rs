//! What the proxy and the operator tell each other besides the configuration: where a document
//! lives (the ConfigMap key, a node's own ConfigMap), the render stamp the operator writes on the
//! first line of each document it renders, and the `/config` status document a proxy's admin
//! server answers (read by the operator's rollout view and by `kubectl tunnelgate status`). One
//! definition each, so both sides cannot drift apart.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The ConfigMap key that holds a configuration document (the base, the whole-cluster document
/// and each node's).
pub const CONFIG_KEY: &str = "config.yaml";

/// The ConfigMap of node `node`'s own document, beside the whole-cluster document `whole`
/// (`WHOLE-node-NODE`): written by the operator when it renders per node, preferred by a proxy
/// started with `--node-name` while it exists.
pub fn node_document_name(whole: &str, node: &str) -> String {
    format!("{whole}-node-{node}")
}

/// The first line of a document the operator renders: `# tunnelgate-render: N`.
const RENDER_STAMP: &str = "# tunnelgate-render: ";

/// How many lines from the top a render stamp is looked for.
const STAMP_LINES: usize = 4;

/// `text` stamped with render number `render`.
pub fn stamp_render(render: u64, text: &str) -> String {
    format!("{RENDER_STAMP}{render}\n{text}")
}

/// The render number stamped on `text`, if it carries one.
pub fn render_of(text: &str) -> Option<u64> {
    text.lines().take(STAMP_LINES).find_map(|l| l.strip_prefix(RENDER_STAMP)?.trim().parse().ok())
}

/// The `/config` document: which configuration is in force and how the last reload went. Read
/// leniently (a field a proxy of another version does not send takes its default).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ConfigStatus {
    /// 1 for the first configuration, +1 for each successful reload.
    pub generation: u64,
    /// Hex SHA-256 of the document text.
    pub sha256: String,
    /// The operator's render number, when the document carries one.
    pub render: Option<u64>,
    /// RFC 3339, seconds.
    pub loaded_at: String,
    pub last_reload: LastReload,
    /// Grows with every change of what this document reports (for `?since=` long-polls).
    pub changes: u64,
    /// Dry-run verdicts by rule name since the proxy started.
    pub dry_run: BTreeMap<String, DryRunCount>,
}

/// The outcome of the last reload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastReload {
    pub failed: bool,
    /// A closed-set reason when it failed (`invalid`, `tls`, `dns`, `auth`, `admin-token`, ...).
    pub reason: Option<String>,
}

/// What one dry-run rule would have changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DryRunCount {
    pub would_deny: u64,
    pub would_allow: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stamp_reads_back_and_the_status_document_keeps_its_wire_names() {
        let text = stamp_render(42, "version: 1\n");
        assert_eq!(render_of(&text), Some(42));
        assert_eq!(render_of("version: 1\n"), None);
        let mut st = ConfigStatus {
            generation: 3,
            sha256: "ab".into(),
            render: Some(42),
            loaded_at: "2026-12-06T00:00:00Z".into(),
            last_reload: LastReload { failed: true, reason: Some("tls".into()) },
            changes: 9,
            dry_run: BTreeMap::new(),
        };
        st.dry_run.insert("ns/p".into(), DryRunCount { would_deny: 2, would_allow: 1 });
        let json = serde_json::to_value(&st).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"generation": 3, "sha256": "ab", "render": 42, "loadedAt": "2026-12-06T00:00:00Z",
                "lastReload": {"failed": true, "reason": "tls"}, "changes": 9,
                "dryRun": {"ns/p": {"wouldDeny": 2, "wouldAllow": 1}}})
        );
        assert_eq!(serde_json::from_value::<ConfigStatus>(json).unwrap(), st);
    }
}
