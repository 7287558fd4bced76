package mesh

import (
	"strings"
	"testing"
	"time"

	udpatype "github.com/cncf/xds/go/udpa/type/v1"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	httpinspv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/http_inspector/v3"
	tlsinspv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	v3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

func mustAny(t *testing.T, m proto.Message) *anypb.Any {
	t.Helper()
	a, err := anypb.New(m)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func tcpProxyFilter(t *testing.T, tp *tcpproxyv3.TcpProxy) *listenerv3.Filter {
	return &listenerv3.Filter{Name: TCPProxyFilter, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(t, tp)}}
}

var known = func(n string) bool { return n == "a" || n == "b" || n == "PassthroughCluster" }

func TestParseNetworkFilters(t *testing.T) {
	// Istio's telemetry filter wrapped in a TypedStruct with a type this
	// binary does not know, then the terminal tcp_proxy.
	wrapped := mustAny(t, &udpatype.TypedStruct{TypeUrl: "type.googleapis.com/stats.PluginConfig", Value: &structpb.Struct{}})
	filters := []*listenerv3.Filter{
		{Name: "istio.stats", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: wrapped}},
		{Name: "some.renamed.metadata_exchange", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: &anypb.Any{TypeUrl: "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange"}}},
		tcpProxyFilter(t, &tcpproxyv3.TcpProxy{StatPrefix: "PassthroughCluster", ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: "PassthroughCluster"},
			IdleTimeout: durationpb.New(5 * time.Minute), MaxConnectAttempts: wrapperspb.UInt32(3)}),
	}
	tp, _, skipped, err := parseNetworkFilters(filters, known)
	if err != nil {
		t.Fatal(err)
	}
	if tp.Cluster != "PassthroughCluster" || tp.IdleTimeout != 5*time.Minute || tp.MaxConnectAttempts != 3 || tp.StatPrefix != "PassthroughCluster" {
		t.Fatalf("tcp_proxy parsed as %+v", tp)
	}
	if len(skipped) != 2 {
		t.Fatalf("skipped %v, want the two telemetry filters", skipped)
	}

	defaults, _, _, err := parseNetworkFilters(filters[2:3], known)
	if err != nil || defaults.MaxConnectAttempts != 3 {
		t.Fatal(err)
	}
	d2, _, _, _ := parseNetworkFilters([]*listenerv3.Filter{tcpProxyFilter(t, &tcpproxyv3.TcpProxy{StatPrefix: "x", ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: "a"}})}, known)
	if d2.MaxConnectAttempts != 1 || d2.IdleTimeout != time.Hour {
		t.Fatalf("defaults %+v, want Envoy's 1 attempt and 1 h idle timeout", d2)
	}
}

func TestParseNetworkFiltersErrors(t *testing.T) {
	tp := func(c string) *listenerv3.Filter {
		return tcpProxyFilter(t, &tcpproxyv3.TcpProxy{StatPrefix: "s", ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: c}})
	}
	for _, tc := range []struct {
		name    string
		filters []*listenerv3.Filter
		want    string
	}{
		{"unknown cluster", []*listenerv3.Filter{tp("nope")}, `cluster: "nope" is not a known cluster`},
		{"unknown filter", []*listenerv3.Filter{{Name: "envoy.filters.network.redis_proxy", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: &anypb.Any{TypeUrl: "type.googleapis.com/envoy.extensions.filters.network.redis_proxy.v3.RedisProxy"}}}, tp("a")}, "filters[0] (envoy.filters.network.redis_proxy): unknown network filter"},
		{"not last", []*listenerv3.Filter{tp("a"), {Name: "istio.stats"}}, "must be last"},
		{"no terminal", []*listenerv3.Filter{{Name: "istio.stats"}}, "no terminal filter"},
		{"empty stat_prefix", []*listenerv3.Filter{tcpProxyFilter(t, &tcpproxyv3.TcpProxy{ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: "a"}})}, "StatPrefix"},
		{"zero weights", []*listenerv3.Filter{tcpProxyFilter(t, &tcpproxyv3.TcpProxy{StatPrefix: "s", ClusterSpecifier: &tcpproxyv3.TcpProxy_WeightedClusters{WeightedClusters: &tcpproxyv3.TcpProxy_WeightedCluster{
			Clusters: []*tcpproxyv3.TcpProxy_WeightedCluster_ClusterWeight{{Name: "a", Weight: 0}, {Name: "b", Weight: 0}}}}})}, "Weight: value must be greater than or equal to 1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, _, err := parseNetworkFilters(tc.filters, known)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one containing %q", err, tc.want)
			}
		})
	}
}

