package controlplane

import (
	"math"
	"net/netip"
	"sort"
	"time"

	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	filev3 "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/file/v3"
	origdstv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/original_dst/v3"
	tlsinspectorv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	udpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/udp/udp_proxy/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Names Istio gives the sidecar's special listeners and clusters.
const (
	virtualOutbound           = "virtualOutbound"
	virtualInbound            = "virtualInbound"
	passthroughCluster        = "PassthroughCluster"
	blackHoleCluster          = "BlackHoleCluster"
	inboundPassthroughCluster = "InboundPassthroughCluster"

	// proxyListenPort and proxyInboundListenPort are mesh.proxyListenPort
	// and the inbound capture port.
	proxyListenPort        = 15001
	proxyInboundListenPort = 15006

	// inboundPassthroughBind4 and 6: "6 is the magical number for inbound".
	inboundPassthroughBind4 = "127.0.0.6"
	inboundPassthroughBind6 = "::6"

	tcpProxyName    = "envoy.filters.network.tcp_proxy"
	udpProxyName    = "envoy.filters.udp_listener.udp_proxy"
	tlsInspector    = "envoy.filters.listener.tls_inspector"
	originalDst     = "envoy.filters.listener.original_dst"
	fileAccessLog   = "envoy.access_loggers.file"
	dnsJitter       = 100 * time.Millisecond // Istio's PILOT_DNS_JITTER_DURATION
	statDelimiter   = ";"                    // Istio's constants.StatPrefixDelimiter
	maxCircuitLimit = math.MaxUint32
)

// resources is a complete sidecar configuration: what one node receives
// over ADS. Each list is sorted by name.
type resources struct {
	Listeners []*listenerv3.Listener
	Clusters  []*clusterv3.Cluster
	Endpoints []*endpointv3.ClusterLoadAssignment
	// Routes are the RDS route configurations of the HTTP listeners, one
	// per HTTP port number, named by it.
	Routes []*routev3.RouteConfiguration
}

// defaultTrustDomain is Istio's default trust domain, the control plane's
// CA's unless told otherwise.
const defaultTrustDomain = "cluster.local"

// generate returns the sidecar configuration of node under reg and mesh.
func generate(reg *Registry, mesh *MeshConfig, node nodeInfo) *resources {
	return newGenerator(reg, mesh, defaultTrustDomain).forClass(node.class(reg))
}

// nodeClass is what makes one node's configuration differ from another's:
// the IP families of the proxy (the wildcard addresses, the inbound bind
// addresses, DNS lookup families) and its namespace (the short host names
// of HTTP virtual hosts: "reviews" means reviews.<its namespace>), whether
// it has a workload identity (mtls: then it gets Istio's TLS shapes) and,
// if so, the registry workload it is (by IP; invalid if none), whose ports
// and peer authentication make its virtualInbound. Nodes of one class
// share a snapshot.
type nodeClass struct {
	v4, v6   bool
	ns       string
	mtls     bool
	workload netip.Addr
}

// generator builds configuration for one registry and mesh config; the
// parts every node shares are built once.
type generator struct {
	reg         *Registry
	mesh        *MeshConfig
	trustDomain string // of the SPIFFE IDs in TLS contexts

	listeners []*listenerv3.Listener // outbound, per address and port
	wildcards []*listenerPlan        // outbound on the wildcard: per class
	http      []*listenerPlan        // HTTP ports: a route configuration each, per class
	clusters  []*clusterv3.Cluster   // EDS and ORIGINAL_DST clusters of hosts
	endpoints []*endpointv3.ClusterLoadAssignment
	dns       []route // ports of DNS-resolved hosts: clusters per class
	names     map[string]bool
	// mtlsClusters are clusters with auto mTLS's transport_socket_matches
	// on the services' ports, for nodes with an identity; built on first
	// use.
	mtlsClusters []*clusterv3.Cluster
}

func newGenerator(reg *Registry, mesh *MeshConfig, trustDomain string) *generator {
	g := &generator{reg: reg, mesh: mesh, trustDomain: trustDomain}
	for _, pl := range reg.listeners {
		if pl.protocol == protocolHTTP {
			g.http = append(g.http, pl)
		}
		if pl.addr.Addr().IsUnspecified() {
			g.wildcards = append(g.wildcards, pl)
			continue
		}
		g.listeners = append(g.listeners, g.outboundListener(pl))
	}
	for _, h := range reg.hosts {
		for _, p := range h.Ports {
			switch h.Resolution {
			case resolutionStatic:
				g.clusters = append(g.clusters, g.edsCluster(h, p))
				g.endpoints = append(g.endpoints, loadAssignment(h, p, mesh))
			case resolutionNone:
				g.clusters = append(g.clusters, g.originalDstCluster(h, p))
			case resolutionDNS:
				g.dns = append(g.dns, route{host: h, port: p})
			}
		}
	}
	return g
}

// clusterNames returns a new set of the names of g's clusters, the same
// for every class: the inbound clusters of every workload's ports are
// among them, though only a node that is the workload has them.
func (g *generator) clusterNames() map[string]bool {
	if g.names == nil {
		g.names = map[string]bool{passthroughCluster: true, blackHoleCluster: true, inboundPassthroughCluster: true}
		for _, h := range g.reg.hosts {
			for _, p := range h.Ports {
				g.names[clusterName(p.Number, h.Name)] = true
			}
		}
		for _, w := range g.reg.workloads {
			for _, p := range w.Ports {
				g.names[inboundClusterName(p.Number)] = true
			}
		}
	}
	out := make(map[string]bool, len(g.names))
	for n := range g.names {
		out[n] = true
	}
	return out
}

// forClass assembles the configuration of a node class.
func (g *generator) forClass(c nodeClass) *resources {
	inbound := g.virtualInbound(c)
	clusters := g.clusters
	var w *workload
	if c.mtls {
		w = g.reg.workloads[c.workload]
		mode := g.mesh.peerAuth()
		if w != nil {
			mode = w.mode(g.mesh)
		}
		inbound = g.virtualInboundMTLS(c, w, mode)
		if g.mesh.EnableAutoMtls {
			clusters = g.autoMTLSClusters()
		}
	}
	r := &resources{
		Listeners: append([]*listenerv3.Listener{g.virtualOutbound(c), inbound}, g.listeners...),
		Clusters:  append([]*clusterv3.Cluster{g.passthroughCluster(), g.blackHoleCluster(), g.inboundPassthroughCluster(c)}, clusters...),
		Endpoints: append([]*endpointv3.ClusterLoadAssignment(nil), g.endpoints...),
	}
	if w != nil {
		for _, p := range w.Ports {
			r.Clusters = append(r.Clusters, g.inboundCluster(c, p.Number))
		}
	}
	for _, pl := range g.wildcards {
		// The proxy's wildcard family; a dual-stack proxy gets both (Istio
		// gives the IPv4 listener an additional_address [::] instead, which
		// meshtun's listeners do not take).
		for _, w := range c.wildcards() {
			at := *pl
			at.addr = netip.AddrPortFrom(w, pl.addr.Port())
			r.Listeners = append(r.Listeners, g.outboundListener(&at))
		}
	}
	for _, rt := range g.dns {
		r.Clusters = append(r.Clusters, g.dnsCluster(rt.host, rt.port, c))
	}
	for _, pl := range g.http {
		r.Routes = append(r.Routes, g.routeConfiguration(pl, c))
	}
	sort.Slice(r.Routes, func(i, j int) bool { return r.Routes[i].GetName() < r.Routes[j].GetName() })
	sort.Slice(r.Listeners, func(i, j int) bool { return r.Listeners[i].GetName() < r.Listeners[j].GetName() })
	sort.Slice(r.Clusters, func(i, j int) bool { return r.Clusters[i].GetName() < r.Clusters[j].GetName() })
	sort.Slice(r.Endpoints, func(i, j int) bool { return r.Endpoints[i].GetClusterName() < r.Endpoints[j].GetClusterName() })
	return r
}

// autoMTLSClusters are g.clusters with the services' ports given auto
// mTLS's transport_socket_matches (external hosts are outside the mesh:
// plaintext, as Istio leaves MESH_EXTERNAL entries; UDP ports, meshtun's
// own addition, have no TLS).
func (g *generator) autoMTLSClusters() []*clusterv3.Cluster {
	if g.mtlsClusters != nil {
		return g.mtlsClusters
	}
	byName := map[string]route{}
	for _, h := range g.reg.hosts {
		if h.External {
			continue
		}
		for _, p := range h.Ports {
			if p.Protocol != protocolUDP {
				byName[clusterName(p.Number, h.Name)] = route{host: h, port: p}
			}
		}
	}
	out := make([]*clusterv3.Cluster, 0, len(g.clusters))
	for _, c := range g.clusters {
		if rt, ok := byName[c.GetName()]; ok {
			c = proto.Clone(c).(*clusterv3.Cluster)
			c.TransportSocketMatches = upstreamTransportSocketMatches(rt.host, rt.port, g.trustDomain)
		}
		out = append(out, c)
	}
	g.mtlsClusters = out
	return out
}

// catchAll is where virtualOutbound sends traffic no listener claims:
// PassthroughCluster under ALLOW_ANY, BlackHoleCluster under REGISTRY_ONLY.
func (g *generator) catchAll() string {
	if g.mesh.OutboundTrafficPolicy.Mode == RegistryOnly {
		return blackHoleCluster
	}
	return passthroughCluster
}

// wildcard is the proxy's wildcard address: 0.0.0.0, or :: for an
// IPv6-only proxy (Istio's getSidecarInboundBindIPs / wildcard choice).
func (c nodeClass) wildcard() netip.Addr {
	if c.v6 && !c.v4 {
		return netip.IPv6Unspecified()
	}
	return netip.IPv4Unspecified()
}

// wildcards are the unspecified addresses of the proxy's families.
func (c nodeClass) wildcards() []netip.Addr {
	switch {
	case c.v4 && c.v6:
		return []netip.Addr{netip.IPv4Unspecified(), netip.IPv6Unspecified()}
	case c.v6:
		return []netip.Addr{netip.IPv6Unspecified()}
	}
	return []netip.Addr{netip.IPv4Unspecified()}
}

// virtualOutbound receives every captured outbound flow and hands it to
// the listener of its original destination (use_original_dst); what no
// listener claims takes the catch-all chain. The first chain stops flows
// addressed to 15001 itself from looping.
func (g *generator) virtualOutbound(c nodeClass) *listenerv3.Listener {
	return &listenerv3.Listener{
		Name:             virtualOutbound,
		Address:          socketAddress(corev3.SocketAddress_TCP, c.wildcard(), proxyListenPort),
		UseOriginalDst:   wrapperspb.Bool(true),
		TrafficDirection: corev3.TrafficDirection_OUTBOUND,
		FilterChains: []*listenerv3.FilterChain{
			{
				Name:             virtualOutbound + "-blackhole",
				FilterChainMatch: &listenerv3.FilterChainMatch{DestinationPort: wrapperspb.UInt32(proxyListenPort)},
				Filters:          []*listenerv3.Filter{g.tcpProxy(blackHoleCluster)},
			},
			{
				Name:    virtualOutbound + "-catchall-tcp",
				Filters: []*listenerv3.Filter{g.tcpProxy(g.catchAll())},
			},
		},
	}
}

// virtualInbound receives captured inbound flows and passes them to the
// application through InboundPassthroughCluster.
func (g *generator) virtualInbound(c nodeClass) *listenerv3.Listener {
	var ranges []*corev3.CidrRange
	if c.v4 || !c.v6 {
		ranges = append(ranges, &corev3.CidrRange{AddressPrefix: "0.0.0.0", PrefixLen: wrapperspb.UInt32(0)})
	}
	if c.v6 {
		ranges = append(ranges, &corev3.CidrRange{AddressPrefix: "::", PrefixLen: wrapperspb.UInt32(0)})
	}
	return &listenerv3.Listener{
		Name:             virtualInbound,
		Address:          socketAddress(corev3.SocketAddress_TCP, c.wildcard(), proxyInboundListenPort),
		TrafficDirection: corev3.TrafficDirection_INBOUND,
		ListenerFilters: []*listenerv3.ListenerFilter{{
			Name:       originalDst,
			ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: mustAny(&origdstv3.OriginalDst{})},
		}},
		FilterChains: []*listenerv3.FilterChain{
			{
				Name:             virtualInbound + "-blackhole",
				FilterChainMatch: &listenerv3.FilterChainMatch{DestinationPort: wrapperspb.UInt32(proxyInboundListenPort)},
				Filters:          []*listenerv3.Filter{g.tcpProxy(blackHoleCluster)},
			},
			{
				Name:             virtualInbound + "-catchall-tcp",
				FilterChainMatch: &listenerv3.FilterChainMatch{PrefixRanges: ranges},
				Filters:          []*listenerv3.Filter{g.tcpProxy(inboundPassthroughCluster)},
			},
		},
	}
}

