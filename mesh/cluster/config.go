package cluster

import (
	"fmt"
	"net/netip"
	"strings"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	leastrequestv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/load_balancing_policies/least_request/v3"
	wrrlocalityv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/load_balancing_policies/wrr_locality/v3"
	"google.golang.org/protobuf/types/known/durationpb"
)

// configure applies the semantic checks and settings of pb (already
// validated by its protoc-gen-validate rules); parse compiles its
// transport sockets. It returns the initial
// hosts of STATIC clusters and the inline hosts of EDS clusters.
func (c *Cluster) configure(pb *clusterv3.Cluster, parse TransportParser) ([]hostSpec, error) {
	if ct := pb.GetClusterType(); ct != nil {
		return nil, fmt.Errorf("cluster_type: custom cluster type %q not supported", ct.GetName())
	}
	c.typ = pb.GetType()
	switch c.typ {
	case clusterv3.Cluster_STATIC, clusterv3.Cluster_STRICT_DNS, clusterv3.Cluster_EDS, clusterv3.Cluster_ORIGINAL_DST:
	default:
		return nil, fmt.Errorf("type: %s not supported", c.typ)
	}
	if err := c.configureLB(pb); err != nil {
		return nil, err
	}
	if pb.GetLbSubsetConfig() != nil {
		return nil, fmt.Errorf("lb_subset_config: subset load balancing not supported")
	}
	if pb.GetCommonLbConfig().GetLocalityWeightedLbConfig() != nil {
		c.localityWeighted = true
	}

	c.connectTimeout = dur(pb.GetConnectTimeout(), defaultConnectTimeout)
	th := thresholdsFromProto(pb.GetCircuitBreakers())
	c.resources = [2]*Resources{
		newResources(c, PriorityDefault, th[0]),
		newResources(c, PriorityHigh, th[1]),
	}
	if err := c.configureBind(pb.GetUpstreamBindConfig()); err != nil {
		return nil, err
	}
	if err := c.configureTransport(pb, parse); err != nil {
		return nil, err
	}

	switch c.typ {
	case clusterv3.Cluster_ORIGINAL_DST:
		if pb.GetLoadAssignment() != nil {
			return nil, fmt.Errorf("load_assignment: ORIGINAL_DST clusters must have no load assignment configured")
		}
		c.origDst = newOrigDstHosts(c, pb)
		return nil, nil
	case clusterv3.Cluster_STRICT_DNS:
		eps, err := parseAssignment(pb.GetLoadAssignment(), "load_assignment", true)
		if err != nil {
			return nil, err
		}
		c.dns = newDNSConfig(pb, eps)
		return nil, nil
	case clusterv3.Cluster_EDS:
		c.edsServiceName = pb.GetEdsClusterConfig().GetServiceName()
	}
	eps, err := parseAssignment(pb.GetLoadAssignment(), "load_assignment", false)
	if err != nil {
		return nil, err
	}
	for i, e := range eps {
		if e.pipe != "" && c.typ != clusterv3.Cluster_STATIC {
			return nil, fmt.Errorf("load_assignment endpoint %d: pipe (Unix domain socket) addresses are only supported in STATIC clusters", i)
		}
	}
	return ipSpecs(eps), nil
}

// configureLB sets the load-balancing policy from load_balancing_policy
// (which takes precedence, as in Envoy) or lb_policy.
func (c *Cluster) configureLB(pb *clusterv3.Cluster) error {
	name := pb.GetLbPolicy().String()
	if lbp := pb.GetLoadBalancingPolicy(); len(lbp.GetPolicies()) > 0 {
		if err := c.policyFromList(lbp, "load_balancing_policy"); err != nil {
			return err
		}
		name = c.lb.String()
	} else {
		switch pb.GetLbPolicy() {
		case clusterv3.Cluster_ROUND_ROBIN:
			c.lb = lbRoundRobin
		case clusterv3.Cluster_LEAST_REQUEST:
			c.lb = lbLeastRequest
			c.choiceCount = defaultChoiceCount
			if v := pb.GetLeastRequestLbConfig().GetChoiceCount(); v != nil {
				c.choiceCount = int(v.GetValue())
			}
		case clusterv3.Cluster_RANDOM:
			c.lb = lbRandom
		case clusterv3.Cluster_CLUSTER_PROVIDED:
			c.lb = lbClusterProvided
		case clusterv3.Cluster_LOAD_BALANCING_POLICY_CONFIG:
			return fmt.Errorf("lb_policy: LOAD_BALANCING_POLICY_CONFIG requires load_balancing_policy")
		default:
			return fmt.Errorf("lb_policy: %s not supported", name)
		}
	}
	if c.typ == clusterv3.Cluster_ORIGINAL_DST && c.lb != lbClusterProvided {
		return fmt.Errorf("lb_policy: LB policy %s is not valid for Cluster type ORIGINAL_DST. "+
			"Only 'CLUSTER_PROVIDED' is allowed with cluster type 'ORIGINAL_DST'", name)
	}
	if c.typ != clusterv3.Cluster_ORIGINAL_DST && c.lb == lbClusterProvided {
		return fmt.Errorf("lb_policy: cluster provided LB specified but cluster type %s does not provide one", c.typ)
	}
	return nil
}

