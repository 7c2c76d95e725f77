//! Build script shared by the proxy and the operator: stamps the git commit into `build_info`.
//! `TUNNELGATE_GIT_SHA` wins (container builds pass it, having no `.git`); otherwise `git` is
//! asked; `unknown` when neither answers.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=TUNNELGATE_GIT_SHA");
    let sha = std::env::var("TUNNELGATE_GIT_SHA").ok().filter(|s| !s.is_empty()).or_else(|| {
        let out = Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).output().ok()?;
        if let Ok(dir) = Command::new("git").args(["rev-parse", "--absolute-git-dir"]).output() {
            let dir = String::from_utf8_lossy(&dir.stdout).trim().to_owned();
            // A new commit or checkout moves HEAD's log: stamp again.
            println!("cargo:rerun-if-changed={dir}/logs/HEAD");
            println!("cargo:rerun-if-changed={dir}/HEAD");
        }
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    });
    println!("cargo:rustc-env=TUNNELGATE_GIT_SHA={}", sha.unwrap_or_else(|| "unknown".to_owned()));
}