// outboundListener builds the listener of one address and port; each
// protocol has its own builder.
func (g *generator) outboundListener(pl *listenerPlan) *listenerv3.Listener {
	switch pl.protocol {
	case protocolHTTP:
		return g.httpListener(pl)
	case protocolTLS:
		return g.tlsListener(pl)
	case protocolUDP:
		return g.udpListener(pl)
	}
	return g.tcpListener(pl)
}

// outboundBase is what every outbound listener of Istio's has: the name
// <address>_<port>, the address, no socket of its own (flows arrive by
// hand-off from virtualOutbound).
func outboundBase(pl *listenerPlan, proto corev3.SocketAddress_Protocol) *listenerv3.Listener {
	return &listenerv3.Listener{
		Name:             listenerName(pl),
		Address:          socketAddress(proto, pl.addr.Addr(), uint32(pl.addr.Port())),
		BindToPort:       wrapperspb.Bool(false),
		TrafficDirection: corev3.TrafficDirection_OUTBOUND,
	}
}

// tcpListener: one chain, tcp_proxy to the port's cluster (the planner
// lets one TCP host port have an address and port).
func (g *generator) tcpListener(pl *listenerPlan) *listenerv3.Listener {
	l := outboundBase(pl, corev3.SocketAddress_TCP)
	rt := pl.routes[0]
	l.FilterChains = []*listenerv3.FilterChain{{Filters: []*listenerv3.Filter{g.tcpProxy(clusterName(rt.port.Number, rt.host.Name))}}}
	return l
}

