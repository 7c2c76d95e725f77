#!/usr/bin/env python3
"""Writes charts/tunnelgate/README.md from values.yaml, helm-docs style: every value with its type,
default and the `# --` comment above it. `--check` exits 1 when the README is out of date (the
test suite runs it)."""

import json
import pathlib
import re
import sys

import yaml

CHART = pathlib.Path(__file__).resolve().parents[1] / "charts" / "tunnelgate"

HEADER = """# tunnelgate

{description}

Kubernetes {kube}. Install:

```sh
helm install tunnelgate charts/tunnelgate --namespace tunnelgate --create-namespace
```

[Installing in a cluster](../../docs/install.md) explains what the chart installs and the two
topologies (node-local proxies or an egress gateway); [the documentation](../../docs/README.md)
covers policies, monitoring and the runbook. This page is generated from `values.yaml` by `scripts/chart-readme.py`;
every value is also checked by `values.schema.json`.

## Values

| Key | Type | Default | Description |
|-----|------|---------|-------------|
"""


def comments(lines):
    """The `# --` description of each key path, from the comment block right above the key."""
    out, stack, block = {}, [], None
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("# --"):
            block = [stripped[4:].strip()]
            continue
        if stripped.startswith("#"):
            if block is not None:
                block.append(stripped[1:].strip())
            continue
        m = re.match(r"^(\s*)([A-Za-z0-9_]+):", line)
        if not m:
            block = None if stripped else block
            continue
        depth = len(m.group(1)) // 2
        stack = stack[:depth] + [m.group(2)]
        if block is not None:
            out[".".join(stack)] = " ".join(b for b in block if b)
        block = None
    return out


def leaves(values, prefix=""):
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from leaves(value, path + ".")
        else:
            yield path, value


def kind(value):
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object", type(None): "null"}[type(value)]


def render():
    text = (CHART / "values.yaml").read_text()
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    docs = comments(text.splitlines())
    rows = []
    for path, value in leaves(yaml.safe_load(text)):
        default = json.dumps(value, separators=(",", ":")).replace("|", "\\|")
        # A comment on a parent map describes the leaves that have none of their own.
        desc = docs.get(path) or next((docs[p] for p in reversed(prefixes(path)) if p in docs), "")
        desc = desc.replace("|", "\\|")
        rows.append(f"| `{path}` | {kind(value)} | `{default}` | {desc} |")
    return HEADER.format(description=chart["description"], kube=chart.get("kubeVersion", "")) + "\n".join(rows) + "\n"


def prefixes(path):
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


if __name__ == "__main__":
    want = render()
    target = CHART / "README.md"
    if "--check" in sys.argv:
        if not target.exists() or target.read_text() != want:
            print("charts/tunnelgate/README.md is out of date: run scripts/chart-readme.py", file=sys.stderr)
            sys.exit(1)
    else:
        target.write_text(want)
