package mesh

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	udpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/udp/udp_proxy/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshtun/meshtun/mesh/cluster"
	"github.com/meshtun/meshtun/mesh/filterchain"
	"github.com/meshtun/meshtun/mesh/stats"
	"github.com/meshtun/meshtun/mesh/udpproxy"
	"github.com/meshtun/meshtun/mesh/upstream"
)

func listener(t testing.TB, name, ip string, port uint32, useOrigDst bool, bind *bool, chains ...*listenerv3.FilterChain) *listenerv3.Listener {
	l := &listenerv3.Listener{
		Name: name,
		Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
			Address: ip, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port}}}},
		UseOriginalDst: wrapperspb.Bool(useOrigDst),
		FilterChains:   chains,
	}
	if bind != nil {
		l.BindToPort = wrapperspb.Bool(*bind)
	}
	if len(chains) == 0 {
		l.FilterChains = []*listenerv3.FilterChain{tcpChain(t, "", "PassthroughCluster", 0)}
	}
	return l
}

func tcpChain(t testing.TB, name, cl string, port uint32) *listenerv3.FilterChain {
	a, err := anypb.New(&tcpproxyv3.TcpProxy{StatPrefix: cl, ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: cl}})
	if err != nil {
		t.Fatal(err)
	}
	fc := &listenerv3.FilterChain{Name: name, Filters: []*listenerv3.Filter{{Name: TCPProxyFilter, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: a}}}}
	if port != 0 {
		fc.FilterChainMatch = &listenerv3.FilterChainMatch{DestinationPort: wrapperspb.UInt32(port)}
	}
	return fc
}

func passthroughClusters() []*clusterv3.Cluster {
	return []*clusterv3.Cluster{
		{Name: "PassthroughCluster", ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_ORIGINAL_DST}, LbPolicy: clusterv3.Cluster_CLUSTER_PROVIDED},
		{Name: "BlackHoleCluster", ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC}},
	}
}

func buildOpts() BuildOptions {
	return BuildOptions{Roles: IstioRoles, Cluster: cluster.Options{Dialer: &upstream.Dialer{}}}
}

var no = false

// The hand-off rules of Envoy's use_original_dst (connection_handler_impl
// getBalancedHandlerByAddress): exact IP:port, then the wildcard of the
// same family for the port, else the receiving listener.
func TestHandOff(t *testing.T) {
	ls := []*listenerv3.Listener{
		listener(t, "virtualOutbound", "0.0.0.0", 15001, true, nil,
			tcpChain(t, "virtualOutbound-blackhole", "BlackHoleCluster", 15001), tcpChain(t, "catchall", "PassthroughCluster", 0)),
		listener(t, "virtualInbound", "0.0.0.0", 15006, false, nil),
		listener(t, "10.96.0.10_53", "10.96.0.10", 53, false, &no),
		listener(t, "0.0.0.0_80", "0.0.0.0", 80, false, &no),
		listener(t, "[::]_80", "::", 80, false, &no),
		listener(t, "fd00::10_443", "fd00::10", 443, false, &no),
	}
	s, err := Build("1", ls, passthroughClusters(), nil, buildOpts())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Retire(nil)
	for _, tc := range []struct{ dst, want string }{
		{"10.96.0.10:53", "10.96.0.10_53"},
		{"10.96.0.11:53", "virtualOutbound"}, // no exact listener, no 0.0.0.0:53
		{"10.96.0.10:80", "0.0.0.0_80"},      // wildcard for the port
		{"[fd00::1]:80", "[::]_80"},          // the wildcard of the same family
		{"[fd00::10]:443", "fd00::10_443"},
		{"10.0.0.1:443", "virtualOutbound"},
		{"10.0.0.1:15001", "virtualOutbound"}, // its own port: stays, hits the blackhole chain
		{"10.0.0.1:15006", "virtualOutbound"}, // virtual listeners are not hand-off targets
	} {
		l := s.handOff(s.outbound, netip.MustParseAddrPort(tc.dst))
		if l == nil || l.Name != tc.want {
			t.Errorf("%s: handed to %v, want %s", tc.dst, l, tc.want)
		}
	}
	if s.inbound == nil || s.inbound.Name != "virtualInbound" {
		t.Fatalf("inbound role: %v", s.inbound)
	}
	// Only listeners that bind get sockets: 0.0.0.0_80 has bind_to_port false.
	if l := s.Listener("0.0.0.0_80"); l.BindToPort {
		t.Fatal("bind_to_port false not honoured")
	}
}

