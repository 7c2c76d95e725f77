//! Log setup: text or JSON lines on stderr, filtered by `TUNNELGATE_LOG` (default `info`). The
//! debug logs of the resolver, the HTTP client and TLS name target hosts and addresses, so they are
//! capped at `info` unless `logging.logTargets` opts in. The file watcher's are always capped: it
//! logs every file event, so a log file in a watched directory fed on itself without end.

use proxy_config::LogFormat;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Safe to call once per process.
pub fn init(format: LogFormat, log_targets: bool) {
    let mut filter = EnvFilter::try_from_env("TUNNELGATE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    for target in ["notify", "inotify"] {
        if let Ok(d) = format!("{target}=info").parse() {
            filter = filter.add_directive(d);
        }
    }
    if !log_targets {
        for target in
            ["hickory_resolver", "hickory_proto", "hickory_net", "hyper", "hyper_util", "rustls", "tokio_rustls", "h2"]
        {
            if let Ok(d) = format!("{target}=info").parse() {
                filter = filter.add_directive(d);
            }
        }
    }
    // Colour only on a terminal: files and container logs get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
