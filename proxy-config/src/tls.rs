//! The `tls` block of a listener: which certificates it serves (files chosen by SNI, or an ACME
//! directory), the protocol floor, ALPN and client-certificate checks, validated with paths.

use std::path::PathBuf;

use crate::error::Errors;
use crate::raw::RawTls;

/// Most certificate pairs one listener may serve.
pub const MAX_CERTIFICATES: usize = 64;

/// TLS settings of one listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    /// Certificate pairs, chosen by SNI from each certificate's names; the first is served to a
    /// client that sends no SNI or an unknown name (unless `strict_sni`). Empty only with `acme`.
    pub certificates: Vec<TlsFiles>,
    /// Refuse a handshake whose SNI is absent or matches no certificate (`unrecognized_name`).
    pub strict_sni: bool,
    /// ALPN protocols offered, in preference order. A client that offers ALPN but none of these
    /// is refused (`no_application_protocol`); a client without ALPN is served.
    pub alpn: Vec<String>,
    /// The oldest protocol version accepted.
    pub min_version: TlsVersion,
    /// Client certificates checked against a CA bundle (mTLS).
    pub client_auth: Option<ClientAuth>,
    /// Certificates obtained and renewed from an ACME directory (TLS-ALPN-01 on this listener).
    pub acme: Option<Acme>,
}

impl ListenerTls {
    /// Every file this block names (a change to any of them is a reload).
    pub fn files(&self) -> impl Iterator<Item = &std::path::Path> {
        let pairs = self.certificates.iter().flat_map(|c| [c.cert_file.as_path(), c.key_file.as_path()]);
        let client =
            self.client_auth.iter().flat_map(|c| std::iter::once(c.ca_file.as_path()).chain(c.crl_file.as_deref()));
        pairs.chain(client)
    }
}

/// PEM files of one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PKCS#8, PKCS#1 (RSA) or SEC1 private key.
    pub key_file: PathBuf,
}

/// The protocol floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsVersion {
    #[default]
    V1_2,
    V1_3,
}

/// Client-certificate verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuth {
    /// PEM bundle of the CAs whose client certificates are accepted.
    pub ca_file: PathBuf,
    /// PEM certificate revocation lists of those CAs: a revoked client certificate is refused.
    pub crl_file: Option<PathBuf>,
    /// `required`: no certificate, no handshake. `optional`: a client without one is served,
    /// a client with a bad one is refused.
    pub required: bool,
}

/// An ACME account and order for one listener's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acme {
    /// The directory URL (`https://acme-v02.api.letsencrypt.org/directory`).
    pub directory: String,
    /// Names on the certificate (at least one; no wildcards: TLS-ALPN-01 cannot prove them).
    pub domains: Vec<String>,
    /// `mailto:` contacts of the account.
    pub contact: Vec<String>,
    /// Account key and certificates survive restarts here.
    pub cache_dir: PathBuf,
    /// CA bundle that signs the directory's HTTPS certificate, when not a public CA (a private
    /// ACME server such as step-ca or a test server).
    pub directory_ca_file: Option<PathBuf>,
}

