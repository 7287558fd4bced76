package mesh

import (
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"google.golang.org/protobuf/proto"

	"github.com/meshtun/meshtun/mesh/cluster"
	"github.com/meshtun/meshtun/mesh/filterchain"
	"github.com/meshtun/meshtun/mesh/httpconn"
)

// Roles says which listeners receive captured flows. Istio's defaults:
// outbound capture lands on the listener at port 15001 (virtualOutbound),
// inbound on 15006 (virtualInbound). No listener name is special.
type Roles struct {
	OutboundPort uint16
	InboundPort  uint16
}

// IstioRoles are Istio's proxyListenPort and proxyInboundListenPort.
var IstioRoles = Roles{OutboundPort: 15001, InboundPort: 15006}

// Snapshot is an immutable, validated configuration. The dispatcher reads
// it through an atomic pointer; a flow keeps the snapshot (and so the
// listener, chain and cluster) it started with.
type Snapshot struct {
	Version   string
	Listeners []*Listener // in configuration order
	Clusters  map[string]*cluster.Cluster

	clusterProtos map[string]*clusterv3.Cluster // what each cluster was built from

	byName    map[string]*Listener
	byAddr    map[netip.AddrPort]*Listener // exact IP:port hand-off targets
	wildcard4 map[uint16]*Listener         // 0.0.0.0:port
	wildcard6 map[uint16]*Listener         // [::]:port
	udpByAddr map[netip.AddrPort]*Listener // UDP listeners by exact IP:port
	udpWild4  map[uint16]*Listener
	udpWild6  map[uint16]*Listener
	bound     map[string]*Listener // binding listeners by bindKey
	outbound  *Listener            // receives captured outbound flows
	inbound   *Listener            // receives captured inbound flows

	// tcpStats are the tcp.<stat_prefix>.* counters by prefix; chains with
	// the same prefix share them, and a prefix still in use after an
	// update keeps them, as Envoy's stat scopes do.
	tcpStats map[string]*TCPStats
	// httpStats are the http.<stat_prefix>.* counters, shared the same way.
	httpStats map[string]*httpconn.Stats

	// HTTP: compiled RDS route configurations, each cluster's upstream
	// HTTP options, and the connection pools (see httpconn.Env).
	routes      map[string]*httpconn.Routes
	routeProtos map[string]*routev3.RouteConfiguration
	httpOpts    map[string]cluster.HTTPOptions
	pools       *httpconn.Pools

	// Dump is what /config_dump shows: the resources as received, with
	// their versions. Set before the snapshot is swapped in.
	Dump *Dump
}

// Listener is the runtime form of an Envoy Listener.
type Listener struct {
	Name           string
	Proto          *listenerv3.Listener
	Addr           netip.AddrPort // IP listeners
	Pipe           string         // Unix domain socket path (address.pipe)
	BindToPort     bool
	UseOriginalDst bool
	Direction      corev3.TrafficDirection
	Chains         []*Chain
	Default        *Chain
	UDP            *UDPProxy // set for UDP listeners (udp_proxy listener filter)
	Stats          *ListenerStats

	insp inspection

	// drain tells the listener's flows when it starts draining and when
	// they are to be closed (a removal or change by an update: Drain; the
	// proxy's drain: Server.StartDrain). Shared with the listeners of
	// later snapshots that carry this one over.
	drain   *listenerDrain
	matcher *filterchain.Matcher
}

// Chain is one filter chain: where its flows go. Exactly one of TCP and
// HTTP is set.
type Chain struct {
	Name    string
	TCP     *TCPProxy
	HTTP    *httpconn.Config // http_connection_manager
	Skipped []string         // telemetry filters accepted and not run
}

// ListenerStats are Envoy's listener.<address>.* counters. They belong to
// the listener's address, so a listener updated in place keeps them.
type ListenerStats struct {
	Prefix                    string // e.g. "listener.0.0.0.0_15001."
	DownstreamCxTotal         atomic.Uint64
	DownstreamCxActive        atomic.Int64
	DownstreamCxDestroy       atomic.Uint64
	NoFilterChainMatch        atomic.Uint64
	DownstreamPreCxActive     atomic.Int64
	DownstreamListenerTimeout atomic.Uint64 // downstream_pre_cx_timeout
}

