//! Proxy authentication (`Proxy-Authorization: Basic`, RFC 7617) against an htpasswd file of
//! bcrypt hashes (as `htpasswd -B` writes them, the format Squid's basic_ncsa_auth and nginx read).
//! Verified credentials are remembered briefly (bcrypt is slow on purpose); every verification that
//! is not remembered draws from a per-client bucket, so guessing is rate-limited. Both outlive
//! configuration generations ([`AuthMemory`]): a reload (which any pod change can cause) neither
//! refills the buckets nor lets a remembered password outlive a change of its user's hash.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::error::TunnelError;
use crate::sync::lock;

/// How long verified credentials are remembered (Squid's `credentialsttl` is 2 h by default).
const REMEMBER: Duration = Duration::from_secs(300);
/// Verifications a client may run per minute (each is one bcrypt computation).
const VERIFICATIONS_PER_MINUTE: u32 = 10;

/// Why the htpasswd file cannot be used; the configuration in force stays.
#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Invalid { path: PathBuf, line: usize, message: &'static str },
}

/// A verified credential: the user, the SHA-256 of the user's hash it was verified against, and
/// until when it is remembered.
type Verified = (String, [u8; 32], Instant);

/// What authentication remembers across configuration generations: verified credentials and each
/// client's verification bucket.
pub struct AuthMemory {
    /// SHA-256 of a verified `Proxy-Authorization` value → what it verified.
    remembered: Mutex<HashMap<[u8; 32], Verified>>,
    verifications: DefaultKeyedRateLimiter<IpAddr>,
}

impl Default for AuthMemory {
    fn default() -> Self {
        let per_minute = NonZeroU32::new(VERIFICATIONS_PER_MINUTE).unwrap_or(NonZeroU32::MIN);
        AuthMemory { remembered: Mutex::default(), verifications: RateLimiter::keyed(Quota::per_minute(per_minute)) }
    }
}

/// User name → (bcrypt hash, the hash's SHA-256).
type Users = HashMap<String, (String, [u8; 32])>;

/// Reads htpasswd text: `user:hash` lines, bcrypt (`$2a$`, `$2b$`, `$2y$`) only; blank lines and
/// `#` comments are skipped. The error is the 1-based line and what is wrong with it.
pub fn parse_htpasswd(text: &str) -> Result<Users, (usize, &'static str)> {
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (user, hash) = line.split_once(':').ok_or((i + 1, "expected user:hash"))?;
        if user.is_empty() {
            return Err((i + 1, "empty user name"));
        }
        if !["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p)) {
            return Err((i + 1, "not a bcrypt hash (write it with htpasswd -B); other formats are too weak"));
        }
        let digest: [u8; 32] = Sha256::digest(hash.as_bytes()).into();
        if users.insert(user.to_owned(), (hash.to_owned(), digest)).is_some() {
            return Err((i + 1, "user listed twice"));
        }
    }
    Ok(users)
}

/// The users of one configuration generation.
pub struct Authenticator {
    /// User name → bcrypt hash, and the hash's SHA-256 (what a remembered credential is tied to).
    users: Users,
    pub realm: String,
    /// What unknown users are verified against: a hash at the cost the file's hashes have.
    dummy: &'static str,
    memory: Arc<AuthMemory>,
}

