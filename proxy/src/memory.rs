//! Memory-pressure load shedding: the heap bytes the proxy holds are sampled against a budget
//! (`limits.memoryBudget`, by default a share of the cgroup memory limit); while it is over,
//! new CONNECTs and HTTP requests get `503` + `Retry-After` and `/readyz` says so, established
//! tunnels keep flowing, and shedding stops by itself once memory falls back.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use tracing::{info, warn};

use crate::metrics::ProxyMetrics;

/// Share of the cgroup memory limit used as the default budget: room is left for the kernel's
/// socket buffers charged to the same cgroup and for the spike of one sampling interval.
const DEFAULT_SHARE_PERCENT: u64 = 85;
/// Shedding stops only below this share of the budget, so it does not flap at the edge.
const RECOVER_PERCENT: u64 = 90;
/// How often memory is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// Whether the proxy is shedding load now.
#[derive(Default)]
pub struct MemoryPressure {
    overloaded: AtomicBool,
}

impl MemoryPressure {
    /// True while new requests are refused for memory.
    pub fn is_overloaded(&self) -> bool {
        self.overloaded.load(Ordering::Relaxed)
    }
}

/// The budget in force: the configured one (0: none), else a share of the cgroup limit.
pub fn budget(configured: Option<u64>) -> Option<u64> {
    match configured {
        Some(0) => None,
        Some(b) => Some(b),
        None => cgroup_limit().map(|l| l / 100 * DEFAULT_SHARE_PERCENT),
    }
}

/// The memory limit of this process's cgroup (v2 `memory.max`, or v1 `memory.limit_in_bytes`),
/// when one is set.
pub fn cgroup_limit() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut candidates = Vec::new();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        if controllers.is_empty() {
            candidates.push(Path::new("/sys/fs/cgroup").join(path).join("memory.max"));
            candidates.push(Path::new("/sys/fs/cgroup/memory.max").to_path_buf());
        } else if controllers.split(',').any(|c| c == "memory") {
            candidates.push(Path::new("/sys/fs/cgroup/memory").join(path).join("memory.limit_in_bytes"));
            candidates.push(Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").to_path_buf());
        }
    }
    candidates.iter().find_map(|p| {
        let v = std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok()?;
        // "max" does not parse; v1 says "no limit" with a huge number.
        (v < 1 << 60).then_some(v)
    })
}

/// Where the bytes in use come from: the binary's counting allocator. Without one (the proxy
/// embedded as a library), resident memory stands in.
static HEAP_PROBE: OnceLock<fn() -> usize> = OnceLock::new();

/// Installs the function that reports the heap bytes in use (called once, by `main`).
pub fn set_heap_probe(probe: fn() -> usize) {
    let _ = HEAP_PROBE.set(probe);
}

/// Bytes of tunnels held in kernel pipes between a splice in and a splice out: outside the heap,
/// but held for the proxy as surely as a buffer (and charged to its cgroup).
static IN_PIPES: AtomicU64 = AtomicU64::new(0);

/// `n` more bytes are held in a pipe.
pub(crate) fn piped(n: usize) {
    IN_PIPES.fetch_add(n as u64, Ordering::Relaxed);
}

/// `n` bytes left a pipe (sent on, or freed with it).
pub(crate) fn unpiped(n: usize) {
    IN_PIPES.fetch_sub(n as u64, Ordering::Relaxed);
}

/// Bytes the proxy holds now: heap in use (or resident memory when the heap is not counted) and
/// bytes held in relay pipes. Resident memory alone would keep shedding after a spike: the
/// allocator keeps freed pages.
pub fn in_use_bytes() -> Option<u64> {
    let own = match HEAP_PROBE.get() {
        Some(probe) => u64::try_from(probe()).ok(),
        None => resident_bytes(),
    }?;
    Some(own.saturating_add(IN_PIPES.load(Ordering::Relaxed)))
}

/// Resident memory of this process in bytes.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Samples memory until the process ends, updating `pressure` and the gauges of `metrics`;
/// `configured` is `limits.memoryBudget` of the configuration in force.
pub(crate) async fn watch(pressure: &MemoryPressure, metrics: &ProxyMetrics, configured: impl Fn() -> Option<u64>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let cgroup_default = budget(None);
    loop {
        tick.tick().await;
        let configured = configured();
        let budget = if configured.is_some() { budget(configured) } else { cgroup_default };
        let Some(rss) = in_use_bytes() else { continue };
        let m = metrics;
        m.memory_in_use.set(i64::try_from(rss).unwrap_or(i64::MAX));
        m.memory_budget.set(budget.map_or(0, |b| i64::try_from(b).unwrap_or(i64::MAX)));
        let was = pressure.is_overloaded();
        let now = match budget {
            None => false,
            Some(b) if was => rss >= b / 100 * RECOVER_PERCENT,
            Some(b) => rss >= b,
        };
        if now != was {
            pressure.overloaded.store(now, Ordering::Relaxed);
            m.memory_overloaded.set(i64::from(now));
            if now {
                warn!(in_use_bytes = rss, budget_bytes = budget, "memory over budget: refusing new requests (503)");
            } else {
                info!(in_use_bytes = rss, "memory back under budget: accepting new requests");
            }
        }
    }
}
