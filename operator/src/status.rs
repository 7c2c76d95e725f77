//! The status each policy should have, computed from its render outcome (pure), following the
//! Kubernetes condition conventions: `lastTransitionTime` changes only when `status` does.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::TunnelPolicyStatus;
use crate::render::PolicyOutcome;

/// Why the rendered configuration is not in force (the same for every policy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotInForce {
    /// CamelCase reason: RenderFailed, TooLarge, ApplyFailed, BaseMissing.
    pub reason: &'static str,
    pub message: String,
}

/// What a new status starts from: the policy's generation, the status it has now, and the time.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    pub generation: Option<i64>,
    pub status: Option<&'a TunnelPolicyStatus>,
    pub now: &'a Time,
}

impl Seen<'_> {
    fn conditions(&self) -> &[Condition] {
        self.status.map(|s| s.conditions.as_slice()).unwrap_or_default()
    }
}

/// Condition `type_`; its transition time moves only when its status does.
fn condition(type_: &str, ok: bool, reason: &str, message: String, seen: &Seen<'_>) -> Condition {
    let status = if ok { "True" } else { "False" };
    let previous = seen.conditions().iter().find(|c| c.type_ == type_);
    let last_transition_time = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => seen.now.clone(),
    };
    let generation = seen.generation;
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// How far the render carrying a policy's current rules has spread over the proxies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    pub loaded: usize,
    pub total: usize,
    /// Nodes whose proxy is behind and reports a failed reload.
    pub stuck_nodes: Vec<String>,
    /// For a dry-run policy: (would deny, would allow) summed over the proxies.
    pub dry_run: Option<(u64, u64)>,
}

/// The `Enforced` condition for `r`.
fn enforced(r: &Rollout, seen: &Seen<'_>) -> Condition {
    let (status, reason, message) = if r.total == 0 {
        (false, "NoProxies", "no proxy pod of the release is running".to_owned())
    } else if r.loaded == r.total {
        (true, "Loaded", format!("loaded on {} of {} proxies", r.loaded, r.total))
    } else if !r.stuck_nodes.is_empty() {
        (
            false,
            "Stuck",
            format!(
                "loaded on {} of {} proxies; the proxies on {} fail to reload (their logs say why)",
                r.loaded,
                r.total,
                bounded(r.stuck_nodes.iter().cloned(), ", ")
            ),
        )
    } else {
        (false, "Rolling", format!("loaded on {} of {} proxies", r.loaded, r.total))
    };
    condition("Enforced", status, reason, message, seen)
}

/// The status of a policy that does not deserialize: not accepted, not rendered, and why.
pub fn unreadable(generation: Option<i64>, message: &str, now: &Time) -> TunnelPolicyStatus {
    let condition = |type_: &str| Condition {
        type_: type_.into(),
        status: "False".into(),
        reason: "Unreadable".into(),
        message: message.to_owned(),
        observed_generation: generation,
        last_transition_time: now.clone(),
    };
    TunnelPolicyStatus {
        observed_generation: generation,
        conditions: vec![condition("Accepted"), condition("Ready")],
        ..TunnelPolicyStatus::default()
    }
}

/// The desired status of a policy.
pub fn desired(
    outcome: &PolicyOutcome,
    seen: &Seen<'_>,
    config_name: &str,
    in_force: Result<&str, &NotInForce>,
    rollout: Option<&Rollout>,
) -> TunnelPolicyStatus {
    let (generation, old, now) = (seen.generation, seen.status, seen.now);
    let mut extra = Vec::new();
    let (accepted, ready, matched, summary) = match &outcome.result {
        Err(errors) => {
            let msg = bounded(errors.iter().map(ToString::to_string), "; ");
            (
                condition("Accepted", false, "Invalid", msg.clone(), seen),
                condition("Ready", false, "Invalid", "the spec is invalid; nothing was rendered for it".into(), seen),
                None,
                None,
            )
        }
        Ok(a) => {
            let accepted = condition("Accepted", true, "Valid", "the spec is valid".into(), seen);
            if !a.restricted.is_empty() {
                extra.push(condition(
                    "Restricted",
                    true,
                    "RefusedAddressSpace",
                    format!(
                        "not rendered: {} (private, loopback, link-local or metadata space, or the cluster's own networks, which a namespaced policy opens only where a ClusterTunnelPolicy with delegate: true, or the chart's config.addressGrants, grants it to its namespace)",
                        bounded(a.restricted.iter().cloned(), ", ")
                    ), seen));
            }
            let ready = ready(a, config_name, in_force, seen);

            // Rollout truth for policies whose rules are in the configuration in force.
            if let (Some(r), true) = (rollout, ready.status == "True" && !a.rules.is_empty()) {
                extra.push(enforced(r, seen));
            }
            (accepted, ready, i32::try_from(a.matched_pods).ok(), Some(a.summary.clone()))
        }
    };
    let counted = rollout.filter(|_| extra.iter().any(|c| c.type_ == "Enforced"));
    TunnelPolicyStatus {
        observed_generation: generation,
        matched_pods: matched,
        destinations: summary,
        proxies: counted.map(|r| crate::crd::ProxyCount {
            loaded: i32::try_from(r.loaded).unwrap_or(i32::MAX),
            total: i32::try_from(r.total).unwrap_or(i32::MAX),
        }),
        loaded: counted.map(|r| format!("{}/{}", r.loaded, r.total)),
        dry_run: rollout.and_then(|r| r.dry_run).map(|(d, a)| crate::crd::DryRunCounts {
            would_deny: i64::try_from(d).unwrap_or(i64::MAX),
            would_allow: i64::try_from(a).unwrap_or(i64::MAX),
            // Kept across reconciles, so the status changes only when a count does.
            since: Some(
                old.and_then(|s| s.dry_run.as_ref()).and_then(|d| d.since.clone()).unwrap_or_else(|| now.clone()),
            ),
        }),
        conditions: [accepted, ready].into_iter().chain(extra).collect(),
    }
}