// tlsListener: a single host at its own address is plain tcp_proxy, as
// Istio does for a VIP; hosts sharing the address (the wildcard listener
// of external hosts without addresses, or several hosts of one entry) get
// one chain per host matched on SNI, after tls_inspector, and a default
// chain to the catch-all for any other server name.
func (g *generator) tlsListener(pl *listenerPlan) *listenerv3.Listener {
	if len(pl.routes) == 1 && !pl.addr.Addr().IsUnspecified() {
		return g.tcpListener(pl)
	}
	l := outboundBase(pl, corev3.SocketAddress_TCP)
	l.ListenerFilters = []*listenerv3.ListenerFilter{{
		Name:       tlsInspector,
		ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: mustAny(&tlsinspectorv3.TlsInspector{})},
	}}
	// Istio's protocolDetectionTimeout (0s: wait for the ClientHello) and
	// continue_on_listener_filters_timeout.
	l.ListenerFiltersTimeout = durationpb.New(0)
	l.ContinueOnListenerFiltersTimeout = true
	routes := append([]route(nil), pl.routes...)
	sort.Slice(routes, func(i, j int) bool { return routes[i].host.Name < routes[j].host.Name })
	for _, rt := range routes {
		l.FilterChains = append(l.FilterChains, &listenerv3.FilterChain{
			FilterChainMatch: &listenerv3.FilterChainMatch{ServerNames: []string{rt.host.Name}},
			Filters:          []*listenerv3.Filter{g.tcpProxy(clusterName(rt.port.Number, rt.host.Name))},
		})
	}
	l.DefaultFilterChain = &listenerv3.FilterChain{Filters: []*listenerv3.Filter{g.tcpProxy(g.catchAll())}}
	return l
}

