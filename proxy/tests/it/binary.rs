//! The built binary: CLI exit codes, signals and drain (D-*), EMFILE (R-04) and memory under
//! backpressure (R-05).

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::support::*;
use crate::tls::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_tunnelgate-proxy");

/// A proxy process with fixed ports read back from its config.
pub(crate) struct Proc {
    pub(crate) child: Child,
    pub(crate) listen: SocketAddr,
    pub(crate) admin: SocketAddr,
    dir: TempDir,
}

impl Proc {
    pub(crate) async fn start(w: &World, extra: &str) -> Proc {
        Proc::start_with(w, extra, None).await
    }

    pub(crate) async fn start_with_args(w: &World, extra: &str, args: &[&str]) -> Proc {
        Proc::launch(w, extra, None, args, &[]).await
    }

    pub(crate) async fn start_with(w: &World, extra: &str, ulimit_nofile: Option<u32>) -> Proc {
        Proc::launch(w, extra, ulimit_nofile, &[], &[]).await
    }

    pub(crate) async fn launch(
        w: &World,
        extra: &str,
        ulimit_nofile: Option<u32>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Proc {
        let dir = TempDir::new("bin");
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let yaml = format!(
            "version: 1\nlisteners: [{{name: forward, bind: '{listen}'}}]\nadmin: {{bind: '{admin}'}}\ndns: {{nameservers: ['{dns}'], timeout: 10s}}\npolicy:\n  rules:\n    - {{name: echo, action: allow, hosts: [allowed.test, slow.test], cidrs: ['127.0.0.2/32']}}\n{extra}",
            dns = w.dns.addr
        );
        let path = dir.0.join("config.yaml");
        std::fs::write(&path, yaml).unwrap();
        let log = std::fs::File::create(dir.0.join("stderr.log")).unwrap();
        let mut cmd = match ulimit_nofile {
            None => {
                let mut c = Command::new(BIN);
                c.arg("--config").arg(&path).args(args);
                c
            }
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c").arg(format!("ulimit -n {n} && exec \"$0\" --config \"$1\"")).arg(BIN).arg(&path);
                c
            }
        };
        let child = cmd.envs(env.iter().copied()).stdout(Stdio::null()).stderr(log).kill_on_drop(true).spawn().unwrap();
        let p = Proc { child, listen, admin, dir };
        assert!(
            eventually(10, || async { TcpStream::connect(admin).await.is_ok() }).await,
            "proxy did not start: {}",
            p.log()
        );
        p
    }

    pub(crate) fn pid(&self) -> String {
        self.child.id().unwrap().to_string()
    }

    pub(crate) fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill").arg(format!("-{sig}")).arg(self.pid()).status().unwrap().success();
        assert!(ok);
    }

    pub(crate) fn config_path(&self) -> std::path::PathBuf {
        self.dir.0.join("config.yaml")
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("stderr.log")).unwrap_or_default()
    }

    pub(crate) async fn exit_within(&mut self, secs: u64) -> i32 {
        match tokio::time::timeout(Duration::from_secs(secs), self.child.wait()).await {
            Ok(Ok(st)) => st.code().unwrap_or(-1),
            _ => panic!("did not exit within {secs}s; log:\n{}", self.log()),
        }
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap()
            .parse()
            .unwrap()
    }

    fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let after = stat.rsplit_once(')').unwrap().1;
        let f: Vec<&str> = after.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }
}

