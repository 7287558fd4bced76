package xdsclient

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
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// decodeAs decodes msgs as one response of kind k and checks that every
// resource is what was sent, whatever it shares.
func decodeAs[M proto.Message](t *testing.T, k kind, msgs ...M) []M {
	t.Helper()
	var raws []rawResource
	for _, m := range msgs {
		raws = append(raws, rawResource{any: xdstest.MustAny(t, m)})
	}
	out, err := decode(&response{kind: k, resources: raws})
	if err != nil {
		t.Fatal(err)
	}
	got := make([]M, len(out))
	for i, d := range out {
		got[i] = d.entry.msg.(M)
		if !proto.Equal(got[i], msgs[i]) {
			t.Errorf("resource %d decoded as %v, sent %v", i, got[i], msgs[i])
		}
	}
	return got
}

// Equal parts of the resources of a response are one copy: whole
// locality groups, else single endpoints; a cluster's parts but its
// metadata; the filters of a listener's chains. Parts that differ are not
// shared, and every resource stays what was sent.
func TestDecodeSharesRepeatedParts(t *testing.T) {
	ap := netip.MustParseAddrPort
	as := decodeAs(t, kindEndpoint,
		xdstest.AssignmentOf("a", xdstest.EndpointsAt(ap("10.0.0.1:80"), ap("10.0.0.2:80"))...),
		xdstest.AssignmentOf("b", xdstest.EndpointsAt(ap("10.0.0.1:80"), ap("10.0.0.2:80"))...),
		xdstest.AssignmentOf("c", xdstest.EndpointsAt(ap("10.0.0.1:80"), ap("10.0.0.3:80"))...))
	group := func(i int) *endpointv3.LocalityLbEndpoints { return as[i].GetEndpoints()[0] }
	if group(0) != group(1) {
		t.Error("equal locality groups of a and b: two copies")
	}
	if group(2) == group(0) {
		t.Fatal("c's group, which differs, shares a's")
	}
	if group(2).GetLbEndpoints()[0] != group(0).GetLbEndpoints()[0] {
		t.Error("endpoint 10.0.0.1:80 of a and c: two copies")
	}
	if group(2).GetLbEndpoints()[1] == group(0).GetLbEndpoints()[1] {
		t.Error("c's 10.0.0.3:80 shares a's 10.0.0.2:80")
	}

	meta := func() *corev3.Metadata {
		s, _ := structpb.NewStruct(map[string]any{"services": "svc"})
		return &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{"istio": s}}
	}
	withMeta := func(pb *clusterv3.Cluster) { pb.Metadata = meta() }
	cs := decodeAs(t, kindCluster,
		xdstest.EDSCluster("x", xdstest.WithConnectTimeout(time.Second), withMeta),
		xdstest.EDSCluster("y", xdstest.WithConnectTimeout(time.Second), withMeta),
		xdstest.EDSCluster("z", xdstest.WithConnectTimeout(2*time.Second)))
	if cs[0].GetConnectTimeout() != cs[1].GetConnectTimeout() {
		t.Error("equal connect timeouts of x and y: two copies")
	}
	if cs[2].GetConnectTimeout() == cs[0].GetConnectTimeout() {
		t.Error("z's 2 s timeout shares x's 1 s")
	}
	if cs[0].GetEdsClusterConfig() == cs[1].GetEdsClusterConfig() {
		t.Error("EDS configs naming different services share a copy")
	}
	if cs[0].GetMetadata() == cs[1].GetMetadata() {
		t.Error("metadata shared: it is left out")
	}

	other := xdstest.TCPListener(t, "l3", "10.0.0.3", 9000, "c", false)
	other.FilterChains[0].FilterChainMatch = &listenerv3.FilterChainMatch{DestinationPort: nil, ServerNames: []string{"x"}}
	ls := decodeAs(t, kindListener,
		xdstest.TCPListener(t, "l0", "10.0.0.1", 9000, "c", false),
		xdstest.TCPListener(t, "l1", "10.0.0.2", 9000, "c", false),
		xdstest.TCPListener(t, "l2", "10.0.0.2", 9001, "d", false),
		other)
	chain := func(i int) *listenerv3.FilterChain { return ls[i].GetFilterChains()[0] }
	filter := func(i int) *listenerv3.Filter { return chain(i).GetFilters()[0] }
	if filter(0) != filter(1) || filter(3) != filter(0) {
		t.Error("the equal tcp_proxy filters of l0, l1 and l3: more than one copy")
	}
	if filter(2) == filter(0) {
		t.Error("l2's filter to another cluster shares l0's")
	}
	if chain(3) == chain(0) {
		t.Error("l3's chain, which has a match, shares l0's")
	}
	if ls[0].GetAddress() == ls[1].GetAddress() {
		t.Error("different addresses share a copy")
	}
}

