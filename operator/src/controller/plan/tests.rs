//! The plan as a table: policies, render outcomes, the write's result and the proxies' reports in;
//! statuses, events and gauges out. No API server.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;

use super::*;
use crate::render::Accepted;
use crate::validate::FieldError;

fn policy(name: &str, generation: i64) -> TunnelPolicy {
    serde_json::from_value(json!({
        "apiVersion": "tunnelgate.io/v1alpha1", "kind": "TunnelPolicy",
        "metadata": {"name": name, "namespace": "shop", "generation": generation},
        "spec": {"podSelector": {}, "action": "Allow", "destinations": [{"hosts": ["api.example.com"], "ports": [443]}]},
    }))
    .unwrap()
}

fn with_status(mut p: TunnelPolicy, status: TunnelPolicyStatus) -> TunnelPolicy {
    p.status = Some(status);
    p
}

fn accepted(name: &str, dry_run: bool) -> PolicyOutcome {
    PolicyOutcome {
        id: PolicyId::namespaced("shop", name),
        result: Ok(Accepted {
            matched_pods: 2,
            summary: "api.example.com:443".into(),
            rules: vec![format!("shop/{name}")],
            restricted: Vec::new(),
            delegated_to: None,
            dry_run,
            over_budget: None,
        }),
    }
}

fn invalid(name: &str, message: &str) -> PolicyOutcome {
    PolicyOutcome {
        id: PolicyId::namespaced("shop", name),
        result: Err(vec![FieldError { path: "spec.destinations[0].ports[0]".into(), message: message.into() }]),
    }
}

fn proxy(pod: &str, render: Option<u64>, failed: Option<&str>) -> (Endpoint, Report) {
    (
        Endpoint { pod: pod.into(), node: format!("node-{pod}"), ip: "10.0.0.1".parse().unwrap() },
        Report { render, failed: failed.map(str::to_owned), dry_run: BTreeMap::new() },
    )
}

fn pod_ref(pod: &str) -> ObjectReference {
    ObjectReference { kind: Some("Pod".into()), name: Some(pod.into()), ..ObjectReference::default() }
}

/// A view of `policies` with `outcomes`, render 7 in force, and `proxies` (when observed).
fn view<'a>(
    policies: &'a [TunnelPolicy],
    outcomes: &'a [PolicyOutcome],
    proxies: Option<&'a [(Endpoint, Report)]>,
) -> View<'a> {
    View {
        outcomes,
        policies: policies.iter().map(|p| (PolicyObject::Namespaced(p).id(), PolicyObject::Namespaced(p))).collect(),
        unreadable: &[],
        warnings: &[],
        in_force: Ok("hash"),
        proxies,
        proxy_pods: proxies.into_iter().flatten().map(|(e, _)| (e.pod.clone(), pod_ref(&e.pod))).collect(),
        render: 7,
        config_name: "tg/tunnelgate-proxy",
        behind_warning_after: Duration::from_secs(120),
    }
}

fn clock() -> Clock {
    Clock { now: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH), instant: tokio::time::Instant::now() }
}

fn condition<'s>(s: &'s TunnelPolicyStatus, type_: &str) -> (&'s str, &'s str) {
    let c = s.conditions.iter().find(|c| c.type_ == type_).unwrap();
    (c.status.as_str(), c.reason.as_str())
}

fn reasons(plan: &Plan) -> Vec<&'static str> {
    plan.events.iter().map(|e| e.reason).collect()
}