fn run(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn cli_check_reports_every_error_with_its_path() {
    let dir = TempDir::new("check");
    let good = dir.0.join("good.yaml");
    std::fs::write(&good, "version: 1\nlisteners: [{name: f, bind: '127.0.0.1:3128'}]\n").unwrap();
    let (code, out) = run(&["check", "--config", good.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("valid"));
    let bad = dir.0.join("bad.yaml");
    std::fs::write(&bad, "version: 1\nlisteners: [{name: f, bind: '127.0.0.1:3128', colour: red}]\npolicy:\n  rules:\n    - {name: a, action: allow, hosts: ['a.*.test'], cidrs: ['10.0.0.0/33'], ports: [70000]}\n").unwrap();
    let (code, out) = run(&["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, 64);
    for want in [
        "listeners[0].colour: unknown field `colour`",
        "policy.rules[0].hosts[0]: wildcard must be the leftmost label",
        "policy.rules[0].cidrs[0]:",
        "policy.rules[0].ports[0]: 70000 is not a port",
    ] {
        assert!(out.contains(want), "{want} in {out}");
    }
    let (code, out) = run(&["check", "--config", "/nonexistent/x.yaml"]);
    assert_eq!(code, 64);
    assert!(out.contains("cannot read /nonexistent/x.yaml: No such file or directory"), "the OS reason: {out}");
}

#[test]
fn cli_explain_names_the_deciding_rule() {
    let dir = TempDir::new("explain");
    let f = dir.0.join("c.yaml");
    std::fs::write(&f, "version: 1\nlisteners: [{name: f, bind: '127.0.0.1:3128'}]\npolicy:\n  rules:\n    - {name: payments/allow-github, action: allow, clients: ['10.244.1.0/24'], hosts: [api.github.com], ports: [443], relay: {idleTimeout: 60s}}\n    - {name: no-evil, action: deny, hosts: ['*.evil.test']}\n    - {name: db, action: allow, cidrs: ['10.9.0.0/16'], ports: [5432]}\n").unwrap();
    let f = f.to_str().unwrap();
    let (code, out) = run(&[
        "explain",
        "--config",
        f,
        "--client",
        "10.244.1.17",
        "--target",
        "api.github.com:443",
        "--resolve",
        "140.82.112.5",
    ]);
    assert_eq!(code, 0);
    assert!(
        out.contains("decision: allow")
            && out.contains("rule: payments/allow-github")
            && out.contains("idleTimeout=1m"),
        "{out}"
    );
    let (code, out) = run(&["explain", "--config", f, "--client", "10.244.1.17", "--target", "x.evil.test:443"]);
    assert_eq!(code, 1, "deny exits 1, as kubectl auth can-i");
    let (code, _) = run(&["explain", "--config", f, "--client", "10.244.1.17", "--target", "api.github.com:443"]);
    assert_eq!(code, 2, "needs resolution");
    assert!(
        out.contains("decision: deny (403)") && out.contains("rule: no-evil") && out.contains("no DNS query"),
        "{out}"
    );
    let (_, out) = run(&["explain", "--config", f, "--client", "1.2.3.4", "--target", "10.9.1.1:5432"]);
    assert!(out.contains("decision: allow") && out.contains("rule: db"), "{out}");
    let (_, out) = run(&[
        "explain",
        "--config",
        f,
        "--client",
        "10.244.1.17",
        "--target",
        "api.github.com:443",
        "--resolve",
        "10.0.0.1",
    ]);
    assert!(
        out.contains("decision: deny")
            && out.contains("reason: private address (private): rule payments/allow-github allows the name"),
        "{out}"
    );
    let (_, out) = run(&["explain", "--config", f, "--client", "1.2.3.4", "--target", "10.0.0.1:5432"]);
    assert!(out.contains("decision: deny") && out.contains("rule: default"), "{out}");
    // A dry-run rule is shown apart from the decision.
    let dry = dir.0.join("dry.yaml");
    std::fs::write(&dry, "version: 1\nlisteners: [{name: f, bind: '127.0.0.1:3128'}]\npolicy:\n  rules:\n    - {name: gh, action: allow, hosts: [api.github.com]}\n    - {name: ns/tighten, action: deny, dryRun: true, hosts: [api.github.com]}\n").unwrap();
    let (_, out) = run(&[
        "explain",
        "--config",
        dry.to_str().unwrap(),
        "--client",
        "10.0.0.1",
        "--target",
        "api.github.com:443",
        "--resolve",
        "140.82.112.5",
    ]);
    assert!(
        out.contains("decision: allow") && out.contains("dry run: rule ns/tighten would deny it (not enforced)"),
        "{out}"
    );
    // The cluster's own networks: refused with their reason and the way to open them.
    let cluster = dir.0.join("cluster.yaml");
    std::fs::write(&cluster, "version: 1\nlisteners: [{name: f, bind: '127.0.0.1:3128'}]\npolicy:\n  defaultAction: allow\n  clusterNetworks: ['34.118.224.0/20']\n  rules:\n    - {name: anywhere, action: allow, cidrs: ['0.0.0.0/0']}\n").unwrap();
    let (_, out) = run(&[
        "explain",
        "--config",
        cluster.to_str().unwrap(),
        "--client",
        "10.0.0.1",
        "--target",
        "34.118.224.10:443",
    ]);
    assert!(
        out.contains("decision: deny (403)")
            && out.contains("cluster-network")
            && out.contains("lies entirely inside one of them"),
        "{out}"
    );
    // A catch-all allow says why it does not open a metadata address, and `check` warns about it.
    let any = dir.0.join("any.yaml");
    std::fs::write(&any, "version: 1\nlisteners: [{name: f, bind: '127.0.0.1:3128'}]\npolicy:\n  rules:\n    - {name: anyv4, action: allow, cidrs: ['0.0.0.0/0']}\n").unwrap();
    let any = any.to_str().unwrap();
    let (_, out) = run(&["explain", "--config", any, "--client", "10.1.1.1", "--target", "169.254.169.254:80"]);
    assert!(
        out.contains("decision: deny (403)")
            && out.contains(
                "reason: private address (rule's CIDR is not an opt-in): the address is metadata; rule anyv4"
            ),
        "{out}"
    );
    let (_, out) =
        run(&["explain", "--config", any, "--client", "10.1.1.1", "--target", "http://169.254.169.254/latest/"]);
    assert!(out.contains("target: 169.254.169.254:80") && out.contains("decision: deny (403)"), "{out}");
    let (code, out) = run(&["explain", "--config", any, "--client", "10.1.1.1", "--target", "https://example.com/"]);
    assert_eq!(code, 64, "{out}");
    let (_, out) = run(&["explain", "--config", any, "--client", "10.1.1.1", "--target", "93.184.216.34:443"]);
    assert!(out.contains("decision: allow") && out.contains("rule: anyv4"), "{out}");
    let (code, out) = run(&["check", "--config", any]);
    assert_eq!(code, 0, "a warning is not an error");
    assert!(out.contains("warning: policy.rules[0].cidrs[0]: 0.0.0.0/0 holds public and refused addresses"), "{out}");
    let (code, out) = run(&["explain", "--config", f, "--client", "1.2.3.4", "--target", "0x7f.1:443"]);
    assert_eq!(code, 64);
    assert!(out.contains("400"), "{out}");
}

#[test]
fn s01_explain_agrees_with_the_proxy_on_every_address_of_the_host() {
    // A listener bound to 0.0.0.0 is the proxy itself on every address of the host, not only on
    // loopback. explain dials nothing, so a real interface address is safe to use here.
    let host = tunnelgate_proxy::own_addresses::host_addresses()
        .into_iter()
        .find(|a| !a.is_loopback())
        .unwrap_or_else(|| "127.0.0.5".parse().unwrap());
    let net = if host.is_ipv4() { format!("{host}/32") } else { format!("{host}/128") };
    let dir = TempDir::new("explain-self");
    let f = dir.0.join("c.yaml");
    std::fs::write(&f, format!("version: 1\nlisteners: [{{name: f, bind: '0.0.0.0:3128'}}]\nadmin: {{bind: '0.0.0.0:9090'}}\npolicy:\n  rules:\n    - {{name: host, action: allow, cidrs: ['{net}']}}\n")).unwrap();
    let f = f.to_str().unwrap();
    let target = |port: u16| if host.is_ipv4() { format!("{host}:{port}") } else { format!("[{host}]:{port}") };
    for port in [3128, 9090] {
        let (_, out) = run(&["explain", "--config", f, "--client", "10.1.1.1", "--target", &target(port)]);
        assert!(out.contains("decision: deny (403)") && out.contains("rule: self"), "{host}:{port}: {out}");
    }
    let (_, out) = run(&["explain", "--config", f, "--client", "10.1.1.1", "--target", &target(8443)]);
    assert!(out.contains("decision: allow") && out.contains("rule: host"), "{out}");
}

#[tokio::test]
async fn invalid_config_exits_64_before_binding() {
    let dir = TempDir::new("invalid");
    let port = free_port();
    let f = dir.0.join("c.yaml");
    std::fs::write(
        &f,
        format!("version: 1\nlisteners: [{{name: f, bind: '127.0.0.1:{port}'}}]\npolicy: {{defaultAction: maybe}}\n"),
    )
    .unwrap();
    let (code, out) = run(&["--config", f.to_str().unwrap()]);
    assert_eq!(code, 64);
    assert!(out.contains("policy.defaultAction"), "{out}");
    // The port was never bound (nothing is listening there).
    assert!(TcpStream::connect(("127.0.0.1", port)).await.is_err());
}

#[tokio::test]
async fn embedded_default_serves_and_denies_private_targets() {
    // The README's first command: no --config.
    let Ok(l) = std::net::TcpListener::bind("127.0.0.1:8080") else {
        panic!("port 8080 is busy; the embedded default needs it")
    };
    drop(l);
    let mut child = Command::new(BIN).stderr(Stdio::null()).kill_on_drop(true).spawn().unwrap();
    let admin: SocketAddr = "127.0.0.1:9090".parse().unwrap();
    assert!(eventually(10, || async { TcpStream::connect(admin).await.is_ok() }).await);
    assert_eq!(admin_get(admin, "/readyz").await.0, 200);
    // Before any traffic, the series alerts rely on exist, with the build and the process.
    let (_, metrics) = admin_get(admin, "/metrics").await;
    for series in [
        "tunnelgate_tunnel_requests_total{listener=\"forward\",result=\"established\"} 0",
        "tunnelgate_tunnel_requests_total{listener=\"forward\",result=\"denied\"} 0",
        "tunnelgate_config_reloads_total{result=\"failure\"} 0",
        "tunnelgate_config_last_reload_success 1",
        "process_resident_memory_bytes ",
        "process_cpu_seconds_total ",
    ] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }
    let sha = metrics.lines().find(|l| l.starts_with("tunnelgate_build_info{")).unwrap_or_default();
    let git = std::process::Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output().unwrap();
    let git = String::from_utf8_lossy(&git.stdout).trim().to_owned();
    assert!(git.len() == 12 && sha.contains(&format!("git_sha=\"{git}\"")), "{sha} (HEAD {git})");
    let (_, cfg) = admin_get(admin, "/config").await;
    let digest: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    let prefix = &digest["sha256"].as_str().unwrap()[..12];
    assert!(metrics.contains(&format!("tunnelgate_config_info{{sha256=\"{prefix}\"}} 1")), "{metrics}");
    let (status, _) = exchange("127.0.0.1:8080".parse().unwrap(), b"CONNECT 127.0.0.1:22 HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, 403, "the default refuses private addresses");
    let (_, cfg) = admin_get(admin, "/config").await;
    assert!(cfg.contains("\"generation\":1") && cfg.contains("\"sha256\""), "{cfg}");
    std::process::Command::new("kill").arg("-TERM").arg(child.id().unwrap().to_string()).status().unwrap();
    let st = tokio::time::timeout(Duration::from_secs(15), child.wait()).await.unwrap().unwrap();
    assert_eq!(st.code(), Some(0));
}

async fn pump(mut s: TcpStream, rounds: usize) -> bool {
    let chunk: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 241) as u8).collect();
    let mut back = vec![0u8; chunk.len()];
    for _ in 0..rounds {
        if s.write_all(&chunk).await.is_err() || s.read_exact(&mut back).await.is_err() || back != chunk {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.shutdown().await.is_ok() && s.read(&mut [0u8; 1]).await.map(|n| n == 0).unwrap_or(false)
}

#[tokio::test]
async fn d01_sigterm_drains_active_tunnels_and_exits_0() {
    let w = World::new().await;
    let mut p = Proc::start(&w, "limits: {drainDelay: 1s, drainTimeout: 30s}\n").await;
    let mut pumps = Vec::new();
    for _ in 0..20 {
        let s = tunnel(p.listen, &w.echo.addr.to_string()).await;
        pumps.push(tokio::spawn(pump(s, 16)));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    p.signal("TERM");
    assert!(eventually(2, || async { admin_get(p.admin, "/readyz").await.0 == 503 }).await, "readiness fails at once");
    for t in pumps {
        assert!(t.await.unwrap(), "every transfer completes intact with a clean half-close");
    }
    assert_eq!(p.exit_within(10).await, 0);
    assert!(p.log().contains("drained"), "{}", p.log());
}

#[tokio::test]
async fn d02_drain_deadline_closes_remaining_tunnels() {
    let w = World::new().await;
    let mut p = Proc::start(&w, "limits: {drainDelay: 0s, drainTimeout: 1s}\nlogging: {format: json}\n").await;
    let mut idle = Vec::new();
    for _ in 0..10 {
        idle.push(tunnel(p.listen, &w.echo.addr.to_string()).await);
    }
    p.signal("TERM");
    assert_eq!(p.exit_within(10).await, 0);
    for mut s in idle {
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).await.unwrap_or(0), 0, "closed with FIN");
    }
    let log = p.log();
    assert!(log.contains("drain deadline passed") && log.contains(r#""tunnels":10"#), "{log}");
    // Closed by the drain, not by the process exiting: each tunnel logs `shutdown` as its reason.
    let closed = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "tunnelgate::access" && v["close"] == "shutdown")
        .count();
    assert_eq!(closed, 10, "{log}");
}

#[tokio::test]
async fn d02_forced_drain_exit_code_is_configurable() {
    let w = World::new().await;
    let mut p =
        Proc::start_with_args(&w, "limits: {drainDelay: 0s, drainTimeout: 500ms}\n", &["--forced-exit-code", "3"])
            .await;
    let _t = tunnel(p.listen, &w.echo.addr.to_string()).await;
    p.signal("TERM");
    assert_eq!(p.exit_within(10).await, 3);
    // Without a tunnel left at the deadline, the same setting exits 0.
    let mut q =
        Proc::start_with_args(&w, "limits: {drainDelay: 0s, drainTimeout: 500ms}\n", &["--forced-exit-code", "3"])
            .await;
    q.signal("TERM");
    assert_eq!(q.exit_within(10).await, 0);
}

#[tokio::test]
async fn d03_new_connections_during_drain() {
    let w = World::new().await;
    let mut p = Proc::start(&w, "limits: {drainDelay: 2s, drainTimeout: 5s}\n").await;
    p.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Still accepting during the delay.
    let mut s = tunnel(p.listen, &w.echo.addr.to_string()).await;
    roundtrip(&mut s, b"served while draining").await;
    drop(s);
    // After the listener closes: refused, not accepted and dropped.
    let refused = eventually(5, || async {
        matches!(TcpStream::connect(p.listen).await, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
    })
    .await;
    assert!(refused);
    assert_eq!(p.exit_within(10).await, 0);
}

#[tokio::test]
async fn d04_upgraded_tunnels_keep_the_process_alive() {
    let w = World::new().await;
    let mut p = Proc::start(&w, "limits: {drainDelay: 0s, drainTimeout: 60s}\n").await;
    let mut tunnels = Vec::new();
    for _ in 0..10 {
        tunnels.push(tunnel(p.listen, &w.echo.addr.to_string()).await);
    }
    p.signal("TERM");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(p.child.try_wait().unwrap().is_none(), "exited with tunnels open");
    for s in tunnels.iter_mut() {
        roundtrip(s, b"still alive").await;
    }
    drop(tunnels);
    assert_eq!(p.exit_within(10).await, 0);
    assert!(p.log().contains("forced=0"), "{}", p.log());
}

#[tokio::test]
async fn d06_half_established_connects_at_sigterm_get_503() {
    let w = World::new().await;
    w.dns.set("slow.test", Answer::Silent);
    let mut p = Proc::start(&w, "limits: {drainDelay: 0s, drainTimeout: 1s}\n").await;
    let mut waiting = Vec::new();
    for _ in 0..5 {
        let mut s = TcpStream::connect(p.listen).await.unwrap();
        s.write_all(b"CONNECT slow.test:443 HTTP/1.1\r\n\r\n").await.unwrap();
        waiting.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    p.signal("TERM");
    for mut s in waiting {
        let (status, text) = read_to_close(&mut s).await;
        assert_eq!(status, 503, "{text}");
    }
    assert_eq!(p.exit_within(10).await, 0);
}

#[tokio::test]
async fn second_signal_exits_at_once() {
    let w = World::new().await;
    let mut p = Proc::start(&w, "limits: {drainDelay: 0s, drainTimeout: 300s}\n").await;
    let _t = tunnel(p.listen, &w.echo.addr.to_string()).await;
    p.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(p.child.try_wait().unwrap().is_none());
    p.signal("INT");
    assert_eq!(p.exit_within(5).await, 1);
}

#[tokio::test]
async fn r04_fd_exhaustion_neither_spins_nor_kills_the_accept_loop() {
    let w = World::new().await;
    let mut p = Proc::start_with(&w, "limits: {drainDelay: 0s}\n", Some(64)).await;
    let mut held = Vec::new();
    for _ in 0..80 {
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(p.listen)).await {
            held.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = p.cpu_ticks();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let spent = p.cpu_ticks() - before;
    assert!(spent < 50, "accept loop busy-spins on EMFILE: {spent} ticks in 1 s");
    drop(held);
    // Once descriptors are free, new connections are served again.
    let served = eventually(3, || async {
        let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(p.listen)).await else {
            return false;
        };
        let t = w.echo.addr.to_string();
        s.write_all(format!("CONNECT {t} HTTP/1.1\r\n\r\n").as_bytes()).await.is_ok()
            && tokio::time::timeout(Duration::from_millis(500), read_head(&mut s))
                .await
                .map(|r| r.0 == 200)
                .unwrap_or(false)
    })
    .await;
    assert!(served, "{}", p.log());
    assert!(p.child.try_wait().unwrap().is_none(), "process alive");
    assert!(metric(p.admin, "tunnelgate_accept_errors_total").await > 0.0, "EMFILE was hit");
    p.signal("TERM");
    assert_eq!(p.exit_within(10).await, 0);
}

#[tokio::test]
async fn r05_backpressure_keeps_memory_flat() {
    let w = World::new().await;
    // (a) an upstream that never reads; (b) a client that never reads.
    let deaf = Upstream::start("127.0.0.2", |s| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(s);
    })
    .await;
    let firehose = Upstream::start("127.0.0.2", |mut s| async move {
        let chunk = vec![5u8; 1 << 16];
        while s.write_all(&chunk).await.is_ok() {}
    })
    .await;
    let mut p = Proc::start(&w, "limits: {drainDelay: 0s, drainTimeout: 1s}\n").await;
    let baseline = p.rss_kib();
    let mut held = Vec::new();
    let mut pushed_total = 0usize;
    for _ in 0..20 {
        let mut s = tunnel(p.listen, &deaf.addr.to_string()).await;
        let chunk = vec![1u8; 1 << 16];
        // Write until flow control stops us.
        while let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(200), s.write_all(&chunk)).await {
            pushed_total += chunk.len();
            if pushed_total > (2usize << 30) {
                break;
            }
        }
        held.push(s);
        held.push(tunnel(p.listen, &firehose.addr.to_string()).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = p.rss_kib().saturating_sub(baseline);
    // 40 tunnels with 2 × 32 KiB buffers each is 2.5 MiB; the kernel holds the rest.
    assert!(grown < 16 * 1024, "RSS grew by {grown} KiB for 40 stalled tunnels");
    drop(held);
    p.signal("TERM");
    assert_eq!(p.exit_within(10).await, 0);
}

#[tokio::test]
async fn access_log_is_json_and_never_identifies_users_unless_opted_in() {
    let w = World::new().await;
    for opt_in in [false, true] {
        // The access log is on by default.
        let extra = format!("logging: {{format: json, logClientAddresses: {opt_in}, logTargets: {opt_in}}}\nlimits: {{drainDelay: 0s}}\n");
        let mut p = Proc::start(&w, &extra).await;
        let mut s = tunnel(p.listen, &w.echo_target("allowed.test")).await;
        roundtrip(&mut s, b"logged").await;
        s.shutdown().await.unwrap();
        let _ = read_to_close(&mut s).await;
        let _ =
            exchange(p.listen, b"CONNECT 10.1.2.3:443 HTTP/1.1\r\nProxy-Authorization: Basic c2VjcmV0\r\n\r\n").await;
        let (status, _) =
            exchange(p.listen, b"GET http://10.1.2.3/x HTTP/1.1\r\nHost: 10.1.2.3\r\nConnection: close\r\n\r\n").await;
        assert_eq!(status, 403);
        p.signal("TERM");
        assert_eq!(p.exit_within(10).await, 0);
        let log = p.log();
        let access: Vec<serde_json::Value> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "tunnelgate::access")
            .collect();
        assert_eq!(access.len(), 3, "{log}");
        // Tunnels log when they close: find each event by what it is, not by its position.
        let find =
            |f: &dyn Fn(&serde_json::Value) -> bool| access.iter().find(|e| f(e)).unwrap_or_else(|| panic!("{log}"));
        let ok = find(&|e| e["result"] == "established");
        assert_eq!(ok["rule"], "echo");
        assert_eq!(ok["close"], "client_closed");
        assert_eq!(ok["bytes_up"], 6);
        assert_eq!(ok["bytes_down"], 6);
        assert_eq!((&ok["decision"], &ok["reason"]), (&"allow".into(), &"policy".into()), "{ok}");
        let denied = find(&|e| e["status"] == 403 && e["kind"] != "http");
        assert_eq!(denied["status"], 403);
        assert_eq!((&denied["decision"], &denied["reason"]), (&"deny".into(), &"default".into()), "{denied}");
        let http = find(&|e| e["kind"] == "http");
        assert_eq!((&http["kind"], &http["decision"], &http["status"]), (&"http".into(), &"deny".into(), &403.into()));
        assert!(!log.contains("c2VjcmV0"), "credentials never logged");
        if opt_in {
            assert_eq!(ok["client"], "127.0.0.1");
            assert!(ok["destination"].as_str().is_some_and(|d| d.starts_with("allowed.test:")), "{ok}");
            assert_eq!(denied["destination"], "10.1.2.3:443", "denials name their target with logTargets");
            assert!(log.contains("allowed.test"));
        } else {
            for line in &access {
                assert!(line.get("client").is_none_or(|v| v.is_null()), "{line}");
            }
            assert!(!log.contains("allowed.test") && !log.contains("10.1.2.3"), "{log}");
        }
    }
}

/// With a configuration the operator rendered, access events name the Kubernetes policy (and its
/// namespace) behind the deciding rule: who the client is, without its address.
#[tokio::test]
async fn access_events_name_the_policy_of_an_operator_rendered_config() {
    let w = World::new().await;
    let mut p = Proc::start(&w, "logging: {format: json}\nlimits: {drainDelay: 0s}\n").await;
    let events = |log: String| -> Vec<serde_json::Value> {
        log.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "tunnelgate::access")
            .collect()
    };
    // A user's own configuration: rule names are the user's, no policy is inferred.
    let mut s = tunnel(p.listen, &w.echo_target("allowed.test")).await;
    roundtrip(&mut s, b"own").await;
    drop(s);
    let text = std::fs::read_to_string(p.config_path()).unwrap();
    let rendered = format!("# tunnelgate-render: 4\n{}", text.replace("name: echo,", "name: payments/allow-echo,"));
    std::fs::write(p.config_path(), rendered).unwrap();
    p.signal("HUP");
    assert!(eventually(10, || async { admin_get(p.admin, "/config").await.1.contains("\"render\":4") }).await);
    let mut s = tunnel(p.listen, &w.echo_target("allowed.test")).await;
    roundtrip(&mut s, b"rendered").await;
    drop(s);
    let (status, _) = exchange(p.listen, b"CONNECT 10.1.2.3:443 HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, 403);
    p.signal("TERM");
    assert_eq!(p.exit_within(10).await, 0);
    let access = events(p.log());
    assert_eq!(access.len(), 3, "{access:#?}");
    // Tunnels log when they close, so the order of the three events is not fixed.
    let by_rule =
        |rule: &str| access.iter().find(|e| e["rule"] == rule).unwrap_or_else(|| panic!("{rule}: {access:#?}"));
    assert!(by_rule("echo").get("policy").is_none(), "a user's own rule names no policy");
    let rendered = by_rule("payments/allow-echo");
    assert_eq!((&rendered["namespace"], &rendered["policy"]), (&"payments".into(), &"allow-echo".into()));
    let denied = by_rule("default");
    assert!(denied.get("policy").is_none(), "the default decided: no policy: {denied}");
}

#[tokio::test]
async fn file_changes_and_sighup_reload_the_running_binary() {
    let w = World::new().await;
    let mut p = Proc::start(&w, "limits: {drainDelay: 0s, drainTimeout: 5s}\n").await;
    let path = p.dir.0.join("config.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    // Deny everything by removing the rule: the running binary picks the change up.
    let denying = text.replace("hosts: [allowed.test, slow.test], cidrs: ['127.0.0.2/32']", "hosts: [other.test]");
    std::fs::write(&path, &denying).unwrap();
    assert!(
        eventually(5, || async { admin_get(p.admin, "/config").await.1.contains("\"generation\":2") }).await,
        "{}",
        p.log()
    );
    let (status, _) =
        exchange(p.listen, format!("CONNECT {} HTTP/1.1\r\n\r\n", w.echo_target("allowed.test")).as_bytes()).await;
    assert_eq!(status, 403);
    p.signal("HUP");
    assert!(eventually(5, || async { p.log().contains("reload requested") }).await);
    assert!(p.child.try_wait().unwrap().is_none(), "SIGHUP does not stop the proxy");
    std::fs::write(&path, &text).unwrap();
    assert!(
        eventually(5, || async { admin_get(p.admin, "/config").await.1.contains("\"generation\":3") }).await,
        "{}",
        p.log()
    );
    // L-06: a reload racing SIGTERM neither hangs nor breaks the drain.
    let _t = tunnel(p.listen, &w.echo.addr.to_string()).await;
    std::fs::write(&path, &denying).unwrap();
    p.signal("TERM");
    tokio::time::sleep(Duration::from_millis(10)).await;
    p.signal("HUP");
    assert_eq!(p.exit_within(15).await, 0);
    assert!(!p.log().contains("panicked"), "{}", p.log());
}

#[tokio::test]
async fn r09_memory_pressure_sheds_new_requests_keeps_tunnels_and_recovers() {
    let w = World::new().await;
    // Upstreams that push without end: each tunnel whose client does not read holds a buffer.
    let firehose = Upstream::start("127.0.0.2", |mut s| async move {
        let chunk = vec![5u8; 1 << 16];
        while s.write_all(&chunk).await.is_ok() {}
    })
    .await;
    let p = Proc::start(&w, "limits: {drainDelay: 0s, drainTimeout: 1s, memoryBudget: 1073741824}\n").await;
    let mut live = tunnel(p.listen, &w.echo.addr.to_string()).await;
    roundtrip(&mut live, b"before").await;
    // A budget a few MiB above what the proxy uses now, applied by a reload.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let in_use = metric(p.admin, "tunnelgate_memory_in_use_bytes").await as u64;
    assert!(in_use > 0);
    let budget = in_use + (4 << 20);
    let cfg = std::fs::read_to_string(p.config_path())
        .unwrap()
        .replace("memoryBudget: 1073741824", &format!("memoryBudget: {budget}"));
    std::fs::write(p.config_path(), cfg).unwrap();
    p.signal("HUP");
    assert!(eventually(5, || async { metric(p.admin, "tunnelgate_memory_budget_bytes").await == budget as f64 }).await);
    // Stalled tunnels until the proxy refuses new ones (bounded in count and time).
    let mut held = Vec::new();
    let mut refused = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while held.len() < 2000 && tokio::time::Instant::now() < deadline {
        let mut s = TcpStream::connect(p.listen).await.unwrap();
        s.write_all(format!("CONNECT {} HTTP/1.1\r\n\r\n", firehose.addr).as_bytes()).await.unwrap();
        let (status, head) = read_head(&mut s).await;
        if status == 503 {
            refused = Some(head);
            break;
        }
        assert_eq!(status, 200, "{head}");
        held.push(s);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let head = refused.unwrap_or_else(|| panic!("no 503 after {} stalled tunnels; log:\n{}", held.len(), p.log()));
    assert!(head.contains("Retry-After: 1\r\n"), "{head}");
    assert_eq!(metric(p.admin, "tunnelgate_memory_overloaded").await, 1.0);
    assert_eq!(admin_get(p.admin, "/readyz").await.0, 503, "the node's clients see the overload");
    // Plain HTTP is shed too; established tunnels keep flowing.
    let (status, _) =
        exchange(p.listen, b"GET http://allowed.test/ HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n")
            .await;
    assert_eq!(status, 503);
    roundtrip(&mut live, b"still flowing").await;
    assert!(metric(p.admin, "tunnelgate_memory_shed_requests_total").await >= 2.0);
    // Pressure falls: shedding stops by itself. Traffic goes on meanwhile (the allocator returns
    // freed memory to the system as it works).
    drop(held);
    let mut recovered = false;
    for _ in 0..200 {
        roundtrip(&mut live, b"tick").await;
        if metric(p.admin, "tunnelgate_memory_overloaded").await == 0.0 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let now = metric(p.admin, "tunnelgate_memory_in_use_bytes").await;
    assert!(recovered, "still shedding at {now} bytes in use (budget {budget})");
    let mut again = tunnel(p.listen, &w.echo.addr.to_string()).await;
    roundtrip(&mut again, b"accepted again").await;
    assert_eq!(admin_get(p.admin, "/readyz").await.0, 200);
}

/// An idle tunnel holds little of the proxy's memory, whether it began as a CONNECT or as a
/// CONNECT after a plain-HTTP request on the same connection (the heap the proxy reports, per
/// tunnel held: about 2,400 and 2,500 bytes; 3,400 and 4,200 before the relay stopped keeping
/// copies of its state and tunnels born from HTTP got tasks of their own).
#[tokio::test]
async fn idle_tunnels_hold_under_3000_bytes_of_heap_each_connect_or_born_from_http() {
    const IDLE_TUNNEL_HEAP: f64 = 3000.0;
    let w = World::new().await;
    let web = crate::http::hyper_upstream().await;
    let p = Proc::start(&w, "").await;
    let connect = || async { tunnel(p.listen, &w.echo.addr.to_string()).await };
    let born_from_http = || async {
        let mut s = TcpStream::connect(p.listen).await.unwrap();
        let get = format!("GET http://allowed.test:{}/small HTTP/1.1\r\nHost: allowed.test\r\n\r\n", web.addr.port());
        s.write_all(get.as_bytes()).await.unwrap();
        let (status, head) = read_head(&mut s).await;
        assert_eq!(status, 200, "{head}");
        let mut body = [0u8; 5];
        s.read_exact(&mut body).await.unwrap();
        assert_eq!(&body, b"small");
        let target = w.echo.addr.to_string();
        s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).await.unwrap();
        let (status, head) = read_head(&mut s).await;
        assert_eq!(status, 200, "{head}");
        s
    };
    // Warm up what the first tunnels create once (pools, caches, the registry's table).
    let mut warm = Vec::new();
    for _ in 0..100 {
        warm.push(connect().await);
        warm.push(born_from_http().await);
    }
    drop(warm);
    assert_eq!(metric_when(p.admin, "tunnelgate_tunnels_active", |v| v == 0.0).await, 0.0);
    // The gauge is sampled every 100 ms.
    let settled = || async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        metric(p.admin, "tunnelgate_memory_in_use_bytes").await
    };
    const N: usize = 400;
    let before = settled().await;
    let mut held = Vec::new();
    for _ in 0..N {
        held.push(connect().await);
    }
    let with_connects = settled().await;
    for _ in 0..N {
        held.push(born_from_http().await);
    }
    let with_both = settled().await;
    for s in &mut held {
        roundtrip(s, b"still open").await;
    }
    let per_connect = (with_connects - before) / N as f64;
    let per_born_from_http = (with_both - with_connects) / N as f64;
    assert!(per_connect < IDLE_TUNNEL_HEAP, "{per_connect:.0} bytes per idle CONNECT tunnel");
    assert!(per_born_from_http < IDLE_TUNNEL_HEAP, "{per_born_from_http:.0} bytes per idle tunnel born from HTTP");
}

/// Debug logs of dependencies (the resolver's queries, the client's connects) never name targets
/// unless `logTargets` says so.
#[tokio::test]
async fn debug_logs_of_dependencies_do_not_name_targets() {
    let w = World::new().await;
    let p = Proc::launch(&w, "", None, &[], &[("TUNNELGATE_LOG", "debug")]).await;
    let mut s = tunnel(p.listen, &w.echo_target("allowed.test")).await;
    roundtrip(&mut s, b"hi").await;
    // The tunnel's last event is a debug one: once it is in the log, debug logging is on and
    // the tunnel's whole life (resolving, connecting, relaying, closing) has been logged.
    drop(s);
    assert!(
        eventually(5, || async {
            p.log().lines().any(|l| l.contains(" DEBUG ") && l.contains("tunnelgate_proxy::access: tunnel closed"))
        })
        .await,
        "debug logging is on: {}",
        p.log()
    );
    let log = p.log();
    assert!(!log.contains("allowed.test"), "the target's name leaked into the log:\n{log}");
}

/// With trace logging and the log file in the configuration's directory (as here: `stderr.log`
/// beside `config.yaml`), the file watcher's own logs do not feed on themselves: an idle proxy
/// writes a bounded log.
#[tokio::test]
async fn trace_logs_in_the_config_directory_do_not_feed_the_file_watcher() {
    let w = World::new().await;
    let p = Proc::launch(&w, "", None, &[], &[("TUNNELGATE_LOG", "trace")]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = p.log().lines().count();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let grown = p.log().lines().count() - before;
    assert!(grown < 200, "an idle proxy wrote {grown} log lines in a second (the watcher logging its own log file)");
}

/// `--help` describes what the proxy serves today: every data path by name.
#[tokio::test]
async fn help_names_every_mode_the_proxy_serves() {
    let out = Command::new(BIN).arg("--help").output().await.unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for words in ["HTTP CONNECT", "plain HTTP", "WebSocket", "tunnel listeners", "transparent listeners", "policy"] {
        assert!(help.contains(words), "--help should name {words:?}:\n{help}");
    }
}

#[test]
fn cli_explain_prints_the_route() {
    let dir = TempDir::new("explain-route");
    let f = dir.0.join("c.yaml");
    std::fs::write(&f, "version: 1\nlisteners: [{name: f, bind: '127.0.0.1:3128'}]\nparents:\n  - {name: corp-a, address: 'proxy-a.corp.example:3128'}\n  - {name: corp-b, address: '10.0.0.9:3128', sendTarget: name}\nparentGroups:\n  - {name: corp, members: [corp-a, corp-b]}\npolicy:\n  defaultRoute: corp\n  rules:\n    - {name: partner, action: allow, hosts: [api.partner.example], route: corp-b}\n    - {name: intranet, action: allow, hosts: [wiki.intranet.example], route: direct}\n    - {name: rest, action: allow, hosts: ['*.example']}\n").unwrap();
    let f = f.to_str().unwrap();
    let explain = |target: &str| {
        run(&["explain", "--config", f, "--client", "10.244.1.17", "--target", target, "--resolve", "140.82.112.5"]).1
    };
    let out = explain("api.partner.example:443");
    assert!(
        out.contains("rule: partner")
            && out.contains("route: parent corp-b at 10.0.0.9:3128 (names the target by name)"),
        "{out}"
    );
    assert!(explain("wiki.intranet.example:443").contains("route: direct"));
    assert!(explain("www.example:443").contains("route: group corp: corp-a, then corp-b"), "the default route");
}

#[test]
fn every_flag_of_the_proxy_is_documented() {
    // The command-line reference's proxy section: every flag in a row, with the default --help prints.
    let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/cli.md")).unwrap();
    let start = page.find("## tunnelgate-proxy").unwrap();
    let section = &page[start..start + page[start..].find("## tunnelgate-operator").unwrap()];
    let bin = env!("CARGO_BIN_EXE_tunnelgate-proxy");
    let mut all = testkit::help_flags(bin, &[]);
    assert!(all.iter().any(|f| f.flag == "--reload-poll-interval" && f.default.as_deref() == Some("10s")), "{all:?}");
    for sub in ["check", "explain"] {
        all.extend(testkit::help_flags(bin, &[sub]));
    }
    let problems = testkit::undocumented_flags(section, &all);
    assert!(problems.is_empty(), "docs/cli.md disagrees with tunnelgate-proxy --help: {problems:?}");
}