// udpListener: a UDP listener whose udp_proxy sends each session to the
// port's cluster (Istio has no UDP; the shape is Envoy's).
func (g *generator) udpListener(pl *listenerPlan) *listenerv3.Listener {
	l := outboundBase(pl, corev3.SocketAddress_UDP)
	rt := pl.routes[0]
	cl := clusterName(rt.port.Number, rt.host.Name)
	l.ListenerFilters = []*listenerv3.ListenerFilter{{
		Name: udpProxyName,
		ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: mustAny(&udpproxyv3.UdpProxyConfig{
			StatPrefix:     cl,
			RouteSpecifier: &udpproxyv3.UdpProxyConfig_Cluster{Cluster: cl},
			AccessLog:      g.accessLog(false),
		})},
	}}
	return l
}

func (g *generator) tcpProxy(cluster string) *listenerv3.Filter {
	return &listenerv3.Filter{
		Name: tcpProxyName,
		ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(&tcpproxyv3.TcpProxy{
			StatPrefix:       cluster,
			ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: cluster},
			AccessLog:        g.accessLog(false),
		})},
	}
}

// accessLog is the mesh's file access log (accessLogFile), with Istio's
// JSON field names when accessLogEncoding is JSON; http adds the request
// fields.
func (g *generator) accessLog(http bool) []*accesslogv3.AccessLog {
	if g.mesh.AccessLogFile == "" {
		return nil
	}
	fal := &filev3.FileAccessLog{Path: g.mesh.AccessLogFile}
	if g.mesh.AccessLogEncoding == "JSON" {
		fields := map[string]any{}
		for k, v := range istioJSONLogFormat {
			fields[k] = v
		}
		if http {
			for k, v := range istioJSONLogFormatHTTP {
				fields[k] = v
			}
		}
		st, _ := structpb.NewStruct(fields)
		fal.AccessLogFormat = &filev3.FileAccessLog_LogFormat{LogFormat: &corev3.SubstitutionFormatString{
			Format: &corev3.SubstitutionFormatString_JsonFormat{JsonFormat: st},
		}}
	}
	return []*accesslogv3.AccessLog{{Name: fileAccessLog, ConfigType: &accesslogv3.AccessLog_TypedConfig{TypedConfig: mustAny(fal)}}}
}

