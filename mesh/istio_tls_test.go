package mesh

import (
	"errors"
	"io/fs"
	"os"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/proto"

	"github.com/meshtun/meshtun/mesh/secrets"
)

// istioFixture reads one of the real istiod responses in shared/istio.
func istioFixture[T proto.Message](t *testing.T, file string, mk func() T) []T {
	t.Helper()
	path := "../../shared/istio/permissive-allow-any/" + file
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s missing: CI must check out shared/ beside the repository", path)
		}
		t.Skipf("%s not present", path)
	}
	var dr discoveryv3.DiscoveryResponse
	if err := proto.Unmarshal(b, &dr); err != nil {
		t.Fatal(err)
	}
	var out []T
	for _, a := range dr.GetResources() {
		m := mk()
		if err := proto.Unmarshal(a.GetValue(), m); err != nil {
			t.Fatal(err)
		}
		out = append(out, m)
	}
	return out
}

// istiod's real clusters and endpoints build whole (their TLS contexts
// compiled, before any secret arrived), and each endpoint takes the match
// its tlsMode label selects: tlsMode-istio for the sidecar-injected app,
// tlsMode-disabled for the rest.
func TestIstioClustersTransportMatches(t *testing.T) {
	clusters := istioFixture(t, "clusters.pb", func() *clusterv3.Cluster { return &clusterv3.Cluster{} })
	cla := istioFixture(t, "endpoints.pb", func() *endpointv3.ClusterLoadAssignment { return &endpointv3.ClusterLoadAssignment{} })
	eps := map[string]*endpointv3.ClusterLoadAssignment{}
	for _, c := range cla {
		eps[c.GetClusterName()] = c
	}
	opts := buildOpts()
	opts.AddedViaAPI, opts.AllowUnknownClusters, opts.Endpoints, opts.Secrets = true, true, eps, secrets.NewStore()
	s, err := Build("1", nil, clusters, nil, opts)
	if err != nil {
		t.Fatalf("istiod's clusters: %v", err)
	}
	defer s.Retire(nil)
	s.commit()
	want := map[string]string{
		"outbound|8080||app.default.svc.cluster.local":        "tlsMode-istio",
		"outbound|80||httpbin.default.svc.cluster.local":      "tlsMode-disabled",
		"outbound|5432||postgres.default.svc.cluster.local":   "tlsMode-disabled",
		"outbound|53||kube-dns.kube-system.svc.cluster.local": "tlsMode-disabled",
	}
	for name, match := range want {
		c := s.Cluster(name)
		if c == nil {
			t.Fatalf("no cluster %s", name)
		}
		hosts := c.Hosts()
		if len(hosts) == 0 {
			t.Fatalf("%s: no hosts", name)
		}
		for _, h := range hosts {
			if got := c.TransportMatch(h); got != match {
				t.Errorf("%s host %s: match %q, want %q", name, h, got, match)
			}
		}
		if s.ClusterSSL(name) == nil {
			t.Errorf("%s: no ssl stats block", name)
		}
	}
	if s.ClusterSSL("PassthroughCluster") != nil {
		t.Error("PassthroughCluster has an ssl block")
	}
}
