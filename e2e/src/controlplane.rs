//! A real Kubernetes control plane on loopback for the end-to-end tests: etcd, kube-apiserver (RBAC,
//! ServiceAccount tokens, an admin identity) and kube-controller-manager, built from their Go
//! modules by `controlplane/build.sh`, started in a directory of their own and stopped when dropped
//! (also when a test panics; a test process killed outright takes them with it through the parent
//! death signal).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// The Kubernetes version the control plane is built at (controlplane/go.mod).
pub const KUBERNETES_VERSION: &str = "v1.37.2";

/// The controllers of kube-controller-manager that the tests rely on: owner references (garbage
/// collection), namespace deletion, each namespace's `default` ServiceAccount, the workloads that
/// turn the chart's DaemonSet and Deployments into Pods, and the aggregation of the chart's user
/// roles into `view`, `edit` and `admin`.
const CONTROLLERS: &str = "garbage-collector-controller,namespace-controller,serviceaccount-controller,daemonset-controller,deployment-controller,replicaset-controller,clusterrole-aggregation-controller";

/// What went wrong starting or driving the control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("building the control plane (controlplane/build.sh) failed: {0}")]
    Build(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} exited early; its log:\n{1}")]
    Exited(&'static str, String),
    #[error("{0} not ready after {1:?}; its log:\n{2}")]
    NotReady(&'static str, Duration, String),
    #[error("Kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("the API server gave no token for {0}")]
    NoToken(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Options for [`ControlPlane::start`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Run kube-controller-manager (garbage collection, namespaces, ServiceAccounts, workloads).
    pub controllers: bool,
    /// etcd compaction by the API server this often (short values make watches see "410 Gone").
    pub compaction_interval: Option<Duration>,
    /// The address the API server listens on: loopback, or the host's end of a bridge of the
    /// test's own network namespaces when processes inside them must reach it.
    pub bind: IpAddr,
}

impl Default for Options {
    fn default() -> Self {
        Self { controllers: true, compaction_interval: None, bind: IpAddr::from([127, 0, 0, 1]) }
    }
}

/// The directory holding `etcd`, `kube-apiserver`, `kube-controller-manager` and `helm`: from
/// `TUNNELGATE_CONTROLPLANE_BIN`, else built (or found in the cache) by `controlplane/build.sh`.
///
/// # Errors
/// When the build fails.
pub fn binaries() -> Result<PathBuf, Error> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("TUNNELGATE_CONTROLPLANE_BIN") {
            return Ok(PathBuf::from(d));
        }
        let script = repo_root().join("controlplane/build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!("{} exited with {}", script.display(), out.status));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().last().map(|l| PathBuf::from(l.trim())).ok_or_else(|| "build.sh printed no directory".into())
    })
    .clone()
    .map_err(Error::Build)
}

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A free loopback port (see `testkit::free_port`).
fn port() -> u16 {
    testkit::free_port()
}

struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, program: &Path, args: &[String], log: PathBuf) -> Result<Self, Error> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io(format!("opening {}", log.display())))?;
        let err = out.try_clone().map_err(io("log file"))?;
        // setpriv --pdeathsig: the child dies with the thread that started it, so a test process
        // killed outright leaves no API server behind.
        let mut cmd = if Path::new("/usr/bin/setpriv").is_file() {
            let mut c = Command::new("/usr/bin/setpriv");
            c.args(["--pdeathsig", "KILL", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        let child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io(format!("starting {}", program.display())))?;
        Ok(Self { name, child, log })
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running control plane. Dropping it stops every process and removes its directory (kept when
/// `E2E_KEEP` is set, for reading the logs).
pub struct ControlPlane {
    dir: PathBuf,
    bin: PathBuf,
    opts: Options,
    etcd_port: u16,
    peer_port: u16,
    /// The API server's secure port on 127.0.0.1.
    pub api_port: u16,
    etcd: Option<Proc>,
    apiserver: Option<Proc>,
    controllers: Option<Proc>,
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver and (unless `opts.controllers` is false) kube-controller-manager
    /// in `dir`, and waits until the API server is ready and its bootstrap roles exist.
    ///
    /// # Errors
    /// When a binary cannot be built or started, or a component is not ready within its time.
    pub async fn start(dir: &Path, opts: Options) -> Result<Self, Error> {
        let bin = binaries()?;
        std::fs::create_dir_all(dir.join("pki")).map_err(io(format!("creating {}", dir.display())))?;
        let mut cp = Self {
            dir: dir.to_path_buf(),
            bin,
            opts,
            etcd_port: port(),
            peer_port: port(),
            api_port: port(),
            etcd: None,
            apiserver: None,
            controllers: None,
        };
        cp.write_identities()?;
        cp.start_etcd()?;
        cp.start_apiserver().await?;
        if cp.opts.controllers {
            cp.start_controllers()?;
        }
        Ok(cp)
    }

    /// The directory of this control plane (logs, PKI, kubeconfigs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory of the built binaries (etcd, kube-apiserver, kube-controller-manager, helm).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    fn write_identities(&self) -> Result<(), Error> {
        let pki = |e: rcgen::Error| Error::Build(format!("test PKI: {e}"));
        let key = rcgen::KeyPair::generate().map_err(pki)?;
        write(&self.dir.join("pki/sa.key"), &key.serialize_pem())?;
        write(&self.dir.join("pki/sa.pub"), &key.public_key_pem())?;
        // The API server's serving certificate, from a CA of this control plane's own: valid for
        // loopback, the bind address and the `kubernetes` Service's address and names.
        let ca_key = rcgen::KeyPair::generate().map_err(pki)?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(pki)?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "tunnelgate-e2e-ca");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).map_err(pki)?;
        let mut names = vec![
            "127.0.0.1".to_owned(),
            "10.96.0.1".to_owned(),
            "localhost".to_owned(),
            "kubernetes".to_owned(),
            "kubernetes.default".to_owned(),
            "kubernetes.default.svc".to_owned(),
        ];
        if !self.opts.bind.is_loopback() {
            names.push(self.opts.bind.to_string());
        }
        let serving_key = rcgen::KeyPair::generate().map_err(pki)?;
        let mut params = rcgen::CertificateParams::new(names).map_err(pki)?;
        params.distinguished_name.push(rcgen::DnType::CommonName, "kube-apiserver");
        let serving = params.signed_by(&serving_key, &ca).map_err(pki)?;
        write(&self.dir.join("pki/ca.crt"), &ca.pem())?;
        write(&self.dir.join("pki/apiserver.crt"), &serving.pem())?;
        write(&self.dir.join("pki/apiserver.key"), &serving_key.serialize_pem())?;
        let token = random_token()?;
        write(&self.dir.join("tokens.csv"), &format!("{token},admin,admin-uid,system:masters\n"))?;
        self.kubeconfig_with_token("admin", &token, "default")?;
        Ok(())
    }

    fn start_etcd(&mut self) -> Result<(), Error> {
        let (c, p) = (self.etcd_port, self.peer_port);
        let args = vec![
            "--name=test".into(),
            format!("--data-dir={}", self.dir.join("etcd").display()),
            format!("--listen-client-urls=http://127.0.0.1:{c}"),
            format!("--advertise-client-urls=http://127.0.0.1:{c}"),
            format!("--listen-peer-urls=http://127.0.0.1:{p}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{p}"),
            format!("--initial-cluster=test=http://127.0.0.1:{p}"),
            "--unsafe-no-fsync=true".into(),
            "--log-level=warn".into(),
        ];
        self.etcd = Some(Proc::spawn("etcd", &self.bin.join("etcd"), &args, self.dir.join("etcd.log"))?);
        Ok(())
    }

    /// Starts the API server (again, after [`Self::stop_apiserver`]) and waits for `/readyz`.
    ///
    /// # Errors
    /// When it exits or is not ready within 120 s.
    pub async fn start_apiserver(&mut self) -> Result<(), Error> {
        let d = &self.dir;
        let mut args = vec![
            format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_port),
            format!("--bind-address={}", self.opts.bind),
            format!("--advertise-address={}", self.opts.bind),
            format!("--secure-port={}", self.api_port),
            format!("--tls-cert-file={}", d.join("pki/apiserver.crt").display()),
            format!("--tls-private-key-file={}", d.join("pki/apiserver.key").display()),
            format!("--token-auth-file={}", d.join("tokens.csv").display()),
            "--authorization-mode=RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", d.join("pki/sa.pub").display()),
            format!("--service-account-signing-key-file={}", d.join("pki/sa.key").display()),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--allow-privileged=true".into(),
            "--endpoint-reconciler-type=none".into(),
            // Pods name no ServiceAccount token volume here: there is no kubelet to mount one.
            "--disable-admission-plugins=ServiceAccount".into(),
            "--profiling=false".into(),
        ];
        if let Some(every) = self.opts.compaction_interval {
            args.push(format!("--etcd-compaction-interval={}s", every.as_secs().max(1)));
        }
        let mut p =
            Proc::spawn("kube-apiserver", &self.bin.join("kube-apiserver"), &args, d.join("kube-apiserver.log"))?;
        let wait = Duration::from_secs(120);
        let deadline = Instant::now() + wait;
        loop {
            if p.exited() {
                return Err(Error::Exited("kube-apiserver", p.log_tail()));
            }
            if let Some(e) = self.etcd.as_mut() {
                if e.exited() {
                    return Err(Error::Exited("etcd", e.log_tail()));
                }
            }
            if Instant::now() > deadline {
                return Err(Error::NotReady("kube-apiserver", wait, p.log_tail()));
            }
            if self.ready().await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.apiserver = Some(p);
        Ok(())
    }

    async fn ready(&self) -> bool {
        let Ok(c) = self.admin_client().await else { return false };
        let req = http::Request::get("/readyz").body(Vec::new());
        let Ok(req) = req else { return false };
        matches!(c.request_text(req).await, Ok(t) if t.trim() == "ok")
    }

    /// Stops the API server (etcd and the controllers keep running).
    pub fn stop_apiserver(&mut self) {
        self.apiserver = None;
    }

    fn start_controllers(&mut self) -> Result<(), Error> {
        let d = &self.dir;
        let args = vec![
            format!("--kubeconfig={}", self.admin_kubeconfig().display()),
            format!("--controllers={CONTROLLERS}"),
            "--leader-elect=false".into(),
            "--secure-port=0".into(),
            "--use-service-account-credentials=false".into(),
            format!("--service-account-private-key-file={}", d.join("pki/sa.key").display()),
            // Garbage collection and namespace deletion at test speed.
            "--concurrent-gc-syncs=5".into(),
            "--namespace-sync-period=10s".into(),
        ];
        self.controllers = Some(Proc::spawn(
            "kube-controller-manager",
            &self.bin.join("kube-controller-manager"),
            &args,
            d.join("kube-controller-manager.log"),
        )?);
        Ok(())
    }

    /// Fails when a component has exited (the test reads its log in the error).
    ///
    /// # Errors
    /// Names the component that is gone.
    pub fn check_alive(&mut self) -> Result<(), Error> {
        for p in [&mut self.etcd, &mut self.apiserver, &mut self.controllers].into_iter().flatten() {
            if p.exited() {
                return Err(Error::Exited(p.name, p.log_tail()));
            }
        }
        Ok(())
    }

    /// The API server's URL.
    pub fn server(&self) -> String {
        match self.opts.bind {
            IpAddr::V6(a) => format!("https://[{a}]:{}", self.api_port),
            IpAddr::V4(a) => format!("https://{a}:{}", self.api_port),
        }
    }

    /// A kubeconfig that authenticates with `token` (written beside the control plane's files).
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn kubeconfig_with_token(&self, name: &str, token: &str, namespace: &str) -> Result<PathBuf, Error> {
        let path = self.dir.join(format!("{name}.kubeconfig"));
        let ca = self.dir.join("pki/ca.crt");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context: {{cluster: test, user: {name}, namespace: {namespace}}}\ncurrent-context: test\n",
            server = self.server(),
            ca = ca.display(),
        );
        write(&path, &text)?;
        Ok(path)
    }

    /// The admin's kubeconfig (group `system:masters`).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// A client as the admin.
    ///
    /// # Errors
    /// When the kubeconfig cannot be read.
    pub async fn admin_client(&self) -> Result<Client, Error> {
        client(&self.admin_kubeconfig()).await
    }

    /// Mints a token for ServiceAccount `namespace/name` (TokenRequest, one hour) and writes a
    /// kubeconfig that uses it: the component then has exactly the RBAC granted to it.
    ///
    /// # Errors
    /// When the ServiceAccount does not exist or the token cannot be minted.
    pub async fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> Result<PathBuf, Error> {
        let admin = self.admin_client().await?;
        let sas: Api<ServiceAccount> = Api::namespaced(admin, namespace);
        let req = TokenRequest {
            spec: Some(TokenRequestSpec { expiration_seconds: Some(3600), ..Default::default() }),
            ..Default::default()
        };
        let tr = sas.create_token_request(name, &PostParams::default(), &req).await?;
        let token = tr.status.and_then(|s| s.token).ok_or_else(|| Error::NoToken(format!("{namespace}/{name}")))?;
        self.kubeconfig_with_token(&format!("sa-{namespace}-{name}"), &token, namespace)
    }

    /// Creates a namespace (no error when it exists).
    ///
    /// # Errors
    /// When the API refuses for another reason.
    pub async fn namespace(&self, name: &str) -> Result<(), Error> {
        let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))
            .map_err(|e| Error::Build(e.to_string()))?;
        match Api::<Namespace>::all(self.admin_client().await?).create(&PostParams::default(), &ns).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// `kubectl auth can-i VERB RESOURCE [-n NAMESPACE] --as USER --as-group GROUPS`: asks the
    /// authorizer through a SubjectAccessReview. `resource` may carry a subresource
    /// (`pods/proxy`) and a group (`tunnelpolicies.tunnelgate.io`).
    ///
    /// # Errors
    /// When the review cannot be created.
    pub async fn can(&self, access: &Access<'_>) -> Result<bool, Error> {
        let (resource, subresource) = match access.resource.split_once('/') {
            Some((r, s)) => (r, Some(s.to_owned())),
            None => (access.resource, None),
        };
        let (resource, group) = match resource.split_once('.') {
            Some((r, g)) => (r, g),
            None => (resource, ""),
        };
        let sar = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(access.user.to_owned()),
                groups: Some(access.groups.iter().map(|g| (*g).to_owned()).collect()),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(access.verb.to_owned()),
                    group: Some(group.to_owned()),
                    resource: Some(resource.to_owned()),
                    subresource,
                    namespace: access.namespace.map(str::to_owned),
                    name: access.name.map(str::to_owned),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: Api<SubjectAccessReview> = Api::all(self.admin_client().await?);
        let out = api.create(&PostParams::default(), &sar).await?;
        Ok(out.status.is_some_and(|s| s.allowed))
    }

    /// Runs the built `helm` against this control plane as the admin; returns its output.
    ///
    /// # Errors
    /// When helm cannot be started; a failing helm is `Ok` with `success == false`.
    pub async fn helm(&self, args: &[&str]) -> Result<std::process::Output, Error> {
        let home = self.dir.join("helm");
        tokio::process::Command::new(self.bin.join("helm"))
            .args(args)
            .env("KUBECONFIG", self.dir.join("admin.kubeconfig"))
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(io("running helm"))
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.controllers = None;
        self.apiserver = None;
        self.etcd = None;
        if std::env::var_os("E2E_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// One access question for [`ControlPlane::can`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Access<'a> {
    pub user: &'a str,
    pub groups: &'a [&'a str],
    pub verb: &'a str,
    pub resource: &'a str,
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
}

/// A client from a kubeconfig file.
///
/// # Errors
/// When the file cannot be read or names an unusable cluster.
pub async fn client(path: &Path) -> Result<Client, Error> {
    let kc = Kubeconfig::read_from(path)?;
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(cfg)?)
}

fn write(path: &Path, text: &str) -> Result<(), Error> {
    std::fs::write(path, text).map_err(io(format!("writing {}", path.display())))
}

fn random_token() -> Result<String, Error> {
    use std::io::Read;
    let mut b = [0u8; 24];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).map_err(io("/dev/urandom"))?;
    Ok(hex::encode(b))
}
