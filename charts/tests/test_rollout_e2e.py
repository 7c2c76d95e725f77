"""A proxy rollout as the chart wires it, on one host: each proxy pod runs in a network namespace
of its own (as pods do), on a bridge with a real Kubernetes API server (the chart installed by
helm), the upstream and the clients. The binaries run with exactly the command, arguments and
environment the chart renders and the tokens of the chart's ServiceAccounts, for both topologies
(node-local DaemonSet and egress-gateway Deployment).

What it shows: a new proxy pod answers its probes only once it enforces the operator's
configuration; during a surge the old and the new pod serve side by side on the same port; the old
one turns unready at SIGTERM but keeps accepting for drainDelay and keeps its established tunnels,
so a client that follows the ready endpoints (as a Service does) is never refused. The kind suite
checks the same with real kubelets and Services."""

import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from conftest import find, render
from cluster import Cluster
from support import binary, connect, container_env, expand, free_port, http_status, status_of, until

NS = "tunnelgate"
TAG = f"{os.getpid() % 100000}"
BRIDGE = f"tgbr{TAG}"
HOST = "10.231.0.1"  # the bridge: API server, upstream, operator
CLIENTS = {"web": "10.231.0.21", "other": "10.231.0.22"}


def sh(*args):
    subprocess.run(args, check=True, capture_output=True)


