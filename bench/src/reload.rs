//! The reload suite: what a large rendered configuration costs the proxy — parse and validate
//! (in-process, with the proxy's own config crate), a whole reload as the proxy times it (parse,
//! compile, swap: `tunnelgate_config_reload_duration_seconds`), the wall time from a file write to
//! the new configuration in force, the proxy's CPU and RSS — while tunnels keep pumping round
//! trips (their worst round trip and any failure are reported), and the CPU per tunnel setup with
//! a large policy against a one-rule one.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::scenarios::{cpu_us, rss_kib};
use crate::targets::{connect_via, free_port, wait_port, TempDir};
use crate::{median, Res};

/// (pods, policies): the sizes of the propagation issue — about 300 KB and 3 MB rendered.
const SIZES: [(usize, usize); 2] = [(10_000, 1_000), (100_000, 10_000)];

/// An operator-shaped document: one rule per policy, each listing its pods' exact addresses and
/// one host, plus a rule that lets the bench's loopback client reach its loopback echo server.
fn document(pods: usize, policies: usize, render: u64, port: u16, admin: u16) -> String {
    let mut doc = format!(
        "# tunnelgate-render: {render}\nversion: 1\nlisteners: [{{name: forward, bind: '127.0.0.1:{port}'}}]\nadmin: {{bind: '127.0.0.1:{admin}'}}\nlimits: {{maxConnections: 100000, maxConnectionsPerClient: 100000, drainDelay: 0s, drainTimeout: 1s}}\nlogging: {{accessLog: false}}\npolicy:\n  defaultAction: deny\n  rules:\n    - {{name: bench/loopback, action: allow, clients: ['127.0.0.1'], cidrs: ['127.0.0.1/32']}}\n"
    );
    let per = pods.checked_div(policies).unwrap_or(0);
    for p in 0..policies {
        let _ = write!(doc, "    - name: ns-{}/policy-{p}\n      action: allow\n      clients: [", p % 100);
        for k in 0..per {
            let n = p * per + k;
            let _ = write!(
                doc,
                "{}'10.{}.{}.{}'",
                if k == 0 { "" } else { ", " },
                64 + n / 65_536,
                (n / 256) % 256,
                n % 256
            );
        }
        let _ = writeln!(doc, "]\n      hosts: ['svc-{p}.example.com']\n      ports: [443]");
    }
    doc
}

