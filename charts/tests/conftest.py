"""Shared helpers for the chart's offline checks: render with the Helm Go SDK (helm-python-sdk)."""

import pathlib

import helm_python as helm
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "tunnelgate"

# Values files the checks render with: defaults, TLS listener on, monitoring on, hostPort on.
CASES = {
    "defaults": {},
    "tls": {"proxy": {"tls": {"enabled": True, "secretName": "proxy-cert"}}},
    "monitoring": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
        "grafanaDashboard": {"enabled": True},
        "prometheusRule": {"enabled": True, "labels": {"release": "prom"}},
        "networkPolicyExample": {"enabled": True, "namespace": "payments"},
    },
    "auth": {"proxy": {"auth": {"secretName": "proxy-users", "realm": "corp egress"}}},
    "parents": {"config": {
        "parents": [{"name": "corp-a", "address": "proxy-a.corp.example:3128", "credentialsSecret": "corp-proxy"},
                    {"name": "corp-b", "address": "10.20.0.9:3128", "sendTarget": "name", "connectTimeout": "3s",
                     "tls": {"caSecret": "corp-ca", "serverName": "proxy-b.corp.example"}}],
        "parentGroups": [{"name": "corp", "members": ["corp-a", "corp-b"], "retryAfter": "1m"}],
        "defaultRoute": "corp",
    }},
    "tunnels": {
        "proxy": {
            "hostPort": {"enabled": True},
            "tunnels": [
                {"name": "app-tls", "port": 8443, "upstream": "app.payments.svc:8080", "secretName": "app-cert",
                 "sendProxyProtocol": "v2", "alpn": ["http/1.1"], "minVersion": "1.3"},
            ],
        }
    },
    "gateway": {
        "proxy": {
            "kind": "Deployment",
            "nodeSelector": {"egress.example.com/gateway": "true"},
            "tolerations": [{"key": "egress.example.com/gateway", "operator": "Exists", "effect": "NoSchedule"}],
            "gateway": {"hostNetwork": True, "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 4}},
        },
        "prometheusRule": {"enabled": True},
        "serviceMonitor": {"enabled": True},
    },
    "hostport": {"proxy": {"hostPort": {"enabled": True}, "workerThreads": 2}, "operator": {"replicas": 2}},
    "transparent": {
        "proxy": {"transparent": {"enabled": True, "ports": [80, 443, 8443], "otherPorts": "drop", "strictDestination": True}},
        "config": {"clusterNetworks": ["10.244.0.0/16", "10.96.0.0/12"]},
        "prometheusRule": {"enabled": True},
    },
}


def render(values: dict, name: str = "tunnelgate", namespace: str = "tunnelgate") -> list[dict]:
    chart = helm.Chart.load(str(CHART))
    chart.validate_schema(values)
    out = chart.render(values, name=name, namespace=namespace, is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        for d in yaml.safe_load_all(text):
            if d:
                docs.append(d)
    return docs


def find(docs: list[dict], kind: str, suffix: str = "") -> dict:
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"].endswith(suffix):
            return d
    raise AssertionError(f"no {kind} *{suffix} in {[(d['kind'], d['metadata']['name']) for d in docs]}")
