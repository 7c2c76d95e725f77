"""Offline checks of the Helm chart: lint, strict schema validation of every rendered manifest
against the oldest and newest supported Kubernetes versions, values schema, security settings,
and the example TunnelPolicies against the CRD's OpenAPI schema."""

import copy
import ipaddress
import json
import subprocess
import sys

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

import celpy
from celpy import celtypes
from conftest import CASES, CHART, ROOT, find, render

# Chart.yaml says kubeVersion >=1.31 (the CRD's CEL rules use isCIDR/isIP); the newest is what
# kubernetes-validate ships.
KUBE_VERSIONS = ["1.31.0", kubernetes_validate.utils.latest_version()]
# Kinds whose schemas come from other projects' CRDs; checked by hand below, never silently skipped.
FOREIGN_KINDS = {"ServiceMonitor", "PrometheusRule"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lint_has_no_errors(case):
    report = helm.lint(str(CHART), CASES[case], strict=True)
    errors = [m for m in report["messages"] if m["severity"] >= 3] + [{"error": e} for e in report["errors"]]
    assert not errors, errors


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_manifests_validate_strictly(case, version):
    docs = render(CASES[case])
    checked = 0
    for d in docs:
        if d["kind"] in FOREIGN_KINDS:
            continue
        kubernetes_validate.validate(d, version, strict=True)
        checked += 1
    assert checked >= 10


def test_servicemonitors_are_well_formed():
    sms = [d for d in render(CASES["monitoring"]) if d["kind"] == "ServiceMonitor"]
    assert {d["metadata"]["name"] for d in sms} == {"tunnelgate-proxy", "tunnelgate-operator"}
    for sm in sms:
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        assert sm["metadata"]["labels"]["release"] == "prom"
        assert sm["spec"]["endpoints"] == [{
            "port": "admin", "path": "/metrics", "interval": "30s",
            "relabelings": [{"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}],
        }]
        assert sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] in ("proxy", "operator")


def test_values_schema_rejects_unknown_and_bad_values():
    chart = helm.Chart.load(str(CHART))
    for bad in [{"proxi": {}}, {"proxy": {"port": 0}}, {"config": {"defaultAction": "maybe"}}, {"proxy": {"drainTimeout": "30 seconds"}}]:
        with pytest.raises(helm.HelmError):
            chart.validate_schema(bad)


def test_grace_period_must_exceed_the_drain():
    with pytest.raises(helm.HelmError, match="terminationGracePeriodSeconds"):
        render({"proxy": {"terminationGracePeriodSeconds": 30, "drainDelay": "5s", "drainTimeout": "30s"}})
    with pytest.raises(helm.HelmError, match="secretName is required"):
        render({"proxy": {"tls": {"enabled": True}}})


def test_workloads_are_locked_down_and_wired():
    docs = render(CASES["tls"])
    text = yaml.safe_dump_all(docs)
    assert "subPath" not in text, "ConfigMap or Secret mounts with subPath never update"
    ds = find(docs, "DaemonSet", "-proxy")
    dep = find(docs, "Deployment", "-operator")
    for w in (ds, dep):
        c = w["spec"]["template"]["spec"]["containers"][0]
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
        assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    args = ds["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--config-map=$(POD_NAMESPACE)/tunnelgate-proxy" in args
    vols = ds["spec"]["template"]["spec"]["volumes"]
    assert vols == [{"name": "tls", "secret": {"secretName": "tunnelgate-proxy-tls", "optional": True}},
                    {"name": "admin-token", "secret": {"secretName": "tunnelgate-admin-token"}}]
    svc = find(docs, "Service", "-proxy")
    assert svc["spec"]["internalTrafficPolicy"] == "Local"
    base = yaml.safe_load(find(docs, "ConfigMap", "-base")["data"]["config.yaml"])
    assert base["policy"]["defaultAction"] == "deny"
    assert base["listeners"][1]["tls"] == {"secretName": "proxy-cert"}
    # RBAC: the proxy may read exactly its ConfigMap.
    role = find(docs, "Role", "-proxy")
    shards = [f"tunnelgate-proxy-shard-{k}" for k in range(64)]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["tunnelgate-proxy", *shards], "verbs": ["get", "list", "watch"]}]


def test_crd_in_chart_is_the_generated_one():
    chart_copy = yaml.safe_load((CHART / "files/crds/tunnelpolicies.yaml").read_text())
    source = yaml.safe_load((ROOT / "crds/tunnelpolicies.yaml").read_text())
    assert chart_copy == source, "run: UPDATE_GOLDEN=1 cargo test -p tunnelgate-operator --test crd"
    rendered = next(d for d in render({}) if d["metadata"]["name"] == "tunnelpolicies.tunnelgate.io")
    assert rendered["spec"] == source["spec"]
    assert rendered["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert not any(d["kind"] == "CustomResourceDefinition" for d in render({"crds": {"enabled": False}}))


def to_json_schema(s):
    """OpenAPI v3 (Kubernetes structural schema) → JSON Schema: nullable, int-or-string."""
    if isinstance(s, list):
        return [to_json_schema(x) for x in s]
    if not isinstance(s, dict):
        return s
    s = {k: to_json_schema(v) for k, v in s.items() if k != "x-kubernetes-validations"}
    if s.pop("x-kubernetes-int-or-string", False):
        s = {k: v for k, v in s.items() if k not in ("type",)}
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.pop("nullable", False) and "type" in s:
        s["type"] = [s["type"], "null"]
    for k in [k for k in s if k.startswith("x-kubernetes-")]:
        s.pop(k)
    return s


# Each example directory with the CRD its manifests are checked against.
EXAMPLE_CRDS = {"tunnelpolicies": "tunnelpolicies.yaml", "clustertunnelpolicies": "clustertunnelpolicies.yaml"}


def crd_schema(crd_file="tunnelpolicies.yaml"):
    crd = yaml.safe_load((ROOT / "crds" / crd_file).read_text())
    schema = to_json_schema(copy.deepcopy(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]))
    # Structural schemas prune unknown fields; admission with strict field validation rejects them.
    def close(s):
        if isinstance(s, dict):
            if s.get("type") == "object" and "properties" in s and "additionalProperties" not in s:
                s["additionalProperties"] = False
            for v in s.values():
                close(v)
        elif isinstance(s, list):
            for v in s:
                close(v)
    close(schema["properties"]["spec"])
    return schema


def crd_openapi(crd_file="tunnelpolicies.yaml"):
    crd = yaml.safe_load((ROOT / "crds" / crd_file).read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


# The Kubernetes CEL library's network functions, as the API server defines them (net/netip parsing:
# a prefix may have host bits set; isIP takes no prefix).
def _is_cidr(s):
    try:
        ipaddress.ip_network(str(s), strict=False)
    except ValueError:
        return celtypes.BoolType(False)
    return celtypes.BoolType("/" in str(s))


def _is_ip(s):
    try:
        ipaddress.ip_address(str(s))
    except ValueError:
        return celtypes.BoolType(False)
    return celtypes.BoolType(True)


CEL_FUNCTIONS = {"isCIDR": _is_cidr, "isIP": _is_ip}


def cel_rules(schema, path="$"):
    """Every (path, schema node, rule) of the schema."""
    for r in schema.get("x-kubernetes-validations", []):
        yield path, schema, r
    for k, v in schema.get("properties", {}).items():
        yield from cel_rules(v, f"{path}.{k}")
    if "items" in schema:
        yield from cel_rules(schema["items"], f"{path}[]")


def cel_violations(schema, value, path="$"):
    """Evaluates every rule at every node that has a value, as the API server does after the schema
    check; returns the messages of the rules that fail."""
    out = []
    env = celpy.Environment()
    for r in schema.get("x-kubernetes-validations", []):
        prg = env.program(env.compile(r["rule"]), functions=CEL_FUNCTIONS)
        if not prg.evaluate({"self": celpy.json_to_cel(value)}):
            out.append(f"{path}: {r['message']}")
    if isinstance(value, dict):
        for k, v in value.items():
            if k in schema.get("properties", {}):
                out += cel_violations(schema["properties"][k], v, f"{path}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            out += cel_violations(schema["items"], v, f"{path}[{i}]")
    return out


@pytest.mark.parametrize("crd_file", sorted(EXAMPLE_CRDS.values()))
def test_every_cel_rule_compiles(crd_file):
    rules = list(cel_rules(crd_openapi(crd_file)))
    assert len(rules) >= 2
    env = celpy.Environment()
    for path, _, r in rules:
        env.compile(r["rule"])  # raises CELParseError with the position
        assert r.get("message"), f"{path}: a rule without a message gives users the rule's text"


def examples(kind):
    return [(d, p) for d, f in EXAMPLE_CRDS.items() for p in sorted((ROOT / "examples" / d / kind).glob("*.yaml"))]


@pytest.mark.parametrize("kind_dir,path", examples("valid"), ids=lambda x: getattr(x, "stem", x))
def test_valid_examples_pass_the_crd_schema(kind_dir, path):
    crd_file = EXAMPLE_CRDS[kind_dir]
    for doc in yaml.safe_load_all(path.read_text()):
        jsonschema.validate(doc, crd_schema(crd_file))
        assert cel_violations(crd_openapi(crd_file), doc) == []


@pytest.mark.parametrize("kind_dir,path", examples("invalid"), ids=lambda x: getattr(x, "stem", x))
def test_invalid_examples_fail_the_crd_schema(kind_dir, path):
    crd_file = EXAMPLE_CRDS[kind_dir]
    doc = yaml.safe_load(path.read_text())
    try:
        jsonschema.validate(doc, crd_schema(crd_file))
    except jsonschema.ValidationError:
        return
    assert cel_violations(crd_openapi(crd_file), doc), f"{path.name} passes both the schema and the CEL rules"


def test_proxy_authentication_names_its_secret_in_the_base():
    base = find(render(CASES["auth"]), "ConfigMap", "tunnelgate-base")
    doc = yaml.safe_load(base["data"]["config.yaml"])
    assert doc["auth"] == {"secretName": "proxy-users", "realm": "corp egress"}
    plain = yaml.safe_load(find(render({}), "ConfigMap", "tunnelgate-base")["data"]["config.yaml"])
    assert "auth" not in plain
    with pytest.raises(Exception):
        render({"proxy": {"auth": {"secretName": "x", "realm": 'bad"realm'}}})


def test_config_requires_the_generated_admin_token_everywhere_it_is_read():
    docs = render({})
    secret = find(docs, "Secret", "tunnelgate-admin-token")
    assert len(secret["data"]["token"]) >= 48
    doc = yaml.safe_load(find(docs, "ConfigMap", "tunnelgate-base")["data"]["config.yaml"])
    assert doc["admin"]["configTokenFile"] == "/etc/tunnelgate/admin-token/token"
    for kind, suffix in [("DaemonSet", "tunnelgate-proxy"), ("Deployment", "tunnelgate-operator")]:
        spec = find(docs, kind, suffix)["spec"]["template"]["spec"]
        vol = next(v for v in spec["volumes"] if v["name"] == "admin-token")
        assert vol["secret"] == {"secretName": "tunnelgate-admin-token"}, "not optional: a pod without it must not start"
        mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "admin-token")
        assert mount == {"name": "admin-token", "mountPath": "/etc/tunnelgate/admin-token", "readOnly": True}
    op = find(docs, "Deployment", "tunnelgate-operator")["spec"]["template"]["spec"]["containers"][0]
    assert "--proxy-admin-token-file=/etc/tunnelgate/admin-token/token" in op["args"]
    # The inspectors read that one Secret, no other.
    rules = find(docs, "Role", "tunnelgate-inspector")["rules"]
    assert [r for r in rules if "secrets" in r["resources"]] == [
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["tunnelgate-admin-token"], "verbs": ["get"]}]


def test_tunnel_listeners_are_declared_in_values():
    docs = render(CASES["tunnels"])
    base = yaml.safe_load(find(docs, "ConfigMap", "-base")["data"]["config.yaml"])
    assert base["listeners"][-1] == {
        "name": "app-tls", "bind": "0.0.0.0:8443", "mode": "tunnel", "upstream": "app.payments.svc:8080",
        "sendProxyProtocol": "v2", "tls": {"secretName": "app-cert", "alpn": ["http/1.1"], "minVersion": "1.3"},
    }
    ports = find(docs, "DaemonSet", "-proxy")["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert {"name": "app-tls", "containerPort": 8443, "hostPort": 8443} in ports
    svc = find(docs, "Service", "-proxy")
    assert {"name": "app-tls", "port": 8443, "targetPort": "app-tls"} in svc["spec"]["ports"]
    for bad in (
        [{"name": "admin", "port": 1, "upstream": "a:1", "secretName": "s"}],
        [{"name": "much-too-long-name", "port": 1, "upstream": "a:1", "secretName": "s"}],
        [{"name": "ok", "port": 1, "upstream": "a:1"}],
        [{"name": "ok", "port": 1, "upstream": "a:1", "secretName": "s", "sendProxyProtocol": "v3"}],
    ):
        with pytest.raises(helm.HelmError):
            render({"proxy": {"tunnels": bad}})


def test_tls_termination_example_renders_and_names_the_certificate_secret():
    example = ROOT / "examples" / "tls-termination"
    cert = yaml.safe_load((example / "certificate.yaml").read_text())
    values = yaml.safe_load((example / "values.yaml").read_text())
    assert cert["kind"] == "Certificate" and cert["apiVersion"] == "cert-manager.io/v1"
    assert cert["spec"]["secretName"] == values["proxy"]["tunnels"][0]["secretName"]
    docs = render(values)
    base = yaml.safe_load(find(docs, "ConfigMap", "-base")["data"]["config.yaml"])
    assert base["listeners"][-1]["tls"]["secretName"] == cert["spec"]["secretName"]


def test_address_grants_reach_the_operator_through_the_base():
    grants = [{"namespaces": ["payments"], "cidrs": ["10.96.0.0/12"]}]
    base = yaml.safe_load(find(render({"config": {"addressGrants": grants}}), "ConfigMap", "-base")["data"]["config.yaml"])
    assert base["addressGrants"] == grants
    assert "addressGrants" not in yaml.safe_load(find(render({}), "ConfigMap", "-base")["data"]["config.yaml"])
    with pytest.raises(helm.HelmError):
        render({"config": {"addressGrants": [{"namespaces": ["Bad_NS"], "cidrs": ["10.0.0.0/8"]}]}})


def test_cluster_policies_crd_and_roles():
    docs = render({})
    crds = {d["metadata"]["name"]: d for d in docs if d["kind"] == "CustomResourceDefinition"}
    assert set(crds) == {"tunnelpolicies.tunnelgate.io", "clustertunnelpolicies.tunnelgate.io"}
    chart_copy = yaml.safe_load((CHART / "files/crds/clustertunnelpolicies.yaml").read_text())
    assert chart_copy == yaml.safe_load((ROOT / "crds/clustertunnelpolicies.yaml").read_text())
    assert crds["clustertunnelpolicies.tunnelgate.io"]["spec"]["scope"] == "Cluster"
    op = find(docs, "ClusterRole", "-operator")
    assert {"apiGroups": ["tunnelgate.io"], "resources": ["tunnelpolicies/status", "clustertunnelpolicies/status"], "verbs": ["patch"]} in op["rules"]
    assert {"apiGroups": [""], "resources": ["pods", "namespaces", "nodes"], "verbs": ["get", "list", "watch"]} in op["rules"]
    view, edit, admin = (find(docs, "ClusterRole", s) for s in ("-view", "-edit", "-platform-admin"))
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert "rbac.authorization.k8s.io/aggregate-to-edit" not in admin["metadata"]["labels"], "namespace editors never get cluster policies"
    assert all("clustertunnelpolicies" not in r["resources"] for r in view["rules"] + edit["rules"])
    assert not any(d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith("-view") for d in render({"rbac": {"userRoles": False}}))


def test_cluster_networks_and_the_rbac_that_learns_them():
    docs = render({"config": {"clusterNetworks": ["10.96.0.0/12"]}})
    base = yaml.safe_load(find(docs, "ConfigMap", "-base")["data"]["config.yaml"])
    assert base["policy"]["clusterNetworks"] == ["10.96.0.0/12"]
    op = find(docs, "ClusterRole", "-operator")
    assert {"apiGroups": [""], "resources": ["pods", "namespaces", "nodes"], "verbs": ["get", "list", "watch"]} in op["rules"]
    role = find(docs, "Role", "-operator-apiserver")
    assert role["metadata"]["namespace"] == "default"
    assert all(v in ("get", "list", "watch") for r in role["rules"] for v in r["verbs"]), "read-only"
    assert find(docs, "RoleBinding", "-operator-apiserver")["roleRef"]["name"] == role["metadata"]["name"]


def test_node_egress_survives_rollouts_and_taints():
    ds = find(render({}), "DaemonSet", "-proxy")
    assert ds["spec"]["updateStrategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    spec = ds["spec"]["template"]["spec"]
    assert {"operator": "Exists"} in spec["tolerations"]
    assert spec["priorityClassName"] == "system-node-critical"
    # A hostPort cannot be shared by two pods on a node: replaced in place instead.
    hp = find(render(CASES["hostport"]), "DaemonSet", "-proxy")
    assert hp["spec"]["updateStrategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    with pytest.raises(helm.HelmError, match="cannot both be 0"):
        render({"proxy": {"updateStrategy": {"maxSurge": 0, "maxUnavailable": 0}}})
    pdb = find(render({}), "PodDisruptionBudget", "-operator")
    dep = find(render({}), "Deployment", "-operator")
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


def test_egress_gateway_topology():
    docs = render(CASES["gateway"])
    assert not [d for d in docs if d["kind"] == "DaemonSet"], "a gateway runs no per-node proxies"
    dep = find(docs, "Deployment", "-proxy")
    spec = dep["spec"]["template"]["spec"]
    assert "replicas" not in dep["spec"], "the HorizontalPodAutoscaler owns the replica count"
    assert spec["nodeSelector"] == {"egress.example.com/gateway": "true"}
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    # hostNetwork: one per node, replaced in place (two pods would share the node's ports).
    anti = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["topologyKey"] == "kubernetes.io/hostname"
    assert anti["labelSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    assert {c["topologyKey"] for c in spec["topologySpreadConstraints"]} == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    svc = find(docs, "Service", "-proxy")
    assert svc["spec"]["internalTrafficPolicy"] == "Cluster", "clients on every node reach the gateway"
    pdb = find(docs, "PodDisruptionBudget", "-proxy")
    assert pdb["spec"] == {"minAvailable": 1, "selector": {"matchLabels": dep["spec"]["selector"]["matchLabels"]}}
    hpa = find(docs, "HorizontalPodAutoscaler", "-proxy")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "tunnelgate-proxy"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 4)
    alert = next(r for g in find(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"] if r["alert"] == "TunnelgateProxyMissingOnNode")
    assert "kube_deployment_status_replicas_available" in alert["expr"]
    # Without hostNetwork: pods surge beside the old ones, fixed replicas, no HPA.
    plain = render({"proxy": {"kind": "Deployment"}})
    d2 = find(plain, "Deployment", "-proxy")
    assert d2["spec"]["replicas"] == 2 and d2["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert "hostNetwork" not in d2["spec"]["template"]["spec"]
    assert not [d for d in plain if d["kind"] == "HorizontalPodAutoscaler"]
    for bad, why in [
        ({"proxy": {"kind": "Deployment"}, "service": {"internalTrafficPolicy": "Local"}}, "needs Cluster"),
        ({"proxy": {"kind": "Deployment", "hostPort": {"enabled": True}}}, "uses proxy.gateway.hostNetwork"),
        ({"proxy": {"gateway": {"hostNetwork": True}}}, "needs proxy.kind: Deployment"),
    ]:
        with pytest.raises(helm.HelmError, match=why):
            render(bad)


def test_chart_conventions_image_digest_names_and_extras():
    digest = "sha256:" + "ab" * 32
    values = {
        "fullnameOverride": "egress",
        "global": {"imageRegistry": "ignored.example"},
        "image": {"digest": digest, "tag": "ignored"},
        "proxy": {"logLevel": "debug", "extraArgs": ["--reload-poll-interval=5s"],
                  "extraEnv": [{"name": "HTTPS_PROXY", "value": ""}], "podLabels": {"team": "net"}},
        "operator": {"logLevel": "info,kube=warn", "extraArgs": ["--debounce=80ms"], "podLabels": {"team": "net"}},
    }
    docs = render(values, name="anything")
    ds, op = find(docs, "DaemonSet", "egress-proxy"), find(docs, "Deployment", "egress-operator")
    for w in (ds, op):
        pod = w["spec"]["template"]
        c = pod["spec"]["containers"][0]
        assert c["image"] == f"ghcr.io/tunnelgate/tunnelgate@{digest}"
        assert pod["metadata"]["labels"]["team"] == "net"
        assert pod["metadata"]["labels"]["app.kubernetes.io/component"] in ("proxy", "operator"), "own labels kept"
    pc, oc = ds["spec"]["template"]["spec"]["containers"][0], op["spec"]["template"]["spec"]["containers"][0]
    assert pc["args"][-1] == "--reload-poll-interval=5s" and oc["args"][-1] == "--debounce=80ms"
    assert "--policy-status=true" in oc["args"]
    second = find(render({"operator": {"policyStatus": False}}), "Deployment", "-operator")
    assert "--policy-status=false" in second["spec"]["template"]["spec"]["containers"][0]["args"]
    assert {"name": "TUNNELGATE_LOG", "value": "debug"} in pc["env"] and {"name": "HTTPS_PROXY", "value": ""} in pc["env"]
    assert {"name": "TUNNELGATE_LOG", "value": "info,kube=warn"} in oc["env"]
    # Every name follows the override, and the names that wire components together agree.
    assert "--config-map=$(POD_NAMESPACE)/egress-proxy" in pc["args"] and "--release=egress" in oc["args"]
    assert find(docs, "Role", "egress-proxy")["rules"][0]["resourceNames"][:2] == ["egress-proxy", "egress-proxy-shard-0"]
    assert all(d["metadata"]["name"].startswith("egress") for d in docs if d["kind"] not in ("CustomResourceDefinition",)), \
        sorted(d["metadata"]["name"] for d in docs)
    chart = helm.Chart.load(str(CHART))
    for bad in [{"image": {"digest": "latest"}}, {"fullnameOverride": "Bad_Name"}, {"proxy": {"extraEnv": [{"value": "x"}]}}]:
        with pytest.raises(helm.HelmError):
            chart.validate_schema(bad)


def test_chart_readme_lists_every_value_and_is_current():
    out = subprocess.run([sys.executable, str(ROOT / "scripts/chart-readme.py"), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = [l for l in (CHART / "README.md").read_text().splitlines() if l.startswith("| `")]
    undocumented = [r.split("|")[1].strip() for r in rows if r.rstrip().endswith("|  |")]
    assert not undocumented, f"values without a `# --` description: {undocumented}"
    assert any("`proxy.gateway.hostNetwork`" in r for r in rows) and len(rows) >= 80


def test_network_policy_example_reaches_a_host_network_gateway():
    docs = render({"proxy": {"kind": "Deployment", "gateway": {"hostNetwork": True}},
                   "networkPolicyExample": {"enabled": True, "namespace": "payments", "proxyCIDRs": ["192.0.2.10/32"]}})
    np = find(docs, "NetworkPolicy")
    to = np["spec"]["egress"][0]["to"]
    assert {"ipBlock": {"cidr": "192.0.2.10/32"}} in to and any("podSelector" in t for t in to)
    assert np["spec"]["egress"][0]["ports"] == [{"protocol": "TCP", "port": 3128}]


def test_per_node_documents_are_wired():
    docs = render({"proxy": {"configPerNode": True}})
    ds = find(docs, "DaemonSet", "-proxy")["spec"]["template"]["spec"]["containers"][0]
    assert "--node-name=$(NODE_NAME)" in ds["args"]
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in ds["env"]
    op = find(docs, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"][0]
    assert "--config-per-node=true" in op["args"]
    role = find(docs, "Role", "-proxy")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]}]
    # Off by default: one named ConfigMap, no node name.
    plain = find(render({}), "DaemonSet", "-proxy")["spec"]["template"]["spec"]["containers"][0]
    assert not any(a.startswith("--node-name") for a in plain["args"])
    assert find(render({}), "Role", "-proxy")["rules"][0]["resourceNames"][0] == "tunnelgate-proxy"
    # Gateway proxies serve every node: they read the whole document.
    gw = find(render({"proxy": {"kind": "Deployment", "configPerNode": True}}), "Deployment", "-proxy")
    assert not any(a.startswith("--node-name") for a in gw["spec"]["template"]["spec"]["containers"][0]["args"])


def test_transparent_interception_runs_on_the_node_network_with_net_admin_alone():
    docs = render(CASES["transparent"])
    ds = find(docs, "DaemonSet", "-proxy")
    # The redirect rules outlive a proxy while this annotation is on its DaemonSet.
    assert ds["metadata"]["annotations"] == {"tunnelgate.io/redirect-rules": "keep"}
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert ds["spec"]["updateStrategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    c = spec["containers"][0]
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    assert sc["runAsUser"] == 0 and not sc["allowPrivilegeEscalation"] and sc["readOnlyRootFilesystem"]
    assert "runAsNonRoot" not in spec["securityContext"]
    assert {"name": "transparent", "containerPort": 15001} in c["ports"]
    assert "--node-name=$(NODE_NAME)" in c["args"] and "--daemonset=tunnelgate-proxy" in c["args"]
    op = find(docs, "Deployment", "-operator")["spec"]["template"]["spec"]["containers"][0]
    assert "--config-per-node=true" in op["args"], "each node enrols its own pods"
    base = yaml.safe_load(find(docs, "ConfigMap", "-base")["data"]["config.yaml"])
    assert base["listeners"][-1] == {"name": "transparent", "bind": "[::]:15001", "mode": "transparent",
                                     "transparent": {"strictDestination": True}}
    assert base["redirect"] == {"listener": "transparent", "ports": [80, 443, 8443], "otherPorts": "drop",
                                "enrollNamespaces": {"tunnelgate.io/transparent": "enabled"}}
    assert base["policy"]["clusterNetworks"] == ["10.244.0.0/16", "10.96.0.0/12"]
    role = find(docs, "Role", "-proxy")
    assert {"apiGroups": ["apps"], "resources": ["daemonsets"], "resourceNames": ["tunnelgate-proxy"],
            "verbs": ["get", "list", "watch"]} in role["rules"]
    alert = next(r for g in find(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"] if r["alert"] == "TunnelgateProxyMissingOnNode")
    assert "transparently intercepted pods' connections are refused" in alert["annotations"]["description"]
    # Off by default: no annotation, no host network, non-root, no redirect.
    plain = render({})
    pds = find(plain, "DaemonSet", "-proxy")
    assert "annotations" not in pds["metadata"] and "hostNetwork" not in pds["spec"]["template"]["spec"]
    assert pds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonRoot"] is True
    assert "redirect" not in yaml.safe_load(find(plain, "ConfigMap", "-base")["data"]["config.yaml"])
    four = render(dict(CASES["transparent"], proxy={"transparent": {"enabled": True, "bindAddress": "0.0.0.0"}}))
    assert yaml.safe_load(find(four, "ConfigMap", "-base")["data"]["config.yaml"])["listeners"][-1]["bind"] == "0.0.0.0:15001"
    for bad, why in [
        ({"proxy": {"transparent": {"enabled": True}}}, "needs config.clusterNetworks"),
        (dict(CASES["transparent"], proxy={"kind": "Deployment", "transparent": {"enabled": True}}), "needs proxy.kind: DaemonSet"),
    ]:
        with pytest.raises(helm.HelmError, match=why):
            render(bad)
    with pytest.raises(helm.HelmError):
        helm.Chart.load(str(CHART)).validate_schema({"proxy": {"transparent": {"otherPorts": "reject"}}})


def test_parents_reach_the_operator_through_the_base():
    base = yaml.safe_load(find(render(CASES["parents"]), "ConfigMap", "-base")["data"]["config.yaml"])
    assert base["parents"][0] == {"name": "corp-a", "address": "proxy-a.corp.example:3128", "credentialsSecret": "corp-proxy"}
    assert base["parentGroups"] == [{"name": "corp", "members": ["corp-a", "corp-b"], "retryAfter": "1m"}]
    assert base["policy"]["defaultRoute"] == "corp"
    plain = yaml.safe_load(find(render({}), "ConfigMap", "-base")["data"]["config.yaml"])
    assert "parents" not in plain and "defaultRoute" not in plain["policy"]
    chart = helm.Chart.load(str(CHART))
    for bad in [{"config": {"parents": [{"name": "direct", "address": "p:1"}]}},
                {"config": {"parents": [{"name": "a", "address": "p:1", "sendTarget": "both"}]}}]:
        with pytest.raises(helm.HelmError):
            chart.validate_schema(bad)


def test_the_proxy_configuration_schema_accepts_the_default_and_every_rendered_base():
    # The JSON Schema editors validate config.yaml with (generated from the types that parse it):
    # the embedded default and the base document of every chart case are valid; a typo is not.
    schema = json.loads((ROOT / "proxy-config" / "config.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    default = yaml.safe_load((ROOT / "proxy-config" / "src" / "default.yaml").read_text())
    assert not [e.message for e in validator.iter_errors(default)]
    for name, values in CASES.items():
        base = yaml.safe_load(find(render(values), "ConfigMap", "-base")["data"]["config.yaml"])
        assert not [e.message for e in validator.iter_errors(base)], name
    typo = dict(default, limitz={"maxConnections": 10})
    assert any("limitz" in e.message for e in validator.iter_errors(typo))


def test_the_chart_and_the_binaries_share_one_version_and_the_changelog_has_it():
    import re
    import tomllib

    cargo = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == cargo and chart["appVersion"] == cargo, (chart["version"], chart["appVersion"], cargo)
    # The image tag the chart defaults to is that version too (values image.tag empty means appVersion).
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["image"]["tag"] in ("", None, cargo), values["image"]["tag"]
    # The changelog's newest section is either Unreleased (work since the last release) or this version.
    headings = re.findall(r"^## (.+)$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert headings and (headings[0] == "Unreleased" or headings[0].startswith(cargo)), headings[:2]
    assert any(h.startswith(cargo) for h in headings), f"no section for {cargo}"