fn metric(body: &str, name: &str) -> f64 {
    body.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

async fn get(admin: SocketAddr, path: &str) -> Res<String> {
    let mut s = TcpStream::connect(admin).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

fn sha256_of(config_json: &str) -> Option<String> {
    let at = config_json.find("\"sha256\":\"")? + 10;
    Some(config_json[at..].chars().take_while(|c| *c != '"').collect())
}

/// The proxy's view of the document in force.
async fn in_force(admin: SocketAddr) -> Option<String> {
    get(admin, "/config").await.ok().and_then(|b| sha256_of(&b))
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// Writes `text` to `path` the way a kubelet swaps a ConfigMap: a new file renamed over the old.
fn replace(path: &Path, text: &str) -> Res<()> {
    let tmp: PathBuf = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Echo round trips through `n` tunnels until `stop`: (round trips, failures, worst µs).
fn pump(
    proxy: SocketAddr,
    echo: SocketAddr,
    n: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, u64, u64)> {
    tokio::spawn(async move {
        let (count, failures, worst) =
            (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let mut tasks = Vec::new();
        for _ in 0..n {
            let (count, failures, worst, stop) = (count.clone(), failures.clone(), worst.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let Ok(mut s) = connect_via(proxy, &echo.to_string()).await else {
                    failures.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    if s.write_all(&buf).await.is_err() || s.read_exact(&mut buf).await.is_err() {
                        failures.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    worst.fetch_max(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
                    count.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        (count.load(Ordering::Relaxed), failures.load(Ordering::Relaxed), worst.load(Ordering::Relaxed))
    })
}

/// CPU µs of the proxy per CONNECT setup (CONNECT, one round trip, close), `n` in sequence.
async fn setup_cpu(pid: u32, proxy: SocketAddr, echo: SocketAddr, n: usize) -> Res<f64> {
    let before = cpu_us(pid)?;
    for _ in 0..n {
        let mut s = connect_via(proxy, &echo.to_string()).await?;
        s.write_all(b"x").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
    }
    Ok((cpu_us(pid)? - before) as f64 / n as f64)
}

pub(crate) async fn run(proxy_bin: &Path, rounds: usize, echo: SocketAddr) -> Res<()> {
    println!("| config | rules | bytes | parse+validate ms (in-process) | reload ms (proxy) | write → in force ms | proxy CPU ms per reload | RSS MiB | tunnels: round trips / failures / worst ms | CPU µs per setup |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    // The floor first: a one-rule policy.
    let mut rows = Vec::new();
    for (pods, policies) in [(0, 0)].into_iter().chain(SIZES) {
        let dir = TempDir::new(&format!("reload-{pods}"))?;
        let (port, admin) = (free_port()?, free_port()?);
        let path = dir.0.join("config.yaml");
        let doc = document(pods, policies, 1, port, admin);
        let label = if pods == 0 { "1 rule".to_owned() } else { format!("{pods} pods / {policies} policies") };
        let parse: Vec<f64> = (0..rounds.max(1))
            .map(|_| {
                let t = Instant::now();
                let ok = proxy_config::ProxyConfig::from_yaml(&doc).is_ok();
                (ok, t.elapsed().as_secs_f64() * 1e3)
            })
            .map(|(ok, ms)| if ok { ms } else { f64::NAN })
            .collect();
        replace(&path, &doc)?;
        let mut child = Command::new(proxy_bin)
            .arg("--config")
            .arg(&path)
            .env("TUNNELGATE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let pid = child.id();
        let proxy: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let admin_addr: SocketAddr = format!("127.0.0.1:{admin}").parse()?;
        wait_port(admin_addr).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let pumping = pump(proxy, echo, 20, stop.clone());
        let (mut wall, mut cpu) = (Vec::new(), Vec::new());
        let m0 = get(admin_addr, "/metrics").await?;
        for r in 0..rounds {
            let next = doc.replacen("# tunnelgate-render: 1", &format!("# tunnelgate-render: {}", r + 2), 1);
            let want = sha256_hex(&next);
            let c0 = cpu_us(pid)?;
            let t = Instant::now();
            replace(&path, &next)?;
            let deadline = t + Duration::from_secs(60);
            while in_force(admin_addr).await.as_deref() != Some(want.as_str()) {
                if Instant::now() > deadline {
                    return Err(format!("{label}: reload {r} not in force after 60 s").into());
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            wall.push(t.elapsed().as_secs_f64() * 1e3);
            cpu.push((cpu_us(pid)? - c0) as f64 / 1e3);
        }
        let m1 = get(admin_addr, "/metrics").await?;
        stop.store(true, Ordering::Relaxed);
        let (trips, failures, worst) = pumping.await?;
        let name = "tunnelgate_config_reload_duration_seconds";
        let (sum, count) = (
            metric(&m1, &format!("{name}_sum")) - metric(&m0, &format!("{name}_sum")),
            metric(&m1, &format!("{name}_count")) - metric(&m0, &format!("{name}_count")),
        );
        let per_setup = setup_cpu(pid, proxy, echo, 2000).await?;
        let rss = rss_kib(pid)? as f64 / 1024.0;
        let _ = child.kill();
        let _ = child.wait();
        let rules = if pods == 0 { 1 } else { policies + 1 };
        rows.push(format!(
            "| {label} | {rules} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {rss:.1} | {trips} / {failures} / {:.1} | {per_setup:.0} |",
            doc.len(),
            median(parse),
            if count > 0.0 { sum / count * 1e3 } else { f64::NAN },
            median(wall),
            median(cpu),
            worst as f64 / 1e3,
        ));
        println!("{}", rows.last().map_or("", String::as_str));
    }
    Ok(())
}
