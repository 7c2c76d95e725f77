//! What a reconcile tells the cluster once the documents are rendered and written, worked out
//! without I/O ([`plan`]): each policy's status, the events to publish (invalid Secrets, invalid
//! and unreadable policies, proxies that fail to reload or stay behind, dry-run summaries) and the
//! gauges. It keeps what it must remember between reconciles in its own [`Memory`]; the executor
//! in the controller queues the statuses, publishes the events and sets the gauges.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::events::{Event, EventType};
use kube::Resource;
use proxy_config::origin::PolicyId;

use super::dryrun;
use super::rollout::{self, Endpoint, Report};
use crate::crd::{ClusterTunnelPolicy, TunnelPolicy, TunnelPolicyStatus};
use crate::render::PolicyOutcome;
use crate::status::{self, NotInForce, Seen};

/// A policy object of either kind, as the cache holds it.
#[derive(Debug, Clone, Copy)]
pub(super) enum PolicyObject<'a> {
    Namespaced(&'a TunnelPolicy),
    Cluster(&'a ClusterTunnelPolicy),
}

impl PolicyObject<'_> {
    pub(super) fn id(&self) -> PolicyId {
        match self {
            PolicyObject::Namespaced(p) => PolicyId::namespaced(
                p.metadata.namespace.as_deref().unwrap_or_default(),
                p.metadata.name.as_deref().unwrap_or_default(),
            ),
            PolicyObject::Cluster(p) => PolicyId::cluster(p.metadata.name.as_deref().unwrap_or_default()),
        }
    }

    fn generation(&self) -> Option<i64> {
        match self {
            PolicyObject::Namespaced(p) => p.metadata.generation,
            PolicyObject::Cluster(p) => p.metadata.generation,
        }
    }

    fn status(&self) -> Option<&TunnelPolicyStatus> {
        match self {
            PolicyObject::Namespaced(p) => p.status.as_ref(),
            PolicyObject::Cluster(p) => p.status.as_ref(),
        }
    }

    fn reference(&self) -> ObjectReference {
        match self {
            PolicyObject::Namespaced(p) => p.object_ref(&()),
            PolicyObject::Cluster(p) => p.object_ref(&()),
        }
    }
}

/// A policy that does not deserialize (a value from a newer CRD than this operator's?).
#[derive(Debug, Clone)]
pub(super) struct UnreadablePolicy {
    pub(super) id: PolicyId,
    pub(super) generation: Option<i64>,
    pub(super) reference: ObjectReference,
    /// The path of the value that could not be read, and why.
    pub(super) path: String,
    pub(super) message: String,
}

/// A Warning event about one object, published once per distinct note while it lasts.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Warning {
    /// What the warning is about (`secret/NAME`, `policy/ID/GENERATION`, `proxy/POD/...`).
    pub(super) key: String,
    pub(super) reference: ObjectReference,
    pub(super) reason: &'static str,
    pub(super) note: String,
}

/// Everything the plan reads.
pub(super) struct View<'a> {
    /// What the render made of each policy.
    pub(super) outcomes: &'a [PolicyOutcome],
    /// The readable policies, by identity.
    pub(super) policies: HashMap<PolicyId, PolicyObject<'a>>,
    pub(super) unreadable: &'a [UnreadablePolicy],
    /// Warnings the inputs raised (invalid Secrets).
    pub(super) warnings: &'a [Warning],
    /// The hash of the document in force, or why the render is not in force.
    pub(super) in_force: Result<&'a str, NotInForce>,
    /// The release's proxies and what each reports (`None`: not observed).
    pub(super) proxies: Option<&'a [(Endpoint, Report)]>,
    /// The proxies' pods, by pod name, for events about a proxy.
    pub(super) proxy_pods: HashMap<String, ObjectReference>,
    /// The latest render number.
    pub(super) render: u64,
    /// The rendered ConfigMap's name, for statuses.
    pub(super) config_name: &'a str,
    /// A proxy behind the latest render for this long gets a Warning event.
    pub(super) behind_warning_after: Duration,
}

/// The time of a reconcile: the wall clock for statuses, the monotonic one for intervals.
#[derive(Debug, Clone)]
pub(super) struct Clock {
    pub(super) now: Time,
    pub(super) instant: tokio::time::Instant,
}

