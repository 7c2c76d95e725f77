//! Validation of the TLS Secrets that base listeners name: PEM certificate chain and key that
//! match, within the certificate's validity period. Never logs or returns key material in errors.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use sha2::{Digest, Sha256};

use crate::render::TlsIn;

/// Why a Secret cannot be used. Messages are safe for events and status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("type is {0:?}, expected kubernetes.io/tls")]
    WrongType(String),
    #[error("missing key {0}")]
    MissingKey(&'static str),
    #[error("tls.crt holds no PEM certificate")]
    NotPem,
    #[error("tls.key holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey,
    #[error("tls.key does not match the certificate in tls.crt")]
    KeyMismatch,
    #[error("certificate is not valid now (notBefore {not_before}, notAfter {not_after})")]
    NotValidNow { not_before: String, not_after: String },
    #[error("cannot parse the certificate")]
    Unparsable,
    #[error("htpasswd line {0} is not user:bcrypt-hash (write it with htpasswd -B)")]
    NotBcrypt(usize),
    #[error("key credentials must hold one line, user:password")]
    NotCredentials,
    #[error("ca.crt holds no PEM certificate")]
    NotCa,
}

fn field<'a>(data: &'a BTreeMap<String, ByteString>, key: &'static str) -> Result<&'a [u8], SecretError> {
    data.get(key).map(|b| b.0.as_slice()).filter(|b| !b.is_empty()).ok_or(SecretError::MissingKey(key))
}

