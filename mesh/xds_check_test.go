package mesh

import (
	"context"
	"net/netip"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"

	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/xdsclient"
)

// TestCheckPutsNothingInForce: Check names every invalid resource as Apply
// would (a static one as a plain error) and leaves the snapshot in force,
// its clusters and their hosts as they were; a valid configuration passes.
func TestCheckPutsNothingInForce(t *testing.T) {
	a, d := newApplier(t)
	ok := xdstest.StaticCluster("a", netip.MustParseAddrPort("10.0.0.1:80"))
	if err := a.Apply(context.Background(), resources([]*clusterv3.Cluster{ok}, nil, nil)); err != nil {
		t.Fatal(err)
	}
	before := d.Snapshot()
	changed := xdstest.StaticCluster("a", netip.MustParseAddrPort("10.0.0.9:80"))
	bad := xdstest.EDSCluster("b")
	bad.LbSubsetConfig = &clusterv3.Cluster_LbSubsetConfig{}
	err := a.Check(context.Background(), nil, nil, resources([]*clusterv3.Cluster{changed, bad},
		[]*endpointv3.ClusterLoadAssignment{badAssignment("b")}, nil))
	es, isRes := xdsclient.AsResourceErrors(err)
	if !isRes || len(es) != 2 || es[0].Name != "b" || es[1].TypeURL != xdsclient.EndpointType {
		t.Errorf("Check = %v, want cluster b and its assignment named", err)
	}
	if err := a.Check(context.Background(), nil, []*clusterv3.Cluster{bad}, resources(nil, nil, nil)); err == nil {
		t.Error("an invalid static cluster passed")
	} else if _, isRes := xdsclient.AsResourceErrors(err); isRes {
		t.Errorf("a static cluster's error is a ResourceError: %v", err)
	}
	if err := a.Check(context.Background(), nil, nil, resources([]*clusterv3.Cluster{changed}, nil, []*listenerv3.Listener{
		xdstest.TCPListener(t, "l", "10.0.0.5", 80, "a", false)})); err != nil {
		t.Errorf("a valid configuration: %v", err)
	}
	if d.Snapshot() != before {
		t.Fatal("Check swapped a snapshot in")
	}
	if hs := before.Cluster("a").Hosts(); len(hs) != 1 || hs[0].Address().String() != "10.0.0.1:80" {
		t.Errorf("cluster a's hosts = %v after Check, want 10.0.0.1:80", addrs(hs))
	}
}
