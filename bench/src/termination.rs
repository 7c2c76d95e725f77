//! The TLS termination suite: wrk over HTTPS through Tunnelgate's tunnel listeners (to a TCP and
//! to a Unix-socket backend) and through hitch, stunnel, HAProxy and nginx (stream) terminating
//! TLS in front of the same plain HTTP backend, against wrk on the backend's plain HTTP (the
//! ceiling). Keep-alive and a handshake per request (with a TLS 1.3 client and with a client
//! capped at TLS 1.2), bodies of 10 B, 1 KiB and 100 KiB; requests per second, the terminator's
//! CPU (all its processes) and wrk's CPU per request, and how much of the machine stayed idle.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::net::UnixListener;

use crate::targets::{free_port, wait_port, which, TempDir};
use crate::{median, Res};

/// A TLS terminator (or the plain backend) that wrk connects to.
struct Terminator {
    name: &'static str,
    url: String,
    /// The processes whose CPU is counted (a terminator's master and workers are its children).
    child: Option<Child>,
}

impl Drop for Terminator {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            crate::targets::stop_child(c);
        }
    }
}

/// User + system CPU of `pid` and all its descendants, in microseconds.
fn tree_cpu_us(pid: u32) -> u64 {
    let mut total = crate::scenarios::cpu_us(pid).unwrap_or(0);
    if let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        for c in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
            total += tree_cpu_us(c);
        }
    }
    total
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
}

fn run_quiet(cmd: &mut Command) -> Res<Child> {
    Ok(cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?)
}

/// Self-signed ECDSA P-256 certificate for `localhost`: cert, key and both concatenated.
fn certificate(dir: &Path) -> Res<()> {
    let ok = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?
        .success();
    if !ok {
        return Err("openssl could not make a certificate".into());
    }
    let both = std::fs::read_to_string(dir.join("cert.pem"))? + &std::fs::read_to_string(dir.join("key.pem"))?;
    std::fs::write(dir.join("combined.pem"), both)?;
    Ok(())
}

async fn started(name: &'static str, child: Child, port: u16) -> Res<Terminator> {
    let t = Terminator { name, url: format!("https://localhost:{port}"), child: Some(child) };
    wait_port(([127, 0, 0, 1], port).into()).await?;
    Ok(t)
}

async fn tunnelgate(bin: &Path, dir: &Path, backend: u16, sock: &Path) -> Res<(Terminator, Terminator)> {
    let (tcp, unix, admin) = (free_port()?, free_port()?, free_port()?);
    let d = dir.display();
    let cfg = format!(
        "version: 1\nlisteners:\n  - {{name: tcp, bind: '127.0.0.1:{tcp}', mode: tunnel, upstream: '127.0.0.1:{backend}', tls: {{certFile: '{d}/cert.pem', keyFile: '{d}/key.pem'}}}}\n  - {{name: unix, bind: '127.0.0.1:{unix}', mode: tunnel, upstream: 'unix:{}', tls: {{certFile: '{d}/cert.pem', keyFile: '{d}/key.pem'}}}}\nadmin: {{bind: '127.0.0.1:{admin}'}}\nrelay: {{idleTimeout: 10m}}\nlimits: {{maxConnections: 100000, maxConnectionsPerClient: 100000, drainDelay: 0s, drainTimeout: 1s}}\n# The peers run without access logs too.\nlogging: {{accessLog: false}}\n",
        sock.display()
    );
    std::fs::write(dir.join("tunnelgate.yaml"), cfg)?;
    let child =
        run_quiet(Command::new(bin).arg("--config").arg(dir.join("tunnelgate.yaml")).env("TUNNELGATE_LOG", "warn"))?;
    let a = started("tunnelgate", child, tcp).await?;
    wait_port(([127, 0, 0, 1], unix).into()).await?;
    // One process serves both listeners: the caller counts its CPU for both targets (one runs at
    // a time), and only the first owns the process.
    let b = Terminator { name: "tunnelgate-unix", url: format!("https://localhost:{unix}"), child: None };
    Ok((a, b))
}

async fn hitch(dir: &Path, backend: u16) -> Res<Option<Terminator>> {
    let Some(bin) = which("hitch") else { return Ok(None) };
    let port = free_port()?;
    let child = run_quiet(
        Command::new(bin)
            .arg(format!("--frontend=[127.0.0.1]:{port}"))
            .arg(format!("--backend=[127.0.0.1]:{backend}"))
            .args(["--workers=2", "--daemon=off", "--quiet"])
            // hitch refuses to run its workers as root.
            .args(if is_root() { &["--user=nobody"][..] } else { &[] })
            .arg(dir.join("combined.pem")),
    )?;
    Ok(Some(started("hitch", child, port).await?))
}

