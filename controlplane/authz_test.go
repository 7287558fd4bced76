package controlplane

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"sigs.k8s.io/yaml"
)

// istioGolden is Istio's builder test data, copied into mesh/rbac.
const istioGolden = "../mesh/rbac/testdata/istio"

// loadIstioPolicies reads an Istio *-in.yaml (AuthorizationPolicy
// documents) as registry policies.
func loadIstioPolicies(t *testing.T, file string) []*authzPolicy {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(istioGolden, file))
	if err != nil {
		t.Fatal(err)
	}
	var out []*authzPolicy
	for i, doc := range bytes.Split(b, []byte("\n---")) {
		var ap struct {
			Metadata struct {
				Name, Namespace string
				Annotations     map[string]string
			}
			Spec struct {
				Action string
				Rules  []authzRuleSpec
			}
		}
		if err := yaml.UnmarshalStrict(doc, &ap, yaml.DisallowUnknownFields); err != nil {
			// apiVersion and kind are not ours: decode leniently after
			// checking nothing else is unknown.
			if err2 := yaml.Unmarshal(doc, &ap); err2 != nil || !strings.Contains(err.Error(), "unknown field \"apiVersion\"") && !strings.Contains(err.Error(), "unknown field \"kind\"") {
				t.Fatalf("%s[%d]: %v", file, i, err)
			}
		}
		spec := authzPolicySpec{Name: ap.Metadata.Name, Namespace: ap.Metadata.Namespace, Action: ap.Spec.Action,
			DryRun: ap.Metadata.Annotations["istio.io/dry-run"] == "true", Rules: ap.Spec.Rules}
		p, err := spec.validate(i)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, p)
	}
	sortedPolicies(out)
	return out
}

// goldenFilter reads an Istio *-out.yaml: the filter's typed_config.
func goldenFilter(t *testing.T, file string) *anypb.Any {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(istioGolden, file))
	if err != nil {
		t.Fatal(err)
	}
	js, err := yaml.YAMLToJSON(b)
	if err != nil {
		t.Fatal(err)
	}
	var f listenerv3.Filter
	if err := protojson.Unmarshal(js, &f); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	return f.GetTypedConfig()
}

// TestAuthzGeneratesAsIstiod: the registry's AuthorizationPolicies give
// the RBAC filters istiod's builder gives for the same policies (its
// golden files, compared as protos).
func TestAuthzGeneratesAsIstiod(t *testing.T) {
	for _, tc := range []struct {
		in   string
		tcp  bool
		outs []string // one per filter, in order
	}{
		{"http/deny-and-allow-in.yaml", false, []string{"http/deny-and-allow-out1.yaml", "http/deny-and-allow-out2.yaml"}},
		{"http/allow-empty-rule-in.yaml", false, []string{"http/allow-empty-rule-out.yaml"}},
		{"http/deny-empty-rule-in.yaml", false, []string{"http/deny-empty-rule-out.yaml"}},
		{"http/dry-run-allow-and-deny-in.yaml", false, []string{"http/dry-run-allow-and-deny-out1.yaml", "http/dry-run-allow-and-deny-out2.yaml"}},
		{"http/dry-run-mix-in.yaml", false, []string{"http/dry-run-mix-out.yaml"}},
		{"tcp/dry-run-mix-in.yaml", true, []string{"tcp/dry-run-mix-out.yaml"}},
	} {
		t.Run(tc.in, func(t *testing.T) {
			ps := loadIstioPolicies(t, tc.in)
			var got []*anypb.Any
			if tc.tcp {
				for _, f := range networkRBAC(ps) {
					got = append(got, f.GetTypedConfig())
				}
			} else {
				for _, f := range httpRBAC(ps) {
					got = append(got, f.GetTypedConfig())
				}
			}
			if len(got) != len(tc.outs) {
				t.Fatalf("%d filters, want %d", len(got), len(tc.outs))
			}
			for i, out := range tc.outs {
				want := goldenFilter(t, out)
				wm, _ := want.UnmarshalNew()
				gm, _ := got[i].UnmarshalNew()
				if !proto.Equal(wm, gm) {
					t.Errorf("filter %d:\ngot  %v\nwant %v (%s)", i, protojson.Format(gm), protojson.Format(wm), out)
				}
			}
		})
	}
}

// TestAuthzTCPDropsHTTPRules: for TCP, an ALLOW rule with HTTP-only
// fields is dropped (rules: {} allows nothing) and a DENY rule loses them.
func TestAuthzTCPDropsHTTPRules(t *testing.T) {
	allow := &authzPolicy{authzPolicySpec: authzPolicySpec{Name: "get", Namespace: "foo", Rules: []authzRuleSpec{{}}}, action: rbacv3.RBAC_ALLOW}
	allow.Rules[0].To = append(allow.Rules[0].To, struct {
		Operation authzOperation `json:"operation"`
	}{authzOperation{Methods: []string{"GET"}, Ports: []string{"80"}}})
	rules, _ := authzRules([]*authzPolicy{allow}, rbacv3.RBAC_ALLOW, true)
	if rules == nil || len(rules.Policies) != 0 {
		t.Fatalf("TCP ALLOW with methods: %v, want rules {}", rules)
	}
	deny := &authzPolicy{authzPolicySpec: allow.authzPolicySpec, action: rbacv3.RBAC_DENY}
	rules, _ = authzRules([]*authzPolicy{deny}, rbacv3.RBAC_DENY, true)
	p := rules.GetPolicies()["ns[foo]-policy[get]-rule[0]"]
	and := p.GetPermissions()[0].GetAndRules().GetRules()
	if len(and) != 1 || and[0].GetOrRules().GetRules()[0].GetDestinationPort() != 80 {
		t.Fatalf("TCP DENY with methods and ports: %v, want the port only", p)
	}
}

// TestAuthzRegistryErrors: a bad policy in the registry is refused naming
// the entry and field.
func TestAuthzRegistryErrors(t *testing.T) {
	for _, tc := range []struct{ doc, want string }{
		{"authorizationPolicies:\n- {name: p, action: CUSTOM}\n", "authorizationPolicies[0] (default/p).action"},
		{"authorizationPolicies:\n- {name: p, rules: [{from: [{source: {ipBlocks: [10.0.0.300]}}]}]}\n", "rules[0].from[0].source.ipBlocks"},
		{"authorizationPolicies:\n- {name: p, rules: [{to: [{operation: {ports: [http]}}]}]}\n", "rules[0].to[0].operation.ports"},
		{"authorizationPolicies:\n- {name: p, rules: [{when: [{key: request.auth.claims}]}]}\n", "when"},
	} {
		_, err := parseRegistry("registry.yaml", []byte("apiVersion: meshtun.io/v1alpha1\nkind: Registry\n"+tc.doc))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want it to name %q", tc.doc, err, tc.want)
		}
	}
}
