// Package xdstest is the test kit of every package that builds Envoy
// resources or talks to a control plane: resource builders shaped like
// istiod's output, and go-control-plane's real ADS server on loopback. One
// copy, so a test reads the same in mesh, httpconn, cluster, xdsclient and
// proxy.
package xdstest

import (
	"net/netip"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// ADS is the config source istiod puts on every dynamic resource.
var ADS = &corev3.ConfigSource{
	ResourceApiVersion:    corev3.ApiVersion_V3,
	ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
}

// MustAny packs m, failing the test if it cannot.
func MustAny(t testing.TB, m proto.Message) *anypb.Any {
	t.Helper()
	a, err := anypb.New(m)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// Pack is MustAny for builders that have no testing.TB at hand (a table
// literal, a helper shared by many tests): anypb.New fails only on a
// message it cannot marshal, a mistake in the test itself, so Pack panics.
func Pack(m proto.Message) *anypb.Any {
	a, err := anypb.New(m)
	if err != nil {
		panic(err)
	}
	return a
}

// Eventually polls cond every 5 ms until it holds, failing the test after d.
func Eventually(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// SocketAddress is a TCP socket address.
func SocketAddress(ip string, port uint32) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address: ip, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port},
	}}}
}

// Assignment is a ClusterLoadAssignment for name with one locality holding
// the given endpoints (AssignmentOf gives endpoints weights, localities
// and priorities).
func Assignment(name string, eps ...netip.AddrPort) *endpointv3.ClusterLoadAssignment {
	if len(eps) == 0 {
		return &endpointv3.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpointv3.LocalityLbEndpoints{{}}}
	}
	return AssignmentOf(name, EndpointsAt(eps...)...)
}

// EDSCluster is an EDS cluster over ADS whose service name is its name, as
// istiod's outbound|port||host clusters; opts shape it further.
func EDSCluster(name string, opts ...ClusterOption) *clusterv3.Cluster {
	return Cluster(name, append([]ClusterOption{WithEDS()}, opts...)...)
}

// StaticCluster is a STATIC round-robin cluster over eps (Cluster with
// WithEndpoints for more shape).
func StaticCluster(name string, eps ...netip.AddrPort) *clusterv3.Cluster {
	return Cluster(name, func(pb *clusterv3.Cluster) { pb.LoadAssignment = Assignment(name, eps...) })
}

// TCPListener is a listener at 0.0.0.0:port whose one chain is a tcp_proxy
// to cluster. bind false makes it a hand-off target only (bind_to_port:
// false), as istiod's outbound listeners are.
func TCPListener(t testing.TB, name string, ip string, port uint32, cluster string, bind bool) *listenerv3.Listener {
	tp := &tcpproxyv3.TcpProxy{StatPrefix: cluster, ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: cluster}}
	return &listenerv3.Listener{
		Name:       name,
		Address:    SocketAddress(ip, port),
		BindToPort: wrapperspb.Bool(bind),
		FilterChains: []*listenerv3.FilterChain{{Filters: []*listenerv3.Filter{{
			Name:       "envoy.filters.network.tcp_proxy",
			ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: MustAny(t, tp)},
		}}}},
	}
}

// HTTPListener is a listener whose connection manager takes its routes
// from RDS (route) over ADS.
func HTTPListener(t testing.TB, name string, ip string, port uint32, route string, bind bool) *listenerv3.Listener {
	hcm := &hcmv3.HttpConnectionManager{
		StatPrefix: name,
		RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{
			ConfigSource: ADS, RouteConfigName: route,
		}},
		HttpFilters: []*hcmv3.HttpFilter{{
			Name:       "envoy.filters.http.router",
			ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: MustAny(t, &routerv3.Router{})},
		}},
	}
	return &listenerv3.Listener{
		Name:       name,
		Address:    SocketAddress(ip, port),
		BindToPort: wrapperspb.Bool(bind),
		FilterChains: []*listenerv3.FilterChain{{Filters: []*listenerv3.Filter{{
			Name:       "envoy.filters.network.http_connection_manager",
			ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: MustAny(t, hcm)},
		}}}},
	}
}

// RouteConfig sends every request to cluster.
func RouteConfig(name, cluster string) *routev3.RouteConfiguration {
	return &routev3.RouteConfiguration{
		Name: name,
		VirtualHosts: []*routev3.VirtualHost{{
			Name:    name,
			Domains: []string{"*"},
			Routes: []*routev3.Route{{
				Match:  &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
				Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: cluster}}},
			}},
		}},
	}
}
