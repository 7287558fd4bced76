package k8scheck

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"helm.sh/helm/v4/pkg/chart/common"
	"istio.io/istio/pkg/config/mesh"
	"istio.io/istio/pkg/kube/inject"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	psaapi "k8s.io/pod-security-admission/api"
	"sigs.k8s.io/yaml"
)

var update = flag.Bool("update", false, "rewrite the generated injector files and the goldens instead of comparing")

const (
	root         = "../.."
	istioValues  = root + "/deploy/istio/meshtun-istiod-values.yaml"
	injectConfig = root + "/deploy/istio/inject-config.yaml"
	injectValues = root + "/deploy/istio/values.json"
	meshConfig   = root + "/deploy/istio/mesh.yaml"
	chartDir     = root + "/deploy/charts/meshtun"
	// The template's default image (meshtun.io/image overrides it).
	meshtunImage = "ghcr.io/meshtun/meshtun:dev"
	tunNode      = "/var/run/meshtun/tun"
)

// istioDir is where the pinned istio.io/istio module is, for its istiod chart and injection template.
func istioDir(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "istio.io/istio").Output()
	if err != nil {
		t.Fatalf("locating istio.io/istio: %v", err)
	}
	dir := strings.TrimSpace(string(out))
	if _, err := os.Stat(filepath.Join(dir, "manifests/charts/istio-control/istio-discovery/Chart.yaml")); err != nil {
		t.Fatalf("istio.io/istio at %s has no istiod chart: %v", dir, err)
	}
	return dir
}

// golden compares got with the file (or writes it under -update).
func golden(t *testing.T, path string, got []byte) {
	t.Helper()
	if *update {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (go test -update in tools/k8scheck writes it)", err)
	}
	if !bytes.Equal(want, got) {
		t.Errorf("%s is out of date with what Istio renders now; review the difference and rerun go test -update in tools/k8scheck:\n%s",
			path, firstDiff(string(want), string(got)))
	}
}

// firstDiff shows the first differing line, enough to see what moved.
func firstDiff(a, b string) string {
	al, bl := strings.Split(a, "\n"), strings.Split(b, "\n")
	for i := 0; i < len(al) || i < len(bl); i++ {
		var x, y string
		if i < len(al) {
			x = al[i]
		}
		if i < len(bl) {
			y = bl[i]
		}
		if x != y {
			return fmt.Sprintf("line %d:\n  file:     %q\n  rendered: %q", i+1, x, y)
		}
	}
	return "(identical lines, different ending)"
}

// TestIstiodChartWithMeshtunValues renders Istio's own istiod chart (helm's engine) with
// deploy/istio/meshtun-istiod-values.yaml, which proves the values file installs (Helm or istioctl
// install take the same values), and takes from it the three files `istioctl kube-inject` needs
// offline: the injector ConfigMap's config and values and the mesh ConfigMap. The chart ships the same
// three files for clusters without istiod.
func TestIstiodChartWithMeshtunValues(t *testing.T) {
	vals, err := common.ReadValuesFile(istioValues)
	if err != nil {
		t.Fatal(err)
	}
	docs, err := helmTemplate(filepath.Join(istioDir(t), "manifests/charts/istio-control/istio-discovery"), "istiod", "istio-system", vals)
	if err != nil {
		t.Fatal(err)
	}
	cms := map[string]*corev1.ConfigMap{}
	for _, f := range docs {
		for _, doc := range splitDocs([]byte(f)) {
			var tm metav1.TypeMeta
			if err := yaml.Unmarshal(doc, &tm); err != nil {
				t.Fatalf("istiod chart output: %v", err)
			}
			if tm.Kind != "ConfigMap" {
				continue
			}
			var cm corev1.ConfigMap
			if err := decodeStrict(doc, &cm); err != nil {
				t.Fatalf("istiod chart ConfigMap: %v", err)
			}
			cms[cm.Name] = &cm
		}
	}
	injector, meshCM := cms["istio-sidecar-injector"], cms["istio"]
	if injector == nil || meshCM == nil {
		t.Fatalf("istiod chart rendered no istio-sidecar-injector or istio ConfigMap (have %v)", mapKeys(cms))
	}
	cfg, err := inject.UnmarshalConfig([]byte(injector.Data["config"]))
	if err != nil {
		t.Fatalf("injector config: %v", err)
	}
	for _, name := range []string{"sidecar", "meshtun"} {
		if _, ok := cfg.RawTemplates[name]; !ok {
			t.Errorf("injector config has no %q template (have %v)", name, mapKeys(cfg.RawTemplates))
		}
	}
	if _, err := inject.ParseTemplates(cfg.RawTemplates); err != nil {
		t.Errorf("injector templates do not parse: %v", err)
	}
	files := map[string]string{
		injectConfig:                             injector.Data["config"],
		injectValues:                             injector.Data["values"],
		meshConfig:                               meshCM.Data["mesh"],
		chartDir + "/files/inject-config.yaml":   injector.Data["config"],
		chartDir + "/files/injector-values.json": injector.Data["values"],
		chartDir + "/files/mesh.yaml":            meshCM.Data["mesh"],
	}
	for path, content := range files {
		golden(t, path, []byte(content))
	}
}