// listenerStatPrefix is Envoy's listener stat scope: "listener." + the
// listener's stat_prefix, else "envoy_internal_<name>" for an internal
// listener, else the address as Envoy prints it (Address::asString:
// "0.0.0.0:15001", IPv6 "[::]:15001", a pipe's path), sanitized as
// Envoy's Stats::Utility::sanitizeStatsName does when the scope is
// created (":" becomes "_"), so IPv6 [::]:15001 is "listener.[__]_15001."
// (envoy source/common/listener_manager/listener_impl.cc
// listenerStatsScope; source/common/stats/utility.cc). Istio's
// listener_address tag regex expects exactly this shape.
func listenerStatPrefix(l *listenerv3.Listener) string {
	var scope string
	switch sa := l.GetAddress().GetSocketAddress(); {
	case l.GetStatPrefix() != "":
		scope = l.GetStatPrefix()
	case l.GetInternalListener() != nil:
		scope = "envoy_internal_" + l.GetName()
	case l.GetAddress().GetPipe() != nil:
		scope = l.GetAddress().GetPipe().GetPath()
	default:
		if ip, err := netip.ParseAddr(sa.GetAddress()); err == nil {
			// inet_ntop's form, IPv6 in brackets: "[::]:15001".
			scope = netip.AddrPortFrom(ip, uint16(sa.GetPortValue())).String()
		} else {
			scope = fmt.Sprintf("%s:%d", sa.GetAddress(), sa.GetPortValue())
		}
	}
	// The replacements of Envoy's sanitizeStatsName.
	return "listener." + strings.NewReplacer("://", "_", ":/", "_", ":", "_", "\x00", "_").Replace(scope) + "."
}

// BuildOptions carries what building a snapshot needs besides resources.
type BuildOptions struct {
	Roles   Roles
	Cluster cluster.Options
	// AddedViaAPI marks clusters that came over xDS (Envoy's added_via_api):
	// all of them, or those named in DynamicClusters.
	AddedViaAPI     bool
	DynamicClusters map[string]bool
	// Routes are the RDS route configurations by name.
	Routes map[string]*routev3.RouteConfiguration
	// AllowUnknownClusters accepts listeners whose tcp_proxy or udp_proxy
	// names a cluster not (yet) known, as Envoy does for xDS: CDS and LDS
	// arrive independently and a control plane may send them in either
	// order. Such a flow is refused (flag NC, downstream_cx_no_route)
	// until the cluster exists. A static-only bootstrap keeps the strict
	// check, which catches typos before anything starts.
	AllowUnknownClusters bool
	// Pools are the proxy's upstream HTTP connection pools, shared by
	// every snapshot (nil: the snapshot gets its own).
	Pools *httpconn.Pools
}