const lbExtPrefix = "envoy.extensions.load_balancing_policies."

// policyFromList uses the first policy of the list that is supported, as
// Envoy does.
func (c *Cluster) policyFromList(lbp *clusterv3.LoadBalancingPolicy, field string) error {
	var seen []string
	for i, p := range lbp.GetPolicies() {
		cfg := p.GetTypedExtensionConfig().GetTypedConfig()
		url := cfg.GetTypeUrl()
		typ := url[strings.LastIndexByte(url, '/')+1:]
		pf := fmt.Sprintf("%s.policies[%d].typed_extension_config.typed_config", field, i)
		switch typ {
		case lbExtPrefix + "round_robin.v3.RoundRobin":
			c.lb = lbRoundRobin
			return nil
		case lbExtPrefix + "random.v3.Random":
			c.lb = lbRandom
			return nil
		case lbExtPrefix + "cluster_provided.v3.ClusterProvided":
			c.lb = lbClusterProvided
			return nil
		case lbExtPrefix + "least_request.v3.LeastRequest":
			var lr leastrequestv3.LeastRequest
			if err := cfg.UnmarshalTo(&lr); err != nil {
				return fmt.Errorf("%s: %w", pf, err)
			}
			c.lb = lbLeastRequest
			c.choiceCount = defaultChoiceCount
			if v := lr.GetChoiceCount(); v != nil {
				c.choiceCount = int(v.GetValue())
			}
			return nil
		case lbExtPrefix + "wrr_locality.v3.WrrLocality":
			var wl wrrlocalityv3.WrrLocality
			if err := cfg.UnmarshalTo(&wl); err != nil {
				return fmt.Errorf("%s: %w", pf, err)
			}
			if err := c.policyFromList(wl.GetEndpointPickingPolicy(), pf+".endpoint_picking_policy"); err != nil {
				seen = append(seen, typ)
				continue
			}
			c.localityWeighted = true
			return nil
		}
		seen = append(seen, typ)
	}
	return fmt.Errorf("%s.policies: no supported policy among %v (supported: round_robin, least_request, random, cluster_provided, wrr_locality)", field, seen)
}

// configureBind reads upstream_bind_config: the source address for
// upstream connections (Istio binds 127.0.0.6 for inbound passthrough),
// plus extra_source_addresses used for destinations of the other family.
func (c *Cluster) configureBind(b *corev3.BindConfig) error {
	if b == nil {
		return nil
	}
	add := func(sa *corev3.SocketAddress, field string) error {
		if sa == nil {
			return nil
		}
		ip, err := netip.ParseAddr(sa.GetAddress())
		if err != nil {
			return fmt.Errorf("%s.address: %q is not an IP address", field, sa.GetAddress())
		}
		if sa.GetPortValue() != 0 || sa.GetNamedPort() != "" {
			return fmt.Errorf("%s.port_value: binding a source port is not supported", field)
		}
		c.bindSrc = append(c.bindSrc, ip.Unmap())
		return nil
	}
	if err := add(b.GetSourceAddress(), "upstream_bind_config.source_address"); err != nil {
		return err
	}
	for i, e := range b.GetExtraSourceAddresses() {
		if err := add(e.GetAddress(), fmt.Sprintf("upstream_bind_config.extra_source_addresses[%d].address", i)); err != nil {
			return err
		}
	}
	for i, sa := range b.GetAdditionalSourceAddresses() {
		if err := add(sa, fmt.Sprintf("upstream_bind_config.additional_source_addresses[%d]", i)); err != nil {
			return err
		}
	}
	if b.GetLocalAddressSelector() != nil {
		return fmt.Errorf("upstream_bind_config.local_address_selector: not supported")
	}
	return nil
}

// sourceFor picks the bind address for a destination: the first
// configured address of the destination's family, else source_address
// (as Envoy; the connect then fails), else none (the kernel chooses).
func (c *Cluster) sourceFor(dst netip.Addr) netip.Addr {
	if len(c.bindSrc) == 0 {
		return netip.Addr{}
	}
	for _, a := range c.bindSrc {
		if a.Is4() == dst.Is4() {
			return a
		}
	}
	return c.bindSrc[0]
}

// endpoint is one lb_endpoint of a load assignment.
type endpoint struct {
	pipe string     // pipe.path of a pipe endpoint; the rest is unset
	host string     // socket_address.address as configured
	ip   netip.Addr // valid when host is an IP literal
	port uint16
	meta *hostMeta
}

