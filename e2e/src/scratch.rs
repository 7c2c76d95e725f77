//! A test's scratch directory under the system's temporary directory, removed when the test ends
//! (kept with `E2E_KEEP=1`, to read the logs of a failed run).

use std::path::PathBuf;

/// The directory (field 0), created empty-or-existing and removed on drop.
pub struct Dir(pub PathBuf);

impl Dir {
    /// `tunnelgate-<name>-<pid>` under the temporary directory, created.
    pub fn new(name: &str) -> std::io::Result<Dir> {
        let d = std::env::temp_dir().join(format!("tunnelgate-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d)?;
        Ok(Dir(d))
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        if std::env::var_os("E2E_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