// Build validates listeners and clusters into a Snapshot. prev, when not
// nil, lends clusters whose configuration is unchanged (keeping their
// hosts, connections and counters) and listener counters by address.
// Every error names the resource and the field.
func Build(version string, listeners []*listenerv3.Listener, clusters []*clusterv3.Cluster, prev *Snapshot, opts BuildOptions) (*Snapshot, error) {
	s := &Snapshot{
		Version:       version,
		Clusters:      make(map[string]*cluster.Cluster, len(clusters)),
		clusterProtos: make(map[string]*clusterv3.Cluster, len(clusters)),
		byName:        make(map[string]*Listener, len(listeners)),
		byAddr:        make(map[netip.AddrPort]*Listener),
		wildcard4:     make(map[uint16]*Listener),
		wildcard6:     make(map[uint16]*Listener),
		udpByAddr:     make(map[netip.AddrPort]*Listener),
		udpWild4:      make(map[uint16]*Listener),
		udpWild6:      make(map[uint16]*Listener),
		bound:         make(map[string]*Listener),
		httpOpts:      make(map[string]cluster.HTTPOptions, len(clusters)),
		routes:        make(map[string]*httpconn.Routes, len(opts.Routes)),
		routeProtos:   opts.Routes,
		pools:         opts.Pools,
	}
	if s.pools == nil {
		s.pools = httpconn.NewPools()
	}
	var created []*cluster.Cluster
	fail := func(err error) (*Snapshot, error) {
		for _, c := range created {
			c.Close()
		}
		return nil, err
	}
	for i, pb := range clusters {
		name := pb.GetName()
		if name == "" {
			return fail(fmt.Errorf("clusters[%d]: name: must not be empty", i))
		}
		if _, dup := s.Clusters[name]; dup {
			return fail(fmt.Errorf("cluster %q: duplicate name", name))
		}
		if prev != nil {
			if old := prev.Clusters[name]; old != nil && proto.Equal(prev.clusterProtos[name], pb) {
				s.Clusters[name], s.clusterProtos[name], s.httpOpts[name] = old, pb, prev.httpOpts[name]
				continue
			}
		}
		ho, err := cluster.ParseHTTPOptions(pb)
		if err != nil {
			return fail(fmt.Errorf("cluster %q: %w", name, err))
		}
		s.httpOpts[name] = ho
		co := opts.Cluster
		co.AddedViaAPI = opts.AddedViaAPI || opts.DynamicClusters[name]
		c, err := cluster.New(pb, co)
		if err != nil {
			return fail(err) // cluster.New names the cluster
		}
		if prev != nil {
			if old := prev.Clusters[name]; old != nil {
				// Stats are kept by cluster name across updates, as in
				// Envoy: the HTTP request counters of the cluster this
				// one replaces go on counting.
				c.ShareHTTPStats(old.HTTPStats())
			}
		}
		created = append(created, c)
		s.Clusters[name], s.clusterProtos[name] = c, pb
	}
	for _, name := range sortedKeys(opts.Routes) {
		rc := opts.Routes[name]
		if prev != nil && prev.routeProtos[name] == rc && prev.routes[name] != nil {
			s.routes[name] = prev.routes[name]
			continue
		}
		r, err := httpconn.CompileRoutes(rc)
		if err != nil {
			return fail(fmt.Errorf("route_configuration %q: %w", name, err))
		}
		s.routes[name] = r
	}
	exists := func(n string) bool { _, ok := s.Clusters[n]; return ok || opts.AllowUnknownClusters }
	defer s.shareTCPStats(prev)
	for i, pb := range listeners {
		l, err := buildListener(pb, exists, prev)
		if err != nil {
			name := pb.GetName()
			if name == "" {
				name = fmt.Sprintf("listeners[%d]", i)
			}
			return fail(fmt.Errorf("listener %q: %w", name, err))
		}
		if _, dup := s.byName[l.Name]; dup {
			return fail(fmt.Errorf("listener %q: duplicate name", l.Name))
		}
		s.byName[l.Name] = l
		s.Listeners = append(s.Listeners, l)
		if l.Pipe != "" {
			continue
		}
		if l.UDP != nil {
			tbl := s.udpByAddr
			var wc map[uint16]*Listener
			if l.Addr.Addr().IsUnspecified() {
				wc = s.udpWild4
				if l.Addr.Addr().Is6() {
					wc = s.udpWild6
				}
			}
			if wc != nil {
				if other := wc[l.Addr.Port()]; other != nil {
					return fail(fmt.Errorf("listener %q: address udp %v: already used by listener %q", l.Name, l.Addr, other.Name))
				}
				wc[l.Addr.Port()] = l
			} else {
				if other := tbl[l.Addr]; other != nil {
					return fail(fmt.Errorf("listener %q: address udp %v: already used by listener %q", l.Name, l.Addr, other.Name))
				}
				tbl[l.Addr] = l
			}
			continue
		}
		port := l.Addr.Port()
		switch {
		case opts.Roles.OutboundPort != 0 && port == opts.Roles.OutboundPort && l.Addr.Addr().IsUnspecified() && s.outbound == nil:
			s.outbound = l
		case opts.Roles.InboundPort != 0 && port == opts.Roles.InboundPort && l.Addr.Addr().IsUnspecified() && s.inbound == nil:
			s.inbound = l
		}
		table := s.byAddr
		key := l.Addr
		if l.Addr.Addr().IsUnspecified() {
			if l.Addr.Addr().Is4() {
				if other := s.wildcard4[port]; other != nil {
					return fail(fmt.Errorf("listener %q: address %v: already used by listener %q", l.Name, l.Addr, other.Name))
				}
				s.wildcard4[port] = l
			} else {
				if other := s.wildcard6[port]; other != nil {
					return fail(fmt.Errorf("listener %q: address %v: already used by listener %q", l.Name, l.Addr, other.Name))
				}
				s.wildcard6[port] = l
			}
			continue
		}
		if other := table[key]; other != nil {
			return fail(fmt.Errorf("listener %q: address %v: already used by listener %q", l.Name, l.Addr, other.Name))
		}
		table[key] = l
	}
	for _, l := range s.Listeners {
		if l.BindToPort && l != s.outbound && l != s.inbound && l.UDP == nil {
			s.bound[bindKey(l)] = l
		}
	}
	return s, nil
}

