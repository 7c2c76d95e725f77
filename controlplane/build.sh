#!/usr/bin/env bash
# Builds the Kubernetes control plane that the end-to-end tests run (kube-apiserver, etcd,
# kube-controller-manager) from the Go modules pinned in this directory's go.mod/go.sum, and helm
# from helm/go.mod. Binaries are cached outside the work tree, keyed by a hash of the pins and of
# this script, so only the first run on a machine pays for the build (about 15-25 minutes on 2
# cores; later runs take well under a second).
#
# Prints the directory holding the binaries on its last line of standard output.
# Environment: TUNNELGATE_CONTROLPLANE_CACHE (default ~/.cache/tunnelgate/controlplane).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
pin() { grep -oE "(^|[[:space:]])$1 v[^[:space:]]+" "$2" | head -n 1 | awk '{print $2}'; }
K8S_VERSION=$(pin k8s.io/kubernetes go.mod)
ETCD_VERSION=$(pin go.etcd.io/etcd/server/v3 go.mod)
HELM_VERSION=$(pin helm.sh/helm/v4 helm/go.mod)
for v in K8S_VERSION ETCD_VERSION HELM_VERSION; do
  [ -n "${!v}" ] || { echo "controlplane/build.sh: no $v pin found" >&2; exit 1; }
done
key=$(cat go.mod go.sum helm/go.mod helm/go.sum build.sh | sha256sum | cut -c1-16)
cache="${TUNNELGATE_CONTROLPLANE_CACHE:-$HOME/.cache/tunnelgate/controlplane}"
out="$cache/$key"
want=(etcd kube-apiserver kube-controller-manager helm)
ok=1
for b in "${want[@]}"; do [ -x "$out/$b" ] || ok=0; done
if [ "$ok" = 1 ]; then
  echo "$out"
  exit 0
fi
command -v go >/dev/null 2>&1 || { echo "controlplane/build.sh: Go is needed to build the control plane (go not found on PATH)" >&2; exit 1; }
mkdir -p "$out.partial"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false
minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
ver_flags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ver_flags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
done
build() { # name package [ldflags]
  local name=$1 pkg=$2 ld=${3:-}
  [ -x "$out.partial/$name" ] && return 0
  echo "controlplane: building $name ($pkg)" >&2
  local t0=$SECONDS
  go build -trimpath -pgo=off -ldflags="-s -w $ld" -o "$out.partial/$name" "$pkg"
  echo "controlplane: built $name in $((SECONDS - t0)) s" >&2
}
build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$ver_flags"
build kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$ver_flags"
build etcd go.etcd.io/etcd/server/v3 "-X go.etcd.io/etcd/api/v3/version.Version=${ETCD_VERSION#v}"
(cd helm && build helm helm.sh/helm/v4/cmd/helm "-X helm.sh/helm/v4/internal/version.version=$HELM_VERSION")
rm -rf "$out"
mv "$out.partial" "$out"
# Builds of earlier pins are of no further use.
find "$cache" -mindepth 1 -maxdepth 1 -type d ! -name "$key" -exec rm -rf {} +
echo "$out"