class Network:
    """A bridge in the host namespace and one network namespace per pod attached to it."""

    def __init__(self):
        if os.geteuid() != 0:
            pytest.fail("this test needs root (network namespaces); CI and scripts/test run as root")
        self.pods = []
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{HOST}/24", "dev", BRIDGE)
        for ip in CLIENTS.values():
            sh("ip", "addr", "add", f"{ip}/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")

    def pod(self, n):
        """A namespace with address 10.231.0.(10+n), its default route via the bridge."""
        ns, veth, ip = f"tgpod{TAG}-{n}", f"tgv{TAG}-{n}", f"10.231.0.{10 + n}"
        sh("ip", "netns", "add", ns)
        self.pods.append((ns, veth))
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", veth, "master", BRIDGE, "up")
        for cmd in (["addr", "add", f"{ip}/24", "dev", "eth0"], ["link", "set", "eth0", "up"],
                    ["link", "set", "lo", "up"], ["route", "add", "default", "via", HOST]):
            sh("ip", "netns", "exec", ns, "ip", *cmd)
        return ns, ip

    def close(self):
        for ns, veth in self.pods:
            subprocess.run(["ip", "link", "del", veth], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


def tunnel(client_ip, proxy, target):
    """An established CONNECT tunnel (the socket), or None."""
    s, head = connect(client_ip, proxy, target)
    if head.startswith(b"HTTP/1.1 200"):
        return s
    s.close()
    return None


def echo_roundtrip(s, payload):
    s.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    return got == payload


@pytest.fixture
def net():
    n = Network()
    procs = []
    yield n, procs
    for p in reversed(procs):
        if isinstance(p, Cluster):
            p.close()
        elif p.poll() is None:
            p.kill()
            p.wait()
    n.close()


@pytest.mark.parametrize("topology", ["DaemonSet", "Deployment"])
def test_rollout_never_refuses_a_client(net, topology, tmp_path):
    network, procs = net
    p_port, p_admin, o_admin = free_port(), free_port(), free_port()
    values = {
        "proxy": {"kind": topology, "port": p_port, "adminPort": p_admin, "drainDelay": "1s", "drainTimeout": "10s",
                  "terminationGracePeriodSeconds": 15},
        "operator": {"adminPort": o_admin, "debounce": "50ms"},
        "config": {"addressGrants": [{"namespaces": ["shop"], "cidrs": [f"{HOST}/32"]}]},
    }
    docs = render(values, name="tg", namespace=NS)
    proxy_kind = "Deployment" if topology == "Deployment" else "DaemonSet"
    workload = find(docs, proxy_kind, "-proxy")
    svc = find(docs, "Service", "-proxy")
    assert svc["spec"]["internalTrafficPolicy"] == ("Cluster" if topology == "Deployment" else "Local")
    strategy = workload["spec"]["strategy" if topology == "Deployment" else "updateStrategy"]["rollingUpdate"]
    assert strategy == {"maxSurge": 1, "maxUnavailable": 0}, "the new pod comes up beside the old one"

    # The API server (the chart installed) and an echo upstream on the bridge.
    cluster = Cluster(bind=HOST)
    procs.append(cluster)
    api = cluster.admin
    cluster.namespace("shop")
    cluster.helm_install("tg", NS, values)
    echo = socket.socket()
    echo.bind((HOST, 0))
    echo.listen(128)

    def serve():
        while True:
            try:
                c, _ = echo.accept()
            except OSError:
                return
            threading.Thread(target=lambda c=c: [c.sendall(b) for b in iter(lambda: c.recv(4096), b"")], daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    target = echo.getsockname()

    def start(kind, suffix, pod, netns=None):
        spec = find(docs, kind, suffix)["spec"]["template"]["spec"]
        c = spec["containers"][0]
        env = container_env(c, pod)
        # The pod's ServiceAccount token, as the kubelet mounts it.
        env_base = {**os.environ, "KUBECONFIG": str(cluster.service_account_kubeconfig(NS, spec["serviceAccountName"]))}
        cmd = cluster.volumes(NS, spec, c, pod) + [str(binary(c["command"][0]))] + expand(c.get("args", []), env)
        if netns:
            cmd = ["ip", "netns", "exec", netns] + cmd
        p = subprocess.Popen(cmd, env={**env_base, **env}, stderr=open(tmp_path / f"{pod}.log", "w"))
        procs.append(p)
        return p

    def proxy_pod(name, ip):
        """The Pod object the kubelet would report, so the operator long-polls this proxy."""
        labels = {**workload["spec"]["template"]["metadata"]["labels"]}
        api.run_pod(NS, {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
            "spec": {"nodeName": "node-1", "containers": [{"name": "proxy", "image": "x"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
        })

    c = workload["spec"]["template"]["spec"]["containers"][0]
    ready_path = c["readinessProbe"]["httpGet"]["path"]

    # Readiness ordering: the first proxy pod starts before any configuration exists; it must not
    # be Ready (nor answer its probes) until the operator's render has arrived.
    ns_a, ip_a = network.pod(1)
    old = start(proxy_kind, "-proxy", "tg-proxy-a", ns_a)
    proxy_pod("tg-proxy-a", ip_a)
    time.sleep(1.5)
    assert http_status(p_admin, ready_path, ip_a) != 200, "Ready before any configuration was loaded"
    assert old.poll() is None, "the proxy waits for its configuration instead of exiting"
    start("Deployment", "-operator", "tg-operator-0")
    try:
        until("old proxy ready", 60, lambda: http_status(p_admin, ready_path, ip_a) == 200)
    except AssertionError:
        for log in ("tg-operator-0.log", "tg-proxy-a.log"):
            text = (tmp_path / log).read_text() if (tmp_path / log).exists() else ""
            print(f"--- {log}\n" + "\n".join(text.splitlines()[-20:]))
        raise

    for name, app, ip in [("web-1", "web", CLIENTS["web"]), ("other-1", "other", CLIENTS["other"])]:
        api.run_pod("shop", {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": app}},
            "spec": {"containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
        })
    api.call("POST", "/apis/tunnelgate.io/v1alpha1/namespaces/shop/tunnelpolicies", {
        "apiVersion": "tunnelgate.io/v1alpha1", "kind": "TunnelPolicy", "metadata": {"name": "web-echo"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "action": "Allow",
                 "destinations": [{"cidrs": [f"{HOST}/32"], "ports": [target[1]]}]},
    })
    until("web allowed", 20, lambda: connect_status_via(CLIENTS["web"], (ip_a, p_port), target) == 200)
    assert connect_status_via(CLIENTS["other"], (ip_a, p_port), target) == 403, "identity is the pod's own address"
    until("Loaded 1/1", 20, lambda: loaded(api) == {"loaded": 1, "total": 1})

    # A tunnel established through the old pod before the rollout.
    long_lived = tunnel(CLIENTS["web"], (ip_a, p_port), target)
    assert long_lived and echo_roundtrip(long_lived, b"before")

    # Clients follow the ready endpoints, as the Service does, and connect all along.
    endpoints = {ip_a: True}
    stop, results = threading.Event(), []

    def clients():
        while not stop.is_set():
            ready = [ip for ip, ok in list(endpoints.items()) if ok]
            if not ready:
                results.append(("no endpoint", None))
            else:
                ip = ready[len(results) % len(ready)]
                results.append((ip, connect_status_via(CLIENTS["web"], (ip, p_port), target)))
            time.sleep(0.02)

    pod_of = {ip_a: "tg-proxy-a"}

    def probe(ip):
        """The kubelet's readiness probe: the result decides the endpoint and, on every change, the
        pod's Ready condition in the API, as a kubelet reports it."""
        reported = None
        while not stop.is_set():
            ready = http_status(p_admin, ready_path, ip) == 200
            endpoints[ip] = ready
            if ready != reported:
                status = "True" if ready else "False"
                api.call("PATCH", f"/api/v1/namespaces/{NS}/pods/{pod_of[ip]}/status",
                         {"status": {"conditions": [{"type": "Ready", "status": status}]}},
                         content_type="application/merge-patch+json")
                reported = ready
            time.sleep(0.1)

    threads = [threading.Thread(target=clients), threading.Thread(target=probe, args=(ip_a,))]
    for t in threads:
        t.start()

    # Surge: the new pod on the same port, beside the old one.
    ns_b, ip_b = network.pod(2)
    start(proxy_kind, "-proxy", "tg-proxy-b", ns_b)
    proxy_pod("tg-proxy-b", ip_b)
    pod_of[ip_b] = "tg-proxy-b"
    endpoints[ip_b] = False
    probe_b = threading.Thread(target=probe, args=(ip_b,))
    probe_b.start()
    threads.append(probe_b)
    until("new proxy ready", 20, lambda: endpoints[ip_b])
    until("the new pod reported Ready in the API", 5, lambda: ready_condition(api, "tg-proxy-b") == "True")
    until("Loaded 2/2", 20, lambda: loaded(api) == {"loaded": 2, "total": 2})
    until("both pods served clients", 10, lambda: {ip for ip, st in results if st == 200} >= {ip_a, ip_b})

    # Only then does the old pod go: unready at once, accepting for drainDelay, tunnels kept.
    old.send_signal(signal.SIGTERM)
    until("old proxy unready", 5, lambda: not endpoints[ip_a])
    until("the old pod reported not Ready in the API", 5, lambda: ready_condition(api, "tg-proxy-a") == "False")
    assert echo_roundtrip(long_lived, b"after SIGTERM"), "an established tunnel keeps flowing while draining"
    long_lived.close()
    assert old.wait(timeout=15) == 0, "the old proxy drains and exits 0"
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()

    failures = [(ip, st) for ip, st in results if st != 200]
    assert not failures, f"{len(failures)} of {len(results)} client connects failed during the rollout: {failures[:5]}"
    assert len(results) > 50
    assert connect_status_via(CLIENTS["web"], (ip_b, p_port), target) == 200


def connect_status_via(client_ip, proxy, target):
    """The status of a CONNECT, or why the proxy could not be reached (kept in failure reports)."""
    try:
        s, head = connect(client_ip, proxy, target)
    except OSError as e:
        return f"refused: {e}"
    s.close()
    return status_of(head)


def ready_condition(api, pod):
    p = api.call("GET", f"/api/v1/namespaces/{NS}/pods/{pod}") or {}
    return next((c["status"] for c in (p.get("status") or {}).get("conditions", []) if c["type"] == "Ready"), None)


def loaded(api):
    tp = api.call("GET", "/apis/tunnelgate.io/v1alpha1/namespaces/shop/tunnelpolicies/web-echo")
    return ((tp or {}).get("status") or {}).get("proxies")