func mapKeys[V any](m map[string]V) []string {
	var k []string
	for n := range m {
		k = append(k, n)
	}
	slices.Sort(k)
	return k
}

// injectCase is one pod of the matrix {classic, native} × {plain, holdApplicationUntilProxyStarts,
// interception NONE}, chosen by the pod's own annotations as a user would.
type injectCase struct {
	name         string
	native, hold bool
	none         bool
}

var injectCases = func() []injectCase {
	var cs []injectCase
	for _, native := range []bool{false, true} {
		placement := "classic"
		if native {
			placement = "native"
		}
		cs = append(cs,
			injectCase{name: placement + "-plain", native: native},
			injectCase{name: placement + "-hold", native: native, hold: true},
			injectCase{name: placement + "-none", native: native, none: true})
	}
	return cs
}()

// app is a sample Deployment with an httpGet, a tcpSocket (by port name) and a grpc probe, which
// the injector rewrites to the agent's /app-health.
func (c injectCase) app() []byte {
	ann := fmt.Sprintf("        inject.istio.io/templates: sidecar,meshtun\n        sidecar.istio.io/nativeSidecar: %q\n", fmt.Sprint(c.native))
	if c.hold {
		ann += "        proxy.istio.io/config: '{\"holdApplicationUntilProxyStarts\": true}'\n"
	}
	if c.none {
		ann += "        sidecar.istio.io/interceptionMode: NONE\n"
	}
	return []byte(`apiVersion: apps/v1
kind: Deployment
metadata:
  name: reviews
  namespace: bookinfo
  labels:
    app: reviews
spec:
  replicas: 1
  selector:
    matchLabels:
      app: reviews
  template:
    metadata:
      labels:
        app: reviews
        version: v1
      annotations:
` + ann + `    spec:
      serviceAccountName: reviews
      containers:
      - name: reviews
        image: example.com/bookinfo/reviews:v1
        ports:
        - name: http
          containerPort: 9080
        - name: grpc-health
          containerPort: 9090
        readinessProbe:
          httpGet:
            path: /ready
            port: 9080
        livenessProbe:
          tcpSocket:
            port: http
        startupProbe:
          grpc:
            port: 9090
`)
}

