//go:build tools

// Package tools pins controller-gen and prometheus-operator's API types, from which gen.sh makes
// the PrometheusRule and ServiceMonitor CRDs that the end-to-end tests install before the chart.
package tools

import (
	_ "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	_ "sigs.k8s.io/controller-tools/cmd/controller-gen"
)
