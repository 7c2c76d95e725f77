//! Hot reload: read → parse and validate the whole document → compile a snapshot → diff the
//! listeners → publish atomically. Any error keeps the configuration in force. Sources only
//! deliver documents to [`apply`]: a file (watched here, with its TLS files, SIGHUP and a slow
//! poll) or the latest text of a ConfigMap (watched by `k8s_source`). The first load goes through
//! the same listener switch and the same record of its outcome.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use notify::{RecursiveMode, Watcher};
use proxy_config::{ConfigErrors, ProxyConfig};
use tokio::sync::{mpsc, watch};
use tokio::time::{interval, sleep, Duration, MissedTickBehavior};
use tracing::{debug, info, warn};

use crate::error::ErrorChain;
use crate::listeners;
use crate::snapshot::{fingerprint, Snapshot, SnapshotError};
use crate::state::{unix_now, Inner};
use crate::sync::lock;

/// Quiet time after a file event before the file is read, so a burst of events (an editor's
/// save, the kubelet's symlink swap) becomes one reload.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Why a reload did not take effect. The configuration in force is unchanged in every case.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration:\n{0}")]
    Invalid(ConfigErrors),
    #[error("cannot use the new configuration")]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Bind(#[from] listeners::BindError),
    #[error("redirect: cannot write the node's rules")]
    Redirect(#[from] crate::redirect::RedirectError),
    #[error("shutting down; reload ignored")]
    Draining,
    /// The task compiling the document did not finish (it panicked or was cancelled).
    #[error("the reload task failed")]
    Aborted,
}

impl ReloadError {
    /// A closed-set reason, for `/config` and the operator's rollout report.
    pub fn reason(&self) -> &'static str {
        match self {
            ReloadError::Read { .. } => "read",
            ReloadError::Invalid(_) => "invalid",
            ReloadError::Snapshot(SnapshotError::Tls { .. }) => "tls",
            ReloadError::Snapshot(SnapshotError::Resolver(_)) => "dns",
            ReloadError::Snapshot(SnapshotError::Auth(_)) => "auth",
            ReloadError::Snapshot(SnapshotError::AdminToken(_)) => "admin-token",
            ReloadError::Snapshot(SnapshotError::Parent { .. }) => "parents",
            ReloadError::Bind(_) => "bind",
            ReloadError::Redirect(_) => "redirect",
            ReloadError::Draining => "draining",
            ReloadError::Aborted => "internal",
        }
    }
}

/// What a successful reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// A new generation is in force.
    Applied { generation: u64, revoked: usize },
    /// The document and its TLS files are identical to what is in force.
    Unchanged,
}

/// Applies a new document. On success the new snapshot serves every new connection; established
/// tunnels keep theirs (unless `policy.reevaluateOnReload` revokes them).
pub async fn apply(inner: &Arc<Inner>, text: &str) -> Result<ReloadOutcome, ReloadError> {
    let started = tokio::time::Instant::now();
    let result = apply_inner(inner, text).await;
    if !matches!(result, Ok(ReloadOutcome::Unchanged) | Err(ReloadError::Draining)) {
        inner.metrics.config_reload_duration.observe(started.elapsed().as_secs_f64());
    }
    record(inner, &result);
    result
}

/// Counts and logs the outcome of a reload attempt.
pub(crate) fn record(inner: &Inner, result: &Result<ReloadOutcome, ReloadError>) {
    let m = &inner.metrics;
    match result {
        Ok(ReloadOutcome::Applied { generation, revoked }) => {
            inner.control.set_reload_failure(None);
            m.config_reloads.with_label_values(&["success"]).inc();
            m.config_generation.set(i64::try_from(*generation).unwrap_or(i64::MAX));
            m.config_last_reload_success_timestamp.set(unix_now());
            m.config_last_reload_success.set(1);
            if *generation == 1 {
                info!(generation, sha256 = %inner.snapshot().sha256, "configuration loaded");
            } else {
                info!(generation, sha256 = %inner.snapshot().sha256, revoked, "configuration reloaded");
            }
        }
        Ok(ReloadOutcome::Unchanged) => debug!("configuration unchanged"),
        Err(ReloadError::Draining) => info!("reload ignored: draining"),
        Err(e) => {
            inner.control.set_reload_failure(Some(e.reason()));
            m.config_reloads.with_label_values(&["failure"]).inc();
            m.config_last_reload_success.set(0);
            warn!(error = %ErrorChain(e), generation = inner.snapshot().generation, "reload failed, keeping the configuration in force");
        }
    }
}

