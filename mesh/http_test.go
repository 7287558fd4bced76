package mesh

import (
	"net/netip"
	"strings"
	"testing"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshtun/meshtun/mesh/accesslog"
)

func hcmChain(t *testing.T, prefix, rds string) *listenerv3.FilterChain {
	router, _ := anypb.New(&routerv3.Router{})
	a, err := anypb.New(&hcmv3.HttpConnectionManager{
		StatPrefix:     prefix,
		RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{RouteConfigName: rds}},
		HttpFilters:    []*hcmv3.HttpFilter{{Name: "envoy.filters.http.router", ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: router}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	return &listenerv3.FilterChain{Filters: []*listenerv3.Filter{{Name: HCMFilter, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: a}}}}
}

// TestHTTPChainsAndRoutes: an http_connection_manager chain builds, RDS
// route configurations are compiled into the snapshot (the HTTP engine's
// Env), http.<stat_prefix> counters survive an update, and a bad route
// configuration is rejected naming it.
func TestHTTPChainsAndRoutes(t *testing.T) {
	f := false
	l := listener(t, "0.0.0.0_80", "0.0.0.0", 80, false, &f, hcmChain(t, "outbound_0.0.0.0_80", "80"))
	rc := &routev3.RouteConfiguration{Name: "80", VirtualHosts: []*routev3.VirtualHost{{Name: "all", Domains: []string{"*"},
		Routes: []*routev3.Route{{Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
			Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: "PassthroughCluster"}}}}}}}}
	opts := buildOpts()
	opts.Routes = map[string]*routev3.RouteConfiguration{"80": rc}
	s1, err := Build("1", []*listenerv3.Listener{l}, passthroughClusters(), nil, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s1.Retire(nil)
	ch := s1.Listener("0.0.0.0_80").Chains[0]
	if ch.HTTP == nil || ch.TCP != nil || ch.HTTP.RDSName() != "80" {
		t.Fatalf("chain: %+v", ch)
	}
	if s1.Routes("80") == nil || s1.Routes("81") != nil || s1.Cluster("PassthroughCluster") == nil || s1.Pools() == nil {
		t.Fatal("snapshot does not serve the HTTP engine's lookups")
	}
	st := s1.HTTPStats()["outbound_0.0.0.0_80"]
	if st == nil || ch.HTTP.Stats() != st {
		t.Fatal("http stats not shared by prefix")
	}
	st.DownstreamRqTotal.Add(3)
	s2, err := Build("2", []*listenerv3.Listener{l}, passthroughClusters(), s1, opts)
	if err != nil {
		t.Fatal(err)
	}
	if s2.HTTPStats()["outbound_0.0.0.0_80"].DownstreamRqTotal.Load() != 3 || s2.Routes("80") != s1.Routes("80") {
		t.Fatal("an update lost the http counters or recompiled unchanged routes")
	}

	bad := &routev3.RouteConfiguration{Name: "80", VirtualHosts: []*routev3.VirtualHost{{Name: "x", Domains: []string{"*", "*"}}}}
	opts.Routes = map[string]*routev3.RouteConfiguration{"80": bad}
	if _, err := Build("3", []*listenerv3.Listener{l}, passthroughClusters(), s2, opts); err == nil || !strings.Contains(err.Error(), `route_configuration "80"`) {
		t.Fatalf("bad route configuration: %v", err)
	}
}

// TestUnknownClusterAllowedOverXDS: a listener naming a cluster that has
// not arrived is an error in a static bootstrap but accepted over xDS,
// where its flows are refused with NC until the cluster exists.
func TestUnknownClusterAllowedOverXDS(t *testing.T) {
	l := listener(t, "10.96.0.1_80", "10.96.0.1", 80, false, nil, tcpChain(t, "", "outbound|80||later", 0))
	opts := buildOpts()
	if _, err := Build("1", []*listenerv3.Listener{l}, passthroughClusters(), nil, opts); err == nil || !strings.Contains(err.Error(), "outbound|80||later") {
		t.Fatalf("strict build: %v", err)
	}
	opts.AllowUnknownClusters = true
	s, err := Build("1", []*listenerv3.Listener{l}, passthroughClusters(), nil, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Retire(nil)
	ch := s.Listener("10.96.0.1_80").Chains[0]
	var e accesslog.Entry
	if _, flags, err := ch.TCP.Connect(s, netip.MustParseAddrPort("10.96.0.1:80"), &e); err == nil || flags != "NC" {
		t.Fatalf("connect to a missing cluster: %q %v, want NC", flags, err)
	}
	if ch.TCP.Stats.DownstreamCxNoRoute.Load() != 1 {
		t.Error("downstream_cx_no_route not counted")
	}
}
