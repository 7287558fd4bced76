package controlplane

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// TestProfileStrictDecode: typos and unknown fields are rejected, naming
// the field and listing the valid choices or fields.
func TestProfileStrictDecode(t *testing.T) {
	const head = "apiVersion: meshtun.io/v1alpha1\nkind: MeshConfig\n"
	for _, tc := range []struct{ doc, want string }{
		{head + "spec:\n  outboundTrafficPolicy:\n    mode: REGISTY_ONLY\n",
			`p.yaml: spec.outboundTrafficPolicy.mode: "REGISTY_ONLY" is not valid; valid choices: ALLOW_ANY, REGISTRY_ONLY`},
		{head + "spec:\n  outboundTrafficPolicy:\n    mode: registry_only\n",
			`"registry_only" is not valid; valid choices: ALLOW_ANY, REGISTRY_ONLY`},
		{head + "spec:\n  outboundTrafficPolicy:\n    mod: REGISTRY_ONLY\n",
			`p.yaml: spec.outboundTrafficPolicy: unknown field "mod"; valid fields: mode`},
		{head + "spec:\n  outboundtrafficpolicy: {mode: REGISTRY_ONLY}\n",
			`p.yaml: spec: unknown field "outboundtrafficpolicy"; valid fields: accessLogEncoding, accessLogFile, connectTimeout, defaultConfig, dnsRefreshRate, enableAutoMtls, outboundTrafficPolicy, peerAuthentication`},
		{head + "meshConfig: {}\n", `p.yaml: unknown field "meshConfig"; valid fields: apiVersion, kind, metadata, spec`},
		{head + "spec:\n  connectTimeout: ten\n", `p.yaml: spec.connectTimeout: want a duration such as "10s", got "ten"`},
		{head + "spec:\n  connectTimeout: 0s\n", `p.yaml: spec.connectTimeout: must be at least 1ms, got 0s`},
		{head + "spec:\n  peerAuthentication: strict\n", `p.yaml: spec.peerAuthentication: "strict" is not valid; valid choices: PERMISSIVE, STRICT, DISABLE`},
		{head + "spec:\n  peerAuthentication: {mode: STRICT}\n", `p.yaml: spec.peerAuthentication: want a string`},
		{head + "spec:\n  enableAutoMtls: yes please\n", `p.yaml: spec.enableAutoMtls`},
		{head + "spec:\n  accessLogEncoding: XML\n", `p.yaml: spec.accessLogEncoding: "XML" is not valid; valid choices: TEXT, JSON`},
		{head + "spec:\n  defaultConfig: {concurrency: -1}\n", `p.yaml: spec.defaultConfig.concurrency: must be 0 (all cores) or more, got -1`},
		{head + "spec:\n  defaultConfig: {concurrency: two}\n", `p.yaml: spec.defaultConfig.concurrency: want a whole number, got "two"`},
		{"apiVersion: v1\nkind: MeshConfig\n", `p.yaml: apiVersion: "v1" is not valid; valid choices: meshtun.io/v1alpha1`},
		{"apiVersion: meshtun.io/v1alpha1\nkind: ConfigMap\n", `p.yaml: kind: "ConfigMap" is not valid; valid choices: MeshConfig, IstioOperator`},
		{"apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nspec:\n  profile: ambient\n",
			`p.yaml: spec.profile: "ambient" is not valid; valid choices: default, demo`},
		{"apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nspec:\n  meshConfig:\n    outboundTrafficPolicy: {mode: REGISTY_ONLY}\n",
			`p.yaml: spec.meshConfig.outboundTrafficPolicy.mode: "REGISTY_ONLY" is not valid; valid choices: ALLOW_ANY, REGISTRY_ONLY`},
		{"apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nspec:\n  components: {}\n",
			`p.yaml: spec: unknown field "components"; valid fields: meshConfig, profile`},
		{head + "spec:\n  connectTimeout: 1s\n  connectTimeout: 2s\n", `p.yaml: yaml: unmarshal errors`},
		{"", `p.yaml: the document is empty`},
	} {
		_, err := ParseProfile("p.yaml", []byte(tc.doc))
		if err == nil {
			t.Errorf("accepted:\n%s", tc.doc)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("error\n  %s\ndoes not contain\n  %s", err, tc.want)
		}
	}
}