async fn apply_inner(inner: &Arc<Inner>, text: &str) -> Result<ReloadOutcome, ReloadError> {
    let _serial = inner.control.reload_lock.lock().await;
    if inner.is_draining() {
        return Err(ReloadError::Draining);
    }
    let current = inner.snapshot();
    // Parsing and compiling a large document (3 MB at 100,000 pods) would stall the tunnels of a
    // runtime worker for that long: it runs on a blocking thread.
    let (owned, task_inner, generation) = (text.to_owned(), inner.clone(), current.generation + 1);
    let fingerprint_in_force = current.fingerprint.clone();
    let built = tokio::task::spawn_blocking(move || -> Result<Option<Snapshot>, ReloadError> {
        let cfg = ProxyConfig::from_yaml(&owned).map_err(ReloadError::Invalid)?;
        if fingerprint(&cfg, &owned) == fingerprint_in_force {
            return Ok(None);
        }
        Ok(Some(Snapshot::build(cfg, &owned, generation, &task_inner.control.acme, &task_inner.auth_memory)?))
    })
    .await
    .map_err(|_| ReloadError::Aborted)??;
    let Some(snap) = built else {
        return Ok(ReloadOutcome::Unchanged);
    };
    let snap = Arc::new(snap);
    crate::snapshot::log_warnings(&snap.config);
    // Process-level settings are read once at start.
    if snap.config.admin != current.config.admin {
        warn!("admin.bind changed: takes effect at the next restart");
    }
    if snap.config.logging.format != current.config.logging.format {
        warn!("logging.format changed: takes effect at the next restart");
    }

    // Plan the listeners without touching the running ones (new addresses are bound here).
    let plans = listeners::plan(inner, &snap.config.listeners).await?;
    // The node's rules next, still before anything switches (nft applies a file whole or not).
    let cfg = &snap.config;
    crate::redirect::sync(&inner.control.redirect, cfg.redirect.as_ref(), &cfg.policy.cluster_networks).await?;
    // Everything needed is in hand: switch.
    inner.publish(snap.clone());
    listeners::apply(inner, &snap.config.listeners, plans).await;
    inner.control.acme.retain(&snap.config);

    let revoked =
        if snap.config.policy.reevaluate_on_reload { inner.tunnels.revoke_denied(&snap.config.policy) } else { 0 };
    Ok(ReloadOutcome::Applied { generation: snap.generation, revoked })
}

pub async fn reload_file(inner: &Arc<Inner>, path: &Path) -> Result<ReloadOutcome, ReloadError> {
    match tokio::fs::read_to_string(path).await {
        Ok(text) => apply(inner, &text).await,
        Err(source) => {
            let result = Err(ReloadError::Read { path: path.to_owned(), source });
            record(inner, &result);
            result
        }
    }
}

/// Where documents come from.
#[derive(Clone)]
pub enum Source {
    /// A file, re-read on every trigger.
    File(PathBuf),
    /// The latest text delivered by another task (the Kubernetes ConfigMap watch).
    Latest(watch::Receiver<Option<String>>),
}

impl Source {
    fn file(&self) -> Option<&Path> {
        match self {
            Source::File(p) => Some(p),
            Source::Latest(_) => None,
        }
    }
}

/// Directories to watch: the config file's (if any), and those of the TLS files in force.
fn watched_dirs(inner: &Inner, source: &Source) -> HashSet<PathBuf> {
    let mut dirs = HashSet::new();
    let parent = |p: &Path| {
        p.parent().map(Path::to_path_buf).filter(|d| !d.as_os_str().is_empty()).unwrap_or_else(|| PathBuf::from("."))
    };
    if let Some(path) = source.file() {
        dirs.insert(parent(path));
    }
    for f in crate::snapshot::watched_files(&inner.snapshot().config) {
        dirs.insert(parent(f));
    }
    dirs
}