func TestWeightedClusterPick(t *testing.T) {
	f := tcpProxyFilter(t, &tcpproxyv3.TcpProxy{StatPrefix: "s", ClusterSpecifier: &tcpproxyv3.TcpProxy_WeightedClusters{WeightedClusters: &tcpproxyv3.TcpProxy_WeightedCluster{
		Clusters: []*tcpproxyv3.TcpProxy_WeightedCluster_ClusterWeight{{Name: "a", Weight: 75}, {Name: "b", Weight: 25}}}}})
	tp, _, _, err := parseNetworkFilters([]*listenerv3.Filter{f}, known)
	if err != nil {
		t.Fatal(err)
	}
	// r sweeps [0, 2^32) in equal steps: exactly 75% must land on "a".
	counts := map[string]int{}
	for i := uint32(0); i < 4096; i++ {
		counts[tp.pickCluster(i<<20)]++
	}
	if counts["a"] != 3072 || counts["b"] != 1024 {
		t.Fatalf("split %v, want 3072/1024", counts)
	}
}

func TestListenerFiltersAndPredicate(t *testing.T) {
	// Istio's virtualInbound: tls_inspector disabled for ports 15006 and
	// 15020-15021, http_inspector only for the complement of 80-81.
	notRange := func(s, e int32) *listenerv3.ListenerFilterChainMatchPredicate {
		return &listenerv3.ListenerFilterChainMatchPredicate{Rule: &listenerv3.ListenerFilterChainMatchPredicate_DestinationPortRange{DestinationPortRange: &v3.Int32Range{Start: s, End: e}}}
	}
	l := &listenerv3.Listener{
		ListenerFiltersTimeout:           durationpb.New(0),
		ContinueOnListenerFiltersTimeout: true,
		ListenerFilters: []*listenerv3.ListenerFilter{
			{Name: "envoy.filters.listener.original_dst"},
			{Name: TLSInspector, ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: mustAny(t, &tlsinspv3.TlsInspector{})},
				FilterDisabled: &listenerv3.ListenerFilterChainMatchPredicate{Rule: &listenerv3.ListenerFilterChainMatchPredicate_OrMatch{OrMatch: &listenerv3.ListenerFilterChainMatchPredicate_MatchSet{
					Rules: []*listenerv3.ListenerFilterChainMatchPredicate{notRange(15006, 15007), notRange(15020, 15022)}}}}},
			{Name: "renamed", ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: mustAny(t, &httpinspv3.HttpInspector{})},
				FilterDisabled: &listenerv3.ListenerFilterChainMatchPredicate{Rule: &listenerv3.ListenerFilterChainMatchPredicate_NotMatch{NotMatch: notRange(80, 82)}}},
		},
	}
	in, err := parseListenerFilters(l)
	if err != nil {
		t.Fatal(err)
	}
	if in.timeout != 0 || !in.continueOnTimeout {
		t.Fatalf("timeout %v continue %v", in.timeout, in.continueOnTimeout)
	}
	for _, tc := range []struct {
		port          uint16
		tls, httpWant bool
	}{{8080, true, false}, {15006, false, false}, {15021, false, false}, {80, true, true}, {81, true, true}, {82, true, false}} {
		tls, http := in.wants(tc.port)
		if tls != tc.tls || http != tc.httpWant {
			t.Errorf("port %d: tls=%v http=%v, want %v %v", tc.port, tls, http, tc.tls, tc.httpWant)
		}
	}
	def, _ := parseListenerFilters(&listenerv3.Listener{})
	if def.timeout != 15*time.Second || def.continueOnTimeout {
		t.Fatalf("defaults %+v, want Envoy's 15 s and no continue", def)
	}
	bad := &listenerv3.Listener{ListenerFilters: []*listenerv3.ListenerFilter{{Name: "envoy.filters.listener.proxy_protocol"}}}
	if _, err := parseListenerFilters(bad); err == nil || !strings.Contains(err.Error(), "listener_filters[0] (envoy.filters.listener.proxy_protocol): unknown listener filter") {
		t.Fatalf("unknown listener filter: %v", err)
	}
	badRange := &listenerv3.Listener{ListenerFilters: []*listenerv3.ListenerFilter{{Name: TLSInspector, FilterDisabled: notRange(90, 80)}}}
	if _, err := parseListenerFilters(badRange); err == nil || !strings.Contains(err.Error(), "filter_disabled: destination_port_range [90, 80)") {
		t.Fatalf("bad range: %v", err)
	}
}
