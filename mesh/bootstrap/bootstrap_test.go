package bootstrap

import (
	"strings"
	"testing"

	xdstype "github.com/cncf/xds/go/xds/type/v3"
)

func TestLoadSample(t *testing.T) {
	b, err := Load("../../examples/sidecar-bootstrap.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if got := len(b.GetStaticResources().GetListeners()); got != 3 {
		t.Fatalf("%d listeners, want 3", got)
	}
	if got := len(b.GetStaticResources().GetClusters()); got != 4 {
		t.Fatalf("%d clusters, want 4", got)
	}
	// istio.stats's PluginConfig is not linked in: kept, wrapped, with its URL.
	f := b.GetStaticResources().GetListeners()[0].GetFilterChains()[1].GetFilters()[0]
	if f.GetTypedConfig().GetTypeUrl() != TypedStructURL {
		t.Fatalf("unknown type kept as %q, want a TypedStruct", f.GetTypedConfig().GetTypeUrl())
	}
	var ts xdstype.TypedStruct
	if err := f.GetTypedConfig().UnmarshalTo(&ts); err != nil || ts.GetTypeUrl() != "type.googleapis.com/stats.PluginConfig" {
		t.Fatalf("wrapped type_url = %q (%v), want the original", ts.GetTypeUrl(), err)
	}
}

func TestParseErrorsNameTheProblem(t *testing.T) {
	for _, tc := range []struct {
		name, doc, want string
	}{
		{"unknown field", "static_resources:\n  listners: []\n", `listners`},
		{"bad yaml", "node: [\n", "not valid YAML"},
		{"bad port", "static_resources:\n  listeners:\n  - name: l\n    address: {socket_address: {address: 1.2.3.4, port_value: 70000}}\n", "PortValue: value must be less than or equal to 65535"},
		{"wrong type", "admin: {address: 5}\n", "unexpected token 5"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.doc), "test.yaml", true)
			if err == nil {
				t.Fatal("parse succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "test.yaml") {
				t.Fatalf("error %q does not name %q and the file", err, tc.want)
			}
		})
	}
}

func TestJSONBootstrap(t *testing.T) {
	b, err := Parse([]byte(`{"node":{"id":"n1","cluster":"c"}}`), "b.json", false)
	if err != nil || b.GetNode().GetId() != "n1" {
		t.Fatalf("got %v, %v", b, err)
	}
}
