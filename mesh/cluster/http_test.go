package cluster

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/mesh/upstream"
)

func withHTTPOptions(t *testing.T, pb *clusterv3.Cluster, o *httpv3.HttpProtocolOptions) *clusterv3.Cluster {
	a, err := anypb.New(o)
	if err != nil {
		t.Fatal(err)
	}
	pb.TypedExtensionProtocolOptions = map[string]*anypb.Any{HTTPOptionsKey: a}
	return pb
}

func TestParseHTTPOptions(t *testing.T) {
	base := func() *clusterv3.Cluster { return xdstest.Cluster("c") }
	explicit := func(pc any) *httpv3.HttpProtocolOptions {
		e := &httpv3.HttpProtocolOptions_ExplicitHttpConfig{}
		switch v := pc.(type) {
		case *corev3.Http2ProtocolOptions:
			e.ProtocolConfig = &httpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: v}
		case *corev3.Http1ProtocolOptions:
			e.ProtocolConfig = &httpv3.HttpProtocolOptions_ExplicitHttpConfig_HttpProtocolOptions{HttpProtocolOptions: v}
		case *corev3.Http3ProtocolOptions:
			e.ProtocolConfig = &httpv3.HttpProtocolOptions_ExplicitHttpConfig_Http3ProtocolOptions{Http3ProtocolOptions: v}
		}
		return &httpv3.HttpProtocolOptions{UpstreamProtocolOptions: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: e}}
	}
	for _, tc := range []struct {
		name string
		pb   *clusterv3.Cluster
		want HTTPOptions
		err  string
	}{
		{"default", base(), DefaultHTTPOptions, ""},
		{"explicit h2", withHTTPOptions(t, base(), explicit(&corev3.Http2ProtocolOptions{})), HTTPOptions{Protocol: HTTP2, IdleTimeout: time.Hour}, ""},
		{"explicit h1", withHTTPOptions(t, base(), explicit(&corev3.Http1ProtocolOptions{})), DefaultHTTPOptions, ""},
		{"downstream", withHTTPOptions(t, base(), &httpv3.HttpProtocolOptions{
			CommonHttpProtocolOptions: &corev3.HttpProtocolOptions{IdleTimeout: durationpb.New(time.Minute), MaxRequestsPerConnection: wrapperspb.UInt32(7)},
			UpstreamProtocolOptions:   &httpv3.HttpProtocolOptions_UseDownstreamProtocolConfig{UseDownstreamProtocolConfig: &httpv3.HttpProtocolOptions_UseDownstreamHttpConfig{}},
		}), HTTPOptions{Protocol: DownstreamProtocol, IdleTimeout: time.Minute, MaxRequestsPerConnection: 7}, ""},
		{"h3", withHTTPOptions(t, base(), explicit(&corev3.Http3ProtocolOptions{})), HTTPOptions{}, "HTTP/3 is not supported"},
	} {
		got, err := ParseHTTPOptions(tc.pb)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%s: %v, want %q", tc.name, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("%s: %+v %v, want %+v", tc.name, got, err, tc.want)
		}
	}
}

// TestConnectHostAccounting: ConnectHost dials the given host with
// Connect's breaker and stats; PickHostFor honours exclude.
func TestConnectHostAccounting(t *testing.T) {
	a, b := startServer(t, "127.0.0.1", 0, false), startServer(t, "127.0.0.1", 0, false)
	pb := xdstest.Cluster("h", xdstest.WithEndpoints(hostsOf(a, b)...))
	pb.CircuitBreakers = &clusterv3.CircuitBreakers{Thresholds: []*clusterv3.CircuitBreakers_Thresholds{{MaxConnections: wrapperspb.UInt32(1)}}}
	c := newTestCluster(t, pb)
	first, err := c.PickHostFor(netip.AddrPort{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	other, _ := c.PickHostFor(netip.AddrPort{}, func(h *Host) bool { return h == first })
	if other == first {
		t.Fatal("exclude ignored")
	}
	u, err := c.ConnectHost(context.Background(), other)
	if err != nil {
		t.Fatal(err)
	}
	if u.Host() != other || other.ActiveConnections() != 1 || stat(t, c, "upstream_cx_total") != 1 {
		t.Errorf("accounting: host %v active %d total %d", u.Host().Address(), other.ActiveConnections(), stat(t, c, "upstream_cx_total"))
	}
	freed := c.ConnectionReleased()
	if _, err := c.ConnectHost(context.Background(), first); !errors.Is(err, ErrOverflow) {
		t.Errorf("second connection with max_connections 1: %v", err)
	}
	select {
	case <-freed:
		t.Error("ConnectionReleased fired with no connection closed")
	default:
	}
	u.Close()
	if stat(t, c, "upstream_cx_active") != 0 {
		t.Error("cx_active after close")
	}
	select {
	case <-freed:
	default:
		t.Error("ConnectionReleased not closed by the connection's close")
	}
}

func TestHTTPStats(t *testing.T) {
	c := newTestCluster(t, xdstest.Cluster("s"))
	s := c.HTTPStats()
	if c.HTTPStats() != s {
		t.Fatal("HTTPStats not stable")
	}
	s.CountResponse(200)
	s.CountResponse(503)
	s.CountResponse(503)
	want := map[string]uint64{"upstream_rq_2xx": 1, "upstream_rq_5xx": 2, "upstream_rq_503": 2, "upstream_rq_200": 1, "upstream_rq_completed": 3}
	for _, st := range s.Stats() {
		if w, ok := want[st.Name]; ok && st.Value != w {
			t.Errorf("%s = %d, want %d", st.Name, st.Value, w)
		}
		delete(want, st.Name)
	}
	if len(want) > 0 {
		t.Errorf("missing %v", want)
	}
	// A cluster that replaces this one (a CDS update) counts on.
	c2, err := New(xdstest.Cluster("s"), Options{Dialer: &upstream.Dialer{}, Stats: c.Scope()})
	if err != nil {
		t.Fatal(err)
	}
	c2.HTTPStats().CountResponse(200)
	if c2.HTTPStats() != s || s.Stats() == nil {
		t.Fatal("the replacing cluster given the replaced one's Scope does not count into its HTTPStats")
	}
	for _, st := range s.Stats() {
		if st.Name == "upstream_rq_completed" && st.Value != 4 {
			t.Errorf("upstream_rq_completed after the replacement = %d, want 4", st.Value)
		}
	}
}