func TestBuildErrorsNameTheResource(t *testing.T) {
	for _, tc := range []struct {
		ls   []*listenerv3.Listener
		want string
	}{
		{[]*listenerv3.Listener{listener(t, "a", "10.0.0.1", 80, false, &no), listener(t, "b", "10.0.0.1", 80, false, &no)}, `listener "b": address 10.0.0.1:80: already used by listener "a"`},
		{[]*listenerv3.Listener{listener(t, "a", "10.0.0.1", 80, false, &no), listener(t, "a", "10.0.0.2", 80, false, &no)}, `listener "a": duplicate name`},
		{[]*listenerv3.Listener{listener(t, "bad-ip", "10.0.0.300", 80, false, &no)}, `listener "bad-ip": address.socket_address.address: "10.0.0.300" is not an IP address`},
		{[]*listenerv3.Listener{listener(t, "c", "10.0.0.1", 80, false, &no, tcpChain(t, "x", "nope", 0))}, `listener "c": filter_chains[0] (x): filters[0] (envoy.filters.network.tcp_proxy): cluster: "nope" is not a known cluster`},
	} {
		_, err := Build("1", tc.ls, passthroughClusters(), nil, buildOpts())
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Build: %v, want %q", err, tc.want)
		}
	}
	bad := append(passthroughClusters(), &clusterv3.Cluster{Name: "PassthroughCluster"})
	if _, err := Build("1", nil, bad, nil, buildOpts()); err == nil || !strings.Contains(err.Error(), `cluster "PassthroughCluster": duplicate name`) {
		t.Errorf("duplicate cluster: %v", err)
	}
}

// A rebuilt snapshot keeps unchanged clusters (their hosts and counters)
// and listener counters by address.
func TestBuildReusesUnchanged(t *testing.T) {
	ls := []*listenerv3.Listener{listener(t, "0.0.0.0_80", "0.0.0.0", 80, false, &no)}
	s1, err := Build("1", ls, passthroughClusters(), nil, buildOpts())
	if err != nil {
		t.Fatal(err)
	}
	s1.Listener("0.0.0.0_80").Stats.DownstreamCxTotal.Add(7)
	s2, err := Build("2", ls, passthroughClusters(), s1, buildOpts())
	if err != nil {
		t.Fatal(err)
	}
	if s2.Clusters["PassthroughCluster"] != s1.Clusters["PassthroughCluster"] {
		t.Fatal("unchanged cluster rebuilt")
	}
	if got := s2.Listener("0.0.0.0_80").Stats.DownstreamCxTotal.Load(); got != 7 {
		t.Fatalf("listener counter %d after rebuild, want 7", got)
	}
	if s2.Listener("0.0.0.0_80").Stats.Prefix != "listener.0.0.0.0_80." {
		t.Fatalf("stat prefix %q", s2.Listener("0.0.0.0_80").Stats.Prefix)
	}
	s1.Retire(s2)
	s2.Retire(nil)
}

// BenchmarkDispatchMatch measures what a captured flow costs before any
// I/O: the hand-off lookup and the filter-chain match, on an Istio-like
// sidecar with many service listeners.
func BenchmarkDispatchMatch(b *testing.B) {
	ls := []*listenerv3.Listener{
		listener(b, "virtualOutbound", "0.0.0.0", 15001, true, nil,
			tcpChain(b, "virtualOutbound-blackhole", "BlackHoleCluster", 15001), tcpChain(b, "catchall", "PassthroughCluster", 0)),
	}
	for i := 0; i < 1000; i++ {
		ip := fmt.Sprintf("10.96.%d.%d", i/250, i%250+1)
		ls = append(ls, listener(b, ip+"_80", ip, 80, false, &no))
	}
	s, err := Build("1", ls, passthroughClusters(), nil, buildOpts())
	if err != nil {
		b.Fatal(err)
	}
	defer s.Retire(nil)
	dst := netip.MustParseAddrPort("10.96.2.100:80")
	src := netip.MustParseAddrPort("10.0.0.2:40000")
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		l := s.handOff(s.outbound, dst)
		info := filterchain.ConnInfo{DstIP: dst.Addr(), DstPort: dst.Port(), SrcIP: src.Addr(), SrcPort: src.Port(), TransportProtocol: "raw_buffer"}
		if l.selectChain(&info) == nil {
			b.Fatal("no chain")
		}
	}
}