// istioJSONLogFormat is the TCP part of Istio's default JSON access log
// format (EnvoyJSONLogFormatIstio).
var istioJSONLogFormat = map[string]string{
	"start_time":                        "%START_TIME%",
	"downstream_peer_uri_san":           "%DOWNSTREAM_PEER_URI_SAN%",
	"upstream_peer_uri_san":             "%UPSTREAM_PEER_URI_SAN%",
	"upstream_transport_failure_reason": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
	"upstream_cluster":                  "%UPSTREAM_CLUSTER_RAW%",
	"upstream_host":                     "%UPSTREAM_HOST%",
	"upstream_local_address":            "%UPSTREAM_LOCAL_ADDRESS%",
	"downstream_local_address":          "%DOWNSTREAM_LOCAL_ADDRESS%",
	"downstream_remote_address":         "%DOWNSTREAM_REMOTE_ADDRESS%",
	"bytes_received":                    "%BYTES_RECEIVED%",
	"bytes_sent":                        "%BYTES_SENT%",
	"duration":                          "%DURATION%",
	"response_flags":                    "%RESPONSE_FLAGS%",
	"connection_termination_details":    "%CONNECTION_TERMINATION_DETAILS%",
}

// istioJSONLogFormatHTTP is the request part of the same format.
var istioJSONLogFormatHTTP = map[string]string{
	"method":                "%REQ(:METHOD)%",
	"path":                  "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
	"protocol":              "%PROTOCOL%",
	"response_code":         "%RESPONSE_CODE%",
	"response_flags":        "%RESPONSE_FLAGS%",
	"response_code_details": "%RESPONSE_CODE_DETAILS%",
	"upstream_service_time": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
	"x_forwarded_for":       "%REQ(X-FORWARDED-FOR)%",
	"user_agent":            "%REQ(USER-AGENT)%",
	"request_id":            "%REQ(X-REQUEST-ID)%",
	"authority":             "%REQ(:AUTHORITY)%",
	"route_name":            "%ROUTE_NAME%",
}