async fn stunnel(dir: &Path, backend: u16) -> Res<Option<Terminator>> {
    let Some(bin) = which("stunnel4").or_else(|| which("stunnel")) else { return Ok(None) };
    let port = free_port()?;
    let d = dir.display();
    std::fs::write(
        dir.join("stunnel.conf"),
        format!("foreground = yes\npid =\nsyslog = no\n[tls]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{backend}\ncert = {d}/cert.pem\nkey = {d}/key.pem\n"),
    )?;
    let child = run_quiet(Command::new(bin).arg(dir.join("stunnel.conf")))?;
    Ok(Some(started("stunnel", child, port).await?))
}

async fn haproxy(dir: &Path, backend: u16) -> Res<Option<Terminator>> {
    let Some(bin) = which("haproxy") else { return Ok(None) };
    let port = free_port()?;
    std::fs::write(
        dir.join("haproxy.cfg"),
        format!(
            "global\n  nbthread 2\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nfrontend f\n  bind 127.0.0.1:{port} ssl crt {}\n  default_backend b\nbackend b\n  server s 127.0.0.1:{backend}\n",
            dir.join("combined.pem").display()
        ),
    )?;
    let child = run_quiet(Command::new(bin).args(["-db", "-f"]).arg(dir.join("haproxy.cfg")))?;
    Ok(Some(started("haproxy", child, port).await?))
}

/// nginx's stream module terminating TLS, with nginx's default since 1.23.4 (TLS 1.2 and 1.3).
/// Debian 12's nginx (1.22) enables TLS 1.0-1.2 only unless told otherwise; left so, it would
/// answer wrk's TLS 1.3 offer with TLS 1.2 and race the other targets' TLS 1.3 handshakes with
/// TLS 1.2 resumptions, which skip the key exchange. The TLS 1.2 client rows compare those.
async fn nginx(dir: &Path, backend: u16) -> Res<Option<Terminator>> {
    let Some(bin) = which("nginx") else { return Ok(None) };
    let module = Path::new("/usr/lib/nginx/modules/ngx_stream_module.so");
    if !module.exists() {
        return Ok(None);
    }
    let port = free_port()?;
    let d = dir.display();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "load_module {};\nworker_processes 2;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err;\nevents {{ worker_connections 20000; }}\nstream {{\n  server {{\n    listen 127.0.0.1:{port} ssl;\n    ssl_protocols TLSv1.2 TLSv1.3;\n    ssl_certificate {d}/cert.pem;\n    ssl_certificate_key {d}/key.pem;\n    proxy_pass 127.0.0.1:{backend};\n  }}\n}}\n",
            module.display()
        ),
    )?;
    let child = run_quiet(Command::new(bin).arg("-p").arg(dir).arg("-c").arg(&conf))?;
    Ok(Some(started("nginx", child, port).await?))
}

/// How a client is set up: wrk with keep-alive, or a handshake per request with OpenSSL's
/// defaults (TLS 1.3 first) or capped at TLS 1.2 through an OpenSSL configuration file (wrk has
/// no option for it), where a resumed handshake needs no key exchange.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    KeepAlive,
    Handshake,
    HandshakeTls12,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::KeepAlive => "keep-alive",
            Mode::Handshake => "handshake per request",
            Mode::HandshakeTls12 => "handshake per request, TLS 1.2 client",
        }
    }
}

/// An OpenSSL configuration that caps the client at TLS 1.2.
fn tls12_client_config(dir: &Path) -> Res<std::path::PathBuf> {
    let path = dir.join("openssl-tls12.cnf");
    std::fs::write(
        &path,
        "openssl_conf = default_conf\n[default_conf]\nssl_conf = ssl_sect\n[ssl_sect]\nsystem_default = system_default_sect\n[system_default_sect]\nMaxProtocol = TLSv1.2\n",
    )?;
    Ok(path)
}

