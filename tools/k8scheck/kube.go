package k8scheck

import (
	"bytes"
	"fmt"
	"reflect"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
	psaapi "k8s.io/pod-security-admission/api"
	"k8s.io/pod-security-admission/policy"
	"sigs.k8s.io/yaml"
)

// splitDocs splits a multi-document YAML stream, dropping empty documents.
func splitDocs(b []byte) [][]byte {
	var docs [][]byte
	for _, d := range bytes.Split(b, []byte("\n---")) {
		d = bytes.TrimPrefix(bytes.TrimSpace(d), []byte("---"))
		if len(bytes.TrimSpace(d)) > 0 {
			docs = append(docs, d)
		}
	}
	return docs
}

// decodeStrict decodes one document into a typed object; an unknown or misspelled field is an error,
// as the API server's strict field validation would report it.
func decodeStrict(doc []byte, into any) error {
	return yaml.UnmarshalStrict(doc, into)
}

// decodeDeployment strictly decodes a Deployment and applies the defaulting offline rendering lacks.
func decodeDeployment(doc []byte) (*appsv1.Deployment, error) {
	var d appsv1.Deployment
	if err := decodeStrict(doc, &d); err != nil {
		return nil, err
	}
	if d.Kind != "Deployment" {
		return nil, fmt.Errorf("kind %q, want Deployment", d.Kind)
	}
	defaultVolumes(&d.Spec.Template.Spec)
	return &d, nil
}

// defaultVolumes does what the API server's SetDefaults_Volume does: a volume with no source at all
// becomes an emptyDir. Istio's template writes `- emptyDir:` with no value for its socket volumes,
// which an offline check would otherwise see as a volume of unknown type.
func defaultVolumes(spec *corev1.PodSpec) {
	for i := range spec.Volumes {
		src := reflect.ValueOf(spec.Volumes[i].VolumeSource)
		empty := true
		for f := 0; f < src.NumField(); f++ {
			if !src.Field(f).IsNil() {
				empty = false
				break
			}
		}
		if empty {
			spec.Volumes[i].EmptyDir = &corev1.EmptyDirVolumeSource{}
		}
	}
}

// podProblems checks what an API server and kubelet would refuse or fail on, with no cluster:
// container names unique and DNS-1123 labels, every mount naming a declared volume, restartPolicy only
// on init containers (the native sidecar), every probe on a port something in the pod serves.
// served maps a port to the container that serves it (app ports come from the pod's containerPorts).
func podProblems(spec *corev1.PodSpec, served map[int32]string) []string {
	var probs []string
	vols := map[string]bool{}
	for _, v := range spec.Volumes {
		if vols[v.Name] {
			probs = append(probs, fmt.Sprintf("volume %q declared twice", v.Name))
		}
		vols[v.Name] = true
	}
	names := map[string]bool{}
	check := func(c corev1.Container, init bool) {
		for _, e := range validation.IsDNS1123Label(c.Name) {
			probs = append(probs, fmt.Sprintf("container %q: %s", c.Name, e))
		}
		if names[c.Name] {
			probs = append(probs, fmt.Sprintf("container %q appears twice", c.Name))
		}
		names[c.Name] = true
		if c.RestartPolicy != nil && !init {
			probs = append(probs, fmt.Sprintf("container %q: restartPolicy is only valid on init containers", c.Name))
		}
		for _, m := range c.VolumeMounts {
			if !vols[m.Name] {
				probs = append(probs, fmt.Sprintf("container %q: mount %s names volume %q, which the pod does not declare", c.Name, m.MountPath, m.Name))
			}
		}
		for kind, p := range map[string]*corev1.Probe{"readinessProbe": c.ReadinessProbe, "livenessProbe": c.LivenessProbe, "startupProbe": c.StartupProbe} {
			if p == nil {
				continue
			}
			port, ok := probePort(c, p)
			if !ok {
				probs = append(probs, fmt.Sprintf("container %q: %s has no port", c.Name, kind))
				continue
			}
			if _, ok := served[port]; !ok {
				probs = append(probs, fmt.Sprintf("container %q: %s on port %d, which nothing in the pod serves", c.Name, kind, port))
			}
		}
	}
	for _, c := range spec.InitContainers {
		check(c, true)
	}
	for _, c := range spec.Containers {
		check(c, false)
	}
	return probs
}

// probePort resolves a probe's port, by number or by the container's port name.
func probePort(c corev1.Container, p *corev1.Probe) (int32, bool) {
	var port intstr.IntOrString
	switch {
	case p.HTTPGet != nil:
		port = p.HTTPGet.Port
	case p.TCPSocket != nil:
		port = p.TCPSocket.Port
	case p.GRPC != nil:
		return p.GRPC.Port, true
	default:
		return 0, false
	}
	if port.Type == intstr.Int {
		return port.IntVal, true
	}
	for _, cp := range c.Ports {
		if cp.Name == port.StrVal {
			return cp.ContainerPort, true
		}
	}
	return 0, false
}

// findContainer returns the named container and whether it is an init container.
func findContainer(spec *corev1.PodSpec, name string) (*corev1.Container, bool) {
	for i := range spec.InitContainers {
		if spec.InitContainers[i].Name == name {
			return &spec.InitContainers[i], true
		}
	}
	for i := range spec.Containers {
		if spec.Containers[i].Name == name {
			return &spec.Containers[i], false
		}
	}
	return nil, false
}

var psaEvaluator = func() policy.Evaluator {
	e, err := policy.NewEvaluator(policy.DefaultChecks(), nil)
	if err != nil {
		panic(err)
	}
	return e
}()

// psa evaluates a pod at a Pod Security level (latest version), as the admission plugin would.
func psa(level psaapi.Level, meta *metav1.ObjectMeta, spec *corev1.PodSpec) policy.AggregateCheckResult {
	return policy.AggregateCheckResults(psaEvaluator.EvaluatePod(psaapi.LevelVersion{Level: level, Version: psaapi.LatestVersion()}, meta, spec))
}

// verdict is a one-line summary of a PSA result for the check's output.
func verdict(r policy.AggregateCheckResult) string {
	if r.Allowed {
		return "allowed"
	}
	var parts []string
	for i, reason := range r.ForbiddenReasons {
		parts = append(parts, reason+" ("+r.ForbiddenDetails[i]+")")
	}
	return "forbidden: " + strings.Join(parts, "; ")
}

// alone is a pod holding only the given container (as a regular container) and the volumes the
// original pod declares: how PSA judges that one container, since its checks read the pod-level
// security context and volumes too.
func alone(spec *corev1.PodSpec, c corev1.Container) *corev1.PodSpec {
	c.RestartPolicy = nil
	return &corev1.PodSpec{Containers: []corev1.Container{c}, Volumes: spec.Volumes, SecurityContext: spec.SecurityContext}
}