// A singular field the wire sets twice is merged by decoding into a value
// neither occurrence encodes: it is not shared, in either order, and each
// resource stays what its bytes say.
func TestDecodeSharesNoMergedField(t *testing.T) {
	once := xdstest.EDSCluster("once", xdstest.WithConnectTimeout(time.Second))
	first, err := proto.Marshal(xdstest.EDSCluster("twice", xdstest.WithConnectTimeout(time.Second)))
	if err != nil {
		t.Fatal(err)
	}
	second, err := proto.Marshal(&clusterv3.Cluster{ConnectTimeout: &durationpb.Duration{Nanos: 5}})
	if err != nil {
		t.Fatal(err)
	}
	twice := &anypb.Any{TypeUrl: ClusterType, Value: append(first, second...)}
	for _, order := range [][]int{{0, 1}, {1, 0}} {
		anys := []*anypb.Any{xdstest.MustAny(t, once), twice}
		raws := []rawResource{{any: anys[order[0]]}, {any: anys[order[1]]}}
		out, err := decode(&response{kind: kindCluster, resources: raws})
		if err != nil {
			t.Fatal(err)
		}
		for i, d := range out {
			want := new(clusterv3.Cluster)
			if err := proto.Unmarshal(raws[i].any.GetValue(), want); err != nil {
				t.Fatal(err)
			}
			if !proto.Equal(d.entry.msg, want) {
				t.Errorf("order %v: %s decoded as %v, its bytes say %v", order, d.name, d.entry.msg, want)
			}
		}
		byName := map[string]*clusterv3.Cluster{}
		for _, d := range out {
			byName[d.name] = d.entry.msg.(*clusterv3.Cluster)
		}
		if got := byName["twice"].GetConnectTimeout(); got.GetSeconds() != 1 || got.GetNanos() != 5 {
			t.Errorf("order %v: merged timeout %v, want 1.000000005s", order, got)
		}
		if byName["once"].GetConnectTimeout() == byName["twice"].GetConnectTimeout() {
			t.Errorf("order %v: the merged timeout is shared", order)
		}
	}
}

// BenchmarkDecodeHeld decodes the assignments, clusters and listeners of
// 10,000 services and reports the heap their decoded messages hold:
// "own-pods" gives each service endpoints of its own, "same-pods" gives
// all services the same three (the shape of integration TestXDSScale).
func BenchmarkDecodeHeld(b *testing.B) {
	const n = 10000
	for _, shape := range []string{"own-pods", "same-pods"} {
		b.Run(shape, func(b *testing.B) {
			var raws [3][]rawResource
			for i := range n {
				vip := fmt.Sprintf("10.96.%d.%d", i/250, i%250+1)
				name := fmt.Sprintf("outbound|8080||svc%d.default.svc.cluster.local", i)
				var eps []netip.AddrPort
				for e := range 3 {
					if shape == "own-pods" {
						eps = append(eps, netip.MustParseAddrPort(fmt.Sprintf("10.%d.%d.%d:8080", 100+e, i/250, i%250+1)))
					} else {
						eps = append(eps, netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 100, 0, byte(e + 1)}), 8080))
					}
				}
				for k, m := range []proto.Message{
					xdstest.AssignmentOf(name, xdstest.EndpointsAt(eps...)...),
					xdstest.EDSCluster(name),
					xdstest.TCPListener(b, vip+"_8080", vip, 8080, name, false),
				} {
					raws[k] = append(raws[k], rawResource{any: xdstest.MustAny(b, m)})
				}
			}
			var held uint64
			for range b.N {
				runtime.GC()
				var before, after runtime.MemStats
				runtime.ReadMemStats(&before)
				var out [3][]namedEntry
				for k, kd := range []kind{kindEndpoint, kindCluster, kindListener} {
					var err error
					if out[k], err = decode(&response{kind: kd, resources: raws[k]}); err != nil {
						b.Fatal(err)
					}
				}
				runtime.GC()
				runtime.ReadMemStats(&after)
				held = after.HeapAlloc - before.HeapAlloc
				runtime.KeepAlive(out)
			}
			b.ReportMetric(float64(held)/(1<<20), "heldMB")
		})
	}
}
