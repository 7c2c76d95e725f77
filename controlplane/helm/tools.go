//go:build tools

// Package tools pins helm, which the end-to-end tests use to install the chart. It is a module of
// its own so that helm's requirements never move the Kubernetes pins of the parent module.
package tools

import _ "helm.sh/helm/v4/cmd/helm"
