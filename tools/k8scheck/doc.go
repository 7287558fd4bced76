// Package k8scheck proves meshtun's Kubernetes packaging with no cluster and no daemon: Istio's own
// istiod chart and injector (istio.io/istio's pkg/kube/inject, the code behind istioctl kube-inject and
// the webhook) render pods with the meshtun template; each pod is decoded strictly into k8s.io/api
// types, defaulted as the API server would, checked field by field and judged by the Pod Security
// Admission evaluator; meshtun's own chart goes through helm's linter and renderer and the same checks.
//
// It is its own module so that the proxy binary's dependencies stay as they are: Istio, Helm and the
// Kubernetes libraries are only test dependencies here. `make k8s-check` runs it; `go test -update`
// rewrites the generated files (deploy/istio's offline injector files, the chart's copies, goldens).
package k8scheck