func udpListener(t *testing.T, bind bool, filters ...*listenerv3.ListenerFilter) *listenerv3.Listener {
	return &listenerv3.Listener{
		Name: "10.96.0.10_53",
		Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
			Protocol: corev3.SocketAddress_UDP, Address: "10.96.0.10", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 53}}}},
		BindToPort:      wrapperspb.Bool(bind),
		ListenerFilters: filters,
	}
}

func TestUDPListeners(t *testing.T) {
	udpProxy := func(cl string) *listenerv3.ListenerFilter {
		a, err := anypb.New(&udpproxyv3.UdpProxyConfig{StatPrefix: "dns", RouteSpecifier: &udpproxyv3.UdpProxyConfig_Cluster{Cluster: cl}})
		if err != nil {
			t.Fatal(err)
		}
		return &listenerv3.ListenerFilter{Name: udpproxy.Name, ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: a}}
	}
	s, err := Build("1", []*listenerv3.Listener{udpListener(t, false, udpProxy("PassthroughCluster"))}, passthroughClusters(), nil, buildOpts())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Retire(nil)
	if l := s.udpListener(netip.MustParseAddrPort("10.96.0.10:53")); l == nil || l.UDP.Cluster != "PassthroughCluster" || l.UDP.IdleTimeout.Seconds() != 60 {
		t.Fatalf("UDP listener %+v", l)
	}
	if s.udpListener(netip.MustParseAddrPort("10.96.0.11:53")) != nil {
		t.Fatal("UDP hand-off matched another address")
	}
	for _, tc := range []struct {
		l    *listenerv3.Listener
		want string
	}{
		{udpListener(t, false), "a UDP listener needs envoy.filters.udp_listener.udp_proxy"},
		{udpListener(t, false, udpProxy("nope")), `cluster: "nope" is not a known cluster`},
		{udpListener(t, true, udpProxy("PassthroughCluster")), "bind_to_port: UDP listeners that bind a socket are not supported"},
	} {
		if _, err := Build("1", []*listenerv3.Listener{tc.l}, passthroughClusters(), nil, buildOpts()); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Build: %v, want %q", err, tc.want)
		}
	}
}

// A removed or changed listener drains; an unchanged one carries its drain
// state (and its flows) over to the next snapshot.
func TestDrainRemovedOrChanged(t *testing.T) {
	a := listener(t, "a", "10.0.0.1", 80, false, &no)
	b := listener(t, "b", "10.0.0.2", 80, false, &no)
	s1, err := Build("1", []*listenerv3.Listener{a, b}, passthroughClusters(), nil, buildOpts())
	if err != nil {
		t.Fatal(err)
	}
	b2 := listener(t, "b", "10.0.0.2", 80, false, &no, tcpChain(t, "other", "BlackHoleCluster", 0)) // changed
	s2, err := Build("2", []*listenerv3.Listener{a, b2}, passthroughClusters(), s1, buildOpts())
	if err != nil {
		t.Fatal(err)
	}
	if s2.Listener("a").drain != s1.Listener("a").drain {
		t.Fatal("unchanged listener did not carry its drain state over")
	}
	if n := s1.Drain(s2, 0); n != 1 {
		t.Fatalf("%d listeners draining, want 1 (b changed)", n)
	}
	if s1.Listener("b").drain.closed().Err() == nil {
		t.Fatal("changed listener b not drained")
	}
	if s1.Listener("a").drain.draining().Err() != nil || s2.Listener("b").drain.draining().Err() != nil {
		t.Fatal("an unchanged or new listener was drained")
	}
	s3, err := Build("3", []*listenerv3.Listener{b2}, passthroughClusters(), s2, buildOpts())
	if err != nil {
		t.Fatal(err)
	}
	s2.Drain(s3, 50*time.Millisecond) // a removed
	if s2.Listener("a").drain.draining().Err() == nil {
		t.Fatal("the drain did not start at once")
	}
	if s2.Listener("a").drain.closed().Err() != nil {
		t.Fatal("drained before the drain duration")
	}
	select {
	case <-s2.Listener("a").drain.closed().Done():
	case <-time.After(5 * time.Second):
		t.Fatal("removed listener never drained")
	}
	s1.Retire(s2)
	s2.Retire(s3)
	s3.Retire(nil)
}