impl Authenticator {
    /// Reads and checks `path`: `user:hash` lines, bcrypt (`$2a$`, `$2b$`, `$2y$`) only; blank
    /// lines and `#` comments are skipped.
    pub fn load(path: &Path, realm: &str, memory: Arc<AuthMemory>) -> Result<Authenticator, AuthFileError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| AuthFileError::Read { path: path.to_owned(), source })?;
        let users = parse_htpasswd(&text).map_err(|(line, message)| AuthFileError::Invalid {
            path: path.to_owned(),
            line,
            message,
        })?;
        // Buckets of clients that have not verified lately are as good as new: drop them.
        memory.verifications.retain_recent();
        let dummy = dummy_hash(usual_cost(users.values().map(|(hash, _)| hash)));
        Ok(Authenticator { users, realm: realm.to_owned(), dummy, memory })
    }

    /// The user `header` (a `Proxy-Authorization` value) authenticates, or why not: 407 for
    /// missing or wrong credentials, 429 when `client` verified too often.
    pub async fn authenticate(&self, client: IpAddr, header: Option<&[u8]>) -> Result<String, TunnelError> {
        let required = || TunnelError::AuthRequired(self.realm.clone());
        let header = header.ok_or_else(required)?;
        let key: [u8; 32] = Sha256::digest(header).into();
        if let Some((user, hash_digest, until)) = lock(&self.memory.remembered).get(&key) {
            // Remembered only while the user still has the hash it was verified against.
            let current = self.users.get(user).map(|(_, digest)| digest);
            if *until > Instant::now() && current == Some(hash_digest) {
                return Ok(user.clone());
            }
        }
        let (user, password) = parse_basic(header).ok_or_else(required)?;
        if let Err(not_until) = self.memory.verifications.check_key(&client.to_canonical()) {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            return Err(TunnelError::RateLimited(wait.as_secs().max(1)));
        }
        // Unknown users cost a verification too, so timing does not tell which names exist.
        let (hash, hash_digest) = match self.users.get(&user) {
            Some((hash, digest)) => (hash.clone(), Some(*digest)),
            None => (self.dummy.to_owned(), None),
        };
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
            .await
            .unwrap_or(false);
        let Some(hash_digest) = hash_digest.filter(|_| ok) else {
            return Err(required());
        };
        let mut remembered = lock(&self.memory.remembered);
        let now = Instant::now();
        remembered.retain(|_, (_, _, until)| *until > now);
        remembered.insert(key, (user.clone(), hash_digest, now + REMEMBER));
        Ok(user)
    }
}

/// `Basic base64(user:password)` → (user, password).
pub fn parse_basic(header: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(header).ok()?.trim();
    let (scheme, b64) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(b64.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// The cost most of `hashes` have (`$2y$05$…` → 5); bcrypt's default when there are none.
fn usual_cost<'a>(hashes: impl Iterator<Item = &'a String>) -> u32 {
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for h in hashes {
        if let Some(cost) = h.get(4..6).and_then(|c| c.parse::<u32>().ok()) {
            *counts.entry(cost).or_default() += 1;
        }
    }
    counts.into_iter().max_by_key(|(cost, n)| (*n, *cost)).map_or(bcrypt::DEFAULT_COST, |(cost, _)| cost)
}

/// A bcrypt hash at `cost` of a fixed string, computed once per cost, to verify unknown users
/// against: an unknown name then costs what a known one does, so timing does not tell them apart.
fn dummy_hash(cost: u32) -> &'static str {
    static DUMMIES: OnceLock<Mutex<HashMap<u32, &'static str>>> = OnceLock::new();
    let mut dummies = lock(DUMMIES.get_or_init(Mutex::default));
    dummies.entry(cost).or_insert_with(|| {
        let hash = bcrypt::hash("tunnelgate unknown user", cost).unwrap_or_default();
        Box::leak(hash.into_boxed_str())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_users_are_verified_at_the_cost_of_the_files_hashes() {
        let at = |cost: u32| bcrypt::hash("x", cost).unwrap();
        let (five, six) = (at(5), at(6));
        assert_eq!(usual_cost([five.clone(), five.clone(), six].iter()), 5);
        assert_eq!(usual_cost(std::iter::empty()), bcrypt::DEFAULT_COST);
        assert!(dummy_hash(5).starts_with("$2b$05$"), "{}", dummy_hash(5));
        assert!(dummy_hash(4).starts_with("$2b$04$"));
    }

    #[test]
    fn basic_credentials_parse_strictly() {
        assert_eq!(parse_basic(b"Basic YWxpY2U6czNjcmV0"), Some(("alice".into(), "s3cret".into())));
        assert_eq!(parse_basic(b"basic YWxpY2U6czNjcmV0"), Some(("alice".into(), "s3cret".into())));
        assert_eq!(parse_basic(b"Basic YTo="), Some(("a".into(), "".into())));
        for bad in [&b"Bearer YWxpY2U6czNjcmV0"[..], b"Basic YWxpY2U", b"Basic ====", b"Basic YWxp*2U6", b"Basic"] {
            assert_eq!(parse_basic(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }
}