#[test]
fn a_valid_policy_gets_its_rollout_and_an_unchanged_status_is_not_written_again() {
    let policies = [policy("web", 3)];
    let outcomes = [accepted("web", false)];
    let proxies = [proxy("a", Some(7), None), proxy("b", Some(6), None)];
    let mut memory = Memory::new(Duration::from_secs(300));
    let plan = plan(&view(&policies, &outcomes, Some(&proxies)), &mut memory, &clock());
    assert_eq!(plan.statuses.len(), 1);
    let (id, status) = &plan.statuses[0];
    assert_eq!(id, &PolicyId::namespaced("shop", "web"));
    assert_eq!(status.observed_generation, Some(3));
    assert_eq!(condition(status, "Accepted"), ("True", "Valid"));
    assert_eq!(condition(status, "Ready"), ("True", "Applied"));
    // Its rules first appeared in render 7: one of the two proxies has it.
    assert_eq!(condition(status, "Enforced"), ("False", "Rolling"));
    assert_eq!(status.loaded.as_deref(), Some("1/2"));
    assert_eq!((plan.accepted, plan.rejected), (1, 0));
    assert_eq!(plan.proxy_states, Some([("current", 1), ("behind", 1), ("failing", 0)]));
    assert!(plan.events.is_empty());
    // Behind for less than the threshold: look again when it would become overdue.
    assert!(plan.recheck.is_some_and(|d| d <= Duration::from_secs(120)));

    // The policy now carries that status: nothing to write.
    let policies = [with_status(policy("web", 3), status.clone())];
    let again = super::plan(&view(&policies, &outcomes, Some(&proxies)), &mut memory, &clock());
    assert!(again.statuses.is_empty(), "{:?}", again.statuses);
}

#[test]
fn an_invalid_policy_is_rejected_alone_and_warned_once_per_generation() {
    let policies = [policy("web", 1), policy("bad", 4)];
    let outcomes = [accepted("web", false), invalid("bad", "port 0 is not a port")];
    let mut memory = Memory::new(Duration::from_secs(300));
    let first = plan(&view(&policies, &outcomes, None), &mut memory, &clock());
    assert_eq!((first.accepted, first.rejected), (1, 1));
    let bad = &first.statuses.iter().find(|(id, _)| id.name() == "bad").unwrap().1;
    assert_eq!(condition(bad, "Accepted"), ("False", "Invalid"));
    assert!(bad.conditions.iter().any(|c| c.message.contains("port 0 is not a port")));
    let web = &first.statuses.iter().find(|(id, _)| id.name() == "web").unwrap().1;
    assert_eq!(condition(web, "Ready"), ("True", "Applied"), "the valid policy is applied");
    assert_eq!(reasons(&first), ["InvalidSpec"]);
    assert_eq!(first.events[0].reference.name.as_deref(), Some("bad"));
    assert!(first.events[0].warning);

    let second = plan(&view(&policies, &outcomes, None), &mut memory, &clock());
    assert!(second.events.is_empty(), "the same problem is not announced again");
    // Fixed, then broken again the same way at a new generation: announced again.
    let fixed = [accepted("web", false), accepted("bad", false)];
    assert!(plan(&view(&policies, &fixed, None), &mut memory, &clock()).events.is_empty());
    let policies = [policy("web", 1), policy("bad", 5)];
    assert_eq!(reasons(&plan(&view(&policies, &outcomes, None), &mut memory, &clock())), ["InvalidSpec"]);
}

#[test]
fn a_failed_write_says_why_on_every_policy_and_reports_no_rollout() {
    let policies = [policy("web", 1)];
    let outcomes = [accepted("web", false)];
    let proxies = [proxy("a", Some(6), None)];
    let mut v = view(&policies, &outcomes, Some(&proxies));
    v.in_force =
        Err(NotInForce { reason: "ApplyFailed", message: "cannot apply ConfigMap tg/tunnelgate-proxy".into() });
    let plan = plan(&v, &mut Memory::new(Duration::from_secs(300)), &clock());
    let status = &plan.statuses[0].1;
    assert_eq!(condition(status, "Ready"), ("False", "ApplyFailed"));
    assert!(status.conditions.iter().all(|c| c.type_ != "Enforced"));
    assert_eq!(status.loaded, None);
}

