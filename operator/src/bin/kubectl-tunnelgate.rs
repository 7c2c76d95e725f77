//! `kubectl tunnelgate` (kubectl finds `kubectl-tunnelgate` on the PATH): `check` policy
//! manifests offline, `explain` a pod's request against what the proxies enforce, `status` of
//! the rollout. Exit codes: 0 valid / allowed / all loaded, 1 denied / not loaded everywhere,
//! 2 needs DNS resolution, 64 invalid input, 69 the cluster cannot be reached.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use tunnelgate_operator::plugin::{self, Release, EXIT_INVALID};

#[derive(Parser)]
#[command(name = "kubectl tunnelgate", about = "Tunnelgate egress policies: check, explain, status", version)]
struct Cli {
    /// Kubeconfig file (default: $KUBECONFIG or ~/.kube/config).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context (default: the current one).
    #[arg(long, global = true)]
    context: Option<String>,
    /// Helm release name of Tunnelgate.
    #[arg(long, global = true, default_value = "tunnelgate")]
    release: String,
    /// Namespace of that release.
    #[arg(long, global = true, default_value = "tunnelgate")]
    release_namespace: String,
    /// The chart's `fullnameOverride`, if the release was installed with one.
    #[arg(long, global = true)]
    fullname_override: Option<String>,
    /// `table` (default), `json` or `yaml` (explain and status).
    #[arg(short, long, global = true, default_value = "table")]
    output: plugin::Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate TunnelPolicy and ClusterTunnelPolicy manifests offline (for CI and GitOps), with
    /// the operator's own validation: every error with its field path, exit 64 on any.
    Check {
        /// Manifest files (multi-document YAML); `-` reads standard input.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// The decision for a request from a pod, against the configuration the proxies enforce.
    Explain {
        /// The pod's namespace.
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// `[pod/NAME | NAME | deploy/NAME] host:port` (the workload is left out with --selector).
        #[arg(required = true, num_args = 1..=2, value_names = ["WORKLOAD", "TARGET"])]
        args: Vec<String>,
        /// The addresses the name resolves to (the decision covers every one).
        #[arg(long)]
        resolve: Vec<IpAddr>,
        /// Resolve the name here, with this machine's resolver, instead of `--resolve` (the
        /// proxies' resolver may answer differently).
        #[arg(long, conflicts_with = "resolve")]
        resolve_here: bool,
        /// Instead of a pod: a running pod this label selector matches (`app=checkout`).
        #[arg(short = 'l', long)]
        selector: Option<String>,
        /// Decide as this authenticated proxy user (rules with `users` match only their users).
        #[arg(long)]
        user: Option<String>,
    },
    /// The proxies, the render each has loaded, and the policies not yet loaded everywhere.
    Status {
        /// The proxies' admin port (chart value proxy.adminPort).
        #[arg(long, default_value_t = 9090)]
        proxy_admin_port: u16,
    },
}

async fn client(cli: &Cli) -> Result<Client, String> {
    let options = KubeConfigOptions { context: cli.context.clone(), ..Default::default() };
    let mut config = match &cli.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|e| format!("{}: {e}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &options).await.map_err(|e| e.to_string())?
        }
        None => Config::from_kubeconfig(&options).await.map_err(|e| e.to_string())?,
    };
    // A command answers now or says why: no retrying of 503s for minutes (the API server's pod
    // proxy answers 503 for a proxy pod it cannot reach, and `status` reports that pod).
    config.default_retry = false;
    Client::try_from(config).map_err(|e| e.to_string())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let release = Release {
        namespace: cli.release_namespace.clone(),
        name: cli.release.clone(),
        fullname_override: cli.fullname_override.clone(),
    };
    let code = match &cli.command {
        Command::Check { files } => {
            let mut worst = 0;
            for f in files {
                let (source, text) = if f.as_os_str() == "-" {
                    let mut s = String::new();
                    let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut s);
                    ("-".to_owned(), Ok(s))
                } else {
                    (f.display().to_string(), std::fs::read_to_string(f))
                };
                match text {
                    Ok(text) => {
                        let (code, out) = plugin::check(&source, &text);
                        print!("{out}");
                        worst = worst.max(code);
                    }
                    Err(e) => {
                        eprintln!("{source}: cannot read: {e}");
                        worst = EXIT_INVALID;
                    }
                }
            }
            worst
        }
        Command::Explain { namespace, args, resolve, selector, resolve_here, user } => {
            let (reference, target) = match (selector, args.as_slice()) {
                (Some(sel), [target]) => (format!("-l={sel}"), target.clone()),
                (None, [pod, target]) => (pod.clone(), target.clone()),
                _ => {
                    eprintln!("explain takes a workload and a target (host:port), or --selector and a target");
                    return ExitCode::from(64);
                }
            };
            let mut resolve = resolve.clone();
            if *resolve_here {
                match plugin::resolve_here(&target).await {
                    Ok(addrs) => resolve = addrs,
                    Err(e) => {
                        eprintln!("{e}");
                        return ExitCode::from(64);
                    }
                }
            }
            match client(&cli).await {
                Ok(c) => {
                    let q = plugin::ExplainQuery {
                        namespace,
                        pod: &reference,
                        target: &target,
                        resolve: &resolve,
                        user: user.as_deref(),
                    };
                    report(plugin::explain(&c, &release, &q, cli.output).await)
                }
                Err(e) => unreachable_cluster(&e),
            }
        }
        Command::Status { proxy_admin_port } => match client(&cli).await {
            Ok(c) => report(plugin::status(&c, &release, *proxy_admin_port, cli.output).await),
            Err(e) => unreachable_cluster(&e),
        },
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn report(r: Result<(i32, String), plugin::PluginError>) -> i32 {
    match r {
        Ok((code, out)) => {
            print!("{out}");
            code
        }
        Err(plugin::PluginError::Usage(m)) => {
            eprintln!("{m}");
            EXIT_INVALID
        }
        Err(e) => unreachable_cluster(&tunnelgate_operator::error_chain(&e)),
    }
}

fn unreachable_cluster(e: &str) -> i32 {
    eprintln!("cannot reach the cluster: {e}");
    69
}