/// The `Ready` condition of an accepted policy: its own outcome first (an over-budget policy is
/// in no document), then whether the configuration is in force.
fn ready(
    a: &crate::render::Accepted,
    config_name: &str,
    in_force: Result<&str, &NotInForce>,
    seen: &Seen<'_>,
) -> Condition {
    let (ok, reason, message): (bool, &str, String) = match in_force {
        _ if a.over_budget.is_some() => (false, "OverBudget", a.over_budget.clone().unwrap_or_default()),
        Err(e) => (false, e.reason, e.message.clone()),
        Ok(_) if a.delegated_to.is_some() => (
            true,
            "Delegated",
            format!(
                "TunnelPolicies of the {} namespace(s) it selects may open refused space inside its CIDRs",
                a.delegated_to.unwrap_or(0)
            ),
        ),
        Ok(_) if a.rules.is_empty() && a.matched_pods > 0 && !a.restricted.is_empty() => (
            false,
            "Restricted",
            "every destination is restricted (see the Restricted condition); no rule is rendered".into(),
        ),
        Ok(_) if a.rules.is_empty() => (
            false,
            "NoMatchingPods",
            "podSelector matches no running pod in this namespace; no rule is rendered".into(),
        ),
        // No document hash here: a change elsewhere must not rewrite every policy's status
        // (one write and one watch event per policy per change, at any scale).
        Ok(_) => (
            true,
            "Applied",
            format!("rules {} are in ConfigMap {config_name}", bounded(a.rules.iter().cloned(), ", ")),
        ),
    };
    condition("Ready", ok, reason, message, seen)
}

/// Most items a status message or event note lists; the rest are counted ("and 12 more").
const SHOWN: usize = 5;
/// Longest item a message shows (an invalid host name can be thousands of characters).
const ITEM_CHARS: usize = 200;

