"""The chart's monitoring: the PrometheusRule (promtool accepts it, its alerts fire on the series a
failing node produces and stay quiet on a healthy one, every alert has a runbook section) and the
Grafana dashboard (every query is valid PromQL, filtered by the node and pod variables)."""

import json
import re
import shutil
import subprocess

import pytest
import yaml

from conftest import CASES, CHART, ROOT, find, render

RUNBOOK = "https://github.com/tunnelgate/tunnelgate/blob/main/docs/runbook.md"
PROXY = 'namespace="tunnelgate", job="tunnelgate-proxy"'
OPERATOR = 'namespace="tunnelgate", job="tunnelgate-operator"'


def promtool():
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: apt-get install prometheus (scripts/test installs it)")
    return path


def rules():
    return find(render(CASES["monitoring"]), "PrometheusRule")


def write_rules(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules()["spec"]))
    return path


def test_promtool_accepts_the_rules(tmp_path):
    out = subprocess.run([promtool(), "check", "rules", str(write_rules(tmp_path))], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 9 rules found" in out.stdout, out.stdout


def test_every_alert_has_summary_description_and_a_runbook_section():
    headings = {
        "#" + h.strip().lower()
        for h in re.findall(r"^## (\S+)$", (ROOT / "docs/runbook.md").read_text(), flags=re.M)
    }
    alerts = [r for g in rules()["spec"]["groups"] for r in g["rules"]]
    assert len(alerts) == 9
    for a in alerts:
        ann = a["annotations"]
        assert ann["summary"] and ann["description"], a["alert"]
        anchor = ann["runbook_url"].removeprefix(RUNBOOK)
        assert anchor == "#" + a["alert"].lower() and anchor in headings, (a["alert"], sorted(headings))
        assert a["labels"]["severity"] in ("warning", "critical")


def ann(alert, description):
    return {"summary": SUMMARY[alert], "description": description, "runbook_url": f"{RUNBOOK}#{alert.lower()}"}


SUMMARY = {
    "TunnelgateProxyDown": "A Tunnelgate proxy cannot be scraped.",
    "TunnelgateProxyMissingOnNode": "Some nodes have no available Tunnelgate proxy.",
    "TunnelgateReloadFailing": "A Tunnelgate proxy refuses its new configuration.",
    "TunnelgateConfigBehind": "A Tunnelgate proxy enforces an old configuration.",
    "TunnelgateDeniedSpike": "Many egress requests are denied.",
    "TunnelgateUpstreamFailures": "Allowed egress fails to connect.",
    "TunnelgateOperatorReconcileErrors": "The Tunnelgate operator fails to reconcile.",
    "TunnelgateCertificateExpiring": "A Tunnelgate listener's certificate expires soon.",
    "TunnelgateParentGroupDown": "A group of parent proxies has no usable member.",
}


def series(metric, labels, values):
    return {"series": f"{metric}{{{labels}}}", "values": values}


def test_alerts_fire_on_the_failing_node_only(tmp_path):
    """Node n1 is healthy; n2 is down, fails its reload, lags one render, denies most requests and
    fails to connect upstream; listener `app` has a certificate 10 days from expiry."""
    n1, n2 = f'{PROXY}, node="n1", pod="p1"', f'{PROXY}, node="n2", pod="p2"'
    ks = 'namespace="tunnelgate", daemonset="tunnelgate-proxy"'
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                series("up", n1, "1x30"),
                series("up", n2, "1 0x30"),
                series("kube_daemonset_status_desired_number_scheduled", ks, "2x30"),
                series("kube_daemonset_status_number_available", ks, "2 1x30"),
                series("tunnelgate_config_last_reload_success", n1, "1x30"),
                series("tunnelgate_config_last_reload_success", n2, "1 0x30"),
                series("tunnelgate_operator_render", OPERATOR + ', pod="op"', "5x30"),
                series("tunnelgate_config_render", n1, "5x30"),
                series("tunnelgate_config_render", n2, "4x30"),
                # n1: 1 deny/s of 10/s; n2: 2 deny/s against 1 allow/s.
                series("tunnelgate_policy_decisions_total", n1 + ', decision="deny", reason="default", rule="default"', "0+60x30"),
                series("tunnelgate_policy_decisions_total", n1 + ', decision="allow", reason="policy", rule="ns/p"', "0+540x30"),
                series("tunnelgate_policy_decisions_total", n2 + ', decision="deny", reason="default", rule="default"', "0+120x30"),
                series("tunnelgate_policy_decisions_total", n2 + ', decision="allow", reason="policy", rule="ns/p"', "0+60x30"),
                series("tunnelgate_tunnel_requests_total", n1 + ', listener="proxy", result="established"', "0+600x30"),
                series("tunnelgate_tunnel_requests_total", n1 + ', listener="proxy", result="dns_failed"', "0+6x30"),
                series("tunnelgate_tunnel_requests_total", n2 + ', listener="proxy", result="established"', "0+60x30"),
                series("tunnelgate_tunnel_requests_total", n2 + ', listener="proxy", result="upstream_timeout"', "0+60x30"),
                series("tunnelgate_operator_reconciles_total", OPERATOR + ', pod="op", result="error"', "0+1x30"),
                series("tunnelgate_operator_reconciles_total", OPERATOR + ', pod="op", result="success"', "0+10x30"),
                series("tunnelgate_tls_certificate_expiry_timestamp_seconds", n1 + ', listener="app"', "864000x200"),
                series("tunnelgate_tls_certificate_expiry_timestamp_seconds", n1 + ', listener="api"', "8640000x200"),
                # Group corp: both members usable on n1; on n2 none from minute 1 (one blip on n1).
                series("tunnelgate_parent_group_healthy_members", n1 + ', group="corp"', "2 0 2x30"),
                series("tunnelgate_parent_group_healthy_members", n2 + ', group="corp"', "2 0x30"),
            ],
            "alert_rule_test": [
                # Within `for`, nothing fires yet.
                {"eval_time": "4m", "alertname": "TunnelgateProxyDown", "exp_alerts": []},
                {"eval_time": "4m", "alertname": "TunnelgateReloadFailing", "exp_alerts": []},
                {"eval_time": "8m", "alertname": "TunnelgateConfigBehind", "exp_alerts": []},
                {"eval_time": "7m", "alertname": "TunnelgateProxyDown", "exp_alerts": [{
                    "exp_labels": {"severity": "critical", "namespace": "tunnelgate", "job": "tunnelgate-proxy",
                                   "node": "n2", "pod": "p2"},
                    "exp_annotations": ann("TunnelgateProxyDown", "The proxy on node n2 (p2) has been down for 5 minutes: pods on that node have no egress."),
                }]},
                {"eval_time": "12m", "alertname": "TunnelgateProxyMissingOnNode", "exp_alerts": [{
                    "exp_labels": {"severity": "critical", "namespace": "tunnelgate", "daemonset": "tunnelgate-proxy"},
                    "exp_annotations": ann("TunnelgateProxyMissingOnNode", "1 node(s) have had no available proxy pod for 10 minutes: their pods have no egress."),
                }]},
                {"eval_time": "7m", "alertname": "TunnelgateReloadFailing", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "namespace": "tunnelgate", "job": "tunnelgate-proxy",
                                   "node": "n2", "pod": "p2"},
                    "exp_annotations": ann("TunnelgateReloadFailing", "The proxy on node n2 keeps its last good configuration: the newest one failed to load for 5 minutes. Policy changes are not enforced there."),
                }]},
                {"eval_time": "12m", "alertname": "TunnelgateConfigBehind", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "namespace": "tunnelgate", "job": "tunnelgate-proxy",
                                   "node": "n2", "pod": "p2"},
                    "exp_annotations": ann("TunnelgateConfigBehind", "The proxy on node n2 has render 4 in force, older than the operator's, for 10 minutes."),
                }]},
                {"eval_time": "20m", "alertname": "TunnelgateDeniedSpike", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "node": "n2"},
                    "exp_annotations": ann("TunnelgateDeniedSpike", "66.67% of the decisions on node n2 are denials (10 minutes). A policy change may have removed access that workloads need."),
                }]},
                {"eval_time": "20m", "alertname": "TunnelgateUpstreamFailures", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "node": "n2"},
                    "exp_annotations": ann("TunnelgateUpstreamFailures", "50% of the tunnel requests on node n2 fail at DNS or at the upstream connection (10 minutes)."),
                }]},
                {"eval_time": "28m", "alertname": "TunnelgateOperatorReconcileErrors", "exp_alerts": [{
                    "exp_labels": {"severity": "warning"},
                    "exp_annotations": ann("TunnelgateOperatorReconcileErrors", "Reconciles have been failing for 15 minutes; new and changed TunnelPolicies are not rendered."),
                }]},
                {"eval_time": "2m", "alertname": "TunnelgateParentGroupDown", "exp_alerts": []},
                {"eval_time": "4m", "alertname": "TunnelgateParentGroupDown", "exp_alerts": [{
                    "exp_labels": {"severity": "critical", "namespace": "tunnelgate", "job": "tunnelgate-proxy",
                                   "node": "n2", "pod": "p2", "group": "corp"},
                    "exp_annotations": ann("TunnelgateParentGroupDown", "No parent of group corp has been usable from node n2 for 2 minutes: the traffic routed through it gets 502."),
                }]},
                {"eval_time": "2h", "alertname": "TunnelgateCertificateExpiring", "exp_alerts": [{
                    "exp_labels": {"severity": "warning", "namespace": "tunnelgate", "job": "tunnelgate-proxy",
                                   "node": "n1", "pod": "p1", "listener": "app"},
                    "exp_annotations": ann("TunnelgateCertificateExpiring", "The certificate of listener app expires in 9d 22h 0m 0s."),
                }]},
            ],
        }],
    }
    write_rules(tmp_path)
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests, width=1000))
    out = subprocess.run([promtool(), "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def dashboard():
    return json.loads((CHART / "files/dashboards/tunnelgate.json").read_text())


def test_dashboard_queries_are_valid_promql(tmp_path):
    """Each panel query, with Grafana's variables filled in, goes through promtool as a recording
    rule: a syntax error anywhere fails."""
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    filled = [
        e.replace("$__rate_interval", "2m").replace("$namespace", "tunnelgate").replace("$node", ".*").replace("$pod", ".*")
        for e in exprs
    ]
    group = {"groups": [{"name": "dashboard", "rules": [{"record": f"panel:{i}", "expr": e} for i, e in enumerate(filled)]}]}
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump(group, width=1000))
    out = subprocess.run([promtool(), "check", "rules", str(tmp_path / "dashboard.yaml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_shows_every_node_and_uses_the_rate_interval():
    d = dashboard()
    names = [v["name"] for v in d["templating"]["list"]]
    assert names == ["datasource", "namespace", "node", "pod"]
    panels = [p for p in d["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in d["panels"]}) == len(d["panels"])
    for p in panels:
        for t in p["targets"]:
            e = t["expr"]
            assert not re.search(r"\[\d+[smh]\]", e), f"{p['title']}: fixed range instead of $__rate_interval: {e}"
            if "tunnelgate_operator" not in e:
                assert 'node=~"$node"' in e and 'pod=~"$pod"' in e, f"{p['title']}: not filtered by node and pod"
    render_panel = next(p for p in panels if p["title"] == "Render in force per node")
    per_node = render_panel["targets"][0]
    assert per_node["expr"].startswith("tunnelgate_config_render{") and per_node["legendFormat"] == "{{node}}", \
        "one series per node: an aggregate would hide the node that is behind"
    titles = {p["title"] for p in panels}
    assert {"Denials by rule", "Denials by reason", "Tunnel close reasons", "Last reload succeeded per node"} <= titles
    # Panels do not overlap on the grid.
    cells = set()
    for p in d["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, p["title"]
                cells.add((x, y))