// parseAssignment reads the endpoints of cla; field is the path of cla in
// error messages. Host names are accepted only when allowNames is set
// (STRICT_DNS); STATIC and EDS need IP addresses, as in Envoy.
func parseAssignment(cla *endpointv3.ClusterLoadAssignment, field string, allowNames bool) ([]endpoint, error) {
	n := 0
	for _, lle := range cla.GetEndpoints() {
		n += len(lle.GetLbEndpoints())
	}
	out := make([]endpoint, 0, n)
	var last *hostMeta // the last endpoint's, shared by the next if equal
	for i, lle := range cla.GetEndpoints() {
		// The paths of error messages are made only for an error: an
		// assignment update at 10,000 services formatted 40,000 of them.
		lf := func() string { return fmt.Sprintf("%s.endpoints[%d]", field, i) }
		if lle.GetLedsClusterLocalityConfig() != nil {
			return nil, fmt.Errorf("%s.leds_cluster_locality_config: LEDS not supported", lf())
		}
		loc := lle.GetLocality()
		lw := lle.GetLoadBalancingWeight().GetValue()
		locLabels := tsLabels(lle.GetMetadata())
		for j, lbe := range lle.GetLbEndpoints() {
			ef := func() string { return fmt.Sprintf("%s.lb_endpoints[%d]", lf(), j) }
			if lbe.GetEndpointName() != "" {
				return nil, fmt.Errorf("%s.endpoint_name: named endpoints not supported", ef())
			}
			ep := lbe.GetEndpoint()
			if ep == nil {
				return nil, fmt.Errorf("%s.endpoint: missing", ef())
			}
			addr := ep.GetAddress()
			af := func() string { return ef() + ".endpoint.address" }
			m := hostMeta{
				hostname:       ep.GetHostname(),
				weight:         1,
				region:         loc.GetRegion(),
				zone:           loc.GetZone(),
				subZone:        loc.GetSubZone(),
				localityWeight: lw,
				priority:       lle.GetPriority(),
				health:         lbe.GetHealthStatus(),
				tsEndpoint:     tsLabels(lbe.GetMetadata()),
				tsLocality:     locLabels,
			}
			if w := lbe.GetLoadBalancingWeight(); w != nil {
				m.weight = w.GetValue()
			}
			if m.weight == 0 {
				m.weight = 1
			}
			switch {
			case addr.GetPipe() != nil:
				// A Unix socket, such as the agent's SDS and xDS sockets in
				// Istio's bootstrap. Abstract sockets ("@name") pass as is.
				p := addr.GetPipe()
				if p.GetPath() == "" {
					return nil, fmt.Errorf("%s.pipe.path: empty", af())
				}
				if p.GetMode() != 0 {
					return nil, fmt.Errorf("%s.pipe.mode: only for listeners", af())
				}
				if allowNames {
					return nil, fmt.Errorf("%s: pipe addresses are not supported in STRICT_DNS clusters", af())
				}
				out = append(out, endpoint{pipe: p.GetPath(), meta: shareMeta(&last, m)})
				continue
			case addr.GetSocketAddress() == nil: // envoy_internal_address
				return nil, fmt.Errorf("%s: want a socket_address", af())
			}
			sa := addr.GetSocketAddress()
			sf := func() string { return af() + ".socket_address" }
			if sa.GetProtocol() != corev3.SocketAddress_TCP {
				return nil, fmt.Errorf("%s.protocol: %s not supported", sf(), sa.GetProtocol())
			}
			if sa.GetResolverName() != "" {
				return nil, fmt.Errorf("%s.resolver_name: custom resolvers not supported", sf())
			}
			if sa.GetNamedPort() != "" {
				return nil, fmt.Errorf("%s.named_port: not supported", sf())
			}
			if sa.GetPortValue() == 0 {
				return nil, fmt.Errorf("%s.port_value: must be set", sf())
			}
			e := endpoint{host: sa.GetAddress(), port: uint16(sa.GetPortValue())}
			if ip, err := netip.ParseAddr(e.host); err == nil {
				e.ip = ip.Unmap()
			} else if !allowNames {
				return nil, fmt.Errorf("%s.address: %q is not an IP address", sf(), e.host)
			}
			if m.hostname == "" && !e.ip.IsValid() {
				m.hostname = e.host
			}
			e.meta = shareMeta(&last, m)
			out = append(out, e)
		}
	}
	return out, nil
}

// shareMeta returns *last if it equals m, else a new copy of m, which
// becomes *last. Metadata is never written once made (withTS copies), and
// the endpoints of a locality usually have the same: sharing it kept one
// per assignment instead of one per endpoint (30,000 at 10,000 services,
// ~4 MB).
func shareMeta(last **hostMeta, m hostMeta) *hostMeta {
	if *last != nil && **last == m {
		return *last
	}
	p := new(hostMeta)
	*p = m
	*last = p
	return p
}

func ipSpecs(eps []endpoint) []hostSpec {
	specs := make([]hostSpec, len(eps))
	for i, e := range eps {
		if e.pipe != "" {
			specs[i] = hostSpec{pipe: e.pipe, meta: e.meta}
			continue
		}
		specs[i] = hostSpec{addr: netip.AddrPortFrom(e.ip, e.port), meta: e.meta}
	}
	return specs
}

// dur is d, or def when d is unset or not positive.
func dur(d *durationpb.Duration, def time.Duration) time.Duration {
	if v := d.AsDuration(); d != nil && v > 0 {
		return v
	}
	return def
}