// baseCluster is what Istio's buildCluster and applyTrafficPolicy give
// every cluster without a DestinationRule: alt_stat_name "<name>;", the
// mesh connect timeout, the default (unlimited) circuit breakers, an empty
// common_lb_config, and LEAST_REQUEST (CLUSTER_PROVIDED for ORIGINAL_DST).
func (g *generator) baseCluster(name string, typ clusterv3.Cluster_DiscoveryType) *clusterv3.Cluster {
	c := &clusterv3.Cluster{
		Name:                 name,
		AltStatName:          name + statDelimiter,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: typ},
		ConnectTimeout:       durationpb.New(time.Duration(g.mesh.ConnectTimeout)),
		LbPolicy:             clusterv3.Cluster_LEAST_REQUEST,
		CircuitBreakers:      defaultCircuitBreakers(),
		CommonLbConfig:       &clusterv3.Cluster_CommonLbConfig{},
	}
	if typ == clusterv3.Cluster_ORIGINAL_DST {
		c.LbPolicy = clusterv3.Cluster_CLUSTER_PROVIDED
	}
	return c
}

// defaultCircuitBreakers are Istio's getDefaultCircuitBreakerThresholds:
// every limit at its maximum, remaining capacity tracked.
func defaultCircuitBreakers() *clusterv3.CircuitBreakers {
	return &clusterv3.CircuitBreakers{Thresholds: []*clusterv3.CircuitBreakers_Thresholds{{
		MaxConnections:     wrapperspb.UInt32(maxCircuitLimit),
		MaxPendingRequests: wrapperspb.UInt32(maxCircuitLimit),
		MaxRequests:        wrapperspb.UInt32(maxCircuitLimit),
		MaxRetries:         wrapperspb.UInt32(maxCircuitLimit),
		TrackRemaining:     true,
	}}}
}

// edsCluster is a service port's cluster: endpoints over ADS, named by
// the cluster (Istio's maybeApplyEdsConfig).
func (g *generator) edsCluster(h *host, p port) *clusterv3.Cluster {
	c := g.baseCluster(clusterName(p.Number, h.Name), clusterv3.Cluster_EDS)
	c.EdsClusterConfig = &clusterv3.Cluster_EdsClusterConfig{ServiceName: c.Name, EdsConfig: adsConfigSource()}
	return c
}

// adsConfigSource is Istio's config source of EDS and RDS: over ADS, no
// initial fetch timeout.
func adsConfigSource() *corev3.ConfigSource {
	return &corev3.ConfigSource{
		ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
		InitialFetchTimeout:   durationpb.New(0),
		ResourceApiVersion:    corev3.ApiVersion_V3,
	}
}

// originalDstCluster is an external host of resolution NONE: connections
// go where the client sent them.
func (g *generator) originalDstCluster(h *host, p port) *clusterv3.Cluster {
	return g.baseCluster(clusterName(p.Number, h.Name), clusterv3.Cluster_ORIGINAL_DST)
}

// dnsCluster is an external host of resolution DNS: STRICT_DNS over its
// endpoints, with Istio's DNS settings for the node's IP families.
func (g *generator) dnsCluster(h *host, p port, cls nodeClass) *clusterv3.Cluster {
	c := g.baseCluster(clusterName(p.Number, h.Name), clusterv3.Cluster_STRICT_DNS)
	c.DnsLookupFamily = clusterv3.Cluster_V4_ONLY // dual stack too, as Istio without ISTIO_DUAL_STACK
	if cls.v6 && !cls.v4 {
		c.DnsLookupFamily = clusterv3.Cluster_V6_ONLY
	}
	c.DnsRefreshRate = durationpb.New(time.Duration(g.mesh.DNSRefreshRate))
	c.DnsJitter = durationpb.New(dnsJitter)
	c.RespectDnsTtl = true
	c.LoadAssignment = loadAssignment(h, p, g.mesh)
	return c
}

