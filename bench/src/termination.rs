//! The TLS termination suite: wrk over HTTPS through Tunnelgate's tunnel listeners (to a TCP and
//! to a Unix-socket backend) and through hitch, stunnel, HAProxy and nginx (stream) terminating
//! TLS in front of the same plain HTTP backend, against wrk on the backend's plain HTTP (the
//! ceiling). Keep-alive and a handshake per request, bodies of 10 B, 1 KiB and 100 KiB; requests
//! per second and the terminator's CPU (all its processes) per request.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::net::UnixListener;

use crate::{free_port, median, wait_port, which, Res, TempDir};

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
            crate::stop_child(c);
        }
    }
}

/// User + system CPU of `pid` and all its descendants, in microseconds.
fn tree_cpu_us(pid: u32) -> u64 {
    let mut total = crate::cpu_us(pid).unwrap_or(0);
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

async fn nginx(dir: &Path, backend: u16) -> Res<Option<Terminator>> {
    let Some(bin) = which("nginx") else { return Ok(None) };
    let module = Path::new("/usr/lib/nginx/modules/ngx_stream_module.so");
    if !module.exists() {
        return Ok(None);
    }
    let port = free_port()?;
    let d = dir.display();
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "load_module {};\nworker_processes 2;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err;\nevents {{ worker_connections 20000; }}\nstream {{\n  server {{\n    listen 127.0.0.1:{port} ssl;\n    ssl_certificate {d}/cert.pem;\n    ssl_certificate_key {d}/key.pem;\n    proxy_pass 127.0.0.1:{backend};\n  }}\n}}\n",
            module.display()
        ),
    )?;
    let child = run_quiet(Command::new(bin).arg("-p").arg(dir).arg("-c").arg(dir.join("nginx.conf")))?;
    Ok(Some(started("nginx", child, port).await?))
}

/// Requests/s from one wrk run, and the terminator's CPU per request (µs).
fn wrk(t: &Terminator, path: &str, keep_alive: bool, secs: f64, cpu_pid: Option<u32>) -> Res<(f64, f64)> {
    let before = cpu_pid.map(tree_cpu_us);
    let mut cmd = Command::new("wrk");
    cmd.args(["-t2", "-c16", &format!("-d{}s", secs.ceil() as u64)]);
    if !keep_alive {
        cmd.args(["-H", "Connection: close"]);
    }
    let out = cmd.arg(format!("{}{path}", t.url)).stderr(Stdio::null()).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rate: f64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:").map(|v| v.trim().parse::<f64>()))
        .ok_or_else(|| format!("{}: no wrk result: {text}", t.name))??;
    if text.contains("Non-2xx") || text.contains("Socket errors") && !keep_alive && rate == 0.0 {
        return Err(format!("{}: wrk saw errors: {text}", t.name).into());
    }
    let cpu = match (before, cpu_pid) {
        (Some(b), Some(p)) => (tree_cpu_us(p).saturating_sub(b)) as f64 / (rate * secs.ceil()).max(1.0),
        _ => f64::NAN,
    };
    Ok((rate, cpu))
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
    let backend = crate::serve(|s| async move {
        let _ = crate::http_server(s).await;
    })
    .await?;
    let sock = dir.0.join("backend.sock");
    let ul = UnixListener::bind(&sock)?;
    tokio::spawn(async move {
        while let Ok((s, _)) = ul.accept().await {
            tokio::spawn(crate::http_server(s));
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
    println!("\nTLS termination: {}; wrk -t2 -c16, {secs} s x {rounds} rounds, medians\n", names.join(", "));
    let mut rows = Vec::new();
    for (path, label) in [("/10", "10 B"), ("/1k", "1 KiB"), ("/100k", "100 KiB")] {
        for keep_alive in [true, false] {
            // Rounds go round the targets (each round runs every target once) so that a slow
            // spell of the shared machine lands on every target alike, not on one target's rounds.
            let mut samples: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); targets.len()];
            for _ in 0..rounds {
                for ((t, pid), (a, b)) in targets.iter().zip(samples.iter_mut()) {
                    match wrk(t, path, keep_alive, secs, *pid) {
                        Ok((x, y)) => {
                            a.push(x);
                            b.push(y);
                        }
                        Err(e) => eprintln!("{e}"),
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
            let (rate, cpu): (Vec<f64>, Vec<f64>) = samples.into_iter().map(|(a, b)| (median(a), median(b))).unzip();
            let mode = if keep_alive { "keep-alive" } else { "handshake per request" };
            println!("  {label} {mode}: {}", rate.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(" | "));
            rows.push((format!("{label}, {mode} (req/s)"), rate));
            rows.push((format!("{label}, {mode}, CPU per request (us)"), cpu));
        }
    }
    println!();
    println!("| scenario | {} |", names.join(" | "));
    println!("|---|{}", "---|".repeat(names.len()));
    for (scenario, values) in &rows {
        let ceiling = values
            .first()
            .copied()
            .filter(|v| names.first() == Some(&"plain http") && v.is_finite() && *v > 0.0 && !scenario.contains("CPU"));
        let cells: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, v)| match ceiling {
                _ if !v.is_finite() => "n/a".to_owned(),
                Some(c) if i > 0 => format!("{v:.0} ({:.2}x)", v / c),
                _ if scenario.contains("CPU") => format!("{v:.1}"),
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