// TestHTTPClusterStatsSurviveCDSUpdate: a CDS update that changes a
// cluster builds a new one, whose HTTP request counters (upstream_rq_2xx,
// upstream_rq_timeout, …) go on from the old ones', as Envoy keeps
// cluster.<name>.* by name in its store; a cluster removed (its block
// dropped from the store) and added back starts anew.
func TestHTTPClusterStatsSurviveCDSUpdate(t *testing.T) {
	ls := []*listenerv3.Listener{listener(t, "0.0.0.0_80", "0.0.0.0", 80, false, &no)}
	s1, err := Build("1", ls, passthroughClusters(), nil, buildOpts())
	if err != nil {
		t.Fatal(err)
	}
	s1.Clusters["BlackHoleCluster"].HTTPStats().CountResponse(200)
	s1.Clusters["BlackHoleCluster"].HTTPStats().RqTimeout.Add(2)

	changed := passthroughClusters()
	changed[1].ConnectTimeout = durationpb.New(3 * time.Second)
	s2, err := Build("2", ls, changed, s1, buildOpts())
	if err != nil {
		t.Fatal(err)
	}
	c1, c2 := s1.Clusters["BlackHoleCluster"], s2.Clusters["BlackHoleCluster"]
	if c1 == c2 {
		t.Fatal("changed cluster not rebuilt")
	}
	st := c2.HTTPStats()
	if st.RqCompleted.Load() != 1 || st.RqTimeout.Load() != 2 {
		t.Fatalf("after the update: upstream_rq_completed %d, upstream_rq_timeout %d, want 1 and 2", st.RqCompleted.Load(), st.RqTimeout.Load())
	}
	c2.HTTPStats().CountResponse(503)
	if got := c2.HTTPStats().Stats(); !hasStat(got, "upstream_rq_200", 1) || !hasStat(got, "upstream_rq_503", 1) || !hasStat(got, "upstream_rq_completed", 2) {
		t.Fatalf("stats after the update: %v", got)
	}
	s1.Retire(s2)

	s3, err := Build("3", ls, changed[:1], s2, buildOpts())
	if err != nil {
		t.Fatal(err)
	}
	s2.Retire(s3)
	// The applier drops the blocks no snapshot in force uses (sweep).
	used := map[stats.Key]bool{}
	for _, k := range s3.Scopes() {
		used[k] = true
	}
	s3.store.Retain(func(k stats.Key) bool { return used[k] })
	s4, err := Build("4", ls, passthroughClusters(), s3, buildOpts())
	if err != nil {
		t.Fatal(err)
	}
	if v := s4.Clusters["BlackHoleCluster"].HTTPStats().RqCompleted.Load(); v != 0 {
		t.Fatalf("re-added cluster: upstream_rq_completed %d, want 0", v)
	}
	s3.Retire(s4)
	s4.Retire(nil)
}

func hasStat(st []cluster.Stat, name string, v uint64) bool {
	for _, s := range st {
		if s.Name == name {
			return s.Value == v
		}
	}
	return false
}

// A listener without a transport socket gets no ssl.* block: most have
// none, and the block was half of a listener's stats.
func TestPlainListenerHasNoSSLStats(t *testing.T) {
	ls, cs, eps := services(t, 1)
	opts := buildOpts()
	opts.Endpoints = map[string]*endpointv3.ClusterLoadAssignment{eps[0].GetClusterName(): eps[0]}
	s, err := Build("1", ls, cs, nil, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Retire(nil)
	l := s.Listener(ls[0].GetName())
	if l == nil || l.Stats == nil {
		t.Fatalf("listener %q not built", ls[0].GetName())
	}
	if l.Stats.ssl.Load() != nil {
		t.Fatal("a listener without TLS has an ssl.* block")
	}
	if a, b := l.Stats.SSL(), l.Stats.SSL(); a == nil || a != b {
		t.Fatal("SSL() does not make one block and keep it")
	}
}