func buildListener(pb *listenerv3.Listener, clusterExists func(string) bool, prev *Snapshot) (*Listener, error) {
	if err := pb.ValidateAll(); err != nil {
		return nil, err
	}
	l := &Listener{
		drain:          newListenerDrain(),
		Name:           pb.GetName(),
		Proto:          pb,
		BindToPort:     pb.GetBindToPort() == nil || pb.GetBindToPort().GetValue(),
		UseOriginalDst: pb.GetUseOriginalDst().GetValue(),
		Direction:      pb.GetTrafficDirection(),
	}
	if l.Name == "" {
		return nil, errors.New("name: must not be empty")
	}
	switch {
	case pb.GetAddress().GetPipe() != nil:
		l.Pipe = pb.GetAddress().GetPipe().GetPath()
	case pb.GetAddress().GetSocketAddress() != nil:
		sa := pb.GetAddress().GetSocketAddress()
		ip, err := netip.ParseAddr(sa.GetAddress())
		if err != nil {
			return nil, fmt.Errorf("address.socket_address.address: %q is not an IP address", sa.GetAddress())
		}
		if sa.GetNamedPort() != "" {
			return nil, errors.New("address.socket_address.named_port: not supported; use port_value")
		}
		l.Addr = netip.AddrPortFrom(ip.Unmap(), uint16(sa.GetPortValue()))
	default:
		return nil, errors.New("address: want socket_address or pipe")
	}
	if sa := pb.GetAddress().GetSocketAddress(); sa != nil && sa.GetProtocol() == corev3.SocketAddress_UDP {
		u, err := parseUDPListener(pb, clusterExists)
		if err != nil {
			return nil, err
		}
		if l.BindToPort {
			return nil, errors.New("bind_to_port: UDP listeners that bind a socket are not supported; set bind_to_port false to receive captured UDP flows")
		}
		l.UDP = u
		l.Stats = &ListenerStats{Prefix: "listener.udp_" + strings.TrimPrefix(listenerStatPrefix(pb), "listener.")}
		return l, nil
	}
	if len(pb.GetAdditionalAddresses()) > 0 {
		return nil, errors.New("additional_addresses: not supported")
	}
	if pb.GetFilterChainMatcher() != nil {
		return nil, errors.New("filter_chain_matcher: not supported; use filter_chain_match")
	}
	var err error
	if l.insp, err = parseListenerFilters(pb); err != nil {
		return nil, err
	}
	for i, fc := range pb.GetFilterChains() {
		c, err := buildChain(fc, clusterExists)
		if err != nil {
			return nil, fmt.Errorf("filter_chains[%d]%s: %w", i, chainLabel(fc), err)
		}
		l.Chains = append(l.Chains, c)
	}
	if dfc := pb.GetDefaultFilterChain(); dfc != nil {
		if l.Default, err = buildChain(dfc, clusterExists); err != nil {
			return nil, fmt.Errorf("default_filter_chain: %w", err)
		}
	}
	if l.matcher, err = filterchain.Compile(pb.GetFilterChains(), pb.GetDefaultFilterChain()); err != nil {
		return nil, err
	}
	prefix := listenerStatPrefix(pb)
	if prev != nil {
		if old := prev.byName[l.Name]; old != nil && old.Stats.Prefix == prefix {
			l.Stats = old.Stats
		}
		if old := prev.byName[l.Name]; old != nil && proto.Equal(old.Proto, pb) {
			// The same listener: its flows, old and new, drain together.
			l.drain.close()
			l.drain = old.drain
		}
	}
	if l.Stats == nil {
		l.Stats = &ListenerStats{Prefix: prefix}
	}
	return l, nil
}

func chainLabel(fc *listenerv3.FilterChain) string {
	if fc.GetName() == "" {
		return ""
	}
	return fmt.Sprintf(" (%s)", fc.GetName())
}

func buildChain(fc *listenerv3.FilterChain, clusterExists func(string) bool) (*Chain, error) {
	if fc.GetTransportSocket() != nil {
		return nil, errors.New("transport_socket: TLS termination is not supported")
	}
	tp, hcm, skipped, err := parseNetworkFilters(fc.GetFilters(), clusterExists)
	if err != nil {
		return nil, err
	}
	return &Chain{Name: fc.GetName(), TCP: tp, HTTP: hcm, Skipped: skipped}, nil
}

// Listener returns the listener named name.
func (s *Snapshot) Listener(name string) *Listener { return s.byName[name] }

// udpListener finds the UDP listener for a captured datagram flow: exact
// IP:port, then the same family's wildcard; nil means pass through.
func (s *Snapshot) udpListener(dst netip.AddrPort) *Listener {
	if l := s.udpByAddr[dst]; l != nil {
		return l
	}
	if dst.Addr().Is6() {
		return s.udpWild6[dst.Port()]
	}
	return s.udpWild4[dst.Port()]
}