#[test]
fn proxies_that_fail_or_stay_behind_are_announced_on_their_pods() {
    let policies = [policy("web", 1)];
    let outcomes = [accepted("web", false)];
    let proxies = [proxy("a", Some(7), None), proxy("b", Some(5), Some("tls")), proxy("c", Some(6), None)];
    let mut memory = Memory::new(Duration::from_secs(300));
    let mut c = clock();
    let first = plan(&view(&policies, &outcomes, Some(&proxies)), &mut memory, &c);
    assert_eq!(reasons(&first), ["ReloadFailing"]);
    assert_eq!(first.events[0].reference.name.as_deref(), Some("b"));
    assert!(first.events[0].note.contains("reason: tls"));
    assert_eq!(first.proxy_states, Some([("current", 1), ("behind", 1), ("failing", 1)]));
    let status = &first.statuses[0].1;
    assert_eq!(condition(status, "Enforced"), ("False", "Stuck"));
    // Past the threshold, the proxy still behind (not failing) is announced once for this render.
    c.instant += Duration::from_secs(121);
    let later = plan(&view(&policies, &outcomes, Some(&proxies)), &mut memory, &c);
    assert_eq!(reasons(&later), ["ProxyBehind"]);
    assert_eq!(later.events[0].reference.name.as_deref(), Some("c"));
    assert!(later.events[0].note.contains("render 7"));
    assert!(plan(&view(&policies, &outcomes, Some(&proxies)), &mut memory, &c).events.is_empty());
}

#[test]
fn a_dry_run_policy_reports_what_its_rules_would_have_changed() {
    let policies = [policy("try", 1)];
    let outcomes = [accepted("try", true)];
    let mut counted = proxy("a", Some(7), None);
    counted.1.dry_run.insert("shop/try".into(), (3, 0));
    counted.1.dry_run.insert("shop/try-other".into(), (100, 100));
    let mut memory = Memory::new(Duration::from_secs(300));
    let mut c = clock();
    let proxies = [counted.clone()];
    let first = plan(&view(&policies, &outcomes, Some(&proxies)), &mut memory, &c);
    let dry = first.statuses[0].1.dry_run.as_ref().unwrap();
    assert_eq!((dry.would_deny, dry.would_allow), (3, 0), "another policy's rule is not counted");
    assert!(first.events.is_empty(), "the first sighting sets the baseline");
    counted.1.dry_run.insert("shop/try".into(), (10, 0));
    let proxies = [counted];
    c.instant += Duration::from_secs(301);
    let later = plan(&view(&policies, &outcomes, Some(&proxies)), &mut memory, &c);
    assert_eq!(reasons(&later), ["DryRun"]);
    assert!(!later.events[0].warning);
    assert!(later.events[0].note.contains("would have denied 7"), "{}", later.events[0].note);
}

#[test]
fn unreadable_policies_and_invalid_secrets_are_told_once() {
    let unreadable = [UnreadablePolicy {
        id: PolicyId::cluster("future"),
        generation: Some(2),
        reference: ObjectReference { name: Some("future".into()), ..ObjectReference::default() },
        path: "spec.destinations[0].mode".into(),
        message: "unknown variant".into(),
    }];
    let secret = |note: &str| Warning {
        key: "secret/web-tls".into(),
        reference: ObjectReference { name: Some("web-tls".into()), ..ObjectReference::default() },
        reason: "InvalidSecret",
        note: note.into(),
    };
    let warnings = [secret("expired")];
    let mut memory = Memory::new(Duration::from_secs(300));
    let v = |warnings| View { unreadable: &unreadable, warnings, ..view(&[], &[], None) };
    let first = plan(&v(&warnings), &mut memory, &clock());
    assert_eq!(reasons(&first), ["InvalidSecret", "Unreadable"]);
    assert_eq!(first.rejected, 1);
    let (id, status) = &first.statuses[0];
    assert_eq!(id, &PolicyId::cluster("future"));
    assert_eq!(condition(status, "Accepted"), ("False", "Unreadable"));
    assert!(status.conditions[0].message.contains("spec.destinations[0].mode"));
    let second = plan(&v(&warnings), &mut memory, &clock());
    assert!(second.events.is_empty() && second.statuses.is_empty());
    // A new problem with the same Secret is told; a fixed one is forgotten (told again if it recurs).
    let changed = [secret("wrong key")];
    assert_eq!(reasons(&plan(&v(&changed), &mut memory, &clock())), ["InvalidSecret"]);
    assert!(plan(&v(&[]), &mut memory, &clock()).events.is_empty());
    assert_eq!(reasons(&plan(&v(&changed), &mut memory, &clock())), ["InvalidSecret"]);
}
