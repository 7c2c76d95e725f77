//! The admin token that `GET /config` requires when `admin.configTokenFile` is set: read from its
//! file with each configuration, kept only as a digest, compared by digest.

use std::path::Path;

use sha2::{Digest, Sha256};

/// Shortest token accepted: a token this short could be guessed over the admin port.
const MIN_LEN: usize = 16;

/// Why the token file cannot be used; the configuration in force stays.
#[derive(Debug, thiserror::Error)]
pub enum AdminTokenError {
    #[error("cannot read the token file: {0}")]
    Read(#[source] std::io::Error),
    #[error("the token file holds {0} characters; at least {MIN_LEN} are required")]
    TooShort(usize),
}

/// The digest of the token in force.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken([u8; 32]);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl AdminToken {
    /// Reads the token from `path` (surrounding whitespace, such as a final newline, is not part
    /// of it).
    pub fn load(path: &Path) -> Result<AdminToken, AdminTokenError> {
        let text = std::fs::read_to_string(path).map_err(AdminTokenError::Read)?;
        let token = text.trim();
        if token.len() < MIN_LEN {
            return Err(AdminTokenError::TooShort(token.len()));
        }
        Ok(AdminToken(Sha256::digest(token.as_bytes()).into()))
    }

    /// Whether `presented` is the token. Digests are compared, so the time taken tells nothing
    /// about how much of a guess was right.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let d: [u8; 32] = Sha256::digest(presented).into();
        d.iter().zip(self.0.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_exactly_the_token_in_the_file() {
        let dir = std::env::temp_dir().join(format!("tg-admin-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "0123456789abcdefXYZ\n").unwrap();
        let t = AdminToken::load(&path).unwrap();
        assert!(t.accepts(b"0123456789abcdefXYZ"));
        assert!(!t.accepts(b"0123456789abcdefXY"));
        assert!(!t.accepts(b"0123456789abcdefXYZ\n"));
        assert!(!t.accepts(b""));
        std::fs::write(&path, "short\n").unwrap();
        assert!(matches!(AdminToken::load(&path), Err(AdminTokenError::TooShort(5))));
        assert!(matches!(AdminToken::load(&dir.join("absent")), Err(AdminTokenError::Read(_))));
        assert_eq!(format!("{t:?}"), "AdminToken(..)");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