// TestProfileOverlaysItsBase: fields a document leaves out keep the base
// profile's values (default for MeshConfig, spec.profile for
// IstioOperator).
func TestProfileOverlaysItsBase(t *testing.T) {
	p, err := ParseProfile("p", []byte("apiVersion: meshtun.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: strict}\nspec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n  defaultConfig: {concurrency: 1}\n"))
	if err != nil {
		t.Fatal(err)
	}
	want := defaultMesh()
	want.OutboundTrafficPolicy.Mode = RegistryOnly
	want.DefaultConfig.Concurrency = 1
	if p.Metadata.Name != "strict" || !reflect.DeepEqual(p.Spec, want) {
		t.Errorf("got %+v", p)
	}
	p, err = ParseProfile("p", []byte("apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nspec:\n  profile: demo\n  meshConfig:\n    connectTimeout: 1.5s\n"))
	if err != nil {
		t.Fatal(err)
	}
	if p.Kind != kindMeshConfig || p.Metadata.Name != "demo" || p.Spec.AccessLogFile != "/dev/stdout" ||
		p.Spec.ConnectTimeout != Duration(1500*time.Millisecond) || p.Spec.OutboundTrafficPolicy.Mode != AllowAny {
		t.Errorf("got %+v", p)
	}
	// An IstioOperator as written for istioctl, namespace included.
	p, err = ParseProfile("p", []byte("apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nmetadata:\n  name: strict\n  namespace: istio-system\nspec:\n  meshConfig:\n    outboundTrafficPolicy:\n      mode: REGISTRY_ONLY\n"))
	if err != nil {
		t.Fatal(err)
	}
	if p.Metadata.Name != "strict" || p.Metadata.Namespace != "istio-system" || p.Spec.OutboundTrafficPolicy.Mode != RegistryOnly {
		t.Errorf("istioctl-style IstioOperator: got %+v", p)
	}
}

// TestProfileDumpHasEveryFieldModeFirst: a dump lists every field, the
// outbound traffic policy first, and parses back to the same profile.
func TestProfileDumpHasEveryFieldModeFirst(t *testing.T) {
	for _, name := range ProfileNames() {
		p, err := BuiltinProfile(name)
		if err != nil {
			t.Fatal(err)
		}
		b, err := MarshalProfile(p)
		if err != nil {
			t.Fatal(err)
		}
		out := string(b)
		if !strings.HasPrefix(out, "apiVersion: meshtun.io/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: "+name+"\nspec:\n  outboundTrafficPolicy:\n    mode: ALLOW_ANY\n") {
			t.Errorf("%s dump does not start with the outbound traffic policy:\n%s", name, out)
		}
		for _, f := range []string{"connectTimeout: 10s", "dnsRefreshRate: 60s", "accessLogFile: ", "accessLogEncoding: TEXT",
			"enableAutoMtls: true", "peerAuthentication: PERMISSIVE", "drainDuration: 45s", "terminationDrainDuration: 5s", "concurrency: 2"} {
			if !strings.Contains(out, f) {
				t.Errorf("%s dump lacks %q:\n%s", name, f, out)
			}
		}
		back, err := ParseProfile("dump", b)
		if err != nil {
			t.Fatalf("%s dump does not parse back: %v\n%s", name, err, out)
		}
		if !reflect.DeepEqual(back, p) {
			t.Errorf("%s: round trip %+v != %+v", name, back, p)
		}
	}
	if _, err := BuiltinProfile("minimal"); err == nil || !strings.Contains(err.Error(), "valid choices: default, demo") {
		t.Errorf("unknown built-in: %v", err)
	}
}

// TestExampleProfilesParse: the profiles in examples/ are valid, and
// profile-default.yaml is exactly the built-in default.
func TestExampleProfilesParse(t *testing.T) {
	files, _ := filepath.Glob("../examples/profile-*.yaml")
	if len(files) < 3 {
		t.Fatalf("examples/profile-*.yaml: %v", files)
	}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		p, err := ParseProfile(f, data)
		if err != nil {
			t.Errorf("%v", err)
			continue
		}
		if filepath.Base(f) == "profile-default.yaml" {
			def, _ := BuiltinProfile("default")
			if !reflect.DeepEqual(p, def) {
				t.Errorf("%s is not the built-in default: %+v", f, p)
			}
		}
	}
}

func TestDurationFormat(t *testing.T) {
	for d, want := range map[time.Duration]string{10 * time.Second: "10s", 1500 * time.Millisecond: "1.5s", 2 * time.Minute: "120s", 0: "0s"} {
		if got := Duration(d).String(); got != want {
			t.Errorf("%v: %q, want %q", d, got, want)
		}
	}
}