/// Validates `t`, the `tls` block at path `p` of a listener; `forward`: the listener is a forward
/// proxy, so HTTP/1.1 is the only protocol inside the TLS.
pub(crate) fn convert(errs: &mut Errors, p: &str, t: RawTls, forward: bool) -> Option<ListenerTls> {
    let before = errs.len();
    let mut certificates = Vec::new();
    let mut pair = |errs: &mut Errors, q: &str, cert: Option<String>, key: Option<String>| match (cert, key) {
        (Some(c), Some(k)) if !c.is_empty() && !k.is_empty() => {
            certificates.push(TlsFiles { cert_file: c.into(), key_file: k.into() })
        }
        (c, k) => {
            if c.as_deref().is_none_or(str::is_empty) {
                errs.push(format!("{q}.certFile"), "required (with keyFile) and must not be empty");
            }
            if k.as_deref().is_none_or(str::is_empty) {
                errs.push(format!("{q}.keyFile"), "required (with certFile) and must not be empty");
            }
        }
    };
    if t.cert_file.is_some() || t.key_file.is_some() {
        pair(errs, p, t.cert_file, t.key_file);
    }
    if let Some(list) = t.certificates {
        if list.is_empty() || list.len() > MAX_CERTIFICATES {
            errs.push(format!("{p}.certificates"), format!("must hold 1 to {MAX_CERTIFICATES} entries"));
        }
        for (i, c) in list.into_iter().enumerate() {
            pair(errs, &format!("{p}.certificates[{i}]"), Some(c.cert_file), Some(c.key_file));
        }
    }
    let acme = t.acme.and_then(|a| acme(errs, &format!("{p}.acme"), a));
    if certificates.is_empty() && acme.is_none() && errs.len() == before {
        errs.push(p, "needs a certificate: certFile and keyFile, certificates, or acme");
    }
    if !certificates.is_empty() && acme.is_some() {
        errs.push(format!("{p}.acme"), "cannot be combined with certificate files (one source per listener)");
    }
    let min_version = match t.min_version.as_deref() {
        None | Some("1.2") => TlsVersion::V1_2,
        Some("1.3") => TlsVersion::V1_3,
        Some(other) => {
            errs.push(format!("{p}.minVersion"), format!("\"{other}\": expected \"1.2\" or \"1.3\""));
            TlsVersion::V1_2
        }
    };
    let alpn = match t.alpn {
        Some(list) => {
            if list.len() > 16 {
                errs.push(format!("{p}.alpn"), "at most 16 protocols");
            }
            for (i, a) in list.iter().enumerate() {
                // RFC 7301 §3.1: 1 to 255 bytes; printable ASCII keeps logs and metrics sane.
                if a.is_empty() || a.len() > 255 || !a.bytes().all(|b| b.is_ascii_graphic()) {
                    errs.push(format!("{p}.alpn[{i}]"), "must be 1-255 printable ASCII characters");
                }
                if a == "acme-tls/1" {
                    errs.push(format!("{p}.alpn[{i}]"), "acme-tls/1 is reserved for ACME challenges");
                }
            }
            list
        }
        // A forward listener speaks HTTP/1.1 over TLS; a tunnel advertises nothing unless told
        // what its backend speaks.
        None if forward => vec!["http/1.1".to_owned()],
        None => Vec::new(),
    };
    if forward && alpn.iter().any(|a| a != "http/1.1") {
        errs.push(format!("{p}.alpn"), "a forward listener speaks only http/1.1");
    }
    let client_auth = t.client_auth.and_then(|c| {
        let q = format!("{p}.clientAuth");
        let required = match c.mode.as_deref() {
            None | Some("required") => true,
            Some("optional") => false,
            Some(other) => {
                errs.push(format!("{q}.mode"), format!("\"{other}\": expected required or optional"));
                true
            }
        };
        if c.ca_file.is_empty() {
            errs.push(format!("{q}.caFile"), "must not be empty");
            return None;
        }
        if c.crl_file.as_deref() == Some("") {
            errs.push(format!("{q}.crlFile"), "must not be empty (omit the field instead)");
        }
        Some(ClientAuth { ca_file: c.ca_file.into(), crl_file: c.crl_file.map(PathBuf::from), required })
    });
    (errs.len() == before).then_some(ListenerTls {
        certificates,
        strict_sni: t.strict_sni.unwrap_or(false),
        alpn,
        min_version,
        client_auth,
        acme,
    })
}

fn acme(errs: &mut Errors, p: &str, a: crate::raw::RawAcme) -> Option<Acme> {
    let before = errs.len();
    if !a.directory.starts_with("https://") {
        errs.push(format!("{p}.directory"), "must be an https:// URL");
    }
    if a.domains.is_empty() || a.domains.len() > 100 {
        errs.push(format!("{p}.domains"), "must hold 1 to 100 names");
    }
    for (i, d) in a.domains.iter().enumerate() {
        if d.starts_with("*.") {
            errs.push(format!("{p}.domains[{i}]"), "wildcards need DNS-01, which is not supported");
            continue;
        }
        match crate::host::parse_host(d) {
            Ok(crate::host::Host::Name(_)) => {}
            Ok(crate::host::Host::Ip(_)) => errs.push(format!("{p}.domains[{i}]"), "must be a DNS name"),
            Err(e) => errs.push(format!("{p}.domains[{i}]"), format!("\"{d}\": {e}")),
        }
    }
    for (i, c) in a.contact.iter().enumerate() {
        if !c.starts_with("mailto:") {
            errs.push(format!("{p}.contact[{i}]"), "must be a mailto: URL");
        }
    }
    if a.cache_dir.is_empty() {
        errs.push(format!("{p}.cacheDir"), "required: the account key and certificates must survive restarts");
    }
    (errs.len() == before).then(|| Acme {
        directory: a.directory,
        domains: a.domains,
        contact: a.contact,
        cache_dir: a.cache_dir.into(),
        directory_ca_file: a.directory_ca_file.filter(|s| !s.is_empty()).map(PathBuf::from),
    })
}
