package xdstest

import (
	"net/netip"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Endpoint is one endpoint of a ClusterLoadAssignment with the attributes
// istiod sets on it. Every field but the address may be left zero, which
// leaves the matching proto field unset, so a test names only what it is
// about.
type Endpoint struct {
	// Addr is the endpoint's IP address and port.
	Addr netip.AddrPort
	// Host, when set, is the socket address in place of Addr, with Port: a
	// DNS name for a STRICT_DNS cluster, or text that is no address at all
	// for a test of how bad input is rejected.
	Host string
	Port uint32

	// Weight is the endpoint's load_balancing_weight; 0 leaves it unset.
	Weight   uint32
	Health   corev3.HealthStatus
	Hostname string

	// Priority, Region and Zone place the endpoint: endpoints that agree on
	// all three share one LocalityLbEndpoints. The locality is left unset
	// when Region and Zone are both empty, as in Assignment.
	Priority     uint32
	Region, Zone string
	// LocalityWeight is the locality's load_balancing_weight; the first
	// endpoint of a locality that sets one gives it. 0 leaves it unset.
	LocalityWeight uint32

	// SocketMatch is the endpoint's
	// filter_metadata["envoy.transport_socket_match"] (istiod's
	// {"tlsMode": "istio"}, IstioTLS); nil leaves metadata unset.
	// LocalitySocketMatch is the same on its locality (the first endpoint
	// of a locality that sets one gives it).
	SocketMatch, LocalitySocketMatch map[string]string
}

// IstioTLS is the transport socket match label istiod puts on an endpoint
// whose workload takes mTLS.
var IstioTLS = map[string]string{"tlsMode": "istio"}

// socketMatchMeta is metadata holding labels under
// envoy.transport_socket_match, nil for none.
func socketMatchMeta(labels map[string]string) *corev3.Metadata {
	if labels == nil {
		return nil
	}
	f := map[string]any{}
	for k, v := range labels {
		f[k] = v
	}
	st, err := structpb.NewStruct(f)
	if err != nil {
		panic(err)
	}
	return &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{"envoy.transport_socket_match": st}}
}

// HostPort is an endpoint at host:port, where host need not be an IP
// address (see Endpoint.Host).
func HostPort(host string, port uint32) Endpoint { return Endpoint{Host: host, Port: port} }

// EndpointsAt is one plain endpoint per address.
func EndpointsAt(addrs ...netip.AddrPort) []Endpoint {
	eps := make([]Endpoint, len(addrs))
	for i, a := range addrs {
		eps[i] = Endpoint{Addr: a}
	}
	return eps
}

func (e Endpoint) socketAddress() *corev3.Address {
	if e.Host != "" {
		return SocketAddress(e.Host, e.Port)
	}
	return SocketAddress(e.Addr.Addr().String(), uint32(e.Addr.Port()))
}

// AssignmentOf is a ClusterLoadAssignment for name holding eps, grouped
// into one LocalityLbEndpoints per (priority, region, zone) in the order
// each first appears, so the field paths of validation errors
// (endpoints[i].lb_endpoints[j]) follow from the order of eps. No
// endpoints give an assignment with no localities.
func AssignmentOf(name string, eps ...Endpoint) *endpointv3.ClusterLoadAssignment {
	type key struct {
		prio         uint32
		region, zone string
	}
	cla := &endpointv3.ClusterLoadAssignment{ClusterName: name}
	byKey := map[key]*endpointv3.LocalityLbEndpoints{}
	for _, e := range eps {
		k := key{e.Priority, e.Region, e.Zone}
		lle := byKey[k]
		if lle == nil {
			lle = &endpointv3.LocalityLbEndpoints{Priority: e.Priority}
			if e.Region != "" || e.Zone != "" {
				lle.Locality = &corev3.Locality{Region: e.Region, Zone: e.Zone}
			}
			byKey[k] = lle
			cla.Endpoints = append(cla.Endpoints, lle)
		}
		if lle.LoadBalancingWeight == nil && e.LocalityWeight > 0 {
			lle.LoadBalancingWeight = wrapperspb.UInt32(e.LocalityWeight)
		}
		if lle.Metadata == nil {
			lle.Metadata = socketMatchMeta(e.LocalitySocketMatch)
		}
		lbe := &endpointv3.LbEndpoint{
			HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
				Address: e.socketAddress(), Hostname: e.Hostname,
			}},
			HealthStatus: e.Health,
			Metadata:     socketMatchMeta(e.SocketMatch),
		}
		if e.Weight > 0 {
			lbe.LoadBalancingWeight = wrapperspb.UInt32(e.Weight)
		}
		lle.LbEndpoints = append(lle.LbEndpoints, lbe)
	}
	return cla
}

// ClusterOption shapes a cluster built by Cluster. Options apply in order,
// after the defaults.
type ClusterOption func(*clusterv3.Cluster)

// Cluster is a cluster named name: by default STATIC, ROUND_ROBIN, with
// istiod's 10 s connect_timeout and no load_assignment; opts change that.
// StaticCluster and EDSCluster are its two common shapes.
func Cluster(name string, opts ...ClusterOption) *clusterv3.Cluster {
	pb := &clusterv3.Cluster{
		Name:                 name,
		ConnectTimeout:       durationpb.New(10 * time.Second),
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC},
	}
	for _, o := range opts {
		o(pb)
	}
	return pb
}

// WithEndpoints sets the cluster's inline load_assignment to eps, laid out
// as AssignmentOf does.
func WithEndpoints(eps ...Endpoint) ClusterOption {
	return func(pb *clusterv3.Cluster) { pb.LoadAssignment = AssignmentOf(pb.GetName(), eps...) }
}

// WithLB sets the cluster's lb_policy.
func WithLB(p clusterv3.Cluster_LbPolicy) ClusterOption {
	return func(pb *clusterv3.Cluster) { pb.LbPolicy = p }
}

// WithType sets the cluster's discovery type, and nothing else: WithEDS
// also says where the endpoints come from.
func WithType(t clusterv3.Cluster_DiscoveryType) ClusterOption {
	return func(pb *clusterv3.Cluster) { pb.ClusterDiscoveryType = &clusterv3.Cluster_Type{Type: t} }
}

// WithEDS makes the cluster an EDS cluster over ADS whose service name is
// its name, as istiod's outbound|port||host clusters are.
func WithEDS() ClusterOption {
	return func(pb *clusterv3.Cluster) {
		pb.ClusterDiscoveryType = &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS}
		pb.EdsClusterConfig = &clusterv3.Cluster_EdsClusterConfig{EdsConfig: ADS, ServiceName: pb.GetName()}
	}
}

// WithConnectTimeout sets connect_timeout; 0 leaves it unset, so the
// proxy's default applies.
func WithConnectTimeout(d time.Duration) ClusterOption {
	return func(pb *clusterv3.Cluster) {
		pb.ConnectTimeout = nil
		if d != 0 {
			pb.ConnectTimeout = durationpb.New(d)
		}
	}
}
