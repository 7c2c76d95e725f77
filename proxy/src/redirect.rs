//! The node's redirect rules, owned by the proxy alone: an nftables table `inet tunnelgate` that
//! sends the enrolled clients' TCP to the configured ports outside the cluster's networks to the
//! transparent listener, and drops their UDP 443 (QUIC then falls back to TCP). It is written
//! whole, in one atomic `nft -f -` transaction, at the first load and at every reload that
//! changes it, and deleted by the reload that no longer asks for it. A change never touches
//! established connections (their NAT was decided once, in conntrack). The table stays when the
//! proxy exits: the enrolled clients' redirected traffic then fails closed until a proxy listens
//! again — unless its DaemonSet released the rules ([`crate::owner`]).
//!
//! Why the `nft` tool: it is netfilter's own front end, applies a whole file as one transaction,
//! and reports errors with their line. The Rust netlink bindings do not serve here: `rustables` is
//! GPL-3.0 (this project is Apache-2.0) and calls its own API rough; `nftnl-rs` manages set
//! elements only.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::process::Stdio;

use ipnet::IpNet;
use proxy_config::{OtherPorts, Redirect};
use tokio::io::AsyncWriteExt;

/// The table's name (family `inet`: IPv4 and IPv6 in one).
pub const TABLE: &str = "tunnelgate";

/// Why the rules could not be written; the rules in force are unchanged (nft applies a file
/// whole or not at all).
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("cannot run nft (is the nftables package installed, and NET_ADMIN granted?)")]
    Spawn(#[source] std::io::Error),
    #[error("nft refused the redirect rules: {0}")]
    Refused(String),
}

/// The nft script that makes the table exactly this (`redirect` set) or removes it (`None`).
/// Creating the table before deleting it makes the deletion valid whether or not it exists.
pub fn script(redirect: Option<&Redirect>, cluster_networks: &[IpNet]) -> String {
    let mut s = format!("table inet {TABLE}\ndelete table inet {TABLE}\n");
    let Some(r) = redirect else { return s };
    let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) = r.enrolled.iter().partition(|a| a.is_ipv4());
    let (c4, c6): (Vec<&IpNet>, Vec<&IpNet>) = cluster_networks.iter().partition(|n| matches!(n, IpNet::V4(_)));
    let list = |items: Vec<String>| {
        if items.is_empty() {
            String::new()
        } else {
            format!(" elements = {{ {} }};", items.join(", "))
        }
    };
    let ports = r.ports.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    let _ = writeln!(s, "table inet {TABLE} {{");
    let _ = writeln!(s, "  set enrolled4 {{ type ipv4_addr;{} }}", list(v4.iter().map(ToString::to_string).collect()));
    let _ = writeln!(s, "  set enrolled6 {{ type ipv6_addr;{} }}", list(v6.iter().map(ToString::to_string).collect()));
    let _ = writeln!(
        s,
        "  set cluster4 {{ type ipv4_addr; flags interval; auto-merge;{} }}",
        list(c4.iter().map(ToString::to_string).collect())
    );
    let _ = writeln!(
        s,
        "  set cluster6 {{ type ipv6_addr; flags interval; auto-merge;{} }}",
        list(c6.iter().map(ToString::to_string).collect())
    );
    let _ = writeln!(s, "  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;");
    for (ip, n) in [("ip", "4"), ("ip6", "6")] {
        let _ = writeln!(
            s,
            "    {ip} saddr @enrolled{n} {ip} daddr != @cluster{n} tcp dport {{ {ports} }} redirect to :{}",
            r.listener_port
        );
    }
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "  chain forward {{ type filter hook forward priority filter; policy accept;");
    for (ip, n) in [("ip", "4"), ("ip6", "6")] {
        let _ = writeln!(s, "    {ip} saddr @enrolled{n} {ip} daddr != @cluster{n} udp dport 443 drop");
        if r.other_ports == OtherPorts::Drop {
            let _ = writeln!(s, "    {ip} saddr @enrolled{n} {ip} daddr != @cluster{n} drop");
        }
    }
    let _ = writeln!(s, "  }}\n}}");
    s
}

/// Brings the node's table to what `redirect` asks for, when that differs from `in_force` (the
/// script last applied, `None`: none); never runs `nft` for a configuration that has no redirect
/// and never had one.
pub async fn sync(
    in_force: &std::sync::Mutex<Option<String>>,
    redirect: Option<&Redirect>,
    cluster_networks: &[IpNet],
) -> Result<(), RedirectError> {
    let wanted = redirect.map(|r| script(Some(r), cluster_networks));
    let last = crate::sync::lock(in_force).clone();
    if last == wanted {
        return Ok(());
    }
    apply(wanted.as_deref().unwrap_or(&script(None, cluster_networks))).await?;
    *crate::sync::lock(in_force) = wanted;
    Ok(())
}

/// Deletes the table if this proxy wrote it (`in_force` holds a script); returns whether it did.
pub async fn remove(in_force: &std::sync::Mutex<Option<String>>) -> Result<bool, RedirectError> {
    if crate::sync::lock(in_force).is_none() {
        return Ok(false);
    }
    apply(&script(None, &[])).await?;
    *crate::sync::lock(in_force) = None;
    Ok(true)
}

/// Applies `script` with `nft -f -`.
pub async fn apply(script: &str) -> Result<(), RedirectError> {
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(RedirectError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).await.map_err(RedirectError::Spawn)?;
    }
    let out = child.wait_with_output().await.map_err(RedirectError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RedirectError::Refused(String::from_utf8_lossy(&out.stderr).trim().to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_redirects_enrolled_clients_outside_the_cluster_and_drops_their_quic() {
        let r = Redirect {
            listener: "transparent".into(),
            listener_port: 15001,
            ports: vec![80, 443],
            enrolled: vec!["10.244.1.5".parse().unwrap(), "fd00::5".parse().unwrap()],
            other_ports: OtherPorts::Drop,
        };
        let nets: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        let s = script(Some(&r), &nets);
        assert!(s.starts_with("table inet tunnelgate\ndelete table inet tunnelgate\n"), "{s}");
        assert!(s.contains("set enrolled4 { type ipv4_addr; elements = { 10.244.1.5 }; }"), "{s}");
        assert!(s.contains("set cluster6 { type ipv6_addr; flags interval; auto-merge; elements = { fd00::/8 }; }"));
        assert!(s.contains("ip saddr @enrolled4 ip daddr != @cluster4 tcp dport { 80, 443 } redirect to :15001"));
        assert!(s.contains("ip6 saddr @enrolled6 ip6 daddr != @cluster6 udp dport 443 drop"));
        assert!(s.contains("ip saddr @enrolled4 ip daddr != @cluster4 drop"), "otherPorts: drop");
        assert_eq!(script(None, &nets), "table inet tunnelgate\ndelete table inet tunnelgate\n");
    }
}