// kubeInject runs Istio's injector on a manifest exactly as `istioctl kube-inject --revision default
// --injectConfigFile … --valuesFile … --meshConfigFile …` does with no cluster: the same file parsing,
// the same inject.IntoResourceFile with no webhook.
func kubeInject(t *testing.T, in []byte) []byte {
	t.Helper()
	cfgBytes, err := os.ReadFile(injectConfig)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := inject.UnmarshalConfig(cfgBytes)
	if err != nil {
		t.Fatalf("%s: %v", injectConfig, err)
	}
	templs, err := inject.ParseTemplates(cfg.RawTemplates)
	if err != nil {
		t.Fatalf("%s: %v", injectConfig, err)
	}
	valuesBytes, err := os.ReadFile(injectValues)
	if err != nil {
		t.Fatal(err)
	}
	vc, err := inject.NewValuesConfig(string(valuesBytes))
	if err != nil {
		t.Fatalf("%s: %v", injectValues, err)
	}
	mc, err := mesh.ReadMeshConfig(meshConfig)
	if err != nil {
		t.Fatalf("%s: %v", meshConfig, err)
	}
	var out bytes.Buffer
	var warnings []string
	if err := inject.IntoResourceFile(nil, templs, vc, "", mc, bytes.NewReader(in), &out, func(w string) { warnings = append(warnings, w) }); err != nil {
		t.Fatalf("injection: %v", err)
	}
	if len(warnings) > 0 {
		t.Fatalf("injection warned: %v", warnings)
	}
	return out.Bytes()
}

// TestInjectMatrix renders the sample Deployment through Istio's injector with the sidecar and meshtun
// templates for every case, compares each with its golden, then checks it as the API server, the
// kubelet and Pod Security Admission would see it.
func TestInjectMatrix(t *testing.T) {
	for _, c := range injectCases {
		t.Run(c.name, func(t *testing.T) {
			out := kubeInject(t, c.app())
			golden(t, filepath.Join("testdata", "inject", c.name+".yaml"), out)
			docs := splitDocs(out)
			if len(docs) != 1 {
				t.Fatalf("injection gave %d documents, want 1", len(docs))
			}
			d, err := decodeDeployment(docs[0])
			if err != nil {
				t.Fatalf("injected Deployment does not decode strictly: %v", err)
			}
			checkInjected(t, c, d)
		})
	}
}

