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
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/mesh/tcpproxy"
)

func tcpProxyFilter(t *testing.T, tp *tcpproxyv3.TcpProxy) *listenerv3.Filter {
	return &listenerv3.Filter{Name: TCPProxyFilter, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: xdstest.MustAny(t, tp)}}
}

var known = func(n string) bool { return n == "a" || n == "b" || n == "PassthroughCluster" }

// The filter list of a chain: Istio's telemetry filters are skipped
// (recognised by name or by config type, TypedStruct-wrapped or not), the
// terminal tcp_proxy is handed to tcpproxy.Parse with the chain's stats
// lookup. tcp_proxy's own fields are tcpproxy's tests.
func TestParseNetworkFilters(t *testing.T) {
	wrapped := xdstest.MustAny(t, &udpatype.TypedStruct{TypeUrl: "type.googleapis.com/stats.PluginConfig", Value: &structpb.Struct{}})
	filters := []*listenerv3.Filter{
		{Name: "istio.stats", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: wrapped}},
		{Name: "some.renamed.metadata_exchange", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: &anypb.Any{TypeUrl: "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange"}}},
		tcpProxyFilter(t, &tcpproxyv3.TcpProxy{StatPrefix: "PassthroughCluster", ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: "PassthroughCluster"},
			IdleTimeout: durationpb.New(5 * time.Minute), MaxConnectAttempts: wrapperspb.UInt32(3)}),
	}
	block := &tcpproxy.Stats{Prefix: "tcp.PassthroughCluster."}
	var asked []string
	lookup := func(p string) *tcpproxy.Stats { asked = append(asked, p); return block }
	tp, hcm, _, skipped, err := parseNetworkFilters(filters, known, lookup)
	if err != nil {
		t.Fatal(err)
	}
	if hcm != nil || tp.Cluster != "PassthroughCluster" || tp.IdleTimeout != 5*time.Minute || tp.MaxConnectAttempts != 3 {
		t.Fatalf("tcp_proxy parsed as %+v (hcm %v)", tp, hcm)
	}
	if tp.Stats != block || len(asked) != 1 || asked[0] != "tcp.PassthroughCluster." {
		t.Fatalf("stats block %p looked up as %q, want the store's block under tcp.PassthroughCluster.", tp.Stats, asked)
	}
	if len(skipped) != 2 {
		t.Fatalf("skipped %v, want the two telemetry filters", skipped)
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
		{"tcp_proxy error names the filter", []*listenerv3.Filter{tp("nope")}, `filters[0] (envoy.filters.network.tcp_proxy): cluster: "nope" is not a known cluster`},
		{"unknown filter", []*listenerv3.Filter{{Name: "envoy.filters.network.redis_proxy", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: &anypb.Any{TypeUrl: "type.googleapis.com/envoy.extensions.filters.network.redis_proxy.v3.RedisProxy"}}}, tp("a")}, "filters[0] (envoy.filters.network.redis_proxy): unknown network filter"},
		{"not last", []*listenerv3.Filter{tp("a"), {Name: "istio.stats"}}, "must be last"},
		{"no terminal", []*listenerv3.Filter{{Name: "istio.stats"}}, "no terminal filter"},
		{"wrong config type", []*listenerv3.Filter{{Name: TCPProxyFilter, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: xdstest.MustAny(t, &structpb.Struct{})}}}, "typed_config: want envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, _, _, err := parseNetworkFilters(tc.filters, known, nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one containing %q", err, tc.want)
			}
		})
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
			{Name: TLSInspector, ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: xdstest.MustAny(t, &tlsinspv3.TlsInspector{})},
				FilterDisabled: &listenerv3.ListenerFilterChainMatchPredicate{Rule: &listenerv3.ListenerFilterChainMatchPredicate_OrMatch{OrMatch: &listenerv3.ListenerFilterChainMatchPredicate_MatchSet{
					Rules: []*listenerv3.ListenerFilterChainMatchPredicate{notRange(15006, 15007), notRange(15020, 15022)}}}}},
			{Name: "renamed", ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: xdstest.MustAny(t, &httpinspv3.HttpInspector{})},
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
