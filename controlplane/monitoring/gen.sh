#!/usr/bin/env bash
# Generates the PrometheusRule and ServiceMonitor CRDs (monitoring.coreos.com/v1) from
# prometheus-operator's Go types with controller-gen, as prometheus-operator's own Makefile does,
# into controlplane/monitoring/crds/. The end-to-end tests install them before the chart when
# prometheusRule / serviceMonitor are on. Run again after changing the pins in go.mod.
set -euo pipefail
cd "$(dirname "$0")"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
CGO_ENABLED=0 go build -o "$out/controller-gen" sigs.k8s.io/controller-tools/cmd/controller-gen
"$out/controller-gen" crd:crdVersions=v1,allowDangerousTypes=true,maxDescLen=0 \
  paths=github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1 \
  output:crd:dir="$out/crds"
mkdir -p crds
for kind in prometheusrules servicemonitors; do
  cp "$out/crds/monitoring.coreos.com_$kind.yaml" "crds/monitoring.coreos.com_$kind.yaml"
done
ls crds
