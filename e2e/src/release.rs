//! The chart installed for real: a [`ControlPlane`] with `helm install` of `charts/tunnelgate`
//! (CRDs admitted by the API server, the chart's RBAC), and kubeconfigs holding tokens of the
//! chart's own ServiceAccounts, so the operator and the proxies run with exactly what the chart
//! grants them.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;

use crate::controlplane::{repo_root, ControlPlane, Error, Options};
use crate::kubelet::Kubelet;

/// The namespace and name of the release the suites install.
pub const NAMESPACE: &str = "tunnelgate";
pub const RELEASE: &str = "tunnelgate";

/// `helm --set` values of an egress-gateway release installed beside a first release, as the chart
/// documents it: the first installs the CRDs and owns policy status.
pub const SECOND_RELEASE_GATEWAY: [&str; 6] =
    ["--set", "crds.enabled=false", "--set", "operator.policyStatus=false", "--set", "proxy.kind=Deployment"];

/// A control plane with the chart installed as release `tunnelgate` in namespace `tunnelgate`.
pub struct Release {
    /// The admin's client (the test acting as the platform team, or as a namespace owner).
    pub admin: Client,
    /// A kubeconfig with the token of the operator's ServiceAccount.
    pub operator_kubeconfig: PathBuf,
    /// A kubeconfig with the token of the proxies' ServiceAccount.
    pub proxy_kubeconfig: PathBuf,
    _kubelet: Kubelet,
    /// Last, so the clients above are gone before the processes stop.
    pub cp: ControlPlane,
}

impl Release {
    /// Starts a control plane in `dir`, creates `namespaces`, and installs the chart with `values`
    /// (`helm --set` expressions) and `--wait`-free semantics: every object is created, no pod runs
    /// unless the test plays its kubelet.
    ///
    /// # Errors
    /// When the control plane does not start or helm fails (its output is in the error).
    pub async fn install(dir: &Path, namespaces: &[&str], values: &[&str], opts: Options) -> Result<Self, Error> {
        let cp = ControlPlane::start(dir, opts).await?;
        for ns in std::iter::once(&NAMESPACE).chain(namespaces) {
            cp.namespace(ns).await?;
        }
        let chart = repo_root().join("charts/tunnelgate");
        let chart = chart.to_string_lossy();
        let mut args = vec!["install", RELEASE, &chart, "--namespace", NAMESPACE];
        for v in values {
            args.push("--set");
            args.push(v);
        }
        let out = cp.helm(&args).await?;
        if !out.status.success() {
            return Err(Error::Build(format!(
                "helm install: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let operator_kubeconfig = cp.service_account_kubeconfig(NAMESPACE, &format!("{RELEASE}-operator")).await?;
        let proxy_kubeconfig = cp.service_account_kubeconfig(NAMESPACE, &format!("{RELEASE}-proxy")).await?;
        let admin = cp.admin_client().await?;
        let _kubelet = Kubelet::start(admin.clone());
        Ok(Self { admin, operator_kubeconfig, proxy_kubeconfig, _kubelet, cp })
    }

    /// A kubeconfig for a person on call (ServiceAccount `oncall` in namespace `ops`) bound, as
    /// the chart's documentation says, to the ClusterRole and the Role `<release>-inspector`: what
    /// `kubectl tunnelgate status` and `explain` run with.
    ///
    /// # Errors
    /// When the API refuses one of the objects.
    pub async fn inspector_kubeconfig(&self) -> Result<PathBuf, Error> {
        self.cp.namespace("ops").await?;
        let inspector = format!("{RELEASE}-inspector");
        let subject = serde_json::json!([{"kind": "ServiceAccount", "name": "oncall", "namespace": "ops"}]);
        let objects = [
            (
                "/api/v1/namespaces/ops/serviceaccounts",
                serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "oncall"}}),
            ),
            (
                "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
                serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                    "metadata": {"name": "oncall-inspector"}, "subjects": subject,
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": inspector}}),
            ),
            (
                &format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{NAMESPACE}/rolebindings"),
                serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                    "metadata": {"name": "oncall-inspector"}, "subjects": subject,
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": inspector}}),
            ),
        ];
        for (path, body) in objects {
            self.create_raw(path, &body).await?;
        }
        self.cp.service_account_kubeconfig("ops", "oncall").await
    }

    /// POSTs one object as the admin.
    ///
    /// # Errors
    /// When the API refuses it.
    pub async fn create_raw(&self, path: &str, body: &serde_json::Value) -> Result<(), Error> {
        let req = http::Request::post(path)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(body).map_err(|e| Error::Build(e.to_string()))?)
            .map_err(|e| Error::Build(e.to_string()))?;
        self.admin.request_text(req).await?;
        Ok(())
    }

    /// Replaces the base document the chart rendered (`<release>-base`, key `config.yaml`) with
    /// `config`, as a platform team editing its values would.
    ///
    /// # Errors
    /// When the API refuses the write.
    pub async fn set_base(&self, config: &str) -> Result<(), Error> {
        let cms: Api<ConfigMap> = Api::namespaced(self.admin.clone(), NAMESPACE);
        let patch = serde_json::json!({"data": {"config.yaml": config}});
        cms.patch(&format!("{RELEASE}-base"), &PatchParams::default(), &Patch::Merge(&patch)).await?;
        Ok(())
    }
}