/// File names whose changes trigger a reload: the config file's and the TLS files' in force.
fn watched_names(inner: &Inner, source: &Source) -> HashSet<std::ffi::OsString> {
    let mut names: HashSet<std::ffi::OsString> =
        source.file().and_then(Path::file_name).map(ToOwned::to_owned).into_iter().collect();
    names.extend(
        crate::snapshot::watched_files(&inner.snapshot().config)
            .iter()
            .filter_map(|p| p.file_name().map(ToOwned::to_owned)),
    );
    names
}

/// Reloads from `source` on every trigger: a file event (inotify on the config file's directory,
/// so the kubelet's `..data` symlink swap is seen, and on the TLS files' directories), a new
/// document from the source, a trigger message (SIGHUP), and every `poll`.
/// Returns the trigger sender; the task ends when the proxy starts draining.
pub fn spawn_source(inner: Arc<Inner>, source: Source, poll: Duration) -> mpsc::Sender<()> {
    let (trigger_tx, mut trigger_rx) = mpsc::channel::<()>(1);
    let (event_tx, mut event_rx) = mpsc::channel::<()>(1);
    let names = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let names_cb = names.clone();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // Only changes to our files (or to the kubelet's `..data` machinery) matter; our own
        // reads raise access events, and reacting to them would loop.
        let relevant = res.is_ok_and(|ev| {
            !matches!(
                ev.kind,
                notify::EventKind::Access(_) | notify::EventKind::Modify(notify::event::ModifyKind::Metadata(_))
            ) && ev.paths.iter().any(|p| {
                p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("..") || lock(&names_cb).contains(n))
            })
        });
        if relevant {
            // A full channel already means "reload pending".
            let _ = event_tx.try_send(());
        }
    });
    let mut watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(error = %e, "file watching unavailable; relying on SIGHUP and polling");
            None
        }
    };
    // Watch before returning, so no change made after this call can be missed.
    let mut watching: HashSet<PathBuf> = HashSet::new();
    *lock(&names) = watched_names(&inner, &source);
    rewatch(watcher.as_mut(), &mut watching, watched_dirs(&inner, &source));
    let mut latest = match &source {
        Source::Latest(rx) => Some(rx.clone()),
        Source::File(_) => None,
    };
    tokio::spawn(async move {
        let mut tick = interval(poll);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tick.tick().await;
        // The document may have changed between the initial load and the watch.
        reload_from(&inner, &source).await;
        loop {
            tokio::select! {
                Some(()) = trigger_rx.recv() => info!("reload requested"),
                Some(()) = event_rx.recv() => {
                    sleep(DEBOUNCE).await;
                    while event_rx.try_recv().is_ok() {}
                }
                r = async { match latest.as_mut() { Some(rx) => rx.changed().await, None => std::future::pending().await } } => {
                    if r.is_err() {
                        latest = None;
                        continue;
                    }
                }
                _ = tick.tick() => {}
            }
            if inner.is_draining() {
                break;
            }
            reload_from(&inner, &source).await;
            *lock(&names) = watched_names(&inner, &source);
            rewatch(watcher.as_mut(), &mut watching, watched_dirs(&inner, &source));
        }
    });
    trigger_tx
}

/// Reads the document from `source` (if there is one yet) and applies it.
async fn reload_from(inner: &Arc<Inner>, source: &Source) {
    match source {
        Source::File(path) => {
            let _ = reload_file(inner, path).await;
        }
        Source::Latest(rx) => {
            let text = rx.borrow().clone();
            if let Some(text) = text {
                let _ = apply(inner, &text).await;
            }
        }
    }
}

/// [`spawn_source`] for a file.
pub fn spawn_file_source(inner: Arc<Inner>, path: PathBuf, poll: Duration) -> mpsc::Sender<()> {
    spawn_source(inner, Source::File(path), poll)
}

/// Brings the set of watched directories to `want`.
fn rewatch(watcher: Option<&mut notify::RecommendedWatcher>, watching: &mut HashSet<PathBuf>, want: HashSet<PathBuf>) {
    let Some(w) = watcher else { return };
    for d in want.difference(watching) {
        if let Err(e) = w.watch(d, RecursiveMode::NonRecursive) {
            warn!(dir = %d.display(), error = %e, "cannot watch directory");
        }
    }
    for d in watching.difference(&want) {
        let _ = w.unwatch(d);
    }
    *watching = want;
}