/// The TLS version and cipher suite a target negotiates with an OpenSSL client (wrk's library),
/// and whether a second connection resumes the first one's session. The client sends a request
/// and reads to the end, as wrk does, so that TLS 1.3 tickets (sent after the handshake) arrive.
fn negotiated(t: &Terminator, tls12: Option<&Path>) -> String {
    let Some(authority) = t.url.strip_prefix("https://") else { return "plain HTTP".to_owned() };
    let session = std::env::temp_dir().join(format!("tg-bench-session-{}", std::process::id()));
    let connect = |extra: &[&std::ffi::OsStr]| -> String {
        let mut cmd = Command::new("openssl");
        cmd.args(["s_client", "-ign_eof", "-connect", authority, "-servername", "localhost"]).args(extra);
        if let Some(conf) = tls12 {
            cmd.env("OPENSSL_CONF", conf);
        }
        let Ok(mut child) = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn() else {
            return String::new();
        };
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write;
            let _ = stdin.write_all(b"GET /10 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        }
        child.wait_with_output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
    };
    let first = connect(&["-sess_out".as_ref(), session.as_os_str()]);
    let second = connect(&["-sess_in".as_ref(), session.as_os_str()]);
    let _ = std::fs::remove_file(&session);
    let line = |text: &str, prefix: &str| text.lines().find(|l| l.starts_with(prefix)).map(str::to_owned);
    match (line(&first, "New,"), line(&second, "Reused,")) {
        (Some(new), resumed) => format!(
            "{}{}",
            new.trim_start_matches("New, ").replace(", Cipher is", ""),
            if resumed.is_some() { ", resumes" } else { ", does not resume" }
        ),
        (None, _) => "unknown (openssl s_client failed)".to_owned(),
    }
}

/// Busy and total jiffies of the whole machine (all CPUs), from /proc/stat.
fn machine_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> =
        stat.lines().next().unwrap_or_default().split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let total: u64 = f.iter().sum();
    // idle and iowait are the fourth and fifth fields.
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// One wrk run: requests/s, the terminator's CPU per request (µs), wrk's own CPU per request
/// (µs) and the share of the machine left idle. The last two tell a terminator that is slow
/// because it costs the client more (more records, more tickets to process) from one that leaves
/// the cores waiting (latency per handshake).
struct Sample {
    rate: f64,
    cpu: f64,
    client_cpu: f64,
    idle: f64,
}

fn wrk(t: &Terminator, path: &str, mode: Mode, tls12: &Path, secs: f64, cpu_pid: Option<u32>) -> Res<Sample> {
    let before = cpu_pid.map(tree_cpu_us);
    let (busy0, total0) = machine_jiffies();
    // bash's `times` prints the CPU of its children, i.e. of wrk alone.
    let mut cmd = Command::new("bash");
    cmd.args(["-c", "wrk \"$@\" && times", "wrk", "-t2", "-c16", &format!("-d{}s", secs.ceil() as u64)]);
    if mode != Mode::KeepAlive {
        cmd.args(["-H", "Connection: close"]);
    }
    if mode == Mode::HandshakeTls12 {
        cmd.env("OPENSSL_CONF", tls12);
    }
    let out = cmd.arg(format!("{}{path}", t.url)).stderr(Stdio::null()).output()?;
    let (busy1, total1) = machine_jiffies();
    let text = String::from_utf8_lossy(&out.stdout);
    let rate: f64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:").map(|v| v.trim().parse::<f64>()))
        .ok_or_else(|| format!("{}: no wrk result: {text}", t.name))??;
    if text.contains("Non-2xx") || text.contains("Socket errors") && mode != Mode::KeepAlive && rate == 0.0 {
        return Err(format!("{}: wrk saw errors: {text}", t.name).into());
    }
    let requests = (rate * secs.ceil()).max(1.0);
    let cpu = match (before, cpu_pid) {
        (Some(b), Some(p)) => (tree_cpu_us(p).saturating_sub(b)) as f64 / requests,
        _ => f64::NAN,
    };
    // `times` prints two lines (the shell's, then its children's) of "<user>m<s>s <sys>m<s>s".
    let client_cpu =
        text.lines().last().map_or(f64::NAN, |l| l.split_whitespace().map(duration_secs).sum::<f64>() * 1e6 / requests);
    let idle = if total1 > total0 { 1.0 - (busy1 - busy0) as f64 / (total1 - total0) as f64 } else { f64::NAN };
    Ok(Sample { rate, cpu, client_cpu, idle })
}

/// Seconds from bash's `times` notation, e.g. `0m1.250s`.
fn duration_secs(v: &str) -> f64 {
    let Some((m, s)) = v.trim_end_matches('s').split_once('m') else { return f64::NAN };
    m.parse::<f64>().unwrap_or(f64::NAN) * 60.0 + s.parse::<f64>().unwrap_or(f64::NAN)
}

/// Runs the suite and prints its table.
pub(crate) async fn run(proxy_bin: &Path, rounds: usize, secs: f64, only: Option<&str>) -> Res<()> {
    if which("wrk").is_none() {
        println!("termination suite skipped: wrk is not installed (bench/install-peers.sh installs it)");
        return Ok(());
    }
    let wanted = |n: &str| only.is_none_or(|o| o.split(',').any(|x| x.trim() == n));
    let dir = TempDir::new("termination")?;
    certificate(&dir.0)?;
    let backend = crate::upstreams::serve(|s| async move {
        let _ = crate::upstreams::http_server(s).await;
    })
    .await?;
    let sock = dir.0.join("backend.sock");
    let ul = UnixListener::bind(&sock)?;
    tokio::spawn(async move {
        while let Ok((s, _)) = ul.accept().await {
            tokio::spawn(crate::upstreams::http_server(s));
        }
    });
    let bport = backend.port();
    let mut targets: Vec<(Terminator, Option<u32>)> = Vec::new();
    if wanted("plain") {
        targets.push((Terminator { name: "plain http", url: format!("http://127.0.0.1:{bport}"), child: None }, None));
    }
    if wanted("tunnelgate") {
        let (tcp, unix) = tunnelgate(proxy_bin, &dir.0, bport, &sock).await?;
        let pid = tcp.child.as_ref().map(Child::id);
        targets.push((tcp, pid));
        targets.push((unix, pid));
    }
    for (name, found) in [
        ("hitch", hitch(&dir.0, bport).await),
        ("stunnel", stunnel(&dir.0, bport).await),
        ("haproxy", haproxy(&dir.0, bport).await),
        ("nginx", nginx(&dir.0, bport).await),
    ] {
        if !wanted(name) {
            continue;
        }
        match found {
            Ok(Some(t)) => {
                let pid = t.child.as_ref().map(Child::id);
                targets.push((t, pid));
            }
            Ok(None) => println!("skipping {name}: not installed (bench/install-peers.sh installs it)"),
            Err(e) => println!("skipping {name}: cannot start it: {e}"),
        }
    }
    let names: Vec<&str> = targets.iter().map(|(t, _)| t.name).collect();
    println!("\nTLS termination: {}; wrk -t2 -c16, {secs} s x {rounds} rounds, medians", names.join(", "));
    let tls12 = tls12_client_config(&dir.0)?;
    for (t, _) in targets.iter().filter(|(t, _)| t.url.starts_with("https://")) {
        println!("  {}: {}; TLS 1.2 client: {}", t.name, negotiated(t, None), negotiated(t, Some(&tls12)));
    }
    println!();
    let mut rows = Vec::new();
    for (path, label) in [("/10", "10 B"), ("/1k", "1 KiB"), ("/100k", "100 KiB")] {
        for mode in [Mode::KeepAlive, Mode::Handshake, Mode::HandshakeTls12] {
            // Rounds go round the targets (each round runs every target once) so that a slow
            // spell of the shared machine lands on every target alike, not on one target's rounds.
            let mut samples: Vec<Vec<Sample>> = targets.iter().map(|_| Vec::new()).collect();
            for _ in 0..rounds {
                for ((t, pid), s) in targets.iter().zip(samples.iter_mut()) {
                    match wrk(t, path, mode, &tls12, secs, *pid) {
                        Ok(x) => s.push(x),
                        Err(e) => eprintln!("{e}"),
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
            let column = |f: fn(&Sample) -> f64| -> Vec<f64> {
                samples.iter().map(|s| median(s.iter().map(f).collect())).collect()
            };
            let rate = column(|s| s.rate);
            let mode = mode.label();
            println!("  {label} {mode}: {}", rate.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(" | "));
            rows.push((format!("{label}, {mode} (req/s)"), rate));
            rows.push((format!("{label}, {mode}, CPU per request (us)"), column(|s| s.cpu)));
            rows.push((format!("{label}, {mode}, wrk CPU per request (us)"), column(|s| s.client_cpu)));
            rows.push((format!("{label}, {mode}, machine idle (%)"), column(|s| s.idle * 100.0)));
        }
    }
    println!();
    println!("| scenario | {} |", names.join(" | "));
    println!("|---|{}", "---|".repeat(names.len()));
    for (scenario, values) in &rows {
        let ceiling = values.first().copied().filter(|v| {
            names.first() == Some(&"plain http") && v.is_finite() && *v > 0.0 && scenario.ends_with("(req/s)")
        });
        let cells: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, v)| match ceiling {
                _ if !v.is_finite() => "n/a".to_owned(),
                Some(c) if i > 0 => format!("{v:.0} ({:.2}x)", v / c),
                _ if !scenario.ends_with("(req/s)") => format!("{v:.1}"),
                _ => format!("{v:.0}"),
            })
            .collect();
        println!("| {scenario} | {} |", cells.join(" | "));
    }
    println!(
        "\nratios are terminator / plain HTTP to the backend (the ceiling); CPU counts every process of the terminator"
    );
    Ok(())
}
