//! A Squid parent proxy on loopback for tests (Debian's squid package): its name server is
//! 127.0.0.1, where nothing answers, and it resolves only the names of its own hosts file, so no
//! test ever makes it ask a real resolver.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Fails the test that asked, naming what could not be set up.
fn setup<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> T {
    r.unwrap_or_else(|e| panic!("squid setup: {what}: {e}"))
}

/// A Squid parent on loopback, stopped on drop.
pub struct Squid {
    pub port: u16,
    pub dir: PathBuf,
    child: Child,
}

impl Drop for Squid {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        for _ in 0..40 {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Squid {
    /// Starts Squid with `access` (its `http_access` lines and what they need) on a free port.
    ///
    /// # Panics
    /// When Squid is not installed or does not start (a test setup failure).
    pub async fn start(tag: &str, access: &str) -> Squid {
        let dir = std::env::temp_dir().join(format!("tg-squid-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        setup("create its directory", std::fs::create_dir_all(&dir));
        // Squid drops its privileges to the `proxy` user: let it write its logs here.
        setup("chmod its directory", Command::new("chmod").arg("777").arg(&dir).status());
        setup("write its hosts file", std::fs::write(dir.join("hosts"), "127.0.0.2 allowed.test www.allowed.test\n"));
        let port = crate::free_port();
        let d = dir.display();
        let cfg = format!(
            "http_port 127.0.0.1:{port}\nvisible_hostname tg-test-parent\n\
             dns_nameservers 127.0.0.1\nhosts_file {d}/hosts\n{access}\n\
             cache deny all\nstrip_query_terms off\naccess_log stdio:{d}/access.log\ncache_log {d}/cache.log\n\
             pid_filename {d}/squid.pid\ncoredump_dir {d}\nshutdown_lifetime 0 seconds\n"
        );
        setup("write its configuration", std::fs::write(dir.join("squid.conf"), cfg));
        let stderr = setup("create its stderr file", std::fs::File::create(dir.join("stderr")));
        let child = setup(
            "run squid (Debian's squid package)",
            Command::new("squid")
                .arg("-N")
                .arg("-f")
                .arg(dir.join("squid.conf"))
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn(),
        );
        let squid = Squid { port, dir, child };
        let mut up = false;
        for _ in 0..400 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(up, "squid did not start: {}", squid.log("cache.log"));
        squid
    }

    /// One of its log files (`cache.log`, `access.log`).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    /// The requests Squid logged (method and target; a tunnel is logged when it ends), once it
    /// has logged `n`.
    pub async fn requests(&self, n: usize) -> Vec<String> {
        let path = self.dir.join("access.log");
        let lines = || {
            std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                // The readiness probe's connection, closed before any request.
                .filter(|l| !l.contains("transaction-end-before-headers"))
                .map(|l| l.split_whitespace().skip(5).take(2).collect::<Vec<_>>().join(" "))
                .collect::<Vec<_>>()
        };
        for _ in 0..200 {
            if lines().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        lines()
    }
}