func checkInjected(t *testing.T, c injectCase, d *appsv1.Deployment) {
	t.Helper()
	meta, spec := &d.Spec.Template.ObjectMeta, &d.Spec.Template.Spec

	// What the pod's containers serve: the agent's status (15020: /app-health, metrics) and readiness
	// (15021) ports, and every port the pod's containers declare.
	served := map[int32]string{15020: "istio-proxy", 15021: "istio-proxy"}
	for _, ct := range slices.Concat(spec.InitContainers, spec.Containers) {
		for _, p := range ct.Ports {
			served[p.ContainerPort] = ct.Name
		}
	}
	for _, p := range podProblems(spec, served) {
		t.Error(p)
	}
	if got := meta.Labels["security.istio.io/tlsMode"]; got != "istio" {
		t.Errorf("label security.istio.io/tlsMode = %q, want istio", got)
	}

	for _, ct := range slices.Concat(spec.InitContainers, spec.Containers) {
		if ct.Name != "reviews" && ct.Image != meshtunImage {
			t.Errorf("container %q runs image %q, want %q", ct.Name, ct.Image, meshtunImage)
		}
	}

	// istio-init: the privileged half of the least-privilege split, absent under interception NONE.
	initC, isInit := findContainer(spec, "istio-init")
	if c.none {
		if initC != nil {
			t.Errorf("interception NONE: istio-init present")
		}
	} else {
		if initC == nil || !isInit {
			t.Fatalf("istio-init missing from initContainers")
		}
		wantArgs := []string{"agent", "--capture-only", "--tun-owner", "1337", "--tun-group", "1337", "--tun-node", tunNode}
		if !slices.Equal(initC.Args, wantArgs) || len(initC.Command) != 0 {
			t.Errorf("istio-init command %q args %q, want args %q", initC.Command, initC.Args, wantArgs)
		}
		checkCaps(t, initC, []corev1.Capability{"NET_ADMIN", "MKNOD"})
		sc := initC.SecurityContext
		if sc.RunAsUser == nil || *sc.RunAsUser != 0 || (sc.Privileged != nil && *sc.Privileged) {
			t.Errorf("istio-init must run as root, unprivileged: %+v", sc)
		}
		if initC.RestartPolicy != nil {
			t.Errorf("istio-init has restartPolicy %s: it must run to completion", *initC.RestartPolicy)
		}
		checkTunMount(t, initC)
	}

	// istio-proxy: uid 1337, nothing added, attached to the init container's TUN.
	proxy, proxyInit := findContainer(spec, "istio-proxy")
	if proxy == nil {
		t.Fatalf("istio-proxy missing")
	}
	if proxyInit != c.native {
		t.Errorf("istio-proxy in initContainers = %v, want %v (native sidecar)", proxyInit, c.native)
	}
	if c.native {
		if proxy.RestartPolicy == nil || *proxy.RestartPolicy != corev1.ContainerRestartPolicyAlways {
			t.Errorf("native istio-proxy restartPolicy = %v, want Always", proxy.RestartPolicy)
		}
		if !c.none && slices.IndexFunc(spec.InitContainers, func(x corev1.Container) bool { return x.Name == "istio-init" }) >
			slices.IndexFunc(spec.InitContainers, func(x corev1.Container) bool { return x.Name == "istio-proxy" }) {
			t.Errorf("istio-proxy starts before istio-init has made its TUN")
		}
	}
	for _, ct := range spec.InitContainers {
		if ct.Name != "istio-proxy" && ct.RestartPolicy != nil {
			t.Errorf("init container %q has restartPolicy %s; only the native sidecar may", ct.Name, *ct.RestartPolicy)
		}
	}
	wantArgs := []string{"agent", "--capture", "attach", "--tun-node", tunNode}
	if c.none {
		wantArgs = []string{"agent", "--capture", "none"}
	}
	if !slices.Equal(proxy.Args, wantArgs) || len(proxy.Command) != 0 {
		t.Errorf("istio-proxy command %q args %q, want args %q", proxy.Command, proxy.Args, wantArgs)
	}
	checkCaps(t, proxy, nil)
	sc := proxy.SecurityContext
	if sc.RunAsUser == nil || *sc.RunAsUser != 1337 || sc.RunAsGroup == nil || *sc.RunAsGroup != 1337 ||
		sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation ||
		sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem ||
		sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("istio-proxy securityContext not least-privilege: %s", mustJSON(sc))
	}
	if c.none {
		if hasVolume(spec, "meshtun-tun") {
			t.Errorf("interception NONE: the TUN volume is declared though nothing captures")
		}
	} else {
		checkTunMount(t, proxy)
	}

	// Lifecycle hooks stay Istio's; they reach meshtun through the image's pilot-agent name.
	var wantHook []string
	var hook *corev1.LifecycleHandler
	switch {
	case c.hold && !c.native:
		wantHook = []string{"pilot-agent", "wait"}
		if proxy.Lifecycle != nil {
			hook = proxy.Lifecycle.PostStart
		}
	case c.native:
		wantHook = []string{"pilot-agent", "request", "--debug-port=15020", "POST", "drain"}
		if proxy.Lifecycle != nil {
			hook = proxy.Lifecycle.PreStop
		}
	}
	if wantHook == nil {
		if proxy.Lifecycle != nil {
			t.Errorf("istio-proxy has lifecycle hooks %s; want none", mustJSON(proxy.Lifecycle))
		}
	} else if hook == nil || hook.Exec == nil || !slices.Equal(hook.Exec.Command, wantHook) {
		t.Errorf("istio-proxy lifecycle %s, want exec %q", mustJSON(proxy.Lifecycle), wantHook)
	}

	// Identity: the projected token for istiod's CA.
	aud := ""
	for _, v := range spec.Volumes {
		if v.Name == "istio-token" && v.Projected != nil {
			for _, s := range v.Projected.Sources {
				if s.ServiceAccountToken != nil && s.ServiceAccountToken.Path == "istio-token" {
					aud = s.ServiceAccountToken.Audience
				}
			}
		}
	}
	if aud != "istio-ca" {
		t.Errorf("istio-token audience %q, want istio-ca", aud)
	}

	// The app's probes go to the agent's /app-health, which meshtun serves from ISTIO_KUBE_APP_PROBERS.
	app, _ := findContainer(spec, "reviews")
	probers := envValue(proxy, "ISTIO_KUBE_APP_PROBERS")
	for kind, p := range map[string]*corev1.Probe{"readyz": app.ReadinessProbe, "livez": app.LivenessProbe, "startupz": app.StartupProbe} {
		path := "/app-health/reviews/" + kind
		if p == nil || p.HTTPGet == nil || p.HTTPGet.Port.IntValue() != 15020 || p.HTTPGet.Path != path {
			t.Errorf("app probe %s not rewritten to :15020%s: %s", kind, path, mustJSON(p))
		}
		if !strings.Contains(probers, `"`+path+`"`) {
			t.Errorf("ISTIO_KUBE_APP_PROBERS lacks %s: %s", path, probers)
		}
	}

	// Pod Security: the sidecar alone is restricted-clean; the pod's verdict is printed.
	if r := psa(psaapi.LevelRestricted, meta, alone(spec, *proxy)); !r.Allowed {
		t.Errorf("istio-proxy alone fails PSA restricted: %s", verdict(r))
	}
	base, restr := psa(psaapi.LevelBaseline, meta, spec), psa(psaapi.LevelRestricted, meta, spec)
	fmt.Printf("PSA %-13s pod: baseline %s\n", c.name, verdict(base))
	fmt.Printf("PSA %-13s pod: restricted %s\n", c.name, verdict(restr))
	if c.none {
		if !base.Allowed {
			t.Errorf("interception NONE pod fails baseline: %s", verdict(base))
		}
	} else {
		// The only thing keeping the pod out of baseline is istio-init's NET_ADMIN, as with stock Istio's
		// istio-init (MKNOD is a baseline capability).
		if base.Allowed || len(base.ForbiddenReasons) != 1 || base.ForbiddenReasons[0] != "non-default capabilities" ||
			!strings.Contains(base.ForbiddenDetails[0], `container "istio-init" must not include "NET_ADMIN"`) ||
			strings.Contains(base.ForbiddenDetails[0], "MKNOD") || strings.Contains(base.ForbiddenDetails[0], "istio-proxy") {
			t.Errorf("baseline verdict %s; want only istio-init's NET_ADMIN", verdict(base))
		}
	}
}