impl Clock {
    pub(super) fn now() -> Clock {
        Clock { now: Time(k8s_openapi::jiff::Timestamp::now()), instant: tokio::time::Instant::now() }
    }
}

/// What the plan remembers from one reconcile to the next.
pub(super) struct Memory {
    /// Per policy: its generation and rules, and the first render that carried them.
    policy_renders: HashMap<PolicyId, (Option<i64>, Vec<String>, u64)>,
    /// The last note published per warning key, so an unchanged problem is not re-announced.
    warned: HashMap<String, String>,
    /// When each dry-run policy was last announced.
    dry_run_events: dryrun::DryRunEvents,
    /// Proxies behind the latest render, and since when.
    laggards: rollout::Laggards,
}

impl Memory {
    pub(super) fn new(dry_run_event_interval: Duration) -> Memory {
        Memory {
            policy_renders: HashMap::new(),
            warned: HashMap::new(),
            dry_run_events: dryrun::DryRunEvents::new(dry_run_event_interval),
            laggards: rollout::Laggards::default(),
        }
    }
}

/// What to tell the cluster.
#[derive(Debug, Default)]
pub(super) struct Plan {
    /// Statuses that differ from the ones the policies have.
    pub(super) statuses: Vec<(PolicyId, TunnelPolicyStatus)>,
    pub(super) events: Vec<PlannedEvent>,
    /// Policies accepted and rejected (invalid or unreadable).
    pub(super) accepted: i64,
    pub(super) rejected: i64,
    /// Proxies current, behind and failing (when observed).
    pub(super) proxy_states: Option<[(&'static str, i64); 3]>,
    /// Look again after this long even without a change (a proxy may become overdue).
    pub(super) recheck: Option<Duration>,
}

impl Plan {
    /// Adds `w` unless its note was already published; marks its key as still live.
    fn warn(&mut self, memory: &mut Memory, live: &mut HashSet<String>, w: Warning) {
        live.insert(w.key.clone());
        if memory.warned.get(&w.key) == Some(&w.note) {
            return;
        }
        memory.warned.insert(w.key, w.note.clone());
        self.events.push(PlannedEvent { reference: w.reference, warning: true, reason: w.reason, note: w.note });
    }
}

/// An event to publish on an object.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PlannedEvent {
    pub(super) reference: ObjectReference,
    /// Warning or Normal.
    pub(super) warning: bool,
    pub(super) reason: &'static str,
    pub(super) note: String,
}

impl PlannedEvent {
    /// The event as the recorder publishes it.
    pub(super) fn event(&self) -> Event {
        Event {
            type_: if self.warning { EventType::Warning } else { EventType::Normal },
            reason: self.reason.into(),
            note: Some(self.note.clone()),
            action: "Reconcile".into(),
            secondary: None,
        }
    }
}

/// The statuses, events and gauges for `v`.
pub(super) fn plan(v: &View<'_>, memory: &mut Memory, clock: &Clock) -> Plan {
    let mut plan = Plan { proxy_states: v.proxies.map(|p| rollout::proxy_states(v.render, p)), ..Plan::default() };
    // Warnings remembered for objects that are gone or fixed are forgotten, so the map stays bounded.
    let mut live = HashSet::new();
    for w in v.warnings {
        plan.warn(memory, &mut live, w.clone());
    }
    let renders = first_renders(v, memory);
    let mut dry_run_live = HashSet::new();
    for o in v.outcomes {
        let Some(p) = v.policies.get(&o.id) else { continue };
        if o.result.is_ok() {
            plan.accepted += 1;
        } else {
            plan.rejected += 1;
        }
        let rollout = policy_rollout(v, o, renders.get(&o.id).copied());
        if let Some(totals) = rollout.as_ref().and_then(|r| r.dry_run) {
            let key = o.id.to_string();
            dry_run_live.insert(key.clone());
            if let Some((delta, elapsed)) = memory.dry_run_events.due(&key, totals, clock.instant) {
                let note = dryrun::note(delta, elapsed);
                plan.events.push(PlannedEvent { reference: p.reference(), warning: false, reason: "DryRun", note });
            }
        }
        let in_force = v.in_force.as_ref().map(|h| *h);
        let desired = status::desired(
            o,
            &Seen { generation: p.generation(), status: p.status(), now: &clock.now },
            v.config_name,
            in_force,
            rollout.as_ref(),
        );
        if p.status() != Some(&desired) {
            plan.statuses.push((o.id.clone(), desired));
        }
        if let Err(errs) = &o.result {
            let note = status::bounded(errs.iter().map(ToString::to_string), "; ");
            let key = format!("policy/{}/{}", o.id, p.generation().unwrap_or(0));
            let w = Warning { key, reference: p.reference(), reason: "InvalidSpec", note: format!("rejected: {note}") };
            plan.warn(memory, &mut live, w);
        }
    }
    proxy_warnings(v, memory, clock, &mut plan, &mut live);
    // Objects that do not deserialize: told once per generation, by status and event.
    for u in v.unreadable {
        plan.rejected += 1;
        let key = format!("unreadable/{}/{}", u.id, u.generation.unwrap_or(0));
        if memory.warned.contains_key(&key) {
            live.insert(key);
            continue;
        }
        let note = format!(
            "cannot read {}: {}; the policy is ignored until it is fixed (a value from a newer CRD than this operator's?)",
            u.path, u.message
        );
        plan.statuses.push((u.id.clone(), status::unreadable(u.generation, &note, &clock.now)));
        plan.warn(memory, &mut live, Warning { key, reference: u.reference.clone(), reason: "Unreadable", note });
    }
    memory.warned.retain(|k, _| live.contains(k));
    memory.dry_run_events.retain(|k| dry_run_live.contains(k));
    plan
}

/// The render that first carried each policy's current rules (a policy unchanged keeps its own).
fn first_renders(v: &View<'_>, memory: &mut Memory) -> HashMap<PolicyId, u64> {
    let mut renders = HashMap::new();
    for o in v.outcomes {
        let Ok(a) = &o.result else { continue };
        let generation = v.policies.get(&o.id).and_then(PolicyObject::generation);
        let entry = memory.policy_renders.entry(o.id.clone()).or_insert((generation, a.rules.clone(), v.render));
        if entry.0 != generation || entry.1 != a.rules {
            *entry = (generation, a.rules.clone(), v.render);
        }
        renders.insert(o.id.clone(), entry.2);
    }
    memory.policy_renders.retain(|k, _| renders.contains_key(k));
    renders
}

/// How far the render carrying `o`'s rules has spread, when the proxies are observed and the
/// render is in force.
fn policy_rollout(v: &View<'_>, o: &PolicyOutcome, first_render: Option<u64>) -> Option<status::Rollout> {
    let proxies = v.proxies?;
    v.in_force.as_ref().ok()?;
    let mut r = rollout::policy_rollout(first_render?, proxies);
    if o.result.as_ref().is_ok_and(|a| a.dry_run) {
        r.dry_run = Some(rollout::dry_run_totals(&o.id, proxies));
    }
    Some(r)
}

/// A proxy that fails its reloads gets one Warning event per failure reason (its logs say more);
/// one that stays behind without a failure (it does not see the new ConfigMap, or does not
/// answer) longer than the threshold gets one per render.
fn proxy_warnings(v: &View<'_>, memory: &mut Memory, clock: &Clock, plan: &mut Plan, live: &mut HashSet<String>) {
    let Some(proxies) = v.proxies else { return };
    for (ep, report) in proxies {
        let (Some(reason), Some(pod)) = (&report.failed, v.proxy_pods.get(&ep.pod)) else { continue };
        let note = format!("the proxy on node {} cannot load the latest configuration (reason: {reason}); it keeps enforcing the previous one", ep.node);
        let key = format!("proxy/{}/{reason}", ep.pod);
        plan.warn(memory, live, Warning { key, reference: pod.clone(), reason: "ReloadFailing", note });
    }
    let (overdue, next) = memory.laggards.update(v.render, proxies, clock.instant, v.behind_warning_after);
    plan.recheck = next;
    for ep in overdue {
        let Some(pod) = v.proxy_pods.get(&ep.pod) else { continue };
        let note = format!(
            "the proxy on node {} has not loaded render {} for over {}; it enforces an older configuration",
            ep.node,
            v.render,
            humantime::format_duration(v.behind_warning_after)
        );
        let key = format!("proxy/{}/behind/{}", ep.pod, v.render);
        plan.warn(memory, live, Warning { key, reference: pod.clone(), reason: "ProxyBehind", note });
    }
}

#[cfg(test)]
mod tests;
