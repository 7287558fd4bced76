package mesh

import (
	"context"
	"fmt"
	"net/netip"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// BenchmarkApplyAssignmentUpdate is Istio's routine push at 10,000
// services (VIP listener, EDS cluster, 3-endpoint assignment each): one
// assignment changes, everything else is carried over by pointer.
func BenchmarkApplyAssignmentUpdate(b *testing.B) {
	const n = 10000
	a, _ := newApplier(b)
	var cs []*clusterv3.Cluster
	var eps []*endpointv3.ClusterLoadAssignment
	var ls []*listenerv3.Listener
	for i := range n {
		name := fmt.Sprintf("outbound|8080||svc%d.default.svc.cluster.local", i)
		cs = append(cs, xdstest.EDSCluster(name))
		eps = append(eps, xdstest.Assignment(name, netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 100, byte(i / 250), byte(i%250 + 1)}), 8080),
			netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 101, byte(i / 250), byte(i%250 + 1)}), 8080)))
		ls = append(ls, xdstest.TCPListener(b, fmt.Sprintf("10.96.%d.%d_8080", i/250, i%250+1), fmt.Sprintf("10.96.%d.%d", i/250, i%250+1), 8080, name, false))
	}
	r := resources(cs, eps, ls)
	if err := a.Apply(context.Background(), r); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		next := *r
		next.Endpoints = make(map[string]*endpointv3.ClusterLoadAssignment, len(r.Endpoints))
		for k, v := range r.Endpoints {
			next.Endpoints[k] = v
		}
		name := cs[i%n].GetName()
		next.Endpoints[name] = xdstest.Assignment(name, netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 102, 0, byte(i%250 + 1)}), 8080))
		if err := a.Apply(context.Background(), &next); err != nil {
			b.Fatal(err)
		}
		r = &next
	}
}
