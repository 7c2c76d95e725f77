#!/usr/bin/env python3
"""Propagation at scale: from an API write to enforcement on the proxy.

Loads namespaces, pods and TunnelPolicies into a Kubernetes API — the emulator (e2e/emulator.py)
or, with --api real, the real kube-apiserver and etcd the tests build (e2e's `controlplane`) —
starts the real operator and proxy (release builds), then measures, per trial, the time from
the API write to the first CONNECT from the pod's own address that gets the new answer (polled
every 20 ms):

  create   an Allow policy for a probe pod            → 200
  delete   that policy                                → 403
  relabel  a pod into an existing Allow policy        → 200 (and back out → 403, not timed)

and reports p50 / p95 / p99 / max, status writes per change (counted by the emulator), the
operator's reconcile time and RSS, the rendered config's size and the proxy's RSS. Run alone on
the machine:

  .venv/bin/python bench/propagation.py --pods 2000 --policies 200 --trials 20
  .venv/bin/python bench/propagation.py --pods 10000 --policies 1000 --trials 20
  .venv/bin/python bench/propagation.py --pods 10000 --policies 1000 --trials 20 --api real
  .venv/bin/python bench/propagation.py --pods 150000 --policies 10000 --namespaces 500 \
      --nodes 5000 --per-node --gateway --trials 10

--gateway runs the proxy as an egress gateway does (the whole-cluster document, merged from its
shards when it passes one ConfigMap) instead of node-0's proxy. With --api real, pods are created
and then given a Running status as a kubelet would (two requests each); status writes are not
counted (the emulator's counters only).

Not part of the test suite (it takes minutes and measures time); the suite checks correctness at
a size CI affords.
"""

import argparse
import asyncio
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import re
import ssl

import aiohttp
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
NS = "tunnelgate"
ECHO_HOST = "127.0.0.2"


def pod_ip(i):
    # 127.1.0.0/16 onward: every address of 127/8 is loopback on Linux.
    return f"127.{1 + i // 65536}.{(i // 256) % 256}.{i % 256}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect_status(client_ip, proxy_port, target):
    s = socket.socket()
    s.settimeout(2)
    try:
        s.bind((client_ip, 0))
        s.connect(("127.0.0.1", proxy_port))
        s.sendall(f"CONNECT {target[0]}:{target[1]} HTTP/1.1\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(256)
            if not chunk:
                break
            head += chunk
        return int(head.split(b" ")[1]) if head else 0
    except OSError:
        return 0
    finally:
        s.close()


def rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metric(text, name):
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name))


class Api:
    def __init__(self, base, token=None, ca=None):
        self.base = base
        self.real = token is not None
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=ca), limit=64) if ca else None
        self.session = aiohttp.ClientSession(connector=connector)

    async def call(self, method, path, body=None, ctype="application/json"):
        for attempt in range(100):
            async with self.session.request(method, self.base + path, data=json.dumps(body) if body is not None else None,
                                            headers={"Content-Type": ctype, **self.headers}) as r:
                text = await r.text()
                # A real API server refuses pods until the namespace's ServiceAccount exists, and
                # sheds load with 429: both pass.
                transient = r.status == 429 or (r.status == 403 and "serviceaccount" in text.lower())
                if transient and attempt < 99:
                    await asyncio.sleep(0.1)
                    continue
                if r.status >= 400 and r.status != 404:
                    raise RuntimeError(f"{method} {path}: {r.status} {text[:200]}")
                return json.loads(text) if text else None

    async def close(self):
        await self.session.close()

    async def create_pod(self, ns, body):
        await self.call("POST", f"/api/v1/namespaces/{ns}/pods", body)
        if self.real:
            # The API server drops the status of a create; a kubelet reports it afterwards.
            await self.call("PATCH", f"/api/v1/namespaces/{ns}/pods/{body['metadata']['name']}/status",
                            {"status": body["status"]}, "application/merge-patch+json")

    async def stats(self):
        return {} if self.real else await self.call("GET", "/_emulator/stats")


