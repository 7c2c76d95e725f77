//! `tunnelgate-proxy` entry point: parses arguments, loads the configuration (exit 64 before
//! binding anything when it is invalid), runs the proxy, and maps signals to the drain.

use clap::Parser;

// mimalloc returns memory of closed tunnels to the system and keeps per-thread free lists, which
// lowers both the idle cost per tunnel and allocation time on the connection path (bench/RESULTS.md).
// `Cap` counts the bytes in use, which memory-pressure shedding compares with its budget: resident
// memory would stay high after a spike, as the allocator keeps freed pages for reuse.
#[global_allocator]
static GLOBAL: cap::Cap<mimalloc::MiMalloc> = cap::Cap::new(mimalloc::MiMalloc, usize::MAX);
use proxy_config::{LogFormat, ProxyConfig};
use tokio::sync::watch;
use tunnelgate_proxy::cli::{self, Cli, Command, RunArgs, EXIT_USAGE};
use tunnelgate_proxy::k8s_source::{self, SourceError};
use tunnelgate_proxy::reload::Source;
use tunnelgate_proxy::{app, telemetry};

fn main() {
    tunnelgate_proxy::memory::set_heap_probe(|| GLOBAL.allocated());
    let args = Cli::parse();
    match args.command {
        Some(Command::Check { config }) => {
            let (code, out) = cli::check(&config);
            print!("{out}");
            std::process::exit(code);
        }
        Some(Command::Explain { config, client, target, resolve, user }) => {
            let (code, out) = cli::explain(&config, client, user.as_deref(), &target, &resolve);
            print!("{out}");
            std::process::exit(code);
        }
        None => {}
    }
    let format_override =
        args.run.log_format.as_deref().map(|f| if f == "json" { LogFormat::Json } else { LogFormat::Text });
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.run.worker_threads {
        builder.worker_threads(n.get());
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tunnelgate-proxy: cannot start the runtime: {e}");
            std::process::exit(70);
        }
    };
    let (config, text, latest) = initial(&rt, &args.run, format_override);
    let code = rt.block_on(serve(config, text, latest, &args.run));
    std::process::exit(code);
}

/// The first configuration, from a file, a ConfigMap, or the embedded default (with logging
/// started as it says); exits 64 when it is invalid, before anything is bound. With a ConfigMap,
/// also the receiver of its later versions.
fn initial(
    rt: &tokio::runtime::Runtime,
    run: &RunArgs,
    format_override: Option<LogFormat>,
) -> (ProxyConfig, String, Option<watch::Receiver<Option<String>>>) {
    if let Some(cm) = &run.config_map {
        // Before the configuration arrives nothing says targets may be logged.
        telemetry::init(format_override.unwrap_or(LogFormat::Text), false);
        return match rt.block_on(first_from_configmap(cm, run.node_name.clone())) {
            Ok((config, text, rx)) => (config, text, Some(rx)),
            Err(e) => {
                tracing::error!(error = %tunnelgate_proxy::error::ErrorChain(&e), "cannot watch the ConfigMap");
                std::process::exit(EXIT_USAGE);
            }
        };
    }
    let (config, text) = match &run.config {
        Some(path) => match cli::load(path) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("tunnelgate-proxy: {e}");
                std::process::exit(EXIT_USAGE);
            }
        },
        None => match ProxyConfig::embedded_default() {
            Ok(c) => (c, proxy_config::config::EMBEDDED_DEFAULT.to_owned()),
            Err(e) => {
                eprintln!("tunnelgate-proxy: embedded default is invalid: {e}");
                std::process::exit(70);
            }
        },
    };
    telemetry::init(format_override.unwrap_or(config.logging.format), config.logging.log_targets);
    (config, text, None)
}

/// Serves `config` until a signal, reloading from where it came from; returns the exit code.
async fn serve(
    config: ProxyConfig,
    text: String,
    latest: Option<watch::Receiver<Option<String>>>,
    run: &RunArgs,
) -> i32 {
    let owner = match (&run.daemonset, &run.config_map) {
        (Some(ds), Some(cm)) => match k8s_source::parse_ref(cm) {
            Ok((ns, _)) => match tunnelgate_proxy::owner::watch(&ns, ds).await {
                Ok(o) => Some(o),
                Err(e) => {
                    tracing::error!(error = %tunnelgate_proxy::error::ErrorChain(&e), "cannot watch the DaemonSet");
                    return EXIT_USAGE;
                }
            },
            Err(_) => None,
        },
        _ => None,
    };
    let handle = match app::start(config, &text).await {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %tunnelgate_proxy::error::ErrorChain(&e), "cannot start");
            return 1;
        }
    };
    // Reload: file or ConfigMap changes, TLS file events, SIGHUP and a slow poll.
    let source = match (latest, run.config.clone()) {
        (Some(rx), _) => Some(Source::Latest(rx)),
        (None, Some(path)) => Some(Source::File(path)),
        (None, None) => None,
    };
    let trigger =
        source.map(|s| tunnelgate_proxy::reload::spawn_source(handle.inner.clone(), s, run.reload_poll_interval));
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else { return };
        while hup.recv().await.is_some() {
            match &trigger {
                Some(t) => {
                    let _ = t.try_send(());
                }
                None => tracing::info!("SIGHUP ignored: running on the embedded default"),
            }
        }
    });
    match wait_signal().await {
        Ok(first) => tracing::info!(signal = first, "shutdown requested"),
        Err(e) => tracing::error!(error = %e, "cannot listen for signals; shutting down"),
    }
    handle.begin_shutdown();
    // A second signal exits at once.
    let second = tokio::spawn(async {
        let _ = wait_signal().await;
        tracing::warn!("second signal, exiting now");
        std::process::exit(1);
    });
    let inner = handle.inner.clone();
    let report = handle.wait().await;
    second.abort();
    if owner.is_some_and(|o| o.releases_rules()) {
        match inner.control.remove_redirect().await {
            Ok(true) => tracing::info!("the node's redirect rules are removed"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %tunnelgate_proxy::error::ErrorChain(&e), "cannot remove the node's redirect rules")
            }
        }
    }
    tracing::info!(forced = report.forced, "exiting");
    if report.forced > 0 {
        i32::from(run.forced_exit_code)
    } else {
        0
    }
}

/// Waits for the first valid document from the ConfigMap; invalid ones are logged and skipped.
async fn first_from_configmap(
    cm: &str,
    node: Option<String>,
) -> Result<(ProxyConfig, String, watch::Receiver<Option<String>>), SourceError> {
    let (ns, name) = k8s_source::parse_ref(cm)?;
    let mut rx = k8s_source::spawn(ns, name, node).await?;
    tracing::info!(configmap = cm, "waiting for the first valid configuration");
    loop {
        let text = rx.borrow_and_update().clone();
        if let Some(text) = text {
            match ProxyConfig::from_yaml(&text) {
                Ok(c) => return Ok((c, text, rx)),
                Err(e) => {
                    tracing::warn!(errors = %e, "configuration from the ConfigMap is invalid; waiting for a valid one")
                }
            }
        }
        if rx.changed().await.is_err() {
            return Err(SourceError::BadName(cm.to_owned()));
        }
    }
}

/// Waits for SIGTERM or SIGINT and names it.
async fn wait_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => Ok("SIGTERM"),
        _ = int.recv() => Ok("SIGINT"),
    }
}
