package k8scheck

import (
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"

	"helm.sh/helm/v4/pkg/chart/common"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	psaapi "k8s.io/pod-security-admission/api"
	"sigs.k8s.io/yaml"
)

// TestChartLintStrict is `helm lint --strict` of deploy/charts/meshtun: any warning fails.
func TestChartLintStrict(t *testing.T) {
	for _, vals := range []map[string]any{{}, {"caCertsSecret": "cacerts", "logAsJson": true, "variant": "distroless"}} {
		for _, p := range helmLintStrict(chartDir, vals) {
			t.Errorf("helm lint --strict (values %v): %s", vals, p)
		}
	}
}

// TestChartTemplate is `helm template` of the chart, each object strictly decoded into its k8s.io/api
// type and checked as the API server, the kubelet and Pod Security Admission would: the control
// plane's pod must pass PSA restricted.
func TestChartTemplate(t *testing.T) {
	cases := []struct {
		name    string
		values  map[string]any
		image   string
		cacerts bool
	}{
		{name: "defaults", values: map[string]any{}, image: "ghcr.io/meshtun/meshtun:dev"},
		{name: "cacerts", values: map[string]any{"caCertsSecret": "cacerts", "hub": "registry.example/mesh", "tag": "v1", "variant": "debug"},
			image: "registry.example/mesh/meshtun:v1-debug", cacerts: true},
		{name: "full-image", values: map[string]any{"image": "registry.example/meshtun@sha256:" + strings.Repeat("ab", 32), "injector": map[string]any{"enabled": false}},
			image: "registry.example/meshtun@sha256:" + strings.Repeat("ab", 32)},
	}
	injectCfg, err := os.ReadFile(injectConfig)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			files, err := helmTemplate(chartDir, "meshtun", "istio-system", c.values)
			if err != nil {
				t.Fatal(err)
			}
			kinds := map[string]int{}
			var dep *appsv1.Deployment
			var svc *corev1.Service
			cms := map[string]*corev1.ConfigMap{}
			for _, f := range files {
				for _, doc := range splitDocs([]byte(f)) {
					var tm metav1.TypeMeta
					if err := yaml.Unmarshal(doc, &tm); err != nil {
						t.Fatalf("chart output: %v\n%s", err, doc)
					}
					kinds[tm.Kind]++
					switch tm.Kind {
					case "Deployment":
						if dep, err = decodeDeployment(doc); err != nil {
							t.Fatalf("Deployment: %v", err)
						}
					case "Service":
						svc = &corev1.Service{}
						err = decodeStrict(doc, svc)
					case "ConfigMap":
						var cm corev1.ConfigMap
						err = decodeStrict(doc, &cm)
						cms[cm.Name] = &cm
					case "ServiceAccount":
						err = decodeStrict(doc, &corev1.ServiceAccount{})
					default:
						t.Errorf("unexpected kind %q in the chart", tm.Kind)
					}
					if err != nil {
						t.Fatalf("%s does not decode strictly: %v", tm.Kind, err)
					}
				}
			}
			if dep == nil || svc == nil || cms["meshtun-controlplane"] == nil {
				t.Fatalf("chart lacks the control plane's Deployment, Service or ConfigMap: %v", kinds)
			}
			spec := &dep.Spec.Template.Spec
			served := map[int32]string{}
			for _, ct := range spec.Containers {
				for _, p := range ct.Ports {
					served[p.ContainerPort] = ct.Name
				}
			}
			for _, p := range podProblems(spec, served) {
				t.Error(p)
			}
			cp, _ := findContainer(spec, "controlplane")
			if cp == nil || cp.Image != c.image {
				t.Fatalf("controlplane container image %v, want %s", cp, c.image)
			}
			if cp.ReadinessProbe == nil || cp.LivenessProbe == nil {
				t.Errorf("controlplane has no readiness or liveness probe")
			}
			if got := dep.Spec.Template.Labels["sidecar.istio.io/inject"]; got != "false" {
				t.Errorf("control plane pod label sidecar.istio.io/inject = %q, want \"false\" (it is not in the mesh)", got)
			}
			for _, flag := range []string{"--registry", "--profile", "--state-dir"} {
				if !slices.Contains(cp.Args, flag) {
					t.Errorf("controlplane args %q lack %s", cp.Args, flag)
				}
			}
			if got := slices.Contains(cp.Args, "--cacerts"); got != c.cacerts {
				t.Errorf("--cacerts in args = %v, want %v", got, c.cacerts)
			}
			if !strings.Contains(cms["meshtun-controlplane"].Data["registry.yaml"], "kind: Registry") ||
				!strings.Contains(cms["meshtun-controlplane"].Data["profile.yaml"], "kind: MeshConfig") {
				t.Errorf("registry/profile ConfigMap: %v", cms["meshtun-controlplane"].Data)
			}

			// The Service is named istiod so that Istio's template (CA_ADDR, discovery address) reaches it.
			if svc.Name != "istiod" {
				t.Errorf("Service name %q, want istiod", svc.Name)
			}
			var ports []int32
			for _, p := range svc.Spec.Ports {
				ports = append(ports, p.Port)
				if _, ok := served[p.TargetPort.IntVal]; !ok {
					t.Errorf("Service port %d targets %s, which the control plane does not declare", p.Port, p.TargetPort.String())
				}
			}
			if !slices.Equal(ports, []int32{15010, 15012}) {
				t.Errorf("Service ports %v, want [15010 15012]", ports)
			}
			for k, v := range svc.Spec.Selector {
				if dep.Spec.Template.Labels[k] != v {
					t.Errorf("Service selector %s=%s does not select the control plane's pods", k, v)
				}
			}

			if _, on := c.values["injector"]; !on {
				inj := cms["istio-sidecar-injector"]
				if inj == nil || cms["istio"] == nil {
					t.Fatalf("chart lacks the injector ConfigMaps (have %v)", mapKeys(cms))
				}
				if inj.Data["config"] != string(injectCfg) {
					t.Errorf("istio-sidecar-injector config differs from %s: %s", injectConfig, firstDiff(string(injectCfg), inj.Data["config"]))
				}
			} else if cms["istio-sidecar-injector"] != nil {
				t.Errorf("injector.enabled=false still renders the injector ConfigMap")
			}

			r := psa(psaapi.LevelRestricted, &dep.Spec.Template.ObjectMeta, spec)
			fmt.Printf("PSA chart %-10s control plane pod: restricted %s\n", c.name, verdict(r))
			if !r.Allowed {
				t.Errorf("control plane pod fails PSA restricted: %s", verdict(r))
			}
		})
	}
}

// TestValuesFileIsReadable guards the one file a user with Istio applies: it must hold only the meshtun
// template under sidecarInjectorWebhook.templates, and nothing else of istiod's values.
func TestValuesFileIsReadable(t *testing.T) {
	vals, err := common.ReadValuesFile(istioValues)
	if err != nil {
		t.Fatal(err)
	}
	if len(vals) != 1 {
		t.Errorf("%s sets %v; want only sidecarInjectorWebhook", istioValues, mapKeys(vals))
	}
	tmpl, err := vals.PathValue("sidecarInjectorWebhook.templates.meshtun")
	if err != nil || !strings.Contains(fmt.Sprint(tmpl), "name: istio-proxy") {
		t.Errorf("%s: sidecarInjectorWebhook.templates.meshtun missing or without istio-proxy: %v", istioValues, err)
	}
}