def policy(ns, name, labels, destination):
    return {"apiVersion": "tunnelgate.io/v1alpha1", "kind": "TunnelPolicy", "metadata": {"name": name, "namespace": ns},
            "spec": {"podSelector": {"matchLabels": labels}, "action": "Allow", "destinations": [destination]}}


def pod(ns, name, labels, ip, node="node-0"):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


async def load(api, pods, policies, namespaces, nodes):
    """Background objects: every policy selects pods/policies pods and allows a host of its own."""
    per = max(1, pods // policies)
    sem = asyncio.Semaphore(32)

    async def post(path, body):
        async with sem:
            await api.call("POST", path, body)

    async def create_pod(ns, body):
        async with sem:
            await api.create_pod(ns, body)

    await asyncio.gather(*(post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"ns-{n}"}})
                           for n in range(namespaces)))
    jobs = []
    for i in range(pods):
        ns = f"ns-{(i // per) % namespaces}"
        jobs.append(create_pod(ns, pod(ns, f"pod-{i}", {"app": f"app-{i // per}"}, pod_ip(i), f"node-{i % nodes}")))
    for p in range(policies):
        ns = f"ns-{p % namespaces}"
        jobs.append(post(f"/apis/tunnelgate.io/v1alpha1/namespaces/{ns}/tunnelpolicies",
                         policy(ns, f"policy-{p}", {"app": f"app-{p}"}, {"hosts": [f"svc-{p}.example.com"], "ports": [443]})))
    await asyncio.gather(*jobs)


async def until(what, secs, f, every=0.02):
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        if await f():
            return
        await asyncio.sleep(every)
    raise RuntimeError(f"timed out: {what}")


