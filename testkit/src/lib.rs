//! Helpers shared by the workspace's test suites (the proxy's integration tests and the local
//! end-to-end suite) and its benchmark; never linked into a shipped binary.
#![allow(clippy::panic, reason = "test code: a setup that cannot be done fails the test that asked")]

pub mod dns;
pub mod squid;

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The lowest port handed out; below it are the well-known and commonly used service ports.
const FIRST: u32 = 10_000;

/// A port for a server the test starts later (a child process binds it). Taken below the kernel's
/// ephemeral range, so an outgoing connection of a parallel test cannot take it between now and the
/// server's bind (a port from `bind(:0)` can: CI lost a run to that); the counter keeps this
/// process's parallel tests apart and the process id keeps test binaries apart.
///
/// # Panics
/// When no loopback port can be bound at all (a test setup failure).
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next().and_then(|p| p.parse::<u32>().ok()))
        .unwrap_or(32768);
    if low < FIRST + 1_000 {
        // No room below the ephemeral range: fall back to one the kernel picks.
        return TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("cannot bind a loopback port: {e}"));
    }
    let span = low - FIRST;
    let base = std::process::id().wrapping_mul(7919);
    loop {
        let port = u16::try_from(FIRST + base.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % span)
            .unwrap_or_else(|_| panic!("port range below {low} exceeds u16"));
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Waits until `f` answers true, polling every 50 ms; returns how long it took.
///
/// # Panics
/// After `secs` seconds, naming `what` (the test that waited fails).
pub async fn until<F, Fut>(what: &str, secs: u64, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        if f().await {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {secs}s waiting for: {what}");
}

/// A long flag a binary's `--help` lists, with the default it prints (`[default: X]`), if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelpFlag {
    pub flag: String,
    pub default: Option<String>,
}

/// The long flags a binary's `--help` lists on its option lines (for `args`, a subcommand), without
/// `--help` and `--version`, each with its printed default: what its reference must name and agree with.
///
/// # Panics
/// When the binary cannot be run or prints no UTF-8 (a test setup failure).
pub fn help_flags(bin: &str, args: &[&str]) -> Vec<HelpFlag> {
    let out = std::process::Command::new(bin)
        .args(args)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
    let text = String::from_utf8(out.stdout).unwrap_or_else(|e| panic!("{bin} --help: {e}"));
    let mut flags: Vec<HelpFlag> = Vec::new();
    for line in text.lines() {
        let l = line.trim_start();
        // `-o, --output`: the short form first.
        let l = match l.strip_prefix('-') {
            Some(r) if r.chars().nth(1) == Some(',') => r.get(2..).unwrap_or("").trim_start(),
            _ => l,
        };
        if let Some(r) = l.strip_prefix("--").filter(|_| line.starts_with("  ") && !line.starts_with("          ")) {
            flags.push(HelpFlag { flag: format!("--{}", r.split([' ', '=']).next().unwrap_or("")), default: None });
        }
        // The flag's line or a description line after it: its default, if printed.
        if let (Some(last), Some(d)) = (flags.last_mut(), l.split("[default: ").nth(1)) {
            last.default = d.split(']').next().map(str::to_owned);
        }
    }
    flags.retain(|f| f.flag != "--help" && f.flag != "--version");
    flags
}

/// Whether a table row shows `value` as a whole word (`50ms` is not in `250ms`).
fn names_value(row: &str, value: &str) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '.' || c == '-';
    row.match_indices(value).any(|(i, _)| !row[..i].ends_with(word) && !row[i + value.len()..].starts_with(word))
}

/// Where a reference page and a binary's `--help` disagree: a flag the page does not name in a
/// table row, or a row that does not show the default the binary prints.
pub fn undocumented_flags(page: &str, flags: &[HelpFlag]) -> Vec<String> {
    let rows: Vec<&str> = page.lines().filter(|l| l.starts_with('|')).collect();
    let names = |row: &str, flag: &str| {
        row.match_indices(flag)
            .any(|(i, _)| !row[i + flag.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-'))
    };
    let mut problems = Vec::new();
    for f in flags {
        let mine: Vec<&&str> = rows.iter().filter(|r| names(r, &f.flag)).collect();
        if mine.is_empty() {
            problems.push(format!("{}: no row names it", f.flag));
        } else if let Some(d) = &f.default {
            if !mine.iter().any(|r| names_value(r, d)) {
                problems.push(format!("{}: --help prints default {d}, the row does not", f.flag));
            }
        }
    }
    problems
}