/// `items` joined by `sep`, bounded: the first few, each cut to a readable length, then how many
/// more there are. Every status message and event note goes through this, so one policy with
/// thousands of errors can neither exceed the API's object limit nor crowd out the others.
pub(crate) fn bounded<I: IntoIterator<Item = String>>(items: I, sep: &str) -> String {
    let mut shown = Vec::new();
    let mut more = 0usize;
    for item in items {
        if shown.len() < SHOWN {
            shown.push(if item.chars().count() > ITEM_CHARS {
                format!("{}…", item.chars().take(ITEM_CHARS).collect::<String>())
            } else {
                item
            });
        } else {
            more += 1;
        }
    }
    let mut out = shown.join(sep);
    if more > 0 {
        out.push_str(&format!("{sep}and {more} more"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_list_a_few_items_each_cut_short_and_count_the_rest() {
        let many = (0..3000).map(|i| format!("spec.destinations[0].hosts[{i}]: {:?}: not a host", "x".repeat(300)));
        let msg = bounded(many, "; ");
        assert!(msg.len() < 2000, "{} bytes", msg.len());
        assert!(msg.starts_with("spec.destinations[0].hosts[0]: "), "{msg}");
        assert!(msg.ends_with("; and 2995 more"), "{msg}");
        assert_eq!(bounded(["a".to_owned(), "b".to_owned()], ", "), "a, b");
    }
    use crate::render::Accepted;
    use crate::validate::FieldError;

    fn t(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    #[test]
    fn conditions_follow_conventions() {
        let ok = PolicyOutcome {
            id: proxy_config::origin::PolicyId::namespaced("a", "p"),
            result: Ok(Accepted {
                matched_pods: 2,
                summary: "x.test:443".into(),
                rules: vec!["a/p".into()],
                restricted: vec![],
                delegated_to: None,
                dry_run: false,
                over_budget: None,
            }),
        };
        let s1 = desired(
            &ok,
            &Seen { generation: Some(3), status: None, now: &t("2026-01-01T00:00:00Z") },
            "tg-proxy",
            Ok("abcdef0123456789"),
            None,
        );
        assert_eq!(s1.observed_generation, Some(3));
        assert_eq!(s1.matched_pods, Some(2));
        assert_eq!(
            (s1.conditions[0].type_.as_str(), s1.conditions[0].status.as_str(), s1.conditions[0].reason.as_str()),
            ("Accepted", "True", "Valid")
        );
        assert_eq!(
            (s1.conditions[1].type_.as_str(), s1.conditions[1].status.as_str(), s1.conditions[1].reason.as_str()),
            ("Ready", "True", "Applied")
        );
        // Same status later, after other policies changed the document: nothing needs writing.
        let s2 = desired(
            &ok,
            &Seen { generation: Some(3), status: Some(&s1), now: &t("2026-01-02T00:00:00Z") },
            "tg-proxy",
            Ok("0123456789abcdef"),
            None,
        );
        assert_eq!(s1, s2);
        // Invalid: both conditions False, the message names the field.
        let bad = PolicyOutcome {
            id: proxy_config::origin::PolicyId::namespaced("a", "p"),
            result: Err(vec![FieldError { path: "spec.destinations[0].hosts[0]".into(), message: "bad".into() }]),
        };
        let s3 = desired(
            &bad,
            &Seen { generation: Some(4), status: Some(&s2), now: &t("2026-01-03T00:00:00Z") },
            "tg-proxy",
            Ok("abc"),
            None,
        );
        assert_eq!(s3.conditions[0].status, "False");
        assert_eq!(s3.conditions[0].reason, "Invalid");
        assert!(s3.conditions[0].message.contains("spec.destinations[0].hosts[0]"));
        assert_eq!(s3.conditions[0].last_transition_time, t("2026-01-03T00:00:00Z"));
        // Valid but the document could not be written.
        let nf = NotInForce { reason: "TooLarge", message: "too big".into() };
        let s4 = desired(
            &ok,
            &Seen { generation: Some(5), status: None, now: &t("2026-01-04T00:00:00Z") },
            "tg-proxy",
            Err(&nf),
            None,
        );
        assert_eq!((s4.conditions[1].status.as_str(), s4.conditions[1].reason.as_str()), ("False", "TooLarge"));
        // Valid, but over its budget: not Ready, and the message says why; no Enforced condition.
        let mut over = ok.clone();
        if let Ok(a) = &mut over.result {
            a.rules.clear();
            a.over_budget = Some("not rendered: over the 65536 one policy may add".into());
        }
        let r = Rollout { loaded: 1, total: 1, stuck_nodes: vec![], dry_run: None };
        let s5 = desired(
            &over,
            &Seen { generation: Some(6), status: None, now: &t("2026-01-05T00:00:00Z") },
            "tg-proxy",
            Ok("abc"),
            Some(&r),
        );
        assert_eq!(s5.conditions[0].reason, "Valid");
        assert_eq!((s5.conditions[1].status.as_str(), s5.conditions[1].reason.as_str()), ("False", "OverBudget"));
        assert!(s5.conditions[1].message.contains("65536"));
        assert!(!s5.conditions.iter().any(|c| c.type_ == "Enforced") && s5.loaded.is_none());
    }

    #[test]
    fn enforced_says_how_far_the_rollout_went() {
        let ok = PolicyOutcome {
            id: proxy_config::origin::PolicyId::namespaced("a", "p"),
            result: Ok(Accepted {
                matched_pods: 1,
                summary: "x.test:443".into(),
                rules: vec!["a/p".into()],
                restricted: vec![],
                delegated_to: None,
                dry_run: false,
                over_budget: None,
            }),
        };
        let now = t("2026-01-01T00:00:00Z");
        let at = |loaded, total, stuck: &[&str]| {
            let r =
                Rollout { loaded, total, stuck_nodes: stuck.iter().map(|s| s.to_string()).collect(), dry_run: None };
            let st =
                desired(&ok, &Seen { generation: Some(1), status: None, now: &now }, "tg-proxy", Ok("h"), Some(&r));
            let c = st.conditions.iter().find(|c| c.type_ == "Enforced").cloned().unwrap();
            (st.loaded.unwrap(), c.status, c.reason, c.message)
        };
        assert_eq!(at(3, 3, &[]).0, "3/3");
        assert_eq!((at(3, 3, &[]).1.as_str(), at(3, 3, &[]).2.as_str()), ("True", "Loaded"));
        assert_eq!(at(1, 3, &[]).2, "Rolling");
        let stuck = at(1, 3, &["node-b"]);
        assert_eq!((stuck.1.as_str(), stuck.2.as_str()), ("False", "Stuck"));
        assert!(stuck.3.contains("node-b"), "{}", stuck.3);
        assert_eq!(at(0, 0, &[]).2, "NoProxies");
        // Not in force: no Enforced condition and no count.
        let nf = NotInForce { reason: "TooLarge", message: "too big".into() };
        let r = Rollout { loaded: 1, total: 1, stuck_nodes: vec![], dry_run: None };
        let st = desired(&ok, &Seen { generation: Some(1), status: None, now: &now }, "tg-proxy", Err(&nf), Some(&r));
        assert!(st.loaded.is_none() && !st.conditions.iter().any(|c| c.type_ == "Enforced"));
    }
}