// handOff finds the listener a captured flow to dst belongs to, as
// Envoy's use_original_dst does from the receiving virtual listener:
// exact IP:port, then the same family's wildcard for the port, else the
// receiving listener itself. Listeners that bind are not hand-off targets
// for flows that are already at their address.
func (s *Snapshot) handOff(recv *Listener, dst netip.AddrPort) *Listener {
	if recv != nil && !recv.UseOriginalDst {
		return recv
	}
	if l := s.byAddr[dst]; l != nil && l != recv {
		return l
	}
	wc := s.wildcard4
	if dst.Addr().Is6() {
		wc = s.wildcard6
	}
	if l := wc[dst.Port()]; l != nil && l != s.outbound && l != s.inbound {
		return l
	}
	return recv
}

// Drain starts draining, for d, every listener of s that next removes or
// changes, as Envoy drains a listener LDS removed: at once its HTTP
// connections are asked to close (Connection: close on the next HTTP/1.1
// response, idle ones closed, GOAWAY on HTTP/2) while its flows go on;
// once d has passed, those still open, HTTP and TCP, are closed. New flows
// already use next. d <= 0 closes them at once.
func (s *Snapshot) Drain(next *Snapshot, d time.Duration) (draining int) {
	for _, l := range s.Listeners {
		if n := next.Listener(l.Name); n != nil && n.drain == l.drain {
			continue // unchanged: Build carried the listener over
		}
		draining++
		l.drain.after(d)
	}
	return draining
}

// Retire closes the clusters of s that next does not carry over. Call it
// once next is in force; flows still using them keep working on their
// open connections.
func (s *Snapshot) Retire(next *Snapshot) {
	for name, c := range s.Clusters {
		if next == nil || next.Clusters[name] != c {
			c.Close()
		}
	}
}

// shareTCPStats gives every tcp_proxy its tcp.<stat_prefix> counters and
// every http_connection_manager its http.<stat_prefix> ones.
func (s *Snapshot) shareTCPStats(prev *Snapshot) {
	s.tcpStats = make(map[string]*TCPStats)
	s.httpStats = make(map[string]*httpconn.Stats)
	getHTTP := func(prefix string) *httpconn.Stats {
		if st := s.httpStats[prefix]; st != nil {
			return st
		}
		if prev != nil && prev.httpStats[prefix] != nil {
			s.httpStats[prefix] = prev.httpStats[prefix]
			return s.httpStats[prefix]
		}
		st := new(httpconn.Stats)
		s.httpStats[prefix] = st
		return st
	}
	get := func(prefix string) *TCPStats {
		if st := s.tcpStats[prefix]; st != nil {
			return st
		}
		if prev != nil {
			if st := prev.tcpStats[prefix]; st != nil {
				s.tcpStats[prefix] = st
				return st
			}
		}
		st := &TCPStats{Prefix: "tcp." + prefix + "."}
		s.tcpStats[prefix] = st
		return st
	}
	for _, l := range s.Listeners {
		for _, c := range append(l.Chains[:len(l.Chains):len(l.Chains)], l.Default) {
			if c != nil && c.HTTP != nil {
				c.HTTP.ShareStats(getHTTP(c.HTTP.StatPrefix))
			}
			if c == nil || c.TCP == nil {
				continue
			}
			if c.TCP.Stats == nil {
				c.TCP.Stats = get(c.TCP.StatPrefix)
			} else {
				s.tcpStats[c.TCP.StatPrefix] = c.TCP.Stats
			}
		}
	}
}

// TCPStats returns the tcp.<stat_prefix>.* counters, sorted by prefix.
func (s *Snapshot) TCPStats() []*TCPStats {
	out := make([]*TCPStats, 0, len(s.tcpStats))
	for _, st := range s.tcpStats {
		out = append(out, st)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Prefix < out[j].Prefix })
	return out
}

// HTTPStats returns the http.<stat_prefix>. counters by prefix.
func (s *Snapshot) HTTPStats() map[string]*httpconn.Stats { return s.httpStats }

// The snapshot is the HTTP engine's view of the configuration
// (httpconn.Env): a request uses the snapshot its connection started on.
var _ httpconn.Env = (*Snapshot)(nil)

// Routes implements httpconn.Env.
func (s *Snapshot) Routes(name string) *httpconn.Routes { return s.routes[name] }

// Cluster implements httpconn.Env.
func (s *Snapshot) Cluster(name string) *cluster.Cluster { return s.Clusters[name] }

// ClusterHTTP implements httpconn.Env.
func (s *Snapshot) ClusterHTTP(name string) cluster.HTTPOptions { return s.httpOpts[name] }

// Pools implements httpconn.Env.
func (s *Snapshot) Pools() *httpconn.Pools { return s.pools }
