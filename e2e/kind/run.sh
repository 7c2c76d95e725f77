#!/usr/bin/env bash
# kind end-to-end suite (needs Docker, kind, helm, kubectl, cargo): cluster → CRD admission check →
# image → kind load → helm install → `cargo test -p e2e --test kind -- --ignored`. Leaves the
# cluster for inspection unless KEEP_CLUSTER is unset and the suite passed.
#   KIND_NODE_IMAGE  node image (Kubernetes version) of the cluster; kind's default when unset.
set -euo pipefail
cd "$(dirname "$0")/../.."
CLUSTER=${CLUSTER:-tunnelgate-e2e}
IMAGE=tunnelgate:e2e
image_args=()
if [ -n "${KIND_NODE_IMAGE:-}" ]; then image_args=(--image "$KIND_NODE_IMAGE"); fi
kind get clusters | grep -qx "$CLUSTER" ||
  kind create cluster --name "$CLUSTER" --config e2e/kind/kind-config.yaml --wait 120s "${image_args[@]}"
kubectl version
# First: the API server must accept the CRD (schema, CEL compilation and cost). A rejected CRD
# fails here, loudly, instead of as a helm install timeout.
kubectl apply --server-side --dry-run=server -f crds/tunnelpolicies.yaml -f crds/clustertunnelpolicies.yaml
docker build --build-arg GIT_SHA="$(git rev-parse --short=12 HEAD 2>/dev/null)" -t "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"
helm upgrade --install tunnelgate charts/tunnelgate --namespace tunnelgate --create-namespace \
  --set image.repository=tunnelgate --set image.tag=e2e --set image.pullPolicy=Never \
  --set proxy.drainDelay=2s --set proxy.drainTimeout=20s --set proxy.terminationGracePeriodSeconds=30 \
  --set operator.replicas=2 --wait --timeout 5m \
  --set-json 'config.addressGrants=[{"namespaces":["*"],"cidrs":["10.0.0.0/8"]}]'
kubectl -n tunnelgate rollout status daemonset/tunnelgate-proxy --timeout=3m
# A second release in the egress-gateway topology (CRDs come from the first).
helm upgrade --install tunnelgate-gw charts/tunnelgate --namespace tunnelgate-gw --create-namespace \
  --set image.repository=tunnelgate --set image.tag=e2e --set image.pullPolicy=Never \
  --set crds.enabled=false --set rbac.userRoles=false --set proxy.kind=Deployment \
  --set operator.policyStatus=false \
  --set proxy.gateway.replicas=2 --wait --timeout 5m \
  --set-json 'config.addressGrants=[{"namespaces":["*"],"cidrs":["10.0.0.0/8"]}]'
kubectl -n tunnelgate-gw rollout status deployment/tunnelgate-gw-proxy --timeout=3m
TUNNELGATE_KIND=1 cargo test -p e2e --test kind -- --ignored --test-threads=1
if [ -z "${KEEP_CLUSTER:-}" ]; then kind delete cluster --name "$CLUSTER"; fi
