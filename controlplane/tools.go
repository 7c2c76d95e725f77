//go:build tools

// Package tools pins the Kubernetes control-plane programs that the end-to-end tests run.
// Nothing here is compiled into Tunnelgate; build.sh builds the binaries from these imports.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
