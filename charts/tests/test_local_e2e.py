"""Local end-to-end of the chart's wiring: the chart is installed by helm into a real Kubernetes
control plane (charts/tests/cluster.py), and the operator and proxy binaries run with exactly the
command, arguments and environment the chart renders (with $(VAR) expanded as the kubelet does) and
the tokens of the chart's ServiceAccounts. A chart that passes the offline checks but wires the
binaries wrongly, or grants them too little, fails here."""

import base64
import json
import os
import socket
import subprocess
import threading
import urllib.request

import pytest

from cluster import Cluster
from conftest import find, render
from support import NS, binary, connect, connect_status, container_env, expand, free_port, http_status, status_of, until

@pytest.fixture
def world():
    procs = []
    cluster = Cluster()
    # An echo upstream on 127.0.0.2.
    echo = socket.socket()
    echo.bind(("127.0.0.2", 0))
    echo.listen(64)

    def serve():
        while True:
            try:
                c, _ = echo.accept()
            except OSError:
                return
            threading.Thread(target=lambda c=c: [c.sendall(b) for b in iter(lambda: c.recv(4096), b"")], daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield {"cluster": cluster, "dir": cluster.dir, "procs": procs, "echo": echo.getsockname()}
    for p in procs:
        p.kill()
        p.wait()
    echo.close()
    cluster.close()


def test_chart_wired_binaries_enforce_a_policy(world):
    p_port, p_admin, o_admin = free_port(), free_port(), free_port()
    values = {
        "proxy": {"port": p_port, "adminPort": p_admin, "drainDelay": "0s", "drainTimeout": "1s", "terminationGracePeriodSeconds": 5},
        "operator": {"adminPort": o_admin, "debounce": "100ms"},
        # The echo server is on loopback: refused space, opened for this namespace only.
        "config": {"addressGrants": [{"namespaces": ["shop"], "cidrs": ["127.0.0.2/32"]}]},
    }
    docs = render(values, name="tg", namespace=NS)
    cluster = world["cluster"]
    api = cluster.admin
    cluster.namespace("shop")
    cluster.helm_install("tg", NS, values)

    for kind, suffix, pod in [("Deployment", "-operator", "tg-operator-0"), ("DaemonSet", "-proxy", "tg-proxy-node1")]:
        spec = find(docs, kind, suffix)["spec"]["template"]["spec"]
        c = spec["containers"][0]
        env = container_env(c, pod)
        # The pod's ServiceAccount, as the kubelet would mount its token.
        kubeconfig = cluster.service_account_kubeconfig(NS, spec["serviceAccountName"])
        env_base = {**os.environ, "KUBECONFIG": str(kubeconfig), "TUNNELGATE_LOG": "info"}
        cmd = cluster.volumes(NS, spec, c, pod) + [str(binary(c["command"][0]))] + expand(c.get("args", []), env)
        world["procs"].append(subprocess.Popen(cmd, env={**env_base, **env}, stderr=open(world["dir"] / f"{pod}.log", "w")))

    # The probes the chart declares answer on the ports it declares.
    op = find(docs, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"][0]
    ds = find(docs, "DaemonSet", "-proxy")["spec"]["template"]["spec"]["containers"][0]
    port_of = lambda c, name: next(p["containerPort"] for p in c["ports"] if p["name"] == name)
    until("operator ready", 20, lambda: http_status(port_of(op, "admin"), op["readinessProbe"]["httpGet"]["path"]) == 200)
    until("proxy ready", 20, lambda: http_status(port_of(ds, "admin"), ds["readinessProbe"]["httpGet"]["path"]) == 200)
    # /config answers only the token of the Secret the chart generated, mounted as the chart says.
    admin = port_of(ds, "admin")
    assert http_status(admin, "/config") == 401
    secret = api.call("GET", f"/api/v1/namespaces/{NS}/secrets/tg-tunnelgate-admin-token")
    token = base64.b64decode(secret["data"]["token"]).decode()
    req = urllib.request.Request(f"http://127.0.0.1:{admin}/config", headers={"X-Tunnelgate-Admin-Token": token})
    with urllib.request.urlopen(req, timeout=2) as r:
        assert r.status == 200 and json.loads(r.read())["generation"] >= 1
    proxy_port = port_of(ds, "proxy")
    echo = world["echo"]
    assert connect_status("127.0.0.21", proxy_port, echo) == 403, "default deny"

    for name, app, ip in [("web-1", "web", "127.0.0.21"), ("other-1", "other", "127.0.0.22")]:
        api.run_pod("shop", {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": app}},
            "spec": {"containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
        })
    api.call("POST", "/apis/tunnelgate.io/v1alpha1/namespaces/shop/tunnelpolicies", {
        "apiVersion": "tunnelgate.io/v1alpha1", "kind": "TunnelPolicy", "metadata": {"name": "web-echo"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "action": "Allow",
                 "destinations": [{"cidrs": ["127.0.0.2/32"], "ports": [echo[1]]}]},
    })
    until("web allowed", 20, lambda: connect_status("127.0.0.21", proxy_port, echo) == 200)
    assert connect_status("127.0.0.22", proxy_port, echo) == 403
    # The ConfigMap the operator wrote is the one the proxy's arguments name.
    cm_arg = next(a for a in ds["args"] if a.startswith("--config-map="))
    cm_ns, cm_name = cm_arg.split("=", 1)[1].replace("$(POD_NAMESPACE)", NS).split("/")
    rendered = api.call("GET", f"/api/v1/namespaces/{cm_ns}/configmaps/{cm_name}")
    assert "shop/web-echo" in rendered["data"]["config.yaml"]
    # The Lease the chart's RBAC names is the one the operator holds.
    lease_rule = next(r for r in find(docs, "Role", "-operator")["rules"] if "leases" in r["resources"] and "resourceNames" in r)
    lease = api.call("GET", f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{lease_rule['resourceNames'][0]}")
    assert lease and lease["spec"]["holderIdentity"] == "tg-operator-0"