fn rfc3339(ts: i64) -> String {
    let t = if ts >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(ts.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(ts.unsigned_abs())
    };
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Checks the `htpasswd` key of a Secret: `user:hash` lines, bcrypt only (what the proxy accepts).
pub fn htpasswd_from_secret(secret: &Secret) -> Result<String, SecretError> {
    let empty = BTreeMap::new();
    let data = secret.data.as_ref().unwrap_or(&empty);
    let text = String::from_utf8(field(data, "htpasswd")?.to_vec()).map_err(|_| SecretError::NotBcrypt(1))?;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let ok = line.split_once(':').is_some_and(|(user, hash)| {
            !user.is_empty() && ["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p))
        });
        if !ok {
            return Err(SecretError::NotBcrypt(i + 1));
        }
    }
    Ok(text)
}

/// A parent proxy's credentials: key `credentials`, one line `user:password` (returned with its
/// newline).
pub fn credentials_from_secret(secret: &Secret) -> Result<String, SecretError> {
    let empty = BTreeMap::new();
    let data = secret.data.as_ref().unwrap_or(&empty);
    let text = String::from_utf8(field(data, "credentials")?.to_vec()).map_err(|_| SecretError::NotCredentials)?;
    let line = proxy_config::parents::credentials_line(&text).ok_or(SecretError::NotCredentials)?;
    Ok(format!("{line}\n"))
}

/// A parent proxy's CA certificates: key `ca.crt`, PEM with at least one certificate.
pub fn ca_from_secret(secret: &Secret) -> Result<String, SecretError> {
    let empty = BTreeMap::new();
    let data = secret.data.as_ref().unwrap_or(&empty);
    let pem = field(data, "ca.crt")?;
    let certs = rustls_pemfile::certs(&mut &*pem).collect::<Result<Vec<_>, _>>().map_err(|_| SecretError::NotCa)?;
    if certs.is_empty() {
        return Err(SecretError::NotCa);
    }
    String::from_utf8(pem.to_vec()).map_err(|_| SecretError::NotCa)
}

/// Checks a `kubernetes.io/tls` Secret and returns its material with public facts.
pub fn tls_from_secret(secret: &Secret) -> Result<TlsIn, SecretError> {
    let ty = secret.type_.clone().unwrap_or_default();
    if ty != "kubernetes.io/tls" {
        return Err(SecretError::WrongType(ty));
    }
    let empty = BTreeMap::new();
    let data = secret.data.as_ref().unwrap_or(&empty);
    tls_from_pem(field(data, "tls.crt")?, field(data, "tls.key")?)
}

/// Checks a PEM certificate chain and key.
pub fn tls_from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<TlsIn, SecretError> {
    let certs =
        rustls_pemfile::certs(&mut &*cert_pem).collect::<Result<Vec<_>, _>>().map_err(|_| SecretError::NotPem)?;
    let leaf = certs.first().ok_or(SecretError::NotPem)?.clone();
    let key = rustls_pemfile::private_key(&mut &*key_pem).map_err(|_| SecretError::NoKey)?.ok_or(SecretError::NoKey)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    match rustls::sign::CertifiedKey::from_der(certs, key, &provider) {
        Ok(_) => {}
        Err(rustls::Error::InconsistentKeys(_)) => return Err(SecretError::KeyMismatch),
        Err(_) => return Err(SecretError::NoKey),
    }
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|_| SecretError::Unparsable)?;
    let v = cert.validity();
    let not_after = rfc3339(v.not_after.timestamp());
    if !v.is_valid() {
        return Err(SecretError::NotValidNow { not_before: rfc3339(v.not_before.timestamp()), not_after });
    }
    Ok(TlsIn {
        cert_pem: String::from_utf8_lossy(cert_pem).into_owned(),
        key_pem: String::from_utf8_lossy(key_pem).into_owned(),
        sha256: hex::encode(Sha256::digest(leaf.as_ref())),
        not_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(ty: &str, crt: &str, key: &str) -> Secret {
        Secret {
            type_: Some(ty.to_owned()),
            data: Some(BTreeMap::from([
                ("tls.crt".to_owned(), ByteString(crt.as_bytes().to_vec())),
                ("tls.key".to_owned(), ByteString(key.as_bytes().to_vec())),
            ])),
            ..Default::default()
        }
    }

    #[test]
    fn valid_pair_and_each_kind_of_broken_secret() {
        let a = rcgen::generate_simple_self_signed(vec!["proxy.test".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["other.test".into()]).unwrap();
        let (crt, key) = (a.cert.pem(), a.signing_key.serialize_pem());
        let ok = tls_from_secret(&secret("kubernetes.io/tls", &crt, &key)).unwrap();
        assert_eq!(ok.sha256, hex::encode(Sha256::digest(a.cert.der())));
        assert!(ok.not_after.ends_with('Z'));
        assert_eq!(tls_from_secret(&secret("Opaque", &crt, &key)), Err(SecretError::WrongType("Opaque".into())));
        assert_eq!(tls_from_secret(&secret("kubernetes.io/tls", "not pem", &key)), Err(SecretError::NotPem));
        assert_eq!(tls_from_secret(&secret("kubernetes.io/tls", &crt, "")), Err(SecretError::MissingKey("tls.key")));
        assert_eq!(
            tls_from_secret(&secret("kubernetes.io/tls", &crt, &b.signing_key.serialize_pem())),
            Err(SecretError::KeyMismatch)
        );
        let kp = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["old.test".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2019, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        let old = params.self_signed(&kp).unwrap();
        let e = tls_from_secret(&secret("kubernetes.io/tls", &old.pem(), &kp.serialize_pem())).unwrap_err();
        assert!(matches!(e, SecretError::NotValidNow { .. }), "{e}");
        assert!(!e.to_string().contains("PRIVATE"));
    }
}

#[cfg(test)]
mod parent_tests {
    use super::*;
    use k8s_openapi::api::core::v1::Secret;

    fn secret(key: &str, value: &str) -> Secret {
        Secret { data: Some([(key.to_owned(), ByteString(value.as_bytes().to_vec()))].into()), ..Default::default() }
    }

    #[test]
    fn parent_secrets_hold_one_credentials_line_or_pem_certificates() {
        assert_eq!(credentials_from_secret(&secret("credentials", "egress:pw\n")), Ok("egress:pw\n".to_owned()));
        assert_eq!(credentials_from_secret(&secret("credentials", "egress:pw")), Ok("egress:pw\n".to_owned()));
        for bad in ["egress", "a:b\nc:d", "\n"] {
            assert_eq!(
                credentials_from_secret(&secret("credentials", bad)),
                Err(SecretError::NotCredentials),
                "{bad:?}"
            );
        }
        assert_eq!(credentials_from_secret(&secret("other", "a:b")), Err(SecretError::MissingKey("credentials")));
        let ca = rcgen::generate_simple_self_signed(vec!["ca.example".to_owned()]).unwrap().cert.pem();
        assert_eq!(ca_from_secret(&secret("ca.crt", &ca)), Ok(ca));
        assert_eq!(ca_from_secret(&secret("ca.crt", "not pem")), Err(SecretError::NotCa));
    }
}
