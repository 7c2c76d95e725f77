//! `tunnelgate-bench`: runs each scenario directly and through each proxy in turn (Tunnelgate,
//! Squid, tinyproxy, http-tunnel) against loopback upstreams it starts itself, and prints medians
//! over rounds with the ratio of each proxy to the direct connection: CONNECT tunnels (bulk,
//! setup, round trips, idle memory) and plain-HTTP forwarding (keep-alive and per-request
//! connections, with proxy CPU per request); and TLS termination against hitch, stunnel, HAProxy
//! and nginx ([`termination`]). It measures; it never asserts.

use std::error::Error;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

mod chart;
mod reload;
mod scenarios;
mod targets;
mod termination;
mod upstreams;

use scenarios::per_target;
use targets::Target;
use upstreams::Upstreams;

type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// Benchmark Tunnelgate against a direct connection and peer proxies.
#[derive(Parser, Debug, Clone)]
struct Args {
    /// The tunnelgate-proxy binary (build it with `cargo build --release -p tunnelgate-proxy`).
    #[arg(long, default_value = "target/release/tunnelgate-proxy")]
    proxy_bin: PathBuf,
    /// Rounds per scenario; the table shows medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Bytes each bulk tunnel carries.
    #[arg(long, default_value_t = 1 << 30)]
    bulk_bytes: u64,
    /// Seconds each timed scenario runs per round.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Idle tunnels opened for the memory scenario.
    #[arg(long, default_value_t = 5000)]
    idle_tunnels: usize,
    /// Extra arguments for tunnelgate-proxy (repeatable), e.g. `--proxy-arg=--worker-threads=1`.
    #[arg(long = "proxy-arg", allow_hyphen_values = true)]
    proxy_args: Vec<String>,
    /// An A/B: a second Tunnelgate, `tunnelgate-b`, measured beside `tunnelgate` in the same
    /// rounds (interleaved), built from another commit (`--b-bin`) and/or run with other arguments
    /// (`--b-arg`, repeatable; it takes none of `--proxy-arg`'s).
    #[arg(long)]
    b_bin: Option<PathBuf>,
    /// Arguments for `tunnelgate-b` (repeatable), e.g. `--b-arg=--worker-threads=1`.
    #[arg(long = "b-arg", allow_hyphen_values = true)]
    b_args: Vec<String>,
    /// Only these targets (comma-separated: direct,tunnelgate,squid,tinyproxy,http-tunnel for the
    /// forward suite, plus haproxy (CONNECT through a Lua action), haproxy-splice (the same,
    /// splicing both ways), the no-parsing floors tunnelgate-l4, haproxy-l4 and
    /// haproxy-l4-splice, transparent (root and nft; bench/run-transparent.sh) and
    /// tunnelgate-squid (Tunnelgate with Squid as its parent), which run only when named; plain,tunnelgate,hitch,stunnel,
    /// haproxy,nginx for termination).
    #[arg(long)]
    only: Option<String>,
    /// Which suites: forward (CONNECT and plain HTTP), termination (TLS in front of a backend),
    /// reload (cost of a 300 KB and a 3 MB rendered configuration), all (forward and termination).
    #[arg(long, default_value = "all", value_parser = ["forward", "termination", "reload", "all"])]
    suite: String,
    /// Also write the forward suite's throughput ratios to direct as an SVG bar chart here.
    #[arg(long)]
    chart: Option<PathBuf>,
    /// Only these scenarios of the forward suite (comma-separated: bulk,setup,round-trips,tls,http,idle),
    /// e.g. to profile one of them.
    #[arg(long)]
    scenarios: Option<String>,
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One row of the table: a metric for each target, and whether higher is better.
struct Row {
    scenario: String,
    higher_better: bool,
    values: Vec<f64>,
}

// Two workers whatever the environment says, so every target meets the same load generator.
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Res<()> {
    let args = Args::parse();
    let _ = rlimit::increase_nofile_limit(200_000);
    if args.suite == "termination" {
        return termination::run(&args.proxy_bin, args.rounds, args.seconds, args.only.as_deref()).await;
    }
    let up = Arc::new(upstreams::upstreams().await?);
    if args.suite == "reload" {
        return reload::run(&args.proxy_bin, args.rounds, up.echo).await;
    }
    // The TLS echo's name resolves here, and nowhere else: the proxies under test ask this stub.
    let dns = testkit::dns::DnsStub::start().await;
    dns.set(upstreams::TLS_NAME, testkit::dns::Answer::Addrs(vec![up.tls.ip()]));
    let targets = start_targets(&args, &up, dns.addr).await?;
    let names: Vec<&str> = targets.iter().map(|t| t.name).collect();
    println!("targets: {}; rounds: {}; medians shown\n", names.join(", "), args.rounds);
    let rows = forward_suite(&args, &targets, &up).await;
    print_table(&names, &rows);
    if let Some(path) = &args.chart {
        match chart::svg(&names, &rows) {
            Some(svg) => std::fs::write(path, svg)?,
            None => println!("no chart: no throughput row has a direct baseline"),
        }
    }
    drop(targets);
    if args.suite == "all" {
        termination::run(&args.proxy_bin, args.rounds, args.seconds, args.only.as_deref()).await?;
    }
    Ok(())
}

/// The targets `--only` names (all the forward ones by default; HAProxy's CONNECT and the floors
/// only when named), started.
async fn start_targets(args: &Args, up: &Upstreams, dns: std::net::SocketAddr) -> Res<Vec<Arc<Target>>> {
    let wanted = |n: &str| args.only.as_deref().is_none_or(|o| o.split(',').any(|x| x.trim() == n));
    let mut targets: Vec<Arc<Target>> = Vec::new();
    if wanted("direct") {
        targets.push(Arc::new(Target::direct()));
    }
    // Built before anything starts: a missing binary is a usage error, not a skipped target.
    let built = |bin: &std::path::Path| {
        if bin.is_file() {
            Ok(())
        } else {
            Err(format!("{} not found: run `cargo build --release -p tunnelgate-proxy` first", bin.display()))
        }
    };
    if wanted("tunnelgate") {
        built(&args.proxy_bin)?;
        targets.push(Arc::new(targets::start_tunnelgate(&args.proxy_bin, &args.proxy_args, dns, "tunnelgate").await?));
    }
    if args.b_bin.is_some() || !args.b_args.is_empty() {
        let bin = args.b_bin.as_deref().unwrap_or(&args.proxy_bin);
        built(bin)?;
        targets.push(Arc::new(targets::start_tunnelgate(bin, &args.b_args, dns, "tunnelgate-b").await?));
    }
    // HAProxy's CONNECT is a Lua action of ours, and it stops answering in some runs (see
    // bench/RESULTS.md): on request only, like the floors below.
    let opted = |n: &str| args.only.as_deref().is_some_and(|o| o.split(',').any(|x| x.trim() == n));
    type Starter<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Res<Option<Target>>> + 'a>>;
    let starters: [(&str, bool, Starter<'_>); 10] = [
        ("haproxy", opted("haproxy"), Box::pin(targets::start_haproxy(false))),
        ("haproxy-splice", opted("haproxy-splice"), Box::pin(targets::start_haproxy(true))),
        ("squid", wanted("squid"), Box::pin(targets::start_squid())),
        ("tinyproxy", wanted("tinyproxy"), Box::pin(targets::start_tinyproxy())),
        ("http-tunnel", wanted("http-tunnel"), Box::pin(targets::start_http_tunnel())),
        // The floors: fixed forwarders with no request to parse (opt in with --only).
        (
            "tunnelgate-l4",
            opted("tunnelgate-l4"),
            Box::pin(async { targets::start_tunnelgate_l4(&args.proxy_bin, up, &args.proxy_args).await.map(Some) }),
        ),
        ("haproxy-l4", opted("haproxy-l4"), Box::pin(targets::start_haproxy_l4(up, false))),
        ("haproxy-l4-splice", opted("haproxy-l4-splice"), Box::pin(targets::start_haproxy_l4(up, true))),
        // Tunnelgate with Squid as its parent (opt in with --only).
        (
            "tunnelgate-squid",
            opted("tunnelgate-squid"),
            Box::pin(targets::start_tunnelgate_via_squid(&args.proxy_bin, &args.proxy_args, dns)),
        ),
        // Transparent interception (root and nft; opt in with --only).
        (
            "transparent",
            opted("transparent"),
            Box::pin(targets::start_transparent(&args.proxy_bin, up, &args.proxy_args, dns)),
        ),
    ];
    for (name, on, start) in starters {
        if !on {
            continue;
        }
        match start.await {
            Ok(Some(t)) => targets.push(Arc::new(t)),
            Ok(None) => println!("skipping {name}: not installed (bench/install-peers.sh installs it)"),
            Err(e) => println!("skipping {name}: cannot start it: {e}"),
        }
    }
    Ok(targets)
}

/// The forward suite's scenarios (those `--scenarios` names), each through every target.
async fn forward_suite(args: &Args, targets: &[Arc<Target>], up: &Arc<Upstreams>) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    let mut add = |scenario: String, higher_better: bool, values: Vec<f64>| {
        println!("  {scenario}: {}", values.iter().map(|v| format!("{v:.1}")).collect::<Vec<_>>().join(" | "));
        rows.push(Row { scenario, higher_better, values });
    };
    let (r, secs) = (args.rounds, args.seconds);
    // Let TIME_WAIT and backlog settle between rounds of the scenarios that open many connections.
    let settle = Duration::from_millis(300);
    let scenario = |n: &str| args.scenarios.as_deref().is_none_or(|o| o.split(',').any(|x| x.trim() == n));
    let gib = args.bulk_bytes as f64 / (1u64 << 30) as f64;
    for n in [1usize, 8].into_iter().filter(|_| scenario("bulk")) {
        let [rate, cpu] = per_target(targets, r, Duration::ZERO, |t| async move {
            scenarios::bulk(&t, up, n, args.bulk_bytes).await.map(|(a, b)| [a, b])
        })
        .await;
        add(format!("bulk, {n} tunnel(s) x {gib:.2} GiB (MB/s)"), true, rate);
        add(format!("bulk, {n} tunnel(s), proxy CPU per GiB (ms)"), false, cpu);
    }
    for conc in [1usize, 64].into_iter().filter(|_| scenario("setup")) {
        let [rate, p50, p99, cpu] = per_target(targets, r, settle, |t| async move {
            scenarios::setup(&t, up, conc, secs).await.map(|(a, b, c, d)| [a, b, c, d])
        })
        .await;
        add(format!("setup, concurrency {conc} (tunnels/s)"), true, rate);
        add(format!("setup, concurrency {conc} p50 (us)"), false, p50);
        add(format!("setup, concurrency {conc} p99 (us)"), false, p99);
        add(format!("setup, concurrency {conc}, proxy CPU per tunnel (us)"), false, cpu);
    }
    for n in [1usize, 64].into_iter().filter(|_| scenario("round-trips")) {
        let [rate, p50, p99, cpu] = per_target(targets, r, Duration::ZERO, |t| async move {
            scenarios::round_trips(&t, up, n, secs).await.map(|(a, b, c, d)| [a, b, c, d])
        })
        .await;
        let what = if n == 1 { "1 tunnel".to_owned() } else { format!("{n} tunnels") };
        add(format!("round trips, {what} (req/s)"), true, rate);
        add(format!("round trips, {what} p50 (us)"), false, p50);
        add(format!("round trips, {what} p99 (us)"), false, p99);
        add(format!("round trips, {what}, proxy CPU per round trip (us)"), false, cpu);
    }
    // TLS with a name (SNI, and CONNECT by name): only through targets that resolve it with the
    // bench's DNS stub.
    for conc in [1usize, 64].into_iter().filter(|_| scenario("tls")) {
        let [rate, p50, p99, cpu] =
            per_target(targets, r, settle, |t| async move { scenarios::tls_setup(&t, up, conc, secs).await }).await;
        add(format!("TLS setup by name, concurrency {conc} (tunnels/s)"), true, rate);
        add(format!("TLS setup by name, concurrency {conc} p50 (us)"), false, p50);
        add(format!("TLS setup by name, concurrency {conc} p99 (us)"), false, p99);
        add(format!("TLS setup by name, concurrency {conc}, proxy CPU per tunnel (us)"), false, cpu);
    }
    if scenario("tls") {
        let [rate, p50, p99, cpu] =
            per_target(targets, r, Duration::ZERO, |t| async move { scenarios::tls_round_trips(&t, up, secs).await })
                .await;
        add("TLS round trips, 1 tunnel (req/s)".to_owned(), true, rate);
        add("TLS round trips, 1 tunnel p50 (us)".to_owned(), false, p50);
        add("TLS round trips, 1 tunnel p99 (us)".to_owned(), false, p99);
        add("TLS round trips, 1 tunnel, proxy CPU per round trip (us)".to_owned(), false, cpu);
    }
    for (path, keep_alive, label) in [
        ("/10", true, "http keep-alive GET 10 B"),
        ("/100k", true, "http keep-alive GET 100 KiB"),
        ("/10", false, "http new connection per GET 10 B"),
    ]
    .into_iter()
    .filter(|_| scenario("http"))
    {
        let conc = 16;
        let [rate, cpu] = per_target(targets, r, settle, |t| async move {
            scenarios::http_requests(&t, up, conc, path, keep_alive, secs).await.map(|(a, b)| [a, b])
        })
        .await;
        add(format!("{label}, {conc} clients (req/s)"), true, rate);
        add(format!("{label}, proxy CPU per request (us)"), false, cpu);
    }
    if scenario("idle") {
        // One round: opening thousands of tunnels is the measurement.
        let [kib, from_http] = per_target(targets, 1, Duration::ZERO, |t| async move {
            scenarios::idle(&t, up, args.idle_tunnels).await.map(|k| k.map(|v| v.unwrap_or(f64::NAN)))
        })
        .await;
        add(format!("idle, {} tunnels (KiB RSS per tunnel)", args.idle_tunnels), false, kib);
        // Tunnels born from HTTP: a CONNECT after a plain request on the same connection.
        let half = args.idle_tunnels / 2;
        add(format!("idle, {half} more tunnels, CONNECT after a request (KiB RSS per tunnel)"), false, from_http);
    }
    rows
}

/// The table: each value and its ratio to direct.
fn print_table(names: &[&str], rows: &[Row]) {
    println!();
    print!("| scenario |");
    for n in names {
        print!(" {n} |");
    }
    println!();
    print!("|---|");
    for _ in names {
        print!("---|");
    }
    println!();
    let direct = names.iter().position(|n| *n == "direct");
    for row in rows {
        print!("| {} {} |", row.scenario, if row.higher_better { "↑" } else { "↓" });
        for (i, v) in row.values.iter().enumerate() {
            match direct.map(|d| row.values[d]) {
                Some(d) if Some(i) != direct && d.is_finite() && v.is_finite() && d > 0.0 => {
                    let ratio = v / d;
                    print!(" {v:.1} ({ratio:.2}x) |");
                }
                _ if v.is_finite() => print!(" {v:.1} |"),
                _ => print!(" n/a |"),
            }
        }
        println!();
    }
    println!("\nratios are proxy / direct; ↑ higher is better, ↓ lower is better; idle memory has no direct baseline");
}

pub(crate) fn report(name: &str, e: &(dyn Error + Send + Sync)) -> f64 {
    eprintln!("{name}: {e}");
    f64::NAN
}
