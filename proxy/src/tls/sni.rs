//! Certificate choice by SNI: exact names first, then a `*.` wildcard covering exactly one more
//! label, else the listener's first certificate (or nothing, for strict listeners).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::LoadedCert;

/// The certificates of one listener, indexed by the names they are valid for.
pub struct SniCerts {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the parent domain of the wildcard (`*.example.com` → `example.com`).
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl fmt::Debug for SniCerts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SniCerts").field("names", &(self.exact.len() + self.wildcard.len())).finish()
    }
}

impl SniCerts {
    /// Indexes `certs`; when two certificates name the same host, the earlier one wins.
    pub fn new(certs: Vec<LoadedCert>) -> SniCerts {
        let mut s = SniCerts { exact: HashMap::new(), wildcard: HashMap::new(), default: None };
        for c in certs {
            for name in &c.names {
                let name = name.trim_end_matches('.');
                match name.strip_prefix("*.") {
                    Some(parent) => s.wildcard.entry(parent.to_owned()).or_insert_with(|| c.key.clone()),
                    None => s.exact.entry(name.to_owned()).or_insert_with(|| c.key.clone()),
                };
            }
            s.default.get_or_insert(c.key);
        }
        s
    }

    /// The certificate whose names cover `sni` (already lower-case without a trailing dot,
    /// as rustls hands it over), if any.
    pub fn matching(&self, sni: Option<&str>) -> Option<&Arc<CertifiedKey>> {
        let name = sni?.trim_end_matches('.');
        let name = name.to_ascii_lowercase();
        if let Some(k) = self.exact.get(&name) {
            return Some(k);
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent)
    }
}

impl ResolvesServerCert for SniCerts {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // Strict listeners refuse unknown names before the handshake reaches this point.
        self.matching(hello.server_name()).or(self.default.as_ref()).cloned()
    }
}