def summary(ms):
    ms = sorted(ms)
    q = lambda p: ms[min(len(ms) - 1, int(round((len(ms) - 1) * p)))]
    return f"{q(0.5):.0f} / {q(0.95):.0f} / {q(0.99):.0f} / {ms[-1]:.0f}"


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pods", type=int, default=2000)
    ap.add_argument("--policies", type=int, default=200)
    ap.add_argument("--namespaces", type=int, default=50)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--nodes", type=int, default=1, help="pods are spread over this many nodes; the proxy stands for node-0")
    ap.add_argument("--per-node", action="store_true", help="the operator renders a document per node; the proxy reads node-0's")
    ap.add_argument("--gateway", action="store_true", help="the proxy reads the whole-cluster document, as an egress gateway does")
    ap.add_argument("--api", choices=["emulator", "real"], default="emulator",
                    help="the API the operator and proxy talk to: the emulator, or a real kube-apiserver and etcd")
    ap.add_argument("--debounce", default="50ms")
    ap.add_argument("--debounce-max", default="250ms")
    ap.add_argument("--target-dir", default=os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target")))
    args = ap.parse_args()
    bins = pathlib.Path(args.target_dir) / "release"
    for b in ("tunnelgate-operator", "tunnelgate-proxy"):
        if not (bins / b).is_file():
            sys.exit(f"{bins / b} missing: cargo build --release -p tunnelgate-operator -p tunnelgate-proxy")

    tmp = tempfile.TemporaryDirectory()
    d = pathlib.Path(tmp.name)
    procs = []
    try:
        if args.api == "real":
            api, kubeconfig = await start_control_plane(d, procs)
        else:
            port_file = d / "emulator.port"
            procs.append(subprocess.Popen([sys.executable, str(ROOT / "e2e/emulator.py"), "--port-file", str(port_file)],
                                          stderr=open(d / "emulator.log", "w")))
            while not port_file.exists():
                time.sleep(0.05)
            base_url = f"http://127.0.0.1:{int(port_file.read_text())}"
            api = Api(base_url)
            kubeconfig = d / "kubeconfig"
            kubeconfig.write_text(
                "apiVersion: v1\nkind: Config\n"
                f"clusters: [{{name: emu, cluster: {{server: '{base_url}'}}}}]\n"
                "users: [{name: emu, user: {}}]\ncontexts: [{name: emu, context: {cluster: emu, user: emu}}]\ncurrent-context: emu\n")

        # The echo target and the base configuration.
        echo = socket.socket()
        echo.bind((ECHO_HOST, 0))
        echo.listen(1024)
        target = echo.getsockname()

        def drain():
            # Accept and close: an unaccepted backlog would fill up and stall the proxy's dials.
            while True:
                try:
                    c, _ = echo.accept()
                except OSError:
                    return
                c.close()

        threading.Thread(target=drain, daemon=True).start()
        p_port, p_admin, o_admin = free_port(), free_port(), free_port()
        base = (f"version: 1\nlisteners: [{{name: forward, bind: '127.0.0.1:{p_port}'}}]\nadmin: {{bind: '127.0.0.1:{p_admin}'}}\n"
                f"addressGrants: [{{namespaces: ['*'], cidrs: ['{ECHO_HOST}/32']}}]\n"
                "policy: {defaultAction: deny, denyPrivateAddresses: false}\nlogging: {accessLog: false}\n"
                "limits: {drainDelay: 0s, drainTimeout: 1s, maxConnections: 100000, maxConnectionsPerClient: 100000}\n")
        await api.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        await api.call("POST", f"/api/v1/namespaces/{NS}/configmaps",
                       {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tunnelgate-base"}, "data": {"config.yaml": base}})

        t0 = time.monotonic()
        await load(api, args.pods, args.policies, args.namespaces, args.nodes)
        load_s = time.monotonic() - t0
        # Probe pods, outside every background policy, each in a namespace of its own: one
        # namespace's pod changes wake a render at most once per churn interval (2 s), and a
        # relabel timed right after the previous trial's in the same namespace would measure that.
        probes = [(f"ns-{t % args.namespaces}", f"probe-{t}", pod_ip(args.pods + t)) for t in range(args.trials)]
        for ns, name, ip in probes:
            await api.create_pod(ns, pod(ns, name, {"app": name}, ip))
        # The relabel trials move probes into this policy (one per probe namespace).
        for ns in sorted({ns for ns, _, _ in probes}):
            await api.call("POST", f"/apis/tunnelgate.io/v1alpha1/namespaces/{ns}/tunnelpolicies",
                           policy(ns, "relabel-target", {"role": "mover"}, {"cidrs": [f"{ECHO_HOST}/32"], "ports": [target[1]]}))

        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "TUNNELGATE_LOG": "warn"}
        operator = subprocess.Popen([str(bins / "tunnelgate-operator"), "--namespace", NS, "--release", "tunnelgate",
                                     "--admin-bind", f"127.0.0.1:{o_admin}", "--debounce", args.debounce,
                                     "--debounce-max", args.debounce_max, "--leader-election", "false", "--tls-dir", str(d),
                                     "--config-per-node", "true" if args.per_node else "false"],
                                    env=env, stderr=open(d / "operator.log", "w"))
        procs.append(operator)
        proxy = subprocess.Popen([str(bins / "tunnelgate-proxy"), "--config-map", f"{NS}/tunnelgate-proxy"]
                                 + (["--node-name", "node-0"] if args.per_node and not args.gateway else []),
                                 env=env, stderr=open(d / "proxy.log", "w"))
        procs.append(proxy)
        t1 = time.monotonic()

        async def admin(port, path):
            async with api.session.get(f"http://127.0.0.1:{port}{path}") as r:
                return await r.text()

        async def proxy_up():
            try:
                return json.loads(await admin(p_admin, "/config")).get("render", 0) > 0
            except (aiohttp.ClientError, ValueError):
                return False

        await until("first render in force", 600, proxy_up, every=0.2)
        first_s = time.monotonic() - t1

        # Steady state before the trials: the first statuses of every policy written.
        async def settled():
            if api.real:
                # No write counters in the API: the operator's own, still for a second.
                before = metric(await admin(o_admin, "/metrics"), "tunnelgate_operator_status_writes_total")
                await asyncio.sleep(1.0)
                text = await admin(o_admin, "/metrics")
                return (metric(text, "tunnelgate_operator_status_writes_total") == before
                        and metric(text, "tunnelgate_operator_status_writes_pending") == 0)
            a = await api.stats()
            await asyncio.sleep(1.0)
            return a == await api.stats()

        await until("initial status writes done", 900, settled, every=0.1)
        loop = asyncio.get_running_loop()
        status_of = lambda ip: loop.run_in_executor(None, connect_status, ip, p_port, target)

        async def stats():
            return await api.stats()

        async def timed(write, ip, want):
            s0 = await stats()
            t = time.monotonic()
            await write()

            async def ok():
                return await status_of(ip) == want

            try:
                await until(f"{ip} → {want}", 30, ok)
            except RuntimeError:
                cm = await api.call("GET", f"/api/v1/namespaces/{NS}/configmaps/tunnelgate-proxy" + ("-node-node-0" if args.per_node and not args.gateway else ""))
                text = json.dumps(cm["data"])
                in_force = await admin(p_admin, "/config")
                print(f"diagnosis: ConfigMap render {cm['metadata']['annotations'].get('tunnelgate.io/render')}, "
                      f"lists {ip}: {ip in text}; proxy /config: {in_force[:300]}; CONNECT now: {await status_of(ip)}",
                      file=sys.stderr)
                raise
            ms = (time.monotonic() - t) * 1e3
            await asyncio.sleep(0.6)  # let the reconcile's status writes land before counting
            s1 = await stats()
            status_writes = sum(v - s0.get(k, 0) for k, v in s1.items() if k.endswith("/status"))
            return ms, status_writes

        results = {"create": [], "delete": [], "relabel": []}
        writes = {"create": [], "delete": [], "relabel": []}
        om0 = await admin(o_admin, "/metrics")
        for t, (ns, name, ip) in enumerate(probes):
            assert await status_of(ip) == 403, f"{name} allowed before its policy"
            path = f"/apis/tunnelgate.io/v1alpha1/namespaces/{ns}/tunnelpolicies"
            body = policy(ns, f"trial-{t}", {"app": name}, {"cidrs": [f"{ECHO_HOST}/32"], "ports": [target[1]]})
            ms, w = await timed(lambda: api.call("POST", path, body), ip, 200)
            results["create"].append(ms), writes["create"].append(w)
            ms, w = await timed(lambda: api.call("DELETE", f"{path}/trial-{t}"), ip, 403)
            results["delete"].append(ms), writes["delete"].append(w)
            pod_path = f"/api/v1/namespaces/{ns}/pods/{name}"
            ms, w = await timed(lambda: api.call("PATCH", pod_path, {"metadata": {"labels": {"role": "mover"}}},
                                                 "application/merge-patch+json"), ip, 200)
            results["relabel"].append(ms), writes["relabel"].append(w)
            await api.call("PATCH", pod_path, {"metadata": {"labels": {"role": None}}}, "application/merge-patch+json")
            await until(f"{name} out again", 30, lambda: _eq(status_of(ip), 403))
        om1 = await admin(o_admin, "/metrics")
        cm_name = "tunnelgate-proxy" + ("-node-node-0" if args.per_node and not args.gateway else "")
        cm = await api.call("GET", f"/api/v1/namespaces/{NS}/configmaps/{cm_name}")
        shards = json.loads(cm["data"]["shards.json"])["shards"] if "shards.json" in cm["data"] else []
        doc_bytes = 0 if shards else len(cm["data"]["config.yaml"])
        for s in shards:
            doc_bytes += len((await api.call("GET", f"/api/v1/namespaces/{NS}/configmaps/{s['name']}"))["data"]["config.yaml"])
        doc_kib = doc_bytes / 1024
        rec = "tunnelgate_operator_reconcile_duration_seconds"
        reconciles = metric(om1, rec + "_count") - metric(om0, rec + "_count")
        reconcile_ms = (metric(om1, rec + "_sum") - metric(om0, rec + "_sum")) / max(reconciles, 1) * 1e3
        cpu = "process_cpu_seconds_total"
        cpu_ms = (metric(om1, cpu) - metric(om0, cpu)) / max(reconciles, 1) * 1e3
        ev = "tunnelgate_operator_policy_evaluations_total"
        evaluated = (metric(om1, ev) - metric(om0, ev)) / max(reconciles, 1)

        print(f"\n{args.pods} pods / {args.policies} policies / {args.namespaces} namespaces / {args.nodes} nodes"
              f"{' (a document per node)' if args.per_node else ''}{', the proxy as a gateway' if args.gateway else ''}, "
              f"{'real kube-apiserver' if api.real else 'API emulator'}, debounce {args.debounce} "
              f"(max {args.debounce_max}), {args.trials} trials; loaded in {load_s:.0f} s, first render in force "
              f"after {first_s:.1f} s\n")
        print("| change | p50 / p95 / p99 / max ms | status writes per change (median, max) |")
        print("|---|---|---|")
        for k in results:
            w = f"{statistics.median(writes[k]):.0f}, {max(writes[k])}" if not api.real else "not counted"
            print(f"| {k} | {summary(results[k])} | {w} |")
        print(f"\noperator: {reconciles:.0f} reconciles, {reconcile_ms:.0f} ms each on average "
              f"(the operator's CPU: {cpu_ms:.0f} ms per reconcile, watches included), "
              f"{evaluated:.1f} of {args.policies} policies evaluated again per reconcile, RSS {rss_mib(operator.pid):.0f} MiB; "
              f"proxy RSS {rss_mib(proxy.pid):.0f} MiB; the proxy's rendered config {doc_kib:.0f} KiB"
              f"{f' in {len(shards)} shards' if shards else ''}")
        await api.close()
    except BaseException:
        for log in ("operator.log", "proxy.log", "emulator.log"):
            text = (d / log).read_text() if (d / log).exists() else ""
            print(f"--- {log} (last lines)\n" + "\n".join(text.splitlines()[-15:]), file=sys.stderr)
        raise
    finally:
        for p in procs:
            p.kill()
            p.wait()
        tmp.cleanup()


async def start_control_plane(d, procs):
    """The real kube-apiserver, etcd and controllers the tests build (e2e's `controlplane`), with
    the CRDs installed; returns the API and the admin kubeconfig."""
    binary = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target"))) / "debug" / "controlplane"
    if not binary.is_file():
        sys.exit(f"{binary} missing: cargo build -p e2e --bin controlplane")
    if not os.environ.get("TUNNELGATE_CONTROLPLANE_BIN"):
        sys.exit("TUNNELGATE_CONTROLPLANE_BIN is not set: export TUNNELGATE_CONTROLPLANE_BIN=$(controlplane/build.sh | tail -n 1)")
    cp = subprocess.Popen([str(binary), str(d / "cluster")], stdout=subprocess.PIPE, stderr=open(d / "controlplane.log", "w"), text=True)
    procs.append(cp)
    kubeconfig = None
    for line in cp.stdout:
        m = re.match(r"export KUBECONFIG=(.+)", line.strip())
        if m:
            kubeconfig = pathlib.Path(m.group(1))
            break
    if kubeconfig is None:
        sys.exit("the control plane did not start: " + (d / "controlplane.log").read_text()[-2000:])
    kc = yaml.safe_load(kubeconfig.read_text())
    cluster, user = kc["clusters"][0]["cluster"], kc["users"][0]["user"]
    api = Api(cluster["server"], token=user["token"], ca=cluster["certificate-authority"])
    for f in sorted((ROOT / "crds").glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc:
                await api.call("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", doc)

    async def established():
        crds = await api.call("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
        return all(any(c["type"] == "Established" and c["status"] == "True"
                       for c in (i.get("status") or {}).get("conditions") or [])
                   for i in crds["items"])

    await until("the CRDs are established", 60, established, every=0.2)
    return api, kubeconfig


async def _eq(fut, want):
    return await fut == want


if __name__ == "__main__":
    asyncio.run(main())
