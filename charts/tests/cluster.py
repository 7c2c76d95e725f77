"""A real Kubernetes control plane for the chart's end-to-end tests: the e2e crate's `controlplane`
binary (etcd, kube-apiserver with RBAC and ServiceAccount tokens, kube-controller-manager, built
from their Go modules by controlplane/build.sh), the chart installed into it by the built helm, and
kubeconfigs holding tokens of the chart's ServiceAccounts, so each binary runs with exactly the
chart's RBAC. The same harness the Rust suites use (e2e/src/controlplane.rs)."""

import base64
import json
import os
import pathlib
import signal
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "tunnelgate"


def target_binary(name: str) -> pathlib.Path:
    p = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "debug" / name
    assert p.is_file(), f"{p} is not built: run `cargo build --workspace` first (scripts/test does)"
    return p


class Api:
    """A small client of the API server: JSON in and out, a bearer token, the cluster's CA."""

    def __init__(self, server: str, token: str, ca: str):
        self.base, self.token = server, token
        self.ctx = ssl.create_default_context(cafile=ca)

    def call(self, method, path, body=None, content_type="application/json"):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": content_type, "Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=10, context=self.ctx) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise AssertionError(f"{method} {path}: {e.code} {e.read().decode(errors='replace')}") from None

    def run_pod(self, namespace, pod):
        """Creates the pod, then reports its status as its kubelet would (a create's status is ignored)."""
        status = pod.pop("status", None)
        self.call("POST", f"/api/v1/namespaces/{namespace}/pods", pod)
        if status:
            self.call("PATCH", f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}/status",
                      {"status": status}, content_type="application/merge-patch+json")


class Cluster:
    """A control plane listening on `bind` (loopback, or the host's end of a test bridge)."""

    def __init__(self, bind: str = "127.0.0.1"):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = pathlib.Path(self.tmp.name)
        self.log = open(self.dir / "controlplane.log", "w")
        self.proc = subprocess.Popen([str(target_binary("controlplane")), "--bind", bind, str(self.dir / "cp")],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)
        env = {}
        deadline = time.monotonic() + 180
        while len(env) < 2:
            line = self.proc.stdout.readline()
            if not line:
                self.close()
                raise AssertionError("the control plane did not start:\n" + (self.dir / "controlplane.log").read_text())
            if line.startswith("export "):
                k, v = line[len("export "):].strip().split("=", 1)
                env[k] = v
            assert time.monotonic() < deadline, "the control plane did not start in time"
        self.bin = pathlib.Path(env["TUNNELGATE_CONTROLPLANE_BIN"])
        self.kubeconfig = pathlib.Path(env["KUBECONFIG"])
        kc = yaml.safe_load(self.kubeconfig.read_text())
        self.server = kc["clusters"][0]["cluster"]["server"]
        self.ca = kc["clusters"][0]["cluster"]["certificate-authority"]
        self.admin = Api(self.server, kc["users"][0]["user"]["token"], self.ca)

    def namespace(self, name, labels=None):
        if self.admin.call("GET", f"/api/v1/namespaces/{name}") is None:
            self.admin.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                          "metadata": {"name": name, "labels": labels or {}}})

    def helm_install(self, release: str, namespace: str, values: dict):
        values_file = self.dir / f"{release}-values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        home = self.dir / "helm"
        out = subprocess.run([str(self.bin / "helm"), "install", release, str(CHART), "--namespace", namespace,
                              "--create-namespace", "-f", str(values_file)],
                             env={**os.environ, "KUBECONFIG": str(self.kubeconfig), "HELM_CACHE_HOME": str(home / "cache"),
                                  "HELM_CONFIG_HOME": str(home / "config"), "HELM_DATA_HOME": str(home / "data")},
                             capture_output=True, text=True)
        assert out.returncode == 0, f"helm install: {out.stdout}{out.stderr}"

    def service_account_kubeconfig(self, namespace: str, name: str) -> pathlib.Path:
        """A kubeconfig with a fresh token (TokenRequest) of ServiceAccount namespace/name."""
        tr = self.admin.call("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
                             {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                              "spec": {"expirationSeconds": 3600}})
        path = self.dir / f"{namespace}-{name}.kubeconfig"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": self.server, "certificate-authority": self.ca}}],
            "users": [{"name": name, "user": {"token": tr["status"]["token"]}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": name, "namespace": namespace}}],
            "current-context": "test",
        }))
        return path

    def volumes(self, namespace: str, pod_spec: dict, container: dict, name: str) -> list[str]:
        """The command prefix that gives a process the container's Secret volumes as its kubelet
        would mount them: each Secret's keys are files in a directory of the test's own, laid over
        this machine's /etc (every mountPath of the chart is under it) in a mount namespace of the
        process's own, so nothing is written to the machine's /etc. A snapshot taken at start: later
        changes to the Secrets do not reach the process."""
        secrets = {v["name"]: v["secret"] for v in pod_spec.get("volumes", []) if "secret" in v}
        upper, work = self.dir / f"{name}-etc", self.dir / f"{name}-etc-work"
        work.mkdir(parents=True, exist_ok=True)
        for m in container.get("volumeMounts", []):
            src = secrets.get(m["name"])
            if src is None:
                continue
            assert m["mountPath"].startswith("/etc/"), m
            target = upper / m["mountPath"].removeprefix("/etc/")
            target.mkdir(parents=True, exist_ok=True)
            secret = self.admin.call("GET", f"/api/v1/namespaces/{namespace}/secrets/{src['secretName']}")
            assert secret is not None or src.get("optional"), f"Secret {src['secretName']} of volume {m['name']} is missing"
            for key, value in ((secret or {}).get("data") or {}).items():
                (target / key).write_bytes(base64.b64decode(value))
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                f'mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={work} /etc && exec "$@"', "sh"]

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.tmp.cleanup()
