//! Warnings about a valid configuration: what it says that does not do what it reads like.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv6Addr};

use crate::addr::{entirely_refused, metadata_in, mixes_public_and_refused};
use crate::config::ProxyConfig;
use crate::policy::Action;

/// One warning, located like a config error (`policy.rules[0].cidrs[0]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

impl ProxyConfig {
    /// Allow-rule CIDRs that read as opening refused addresses but do not: a CIDR with public
    /// space in it (`0.0.0.0/0`) allows only its public part, and a private range never opens the
    /// metadata or loopback addresses inside it.
    pub fn warnings(&self) -> Vec<ConfigWarning> {
        let mut out = Vec::new();
        if !self.policy.deny_private_addresses {
            return out;
        }
        for (i, rule) in self.policy.rules.iter().enumerate() {
            if rule.action != Action::Allow {
                continue;
            }
            for (j, net) in rule.cidrs.iter().enumerate() {
                let path = format!("policy.rules[{i}].cidrs[{j}]");
                if mixes_public_and_refused(net) {
                    out.push(ConfigWarning {
                        path,
                        message: format!(
                            "{net} holds public and refused addresses: it allows only the public ones; private, \
                             loopback, link-local and metadata addresses in it stay refused (to open some, list a \
                             CIDR that lies entirely inside private space, such as 10.20.0.0/16)"
                        ),
                    });
                    continue;
                }
                let mut message = String::new();
                let metadata = metadata_in(net);
                if !metadata.is_empty() {
                    let names: Vec<String> = metadata.iter().map(ToString::to_string).collect();
                    let _ = write!(
                        message,
                        "{net} does not open the metadata address(es) {} inside it; name each as a /32 or /128 \
                         to open it",
                        names.join(", ")
                    );
                }
                let loopback =
                    [IpAddr::from([127, 0, 0, 1]), IpAddr::from(Ipv6Addr::LOCALHOST)].iter().any(|a| net.contains(a));
                if loopback && net.prefix_len() != net.max_prefix_len() && entirely_refused(net) {
                    if !message.is_empty() {
                        message.push_str("; ");
                    }
                    let _ = write!(message, "{net} does not open loopback addresses; name each exactly (127.0.0.1/32)");
                }
                if !message.is_empty() {
                    out.push(ConfigWarning { path, message });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broad_and_ambiguous_cidrs_are_named() {
        let doc = "version: 1\nlisteners: [{name: f, bind: '127.0.0.1:0'}]\npolicy:\n  rules:\n    - {name: any, action: allow, cidrs: ['0.0.0.0/0', '8.8.8.0/24', '10.0.0.0/8']}\n    - {name: ll, action: allow, cidrs: ['169.254.0.0/16', '127.0.0.0/8', '169.254.169.254/32']}\n    - {name: no, action: deny, cidrs: ['0.0.0.0/0']}\n";
        let cfg = ProxyConfig::from_yaml(doc).unwrap();
        let w: Vec<String> = cfg.warnings().iter().map(ToString::to_string).collect();
        assert_eq!(w.len(), 3, "{w:#?}");
        assert!(w[0].starts_with("policy.rules[0].cidrs[0]: 0.0.0.0/0 holds public and refused"), "{}", w[0]);
        assert!(w[1].starts_with("policy.rules[1].cidrs[0]: 169.254.0.0/16 does not open the metadata"), "{}", w[1]);
        assert!(w[2].starts_with("policy.rules[1].cidrs[1]: 127.0.0.0/8 does not open loopback"), "{}", w[2]);
    }
}
