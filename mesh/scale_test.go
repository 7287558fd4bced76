package mesh

import (
	"fmt"
	"net/netip"
	"runtime"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	"google.golang.org/protobuf/types/known/durationpb"
)

// services builds n Istio-like services: a VIP listener with a tcp_proxy
// chain, an EDS cluster, and a 3-endpoint assignment each.
func services(b testing.TB, n int) ([]*listenerv3.Listener, []*clusterv3.Cluster, []*endpointv3.ClusterLoadAssignment) {
	var ls []*listenerv3.Listener
	cs := passthroughClusters()
	var eps []*endpointv3.ClusterLoadAssignment
	for i := 0; i < n; i++ {
		vip := fmt.Sprintf("10.96.%d.%d", i/250, i%250+1)
		name := fmt.Sprintf("outbound|8080||svc%d.default.svc.cluster.local", i)
		ls = append(ls, listener(b, vip+"_8080", vip, 8080, false, &no, tcpChain(b, "", name, 0)))
		cs = append(cs, &clusterv3.Cluster{Name: name, ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
			ConnectTimeout:   durationpb.New(10 * time.Second),
			EdsClusterConfig: &clusterv3.Cluster_EdsClusterConfig{EdsConfig: &corev3.ConfigSource{ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}}}}})
		cla := &endpointv3.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpointv3.LocalityLbEndpoints{{}}}
		for e := 0; e < 3; e++ {
			cla.Endpoints[0].LbEndpoints = append(cla.Endpoints[0].LbEndpoints, &endpointv3.LbEndpoint{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
				Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
					Address: fmt.Sprintf("10.%d.%d.%d", 100+e, i/250, i%250+1), PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 8080}}}}}}})
		}
		eps = append(eps, cla)
	}
	return ls, cs, eps
}

// BenchmarkApplyServices measures building and installing a snapshot of
// n services (what an xDS update of that size costs off the hot path) and
// the heap it holds afterwards.
func BenchmarkApplyServices(b *testing.B) {
	for _, n := range []int{1000, 10000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			ls, cs, eps := services(b, n)
			opts := buildOpts()
			opts.Endpoints = make(map[string]*endpointv3.ClusterLoadAssignment, len(eps))
			for _, cla := range eps {
				opts.Endpoints[cla.GetClusterName()] = cla
			}
			runtime.GC()
			var before runtime.MemStats
			runtime.ReadMemStats(&before)
			var s *Snapshot
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if s != nil {
					s.Retire(nil)
				}
				var err error
				if s, err = Build("1", ls, cs, nil, opts); err != nil {
					b.Fatal(err)
				}
				s.commit() // what Server.Apply does before the swap
				if len(s.commits) != len(eps) {
					b.Fatalf("%d assignments staged, want %d", len(s.commits), len(eps))
				}
			}
			b.StopTimer()
			runtime.GC()
			var after runtime.MemStats
			runtime.ReadMemStats(&after)
			b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/(1<<20), "heapMB")
			if s.handOff(s.outbound, mustAP("10.96.3.1:8080")) == nil {
				b.Fatal("no listener")
			}
			s.Retire(nil)
		})
	}
}

func mustAP(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }
