package xdstest

import (
	"net/netip"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

func lbEndpoint(ip string, port uint32) *endpointv3.LbEndpoint {
	return &endpointv3.LbEndpoint{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
		Address: SocketAddress(ip, port),
	}}}
}

func equal(t *testing.T, what string, got, want proto.Message) {
	t.Helper()
	if !proto.Equal(got, want) {
		t.Errorf("%s:\n got  %v\n want %v", what, prototext.Format(got), prototext.Format(want))
	}
}

// TestShorthandsKeepTheirShape: StaticCluster, EDSCluster and Assignment
// build, through Cluster and AssignmentOf, exactly the protos they built
// before those existed, which the tests of other packages were written
// against.
func TestShorthandsKeepTheirShape(t *testing.T) {
	a, b := netip.MustParseAddrPort("10.0.0.1:80"), netip.MustParseAddrPort("[fd00::2]:8080")
	one := &endpointv3.ClusterLoadAssignment{ClusterName: "s", Endpoints: []*endpointv3.LocalityLbEndpoints{{
		LbEndpoints: []*endpointv3.LbEndpoint{lbEndpoint("10.0.0.1", 80), lbEndpoint("fd00::2", 8080)},
	}}}
	equal(t, "Assignment", Assignment("s", a, b), one)
	equal(t, "empty Assignment", Assignment("s"),
		&endpointv3.ClusterLoadAssignment{ClusterName: "s", Endpoints: []*endpointv3.LocalityLbEndpoints{{}}})
	equal(t, "StaticCluster", StaticCluster("s", a, b), &clusterv3.Cluster{
		Name:                 "s",
		ConnectTimeout:       durationpb.New(10 * time.Second),
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC},
		LoadAssignment:       one,
	})
	equal(t, "EDSCluster", EDSCluster("e"), &clusterv3.Cluster{
		Name:                 "e",
		ConnectTimeout:       durationpb.New(10 * time.Second),
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
		EdsClusterConfig:     &clusterv3.Cluster_EdsClusterConfig{EdsConfig: ADS, ServiceName: "e"},
	})
}

// TestAssignmentOfGroupsLocalities: one LocalityLbEndpoints per (priority,
// region, zone) in order of first appearance, so error paths in the tests
// that use it are predictable; only what an endpoint sets is set.
func TestAssignmentOfGroupsLocalities(t *testing.T) {
	a, b, c := netip.MustParseAddrPort("10.0.0.1:80"), netip.MustParseAddrPort("10.0.0.2:80"), netip.MustParseAddrPort("10.0.0.3:80")
	got := AssignmentOf("c",
		Endpoint{Addr: a, Zone: "z1", LocalityWeight: 3},
		Endpoint{Addr: b, Priority: 1, Health: corev3.HealthStatus_DRAINING},
		Endpoint{Addr: c, Zone: "z1", Weight: 2, LocalityWeight: 9, Hostname: "c.example"},
		HostPort("db.example", 5432),
	)
	dns := lbEndpoint("db.example", 5432)
	weighted := lbEndpoint("10.0.0.3", 80)
	weighted.LoadBalancingWeight = wrapperspb.UInt32(2)
	weighted.GetEndpoint().Hostname = "c.example"
	draining := lbEndpoint("10.0.0.2", 80)
	draining.HealthStatus = corev3.HealthStatus_DRAINING
	equal(t, "AssignmentOf", got, &endpointv3.ClusterLoadAssignment{ClusterName: "c", Endpoints: []*endpointv3.LocalityLbEndpoints{
		{Locality: &corev3.Locality{Zone: "z1"}, LoadBalancingWeight: wrapperspb.UInt32(3),
			LbEndpoints: []*endpointv3.LbEndpoint{lbEndpoint("10.0.0.1", 80), weighted}},
		{Priority: 1, LbEndpoints: []*endpointv3.LbEndpoint{draining}},
		{LbEndpoints: []*endpointv3.LbEndpoint{dns}},
	}})
	equal(t, "empty AssignmentOf", AssignmentOf("c"), &endpointv3.ClusterLoadAssignment{ClusterName: "c"})
}

// TestClusterOptions: the defaults, and each option changing only its
// field, applied in order.
func TestClusterOptions(t *testing.T) {
	got := Cluster("c",
		WithLB(clusterv3.Cluster_LEAST_REQUEST),
		WithType(clusterv3.Cluster_STRICT_DNS),
		WithEndpoints(HostPort("db.example", 5432)),
		WithConnectTimeout(0),
	)
	equal(t, "Cluster", got, &clusterv3.Cluster{
		Name:                 "c",
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STRICT_DNS},
		LbPolicy:             clusterv3.Cluster_LEAST_REQUEST,
		LoadAssignment: &endpointv3.ClusterLoadAssignment{ClusterName: "c", Endpoints: []*endpointv3.LocalityLbEndpoints{{
			LbEndpoints: []*endpointv3.LbEndpoint{lbEndpoint("db.example", 5432)},
		}}},
	})
	eds := EDSCluster("e", WithConnectTimeout(time.Second), WithEndpoints(Endpoint{Addr: netip.MustParseAddrPort("10.0.0.1:80")}))
	if eds.GetType() != clusterv3.Cluster_EDS || eds.GetEdsClusterConfig().GetServiceName() != "e" ||
		eds.GetConnectTimeout().AsDuration() != time.Second || len(eds.GetLoadAssignment().GetEndpoints()) != 1 {
		t.Errorf("EDSCluster with options: %v", prototext.Format(eds))
	}
}

// TestPackPanicsOnWhatMustAnyRejects: Pack is MustAny without a
// testing.TB, so what MustAny would fail the test on, Pack panics on.
func TestPackPanicsOnWhatMustAnyRejects(t *testing.T) {
	if a := Pack(&corev3.Locality{Zone: "z"}); a.GetTypeUrl() != "type.googleapis.com/envoy.config.core.v3.Locality" {
		t.Errorf("Pack type URL %q", a.GetTypeUrl())
	}
	defer func() {
		if recover() == nil {
			t.Error("Pack(nil) did not panic")
		}
	}()
	Pack(nil)
}
