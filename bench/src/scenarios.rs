//! The forward suite's measurements, one function per scenario: bulk transfer, tunnel setup,
//! round trips, plain-HTTP requests and idle memory, with the proxy's CPU per operation read
//! from /proc; and the rounds-and-medians loop they share ([`per_target`]).

use std::error::Error;
use std::future::Future;
use std::net::SocketAddr;
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::targets::{open, open_as, Target};
use crate::upstreams::{Upstreams, TLS_NAME};
use crate::{median, report, Res};

/// Each target's median over `rounds` of the `K` values `measure` returns (a failed round is
/// reported and left out), pausing `pause` between rounds.
pub(crate) async fn per_target<const K: usize, F, Fut>(
    targets: &[Arc<Target>],
    rounds: usize,
    pause: Duration,
    mut measure: F,
) -> [Vec<f64>; K]
where
    F: FnMut(Arc<Target>) -> Fut,
    Fut: Future<Output = Res<[f64; K]>>,
{
    let mut out: [Vec<f64>; K] = std::array::from_fn(|_| Vec::new());
    for t in targets {
        let mut samples: [Vec<f64>; K] = std::array::from_fn(|_| Vec::new());
        for _ in 0..rounds {
            match measure(t.clone()).await {
                Ok(values) => {
                    for (s, v) in samples.iter_mut().zip(values) {
                        s.push(v);
                    }
                }
                Err(e) => {
                    report(t.name, &*e);
                }
            }
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
        for (o, s) in out.iter_mut().zip(samples) {
            o.push(median(s));
        }
    }
    out
}

/// One HTTP GET of `path` on `s` (absolute-form through a proxy, origin-form direct); reads the
/// whole response. `buf` is reused across calls.
pub(crate) async fn http_get(
    s: &mut TcpStream,
    proxied: bool,
    upstream: SocketAddr,
    path: &str,
    buf: &mut Vec<u8>,
) -> Res<()> {
    let req = if proxied {
        format!("GET http://{upstream}{path} HTTP/1.1\r\nHost: {upstream}\r\n\r\n")
    } else {
        format!("GET {path} HTTP/1.1\r\nHost: {upstream}\r\n\r\n")
    };
    s.write_all(req.as_bytes()).await?;
    buf.clear();
    let mut tmp = [0u8; 16384];
    let (end, len) = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            if !head.starts_with("http/1.1 200") && !head.starts_with("http/1.0 200") {
                return Err(head.lines().next().unwrap_or("").to_owned().into());
            }
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:").and_then(|v| v.trim().parse::<usize>().ok()))
                .ok_or("no content-length")?;
            break (i + 4, len);
        }
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return Err("closed".into());
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    while buf.len() < end + len {
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return Err("closed mid-body".into());
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    Ok(())
}

/// Requests per second of plain-HTTP GETs of `path` from `conc` clients, each on one keep-alive
/// connection (`keep_alive`) or a new connection per request; and the proxy's CPU time (user +
/// system) per request in microseconds, when the target is a process.
pub(crate) async fn http_requests(
    t: &Arc<Target>,
    up: &Upstreams,
    conc: usize,
    path: &'static str,
    keep_alive: bool,
    secs: f64,
) -> Res<(f64, f64)> {
    let connect = |t: Arc<Target>, upstream: SocketAddr| async move {
        crate::targets::tcp(&t, t.proxy.unwrap_or(t.front(upstream))).await
    };
    let cpu_before = t.child.as_ref().map(|c| cpu_us(c.id())).transpose()?;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (t, stop, count, upstream) = (t.clone(), stop.clone(), count.clone(), up.http);
        tasks.push(tokio::spawn(async move {
            let proxied = t.proxy.is_some();
            let mut buf = Vec::with_capacity(128 * 1024);
            let mut s = connect(t.clone(), upstream).await?;
            while !stop.load(Ordering::Relaxed) {
                if !keep_alive {
                    #[allow(deprecated)]
                    let _ = s.set_linger(Some(Duration::ZERO));
                    s = connect(t.clone(), upstream).await?;
                }
                http_get(&mut s, proxied, upstream, path, &mut buf).await?;
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<(), Box<dyn Error + Send + Sync>>(())
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for mut task in tasks {
        // A target that stops answering must not hang the whole bench.
        match tokio::time::timeout(Duration::from_secs(10), &mut task).await {
            Ok(joined) => joined??,
            Err(_) => {
                task.abort();
                return Err("stalled: a request got no answer within 10 s".into());
            }
        }
    }
    let n = count.load(Ordering::Relaxed) as f64;
    let rate = n / start.elapsed().as_secs_f64();
    Ok((rate, cpu_per_op(t, cpu_before, n)?))
}

/// User + system CPU time of process `pid`, in microseconds.
pub(crate) fn cpu_us(pid: u32) -> Res<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').ok_or("bad stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11).ok_or("bad stat")?.parse::<u64>()? + f.get(12).ok_or("bad stat")?.parse::<u64>()?;
    // Clock ticks are 100 Hz on Linux (USER_HZ).
    Ok(ticks * 10_000)
}

/// MB/s (10^6 bytes) moved by `n` tunnels of `bytes` each, and the proxy's CPU milliseconds per GiB.
pub(crate) async fn bulk(t: &Target, up: &Upstreams, n: usize, bytes: u64) -> Res<(f64, f64)> {
    let mut streams = Vec::new();
    for _ in 0..n {
        streams.push(open(t, up.sink).await?);
    }
    let cpu_before = t.child.as_ref().map(|c| cpu_us(c.id())).transpose()?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for mut s in streams {
        tasks.push(tokio::spawn(async move {
            let chunk = vec![0x5au8; 256 * 1024];
            s.write_all(&bytes.to_be_bytes()).await?;
            let mut left = bytes;
            while left > 0 {
                let k = left.min(chunk.len() as u64) as usize;
                s.write_all(&chunk[..k]).await?;
                left -= k as u64;
            }
            let mut ack = [0u8; 8];
            s.read_exact(&mut ack).await?;
            Ok::<u64, std::io::Error>(u64::from_be_bytes(ack))
        }));
    }
    for task in tasks {
        let got = task.await??;
        if got != bytes {
            return Err(format!("{}: sink got {got} of {bytes} bytes", t.name).into());
        }
    }
    let rate = (n as u64 * bytes) as f64 / start.elapsed().as_secs_f64() / 1e6;
    let gib = (n as u64 * bytes) as f64 / (1u64 << 30) as f64;
    // µs per GiB from cpu_per_op, as milliseconds.
    Ok((rate, cpu_per_op(t, cpu_before, gib)? / 1e3))
}

pub(crate) fn percentile(v: &mut [u64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)] as f64
}

/// Runs `op` over and over on `conc` concurrent tasks for `secs`: operations per second, p50 and
/// p99 latency (µs) and the target's CPU per operation.
async fn concurrently<F, Fut>(t: &Target, conc: usize, secs: f64, op: F) -> Res<[f64; 4]>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Res<()>> + Send,
{
    let cpu_before = t.child.as_ref().map(|c| cpu_us(c.id())).transpose()?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let start = Instant::now();
    for _ in 0..conc {
        let (stop, op) = (stop.clone(), op.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                op().await?;
                lat.push(t0.elapsed().as_micros() as u64);
            }
            Ok::<Vec<u64>, Box<dyn Error + Send + Sync>>(lat)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    let rate = all.len() as f64 / start.elapsed().as_secs_f64();
    let cpu = cpu_per_op(t, cpu_before, all.len() as f64)?;
    Ok([rate, percentile(&mut all, 0.5), percentile(&mut all, 0.99), cpu])
}

/// Tunnel setups per second and p50/p99 latency (µs) at `conc` concurrent clients.
pub(crate) async fn setup(t: &Arc<Target>, up: &Upstreams, conc: usize, secs: f64) -> Res<(f64, f64, f64, f64)> {
    let (target, hello) = (t.clone(), up.hello);
    let [rate, p50, p99, cpu] = concurrently(t, conc, secs, move || {
        let t = target.clone();
        async move {
            let mut s = open(&t, hello).await?;
            s.write_all(b"ping").await?;
            let mut b = [0u8; 4];
            s.read_exact(&mut b).await?;
            // Reset rather than FIN: no TIME_WAIT pile-up on the client's ports.
            #[allow(deprecated)]
            let _ = s.set_linger(Some(Duration::ZERO));
            Ok(())
        }
    })
    .await?;
    Ok((rate, p50, p99, cpu))
}

/// A TLS session with the TLS echo through `t`, named [`TLS_NAME`] in the SNI (and in the
/// CONNECT, through a proxy), after one 64-byte echo.
async fn tls_session(t: &Target, up: &Upstreams) -> Res<tokio_rustls::client::TlsStream<TcpStream>> {
    if !t.stub_dns {
        return Err("not run: it would resolve the name through the system's resolver".into());
    }
    let authority = format!("{TLS_NAME}:{}", up.tls.port());
    let session = async {
        let tcp = open_as(t, up.tls, &authority).await?;
        let name = rustls::pki_types::ServerName::try_from(TLS_NAME)?;
        let mut tls = tokio_rustls::TlsConnector::from(up.tls_client.clone()).connect(name, tcp).await?;
        echo64(&mut tls).await?;
        Ok::<_, Box<dyn Error + Send + Sync>>(tls)
    };
    // A target that stops answering must not hang the whole bench.
    tokio::time::timeout(Duration::from_secs(10), session)
        .await
        .map_err(|_| format!("{}: no TLS session within 10 s", t.name))?
}

async fn echo64<S: AsyncReadExt + AsyncWriteExt + Unpin>(s: &mut S) -> std::io::Result<()> {
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    s.write_all(&msg).await?;
    s.read_exact(&mut back).await?;
    Ok(())
}

/// TLS tunnels per second (a handshake with SNI and one echo each), p50/p99 latency (µs) and the
/// proxy's CPU per tunnel, at `conc` concurrent clients.
pub(crate) async fn tls_setup(t: &Arc<Target>, up: &Arc<Upstreams>, conc: usize, secs: f64) -> Res<[f64; 4]> {
    let (target, up) = (t.clone(), up.clone());
    concurrently(t, conc, secs, move || {
        let (t, up) = (target.clone(), up.clone());
        async move {
            let tls = tls_session(&t, &up).await?;
            #[allow(deprecated)]
            let _ = tls.get_ref().0.set_linger(Some(Duration::ZERO));
            Ok(())
        }
    })
    .await
}

/// Round trips per second of 64-byte echoes over one established TLS tunnel, p50/p99 (µs) and the
/// proxy's CPU per round trip.
pub(crate) async fn tls_round_trips(t: &Target, up: &Upstreams, secs: f64) -> Res<[f64; 4]> {
    let mut tls = tls_session(t, up).await?;
    let cpu_before = t.child.as_ref().map(|c| cpu_us(c.id())).transpose()?;
    let mut lat = Vec::new();
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        let t0 = Instant::now();
        tokio::time::timeout(Duration::from_secs(5), echo64(&mut tls)).await??;
        lat.push(t0.elapsed().as_micros() as u64);
    }
    let done = lat.len() as f64;
    let rate = done / start.elapsed().as_secs_f64();
    let cpu = cpu_per_op(t, cpu_before, done)?;
    Ok([rate, percentile(&mut lat, 0.5), percentile(&mut lat, 0.99), cpu])
}

/// The target process's CPU time (µs) per operation since `before`; NaN without a process.
pub(crate) fn cpu_per_op(t: &Target, before: Option<u64>, ops: f64) -> Res<f64> {
    Ok(match (before, t.child.as_ref()) {
        (Some(b), Some(c)) => (cpu_us(c.id())? - b) as f64 / ops.max(1.0),
        _ => f64::NAN,
    })
}

/// Round trips per second, p50 and p99 (µs) of 64-byte echoes over `n` established tunnels,
/// and the proxy's CPU per round trip.
pub(crate) async fn round_trips(t: &Target, up: &Upstreams, n: usize, secs: f64) -> Res<(f64, f64, f64, f64)> {
    let mut streams = Vec::new();
    for _ in 0..n {
        streams.push(open(t, up.echo).await?);
    }
    let cpu_before = t.child.as_ref().map(|c| cpu_us(c.id())).transpose()?;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for mut s in streams {
        let (stop, count) = (stop.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let msg = [7u8; 64];
            let mut back = [0u8; 64];
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                s.write_all(&msg).await?;
                s.read_exact(&mut back).await?;
                lat.push(t0.elapsed().as_micros() as u64);
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<Vec<u64>, std::io::Error>(lat)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for mut task in tasks {
        // A target that stops answering must not hang the whole bench.
        match tokio::time::timeout(Duration::from_secs(5), &mut task).await {
            Ok(joined) => all.extend(joined??),
            Err(_) => {
                task.abort();
                return Err("stalled: an echo got no answer within 5 s".into());
            }
        }
    }
    let done = count.load(Ordering::Relaxed) as f64;
    let rate = done / start.elapsed().as_secs_f64();
    let cpu = cpu_per_op(t, cpu_before, done)?;
    Ok((rate, percentile(&mut all, 0.5), percentile(&mut all, 0.99), cpu))
}

pub(crate) fn rss_kib(pid: u32) -> Res<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).ok_or("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).ok_or("bad VmRSS")?.parse()?)
}

/// A tunnel born from HTTP: a plain-HTTP request through the proxy, then a CONNECT on the same
/// connection.
async fn open_after_request(t: &Target, up: &Upstreams) -> Res<TcpStream> {
    let proxy = t.proxy.ok_or("no proxy")?;
    let mut s = crate::targets::tcp(t, proxy).await?;
    s.set_nodelay(true)?;
    let mut buf = Vec::new();
    http_get(&mut s, true, up.http, "/10", &mut buf).await?;
    crate::targets::connect_on(s, &up.hold.to_string()).await
}

/// Proxy memory per idle tunnel in KiB (RSS with the tunnels held minus before): `n` CONNECT
/// tunnels, then `n / 2` more born from HTTP where the proxy takes them (`None` otherwise).
pub(crate) async fn idle(t: &Target, up: &Upstreams, n: usize) -> Res<[Option<f64>; 2]> {
    let Some(pid) = t.child.as_ref().map(Child::id) else { return Ok([None, None]) };
    // Tunnels born from HTTP where the proxy keeps a connection open after a plain request and
    // takes a CONNECT on it (tinyproxy does not; http-tunnel serves only CONNECT).
    let mut born_from_http = false;
    if t.proxy.is_some() {
        match open_after_request(t, up).await {
            Ok(_) => born_from_http = true,
            Err(e) => println!("{}: no CONNECT after a request: {e}", t.name),
        }
    }
    // Warm up allocator pools and lazily created structures first.
    let mut warm = Vec::new();
    for _ in 0..100 {
        warm.push(open(t, up.hold).await?);
        if born_from_http {
            warm.push(open_after_request(t, up).await?);
        }
    }
    drop(warm);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Both kinds held at once, one after the other: memory freed by the first would otherwise be
    // reused by the second without growing the process.
    let before = rss_kib(pid)?;
    let mut held = Vec::with_capacity(2 * n);
    for _ in 0..n {
        held.push(open(t, up.hold).await?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let direct = rss_kib(pid)?;
    let mut from_http = None;
    if born_from_http {
        // Half as many: both kinds held at once must fit within the descriptor limits of the
        // proxy and the bench (two descriptors a tunnel in each).
        for _ in 0..n / 2 {
            held.push(open_after_request(t, up).await?);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        from_http = Some(rss_kib(pid)?.saturating_sub(direct) as f64 / (n / 2).max(1) as f64);
    }
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok([Some(direct.saturating_sub(before) as f64 / n as f64), from_http])
}
