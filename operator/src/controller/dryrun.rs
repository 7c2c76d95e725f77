//! Dry-run announcements: at most one Normal event per dry-run policy per interval, saying what its
//! rules would have changed since the previous one. Counts come from the proxies' reports (sums
//! by rule, since each proxy loaded the rule), so the event names no client and no target.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// The last announcement per policy: when, and the totals (would deny, would allow) it counted up to.
pub(super) struct DryRunEvents {
    interval: Duration,
    last: HashMap<String, (Instant, (u64, u64))>,
}

impl DryRunEvents {
    pub(super) fn new(interval: Duration) -> DryRunEvents {
        DryRunEvents { interval, last: HashMap::new() }
    }

    /// What to announce for `policy` whose proxies now report `totals`: the counts since the last
    /// announcement and how long that was, once `interval` has passed and something was counted.
    /// The first sighting only sets the baseline; totals that fall (a proxy restarted and counts
    /// from zero) set a new one.
    pub(super) fn due(&mut self, policy: &str, totals: (u64, u64), now: Instant) -> Option<((u64, u64), Duration)> {
        let Some(&(at, prev)) = self.last.get(policy) else {
            self.last.insert(policy.to_owned(), (now, totals));
            return None;
        };
        if totals.0 < prev.0 || totals.1 < prev.1 {
            self.last.insert(policy.to_owned(), (now, totals));
            return None;
        }
        let elapsed = now.saturating_duration_since(at);
        let delta = (totals.0 - prev.0, totals.1 - prev.1);
        if elapsed < self.interval || delta == (0, 0) {
            return None;
        }
        self.last.insert(policy.to_owned(), (now, totals));
        Some((delta, elapsed))
    }

    /// Forgets policies that are gone or no longer in dry run.
    pub(super) fn retain(&mut self, live: impl Fn(&str) -> bool) {
        self.last.retain(|k, _| live(k));
    }
}

/// The event's note: "would have denied 17 and allowed 0 connections in the last 5m".
pub(super) fn note((would_deny, would_allow): (u64, u64), elapsed: Duration) -> String {
    let minutes = elapsed.as_secs().div_ceil(60).max(1);
    format!("dry run: would have denied {would_deny} and allowed {would_allow} connections in the last {minutes}m")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_announcement_per_interval_with_what_was_counted_since_the_last() {
        let t0 = Instant::now();
        let min = Duration::from_secs(60);
        let mut ev = DryRunEvents::new(5 * min);
        assert_eq!(ev.due("ns/p", (10, 0), t0), None, "the first sighting is the baseline");
        assert_eq!(ev.due("ns/p", (15, 1), t0 + min), None, "within the interval");
        assert_eq!(ev.due("ns/p", (27, 1), t0 + 5 * min), Some(((17, 1), 5 * min)));
        assert_eq!(ev.due("ns/p", (27, 1), t0 + 11 * min), None, "nothing counted: no event");
        assert_eq!(ev.due("ns/p", (30, 1), t0 + 12 * min), Some(((3, 0), 7 * min)));
        // A proxy restarted: its counts start again from zero; no negative announcement.
        assert_eq!(ev.due("ns/p", (2, 0), t0 + 20 * min), None);
        assert_eq!(ev.due("ns/p", (9, 0), t0 + 25 * min), Some(((7, 0), 5 * min)));
        ev.retain(|k| k != "ns/p");
        assert_eq!(ev.due("ns/p", (50, 0), t0 + 40 * min), None, "forgotten: a new baseline");
        assert_eq!(
            note((17, 0), Duration::from_secs(290)),
            "dry run: would have denied 17 and allowed 0 connections in the last 5m"
        );
    }
}
