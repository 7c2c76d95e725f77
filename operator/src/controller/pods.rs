//! The pods as the renderer sees them, kept current from the pod cache by what changed since the
//! last render, so that a render converts and re-selects only the pods that changed.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

use super::watches::pod_in;
use crate::render::{PodChanges, PodIn};

/// The renderer's pods, with the cache objects they were converted from.
#[derive(Debug, Default)]
pub(super) struct PodTable {
    rows: Vec<PodIn>,
    /// The cache's object behind each row: the cache replaces an object's `Arc` when it changes,
    /// so an unchanged `Arc` means an unchanged pod.
    seen: Vec<Arc<Pod>>,
    /// Row by `namespace/name`.
    index: HashMap<String, usize>,
    /// Row by the address of its cache object (held in `seen`, so never reused while listed): an
    /// unchanged pod is found without building its name.
    by_object: HashMap<usize, usize>,
    /// Filled at least once (before that, everything is a change).
    synced: bool,
}

/// What changed in one [`PodTable::sync`]: the changed pods before and after.
#[derive(Debug, Default)]
pub(super) struct Changed {
    all: bool,
    pods: Vec<PodIn>,
}

impl Changed {
    pub(super) fn as_changes(&self) -> PodChanges<'_> {
        if self.all {
            return PodChanges::All;
        }
        PodChanges::Pods(self.pods.iter().map(|p| (p.namespace.as_str(), &p.labels)).collect())
    }

    #[cfg(test)]
    pub(super) fn count(&self) -> Option<usize> {
        (!self.all).then_some(self.pods.len())
    }
}

/// Writes `namespace/name` of `pod` into `key`.
fn name_key(pod: &Pod, key: &mut String) {
    key.clear();
    key.push_str(pod.metadata.namespace.as_deref().unwrap_or_default());
    key.push('/');
    key.push_str(pod.metadata.name.as_deref().unwrap_or_default());
}

/// The address of a cache object, its identity while the table holds it.
fn object_addr(pod: &Arc<Pod>) -> usize {
    Arc::as_ptr(pod).addr()
}

impl PodTable {
    pub(super) fn rows(&self) -> &[PodIn] {
        &self.rows
    }

    /// Brings the table to `pods` (the cache's content) and says which pods changed.
    pub(super) fn sync(&mut self, pods: &[Arc<Pod>]) -> Changed {
        let mut changed = Changed { all: !self.synced, pods: Vec::new() };
        self.synced = true;
        let mut visited = vec![false; self.rows.len()];
        let mut key = String::new();
        for pod in pods {
            if let Some(&i) = self.by_object.get(&object_addr(pod)) {
                visited[i] = true;
                continue;
            }
            name_key(pod, &mut key);
            match self.index.get(key.as_str()).copied() {
                Some(i) => {
                    visited[i] = true;
                    self.by_object.remove(&object_addr(&self.seen[i]));
                    self.by_object.insert(object_addr(pod), i);
                    self.seen[i] = pod.clone();
                    let row = pod_in(pod);
                    // A new object with the same facts (a status update of another field) is no change.
                    if row != self.rows[i] {
                        let old = std::mem::replace(&mut self.rows[i], row);
                        if !changed.all {
                            changed.pods.push(old);
                            changed.pods.push(self.rows[i].clone());
                        }
                    }
                }
                None => {
                    let row = pod_in(pod);
                    if !changed.all {
                        changed.pods.push(row.clone());
                    }
                    self.index.insert(key.clone(), self.rows.len());
                    self.by_object.insert(object_addr(pod), self.rows.len());
                    self.rows.push(row);
                    self.seen.push(pod.clone());
                    visited.push(true);
                }
            }
        }
        // Rows the cache no longer has: deleted pods. Removed from the back so that the rows
        // moved into their places are ones already visited.
        for i in (0..visited.len()).rev() {
            if visited[i] {
                continue;
            }
            let gone = self.rows.swap_remove(i);
            let seen = self.seen.swap_remove(i);
            self.by_object.remove(&object_addr(&seen));
            name_key(&seen, &mut key);
            self.index.remove(key.as_str());
            if let Some(moved) = self.seen.get(i) {
                name_key(moved, &mut key);
                self.index.insert(key.clone(), i);
                self.by_object.insert(object_addr(moved), i);
            }
            if !changed.all {
                changed.pods.push(gone);
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodIP, PodStatus};
    use kube::api::ObjectMeta;

    use super::*;

    fn pod(name: &str, app: &str, ip: &str) -> Arc<Pod> {
        Arc::new(Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                labels: Some([("app".to_owned(), app.to_owned())].into()),
                ..Default::default()
            },
            spec: None,
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ips: Some(vec![PodIP { ip: ip.into() }]),
                ..Default::default()
            }),
        })
    }

    fn apps(t: &PodTable) -> Vec<String> {
        let mut v: Vec<String> = t.rows().iter().map(|r| format!("{}@{}", r.labels["app"], r.ips[0])).collect();
        v.sort();
        v
    }

    /// The table follows the cache: the first sync is "everything", an unchanged cache is no
    /// change, and an update, an addition and a deletion are reported (an update before and after).
    #[test]
    fn the_pod_table_reports_only_what_changed() {
        let (a, b, c) = (pod("a", "web", "10.0.0.1"), pod("b", "web", "10.0.0.2"), pod("c", "db", "10.0.0.3"));
        let mut t = PodTable::default();
        assert_eq!(t.sync(&[a.clone(), b.clone(), c.clone()]).count(), None, "first sync: everything");
        assert_eq!(t.sync(&[a.clone(), b.clone(), c.clone()]).count(), Some(0));
        // A new object with the same facts is no change.
        let a2 = pod("a", "web", "10.0.0.1");
        assert_eq!(t.sync(&[a2.clone(), b.clone(), c.clone()]).count(), Some(0));
        // Relabelled: before and after.
        let b2 = pod("b", "db", "10.0.0.2");
        let ch = t.sync(&[a2.clone(), b2.clone(), c.clone()]);
        let PodChanges::Pods(list) = ch.as_changes() else { panic!("not all") };
        let labels: Vec<&str> = list.iter().map(|(_, l)| l["app"].as_str()).collect();
        assert_eq!(labels, ["web", "db"]);
        // The first row deleted: the last one takes its place and is still found afterwards.
        assert_eq!(t.sync(&[b2.clone(), c.clone()]).count(), Some(1));
        assert_eq!(apps(&t), ["db@10.0.0.2", "db@10.0.0.3"]);
        let c2 = pod("c", "web", "10.0.0.3");
        assert_eq!(t.sync(&[b2.clone(), c2.clone()]).count(), Some(2));
        let d = pod("d", "web", "10.0.0.4");
        assert_eq!(t.sync(&[d.clone(), c2.clone(), b2.clone()]).count(), Some(1), "an addition");
        assert_eq!(apps(&t), ["db@10.0.0.2", "web@10.0.0.3", "web@10.0.0.4"]);
        assert_eq!(t.sync(&[]).count(), Some(3), "all deleted");
        assert!(t.rows().is_empty());
    }
}