// loadAssignment groups a host port's endpoints by locality. The locality
// weight is the sum of its endpoints' weights, as Istio's EndpointBuilder
// computes it; without locality_weighted_lb_config (Istio's default) it
// is informational. A service's endpoints carry Istio's metadata
// (endpointMetadata).
func loadAssignment(h *host, p port, mesh *MeshConfig) *endpointv3.ClusterLoadAssignment {
	name := clusterName(p.Number, h.Name)
	type loc struct{ region, zone, sub string }
	groups := map[loc]*endpointv3.LocalityLbEndpoints{}
	var order []loc
	for i := range h.Endpoints {
		e := &h.Endpoints[i]
		k := loc{e.Region, e.Zone, e.SubZone}
		grp := groups[k]
		if grp == nil {
			grp = &endpointv3.LocalityLbEndpoints{
				Locality:            &corev3.Locality{Region: e.Region, Zone: e.Zone, SubZone: e.SubZone},
				LoadBalancingWeight: wrapperspb.UInt32(0),
			}
			groups[k] = grp
			order = append(order, k)
		}
		lb := &endpointv3.LbEndpoint{
			HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
				Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
					Address:       e.Address,
					PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: e.PortFor(p)},
				}}},
			}},
			LoadBalancingWeight: wrapperspb.UInt32(e.Weight),
		}
		if !h.External {
			lb.Metadata = endpointMetadata(h, e, mesh)
		}
		grp.LbEndpoints = append(grp.LbEndpoints, lb)
		grp.LoadBalancingWeight.Value += e.Weight
	}
	sort.Slice(order, func(i, j int) bool {
		a, b := order[i], order[j]
		if a.region != b.region {
			return a.region < b.region
		}
		if a.zone != b.zone {
			return a.zone < b.zone
		}
		return a.sub < b.sub
	})
	cla := &endpointv3.ClusterLoadAssignment{ClusterName: name}
	for _, k := range order {
		cla.Endpoints = append(cla.Endpoints, groups[k])
	}
	return cla
}

// passthroughCluster is Istio's buildDefaultPassthroughCluster: to the
// original destination, "used to catch all traffic to unknown listener
// ports".
func (g *generator) passthroughCluster() *clusterv3.Cluster {
	c := &clusterv3.Cluster{
		Name:                 passthroughCluster,
		AltStatName:          passthroughCluster + statDelimiter,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_ORIGINAL_DST},
		ConnectTimeout:       durationpb.New(time.Duration(g.mesh.ConnectTimeout)),
		LbPolicy:             clusterv3.Cluster_CLUSTER_PROVIDED,
		CircuitBreakers:      defaultCircuitBreakers(),
	}
	return c
}

// blackHoleCluster is Istio's buildBlackHoleCluster: STATIC with no
// endpoints, so every connect through it is refused.
func (g *generator) blackHoleCluster() *clusterv3.Cluster {
	return &clusterv3.Cluster{
		Name:                 blackHoleCluster,
		AltStatName:          blackHoleCluster + statDelimiter,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC},
		ConnectTimeout:       durationpb.New(time.Duration(g.mesh.ConnectTimeout)),
		LbPolicy:             clusterv3.Cluster_ROUND_ROBIN,
	}
}

// inboundPassthroughCluster is Istio's buildInboundPassthroughCluster: the
// passthrough cluster bound to 127.0.0.6 (::6 for an IPv6-only proxy; a
// dual-stack proxy gets ::6 as an extra source address), so the
// application sees inbound connections from an address capture ignores.
func (g *generator) inboundPassthroughCluster(cls nodeClass) *clusterv3.Cluster {
	c := g.passthroughCluster()
	c.Name = inboundPassthroughCluster
	// Istio keeps the clone's "PassthroughCluster;"; meshtun's /stats
	// would then list the two clusters' counters under one name twice
	// (Envoy merges them), so the inbound cluster gets its own.
	c.AltStatName = inboundPassthroughCluster + statDelimiter
	src := inboundPassthroughBind4
	if cls.v6 && !cls.v4 {
		src = inboundPassthroughBind6
	}
	c.UpstreamBindConfig = &corev3.BindConfig{SourceAddress: &corev3.SocketAddress{
		Address: src, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 0},
	}}
	if cls.v4 && cls.v6 {
		c.UpstreamBindConfig.ExtraSourceAddresses = []*corev3.ExtraSourceAddress{{Address: &corev3.SocketAddress{
			Address: inboundPassthroughBind6, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 0},
		}}}
	}
	return c
}

func socketAddress(proto corev3.SocketAddress_Protocol, ip netip.Addr, port uint32) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Protocol:      proto,
		Address:       ip.String(),
		PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port},
	}}}
}

func mustAny(m proto.Message) *anypb.Any {
	a, err := anypb.New(m)
	if err != nil {
		panic(err) // only for messages this package builds
	}
	return a
}
