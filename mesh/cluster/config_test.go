package cluster

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	leastrequestv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/load_balancing_policies/least_request/v3"
	ringhashv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/load_balancing_policies/ring_hash/v3"
	roundrobinv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/load_balancing_policies/round_robin/v3"
	wrrlocalityv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/load_balancing_policies/wrr_locality/v3"
	"github.com/rs/zerolog"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/mesh/upstream"
)

const svcName = "outbound|80||a.ns.svc.cluster.local"

// base is a valid STATIC cluster of two endpoints in region "r"; opts
// change it.
func base(opts ...xdstest.ClusterOption) *clusterv3.Cluster {
	eps := xdstest.WithEndpoints(
		xdstest.Endpoint{Addr: netip.MustParseAddrPort("10.0.0.1:80"), Region: "r"},
		xdstest.Endpoint{Addr: netip.MustParseAddrPort("10.0.0.2:80"), Region: "r"})
	return xdstest.Cluster(svcName, append([]xdstest.ClusterOption{eps}, opts...)...)
}

func secondAddr(pb *clusterv3.Cluster, a *corev3.Address) *clusterv3.Cluster {
	pb.LoadAssignment.Endpoints[0].LbEndpoints[1].GetEndpoint().Address = a
	return pb
}

func lbPolicies(msgs ...proto.Message) *clusterv3.LoadBalancingPolicy {
	lbp := &clusterv3.LoadBalancingPolicy{}
	for _, m := range msgs {
		a, err := anypb.New(m)
		if err != nil {
			panic(err)
		}
		lbp.Policies = append(lbp.Policies, &clusterv3.LoadBalancingPolicy_Policy{
			TypedExtensionConfig: &corev3.TypedExtensionConfig{Name: "p", TypedConfig: a},
		})
	}
	return lbp
}

func TestValidationErrors(t *testing.T) {
	cases := []struct {
		name string
		pb   func() *clusterv3.Cluster
		want string
	}{
		{"internal address", func() *clusterv3.Cluster {
			return secondAddr(base(), &corev3.Address{Address: &corev3.Address_EnvoyInternalAddress{
				EnvoyInternalAddress: &corev3.EnvoyInternalAddress{AddressNameSpecifier: &corev3.EnvoyInternalAddress_ServerListenerName{ServerListenerName: "x"}}}})
		}, `cluster "` + svcName + `": load_assignment.endpoints[0].lb_endpoints[1].endpoint.address: want a socket_address`},
		{"pipe address with a mode", func() *clusterv3.Cluster {
			return secondAddr(base(), &corev3.Address{Address: &corev3.Address_Pipe{Pipe: &corev3.Pipe{Path: "/tmp/s", Mode: 0o600}}})
		}, "load_assignment.endpoints[0].lb_endpoints[1].endpoint.address.pipe.mode: only for listeners"},
		{"host name in STATIC", func() *clusterv3.Cluster {
			return xdstest.Cluster(svcName, xdstest.WithEndpoints(xdstest.HostPort("db.example", 5432)))
		}, `load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address: "db.example" is not an IP address`},
		{"UDP endpoint", func() *clusterv3.Cluster {
			pb := base()
			pb.LoadAssignment.Endpoints[0].LbEndpoints[0].GetEndpoint().Address.GetSocketAddress().Protocol = corev3.SocketAddress_UDP
			return pb
		}, "lb_endpoints[0].endpoint.address.socket_address.protocol: UDP not supported"},
		{"LOGICAL_DNS", func() *clusterv3.Cluster { return base(xdstest.WithType(clusterv3.Cluster_LOGICAL_DNS)) },
			"type: LOGICAL_DNS not supported"},
		{"cluster_type extension", func() *clusterv3.Cluster {
			pb := base()
			pb.ClusterDiscoveryType = &clusterv3.Cluster_ClusterType{ClusterType: &clusterv3.Cluster_CustomClusterType{
				Name: "envoy.clusters.aggregate", TypedConfig: &anypb.Any{TypeUrl: "type.googleapis.com/x"}}}
			return pb
		}, `cluster_type: custom cluster type "envoy.clusters.aggregate" not supported`},
		{"ORIGINAL_DST + ROUND_ROBIN", func() *clusterv3.Cluster {
			pb := base(xdstest.WithType(clusterv3.Cluster_ORIGINAL_DST))
			pb.LoadAssignment = nil
			return pb
		}, "lb_policy: LB policy ROUND_ROBIN is not valid for Cluster type ORIGINAL_DST. Only 'CLUSTER_PROVIDED' is allowed with cluster type 'ORIGINAL_DST'"},
		{"ORIGINAL_DST + load_assignment", func() *clusterv3.Cluster {
			pb := base(xdstest.WithType(clusterv3.Cluster_ORIGINAL_DST))
			pb.LbPolicy = clusterv3.Cluster_CLUSTER_PROVIDED
			return pb
		}, "load_assignment: ORIGINAL_DST clusters must have no load assignment configured"},
		{"CLUSTER_PROVIDED on STATIC", func() *clusterv3.Cluster {
			pb := base()
			pb.LbPolicy = clusterv3.Cluster_CLUSTER_PROVIDED
			return pb
		}, "lb_policy: cluster provided LB specified but cluster type STATIC does not provide one"},
		{"missing name", func() *clusterv3.Cluster {
			pb := base()
			pb.Name = ""
			return pb
		}, `cluster "": invalid Cluster.Name: value length must be at least 1 runes`},
		{"negative connect_timeout (PGV)", func() *clusterv3.Cluster {
			pb := base()
			pb.ConnectTimeout = durationpb.New(-time.Second)
			return pb
		}, "invalid Cluster.ConnectTimeout"},
		{"RING_HASH", func() *clusterv3.Cluster {
			pb := base()
			pb.LbPolicy = clusterv3.Cluster_RING_HASH
			return pb
		}, "lb_policy: RING_HASH not supported"},
		{"MAGLEV", func() *clusterv3.Cluster {
			pb := base()
			pb.LbPolicy = clusterv3.Cluster_MAGLEV
			return pb
		}, "lb_policy: MAGLEV not supported"},
		{"load_balancing_policy without a supported policy", func() *clusterv3.Cluster {
			pb := base()
			pb.LoadBalancingPolicy = lbPolicies(&ringhashv3.RingHash{})
			return pb
		}, "load_balancing_policy.policies: no supported policy among [envoy.extensions.load_balancing_policies.ring_hash.v3.RingHash]"},
		{"bind source port", func() *clusterv3.Cluster {
			pb := base()
			pb.UpstreamBindConfig = &corev3.BindConfig{SourceAddress: &corev3.SocketAddress{
				Address: "127.0.0.6", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 1234}}}
			return pb
		}, "upstream_bind_config.source_address.port_value: binding a source port is not supported"},
		{"subset lb", func() *clusterv3.Cluster {
			pb := base()
			pb.LbSubsetConfig = &clusterv3.Cluster_LbSubsetConfig{}
			return pb
		}, "lb_subset_config: subset load balancing not supported"},
		{"named endpoint", func() *clusterv3.Cluster {
			pb := base()
			pb.LoadAssignment.Endpoints[0].LbEndpoints[0].HostIdentifier = &endpointv3.LbEndpoint_EndpointName{EndpointName: "e"}
			return pb
		}, "load_assignment.endpoints[0].lb_endpoints[0].endpoint_name: named endpoints not supported"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(tc.pb(), Options{Dialer: &upstream.Dialer{}, Log: zerolog.Nop()})
			if err == nil {
				t.Fatalf("no error, want %q", tc.want)
			}
			t.Log(err)
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error\n  %v\nwant it to contain\n  %s", err, tc.want)
			}
		})
	}
	if _, err := New(base(), Options{}); err == nil || !strings.Contains(err.Error(), "Options.Dialer is required") {
		t.Errorf("nil dialer: %v", err)
	}
}