func checkCaps(t *testing.T, c *corev1.Container, add []corev1.Capability) {
	t.Helper()
	sc := c.SecurityContext
	if sc == nil || sc.Capabilities == nil {
		t.Errorf("%s: no capabilities set", c.Name)
		return
	}
	if !slices.Equal(sc.Capabilities.Add, add) || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("%s: capabilities add %v drop %v, want add %v drop [ALL]", c.Name, sc.Capabilities.Add, sc.Capabilities.Drop, add)
	}
}

func checkTunMount(t *testing.T, c *corev1.Container) {
	t.Helper()
	for _, m := range c.VolumeMounts {
		if m.Name == "meshtun-tun" && m.MountPath == filepath.Dir(tunNode) && !m.ReadOnly {
			return
		}
	}
	t.Errorf("%s: no writable meshtun-tun mount at %s", c.Name, filepath.Dir(tunNode))
}

func hasVolume(spec *corev1.PodSpec, name string) bool {
	return slices.ContainsFunc(spec.Volumes, func(v corev1.Volume) bool { return v.Name == name })
}

func envValue(c *corev1.Container, name string) string {
	for _, e := range c.Env {
		if e.Name == name {
			return e.Value
		}
	}
	return ""
}

func mustJSON(v any) string {
	b, err := yaml.Marshal(v)
	if err != nil {
		return err.Error()
	}
	return strings.TrimSpace(string(b))
}