func TestConfigAccessors(t *testing.T) {
	pb := base()
	pb.ClusterDiscoveryType = &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS}
	pb.EdsClusterConfig = &clusterv3.Cluster_EdsClusterConfig{ServiceName: "a.ns.svc.cluster.local"}
	pb.ConnectTimeout = nil
	c := newTestCluster(t, pb, func(o *Options) { o.AddedViaAPI = true })
	if c.Name() != svcName || c.ObservabilityName() != svcName || !c.AddedViaAPI() ||
		c.EDSServiceName() != "a.ns.svc.cluster.local" || c.ConnectTimeout() != 5*time.Second {
		t.Fatalf("accessors: %q %q %v %q %v", c.Name(), c.ObservabilityName(), c.AddedViaAPI(), c.EDSServiceName(), c.ConnectTimeout())
	}
	if th := c.Thresholds(PriorityHigh); th != defaultThresholds {
		t.Errorf("default thresholds %+v", th)
	}
	h := c.Hosts()[0]
	if h.Weight() != 1 || h.Zone() != "" || h.Region() != "r" || h.Canary() || h.SuccessRate() != -1 || h.HealthFlags() != "healthy" {
		t.Errorf("host accessors: weight %d region %q flags %q", h.Weight(), h.Region(), h.HealthFlags())
	}
	var names []string
	for _, s := range h.Stats() {
		names = append(names, s.Name)
	}
	if got := strings.Join(names, ","); got != "cx_active,cx_connect_fail,cx_total,rq_active,rq_error,rq_success,rq_timeout,rq_total" {
		t.Errorf("host stats %s", got)
	}
	st := c.Stats()
	for i := 1; i < len(st); i++ {
		if st[i-1].Name >= st[i].Name {
			t.Fatalf("Stats not sorted: %q before %q", st[i-1].Name, st[i].Name)
		}
	}
	h.BeginRequest()
	h.EndRequest(RequestTimeout)
	if hostStat(h, "rq_timeout") != 1 || hostStat(h, "rq_total") != 1 || hostStat(h, "rq_active") != 0 {
		t.Errorf("request stats %v", h.Stats())
	}
}

func TestLoadBalancingPolicyExtension(t *testing.T) {
	pb := base()
	pb.LbPolicy = clusterv3.Cluster_LOAD_BALANCING_POLICY_CONFIG
	pb.LoadBalancingPolicy = lbPolicies(&ringhashv3.RingHash{}, &leastrequestv3.LeastRequest{ChoiceCount: wrapperspb.UInt32(3)})
	c := newTestCluster(t, pb)
	if c.LbPolicy() != "LEAST_REQUEST" || c.choiceCount != 3 {
		t.Fatalf("policy %s choice_count %d", c.LbPolicy(), c.choiceCount)
	}
	pb = base()
	pb.LoadBalancingPolicy = lbPolicies(&wrrlocalityv3.WrrLocality{EndpointPickingPolicy: lbPolicies(&roundrobinv3.RoundRobin{})})
	c = newTestCluster(t, pb)
	if c.LbPolicy() != "ROUND_ROBIN" || !c.localityWeighted {
		t.Fatalf("wrr_locality: policy %s locality weighted %v", c.LbPolicy(), c.localityWeighted)
	}
}
