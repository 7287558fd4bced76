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
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"google.golang.org/protobuf/proto"

	"github.com/meshtun/meshtun/mesh/cluster"
	"github.com/meshtun/meshtun/mesh/filterchain"
	"github.com/meshtun/meshtun/mesh/httpconn"
	"github.com/meshtun/meshtun/mesh/rbac"
	"github.com/meshtun/meshtun/mesh/secrets"
	"github.com/meshtun/meshtun/mesh/stats"
	"github.com/meshtun/meshtun/mesh/tcpproxy"
	"github.com/meshtun/meshtun/mesh/tlsctx"
	"github.com/meshtun/meshtun/mesh/udpproxy"
	"github.com/meshtun/meshtun/xdsclient"
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

// Snapshot is an immutable, validated configuration: Build makes it
// whole and nothing writes into it afterwards. The dispatcher reads it
// through an atomic pointer; a flow keeps the snapshot (and so the
// listener, chain and cluster) it started with. Counters are not part of
// it: it holds pointers to blocks of the proxy's stats store, looked up
// by name, and no history of the snapshots before it.
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
	// the same prefix share them (one block of the store).
	tcpStats map[string]*tcpproxy.Stats
	// rbacStats and rbacShadow are the RBAC filters' counters by prefix.
	rbacStats  map[string]*rbac.Stats
	rbacShadow map[string]*rbac.ShadowStats
	// httpStats are the http.<stat_prefix>.* counters, shared the same way.
	httpStats map[string]*httpconn.Stats
	// sslStats are the cluster.<name>.ssl.* counters of the clusters with
	// a TLS transport socket, by cluster name.
	sslStats map[string]*tlsctx.Stats
	// store is the stats store the blocks come from; scopes are the keys
	// of the blocks this snapshot uses.
	store  *stats.Store
	scopes []stats.Key // may repeat a key
	// building records what the listener being built registers (nil
	// outside buildListener), so that a later snapshot can carry it over.
	building *listenerReg

	// secrets is the SDS secret store the TLS contexts read at each
	// handshake (BuildOptions.Secrets).
	secrets *secrets.Store

	// EDS: the assignments by service name, the host set each EDS cluster
	// has in this snapshot (staged by its build or kept from the one
	// before), and those Server.Apply must commit.
	claProtos map[string]*endpointv3.ClusterLoadAssignment
	endpoints map[string]*cluster.Staged
	commits   []*cluster.Staged

	// HTTP: compiled RDS route configurations, each cluster's upstream
	// HTTP options, and the connection pools (see httpconn.Env).
	routes      map[string]*httpconn.Routes
	routeProtos map[string]*routev3.RouteConfiguration
	httpOpts    map[string]cluster.HTTPOptions
	pools       *httpconn.Pools

	// Dump is what /config_dump shows: the resources as received, with
	// their versions (BuildOptions.Dump).
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
	UDP            *udpproxy.Config // set for UDP listeners (udp_proxy listener filter)
	Stats          *ListenerStats

	insp    inspection
	dynamic bool // came over LDS: a bind failure is a ResourceError
	tls     bool // a chain terminates TLS

	// drain tells the listener's flows when it starts draining and when
	// they are to be closed (a removal or change by an update: Drain; the
	// proxy's drain: Server.StartDrain). Shared with the listeners of
	// later snapshots that carry this one over.
	drain   *listenerDrain
	matcher *filterchain.Matcher
	// reg is what its build registered in its snapshot: a later snapshot
	// that carries the listener over registers the same.
	reg *listenerReg
}

// listenerReg is what building a listener registered in its snapshot:
// the stats blocks it counts into (by key, for the sweep) and the shared
// per-prefix blocks the admin lists.
type listenerReg struct {
	scopes []stats.Key
	tcp    []*tcpproxy.Stats
	http   map[string]*httpconn.Stats
	rbac   []*rbac.Filter
}

// carryListener returns the listener of prev that pb (the same message)
// built, registered in s as its build registered it in prev, or nil when
// it must be built: a listener whose message did not change and whose
// build depends on nothing else that changed (the stats store, the
// secret store its TLS contexts read, the cluster check, which xDS
// updates skip) is the same listener. At 10,000 services an assignment update rebuilt all 10,000
// listeners, ~0.15 s of CPU and ~15 MB of garbage each time.
func carryListener(s, prev *Snapshot, pb *listenerv3.Listener, dynamic bool, opts BuildOptions) *Listener {
	if prev == nil || !opts.AllowUnknownClusters || prev.store != s.store {
		return nil
	}
	old := prev.byName[pb.GetName()]
	if old == nil || old.Proto != pb || old.dynamic != dynamic || old.reg == nil || (old.tls && prev.secrets != s.secrets) {
		return nil
	}
	r := old.reg
	s.scopes = append(s.scopes, r.scopes...)
	for _, st := range r.tcp {
		s.tcpStats[st.Prefix] = st
	}
	for prefix, st := range r.http {
		s.httpStats[prefix] = st
	}
	for _, f := range r.rbac {
		s.rbacStats[f.StatsPrefix] = f.Stats
		s.rbacShadow[f.ShadowStatsPrefix()] = f.ShadowStats
	}
	return old
}

// Chain is one filter chain: where its flows go, which is its terminal
// network filter. Exactly one of TCP and HTTP is set. A chain with TLS
// terminates it: its filters get the decrypted bytes (a *Downstream).
type Chain struct {
	Name    string
	TCP     *tcpproxy.Config // tcp_proxy
	HTTP    *httpconn.Config // http_connection_manager
	Skipped []string         // telemetry filters accepted and not run
	// TLS is the transport_socket's DownstreamTlsContext; nil is
	// raw_buffer (the bytes go on as they came, TLS or not).
	TLS *tlsctx.Downstream
	// HandshakeTimeout bounds TLS's handshake: the chain's
	// transport_socket_connect_timeout, else DefaultHandshakeTimeout.
	HandshakeTimeout time.Duration
	// RBAC are the chain's envoy.filters.network.rbac filters in order
	// (istiod: LOG, DENY, ALLOW), evaluated before the terminal filter.
	RBAC []*rbac.Filter
}

// ListenerStats are Envoy's listener.<address>.* counters, a block of the
// stats store under their Prefix, so a listener updated in place (or
// replaced at the same address) keeps them.
type ListenerStats struct {
	Prefix                    string // e.g. "listener.0.0.0.0_15001."
	DownstreamCxTotal         atomic.Uint64
	DownstreamCxActive        atomic.Int64
	DownstreamCxDestroy       atomic.Uint64
	NoFilterChainMatch        atomic.Uint64
	DownstreamPreCxActive     atomic.Int64
	DownstreamListenerTimeout atomic.Uint64 // downstream_pre_cx_timeout
	// ssl are the listener's ssl.* counters, shared by the TLS contexts
	// of all its chains, as in Envoy; made by the first chain with a
	// transport socket (SSL), as most listeners have none and the block
	// was half of a listener's stats (~2 MB at 10,000 services).
	ssl atomic.Pointer[tlsctx.Stats]
}

// SSL returns the listener's ssl.* counters, making them on first use.
func (ls *ListenerStats) SSL() *tlsctx.Stats {
	if st := ls.ssl.Load(); st != nil {
		return st
	}
	ls.ssl.CompareAndSwap(nil, new(tlsctx.Stats))
	return ls.ssl.Load()
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
	return "listener." + statNameSanitizer.Replace(scope) + "."
}

// statNameSanitizer makes the replacements of Envoy's sanitizeStatsName.
// One for the process: building one per listener took 0.06 s of CPU in
// a 10,000-listener update.
var statNameSanitizer = strings.NewReplacer("://", "_", ":/", "_", ":", "_", "\x00", "_")

// BuildOptions carries what building a snapshot needs besides resources.
type BuildOptions struct {
	Roles   Roles
	Cluster cluster.Options
	// AddedViaAPI marks clusters that came over xDS (Envoy's added_via_api):
	// all of them, or those named in DynamicClusters. An invalid resource
	// that came over xDS is reported as an xdsclient.ResourceError, so
	// that it alone is rejected; a static (bootstrap) one fails the whole
	// build with a plain error, as a bad bootstrap file does in Envoy.
	AddedViaAPI     bool
	DynamicClusters map[string]bool
	// DynamicListeners names the listeners that came over LDS (all of
	// them when AddedViaAPI is set).
	DynamicListeners map[string]bool
	// Routes are the RDS route configurations by name.
	Routes map[string]*routev3.RouteConfiguration
	// Endpoints are the EDS assignments by service name. Each is
	// validated on its own; the EDS clusters that use one get it staged
	// (cluster.Staged) and put in force when the snapshot is swapped in
	// (Server.Apply), never before.
	Endpoints map[string]*endpointv3.ClusterLoadAssignment
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
	// Stats is the proxy's stats store, where the snapshot finds every
	// counter block by its Envoy name (nil: prev's store, else a new
	// one).
	Stats *stats.Store
	// Dump is what the snapshot shows on /config_dump (nil: an empty one).
	Dump *Dump
	// Secrets is the SDS secret store (the proxy's, fed by its SDS
	// client): TLS contexts look their certificates and trust bundles up
	// in it by name at each handshake, so a rotation reaches the next
	// connection without a new snapshot. Nil: an empty store, in which
	// every TLS handshake fails naming the missing secret.
	Secrets *secrets.Store
}

// buildErrors collects what is wrong with a build: every invalid xDS
// resource, by name, and the first invalid static one.
type buildErrors struct {
	static   error
	resource xdsclient.ResourceErrors
}

// add records err for the resource typ/name; noun is how a plain error
// names it ("cluster", "listener"). err may already start with
// `<noun> "<name>": ` (cluster.New names its cluster): a ResourceError
// names it once.
func (b *buildErrors) add(typ, noun, name string, dynamic bool, err error) {
	prefix := fmt.Sprintf("%s %q: ", noun, name)
	if !dynamic {
		if b.static == nil {
			if !strings.HasPrefix(err.Error(), prefix) {
				err = fmt.Errorf("%s%w", prefix, err)
			}
			b.static = err
		}
		return
	}
	if u := errors.Unwrap(err); u != nil && strings.HasPrefix(err.Error(), prefix) {
		err = u
	}
	b.resource = append(b.resource, xdsclient.ResourceError{TypeURL: typ, Name: name, Err: err})
}

func (b *buildErrors) err() error {
	if b.static != nil {
		return b.static
	}
	if len(b.resource) > 0 {
		return b.resource
	}
	return nil
}

// Build validates listeners, clusters, route configurations and EDS
// assignments into a Snapshot, each resource on its own: the error names
// every invalid one (an xdsclient.ResourceErrors when they all came over
// xDS), and nothing is built when there is one. prev, when not nil,
// lends clusters whose configuration is unchanged (keeping their hosts
// and connections) and compiled routes. Counters are not lent: they are
// looked up by name in the stats store. Build changes nothing live: EDS
// host sets are staged and committed by Server.Apply, and the returned
// snapshot is complete (its Dump included) and never written again.
func Build(version string, listeners []*listenerv3.Listener, clusters []*clusterv3.Cluster, prev *Snapshot, opts BuildOptions) (*Snapshot, error) {
	s := &Snapshot{
		Version:       version,
		Clusters:      make(map[string]*cluster.Cluster, len(clusters)),
		clusterProtos: make(map[string]*clusterv3.Cluster, len(clusters)),
		byName:        make(map[string]*Listener, len(listeners)),
		byAddr:        make(map[netip.AddrPort]*Listener, len(listeners)),
		wildcard4:     make(map[uint16]*Listener),
		wildcard6:     make(map[uint16]*Listener),
		udpByAddr:     make(map[netip.AddrPort]*Listener),
		udpWild4:      make(map[uint16]*Listener),
		udpWild6:      make(map[uint16]*Listener),
		bound:         make(map[string]*Listener),
		httpOpts:      make(map[string]cluster.HTTPOptions, len(clusters)),
		routes:        make(map[string]*httpconn.Routes, len(opts.Routes)),
		routeProtos:   opts.Routes,
		claProtos:     opts.Endpoints,
		endpoints:     make(map[string]*cluster.Staged),
		tcpStats:      make(map[string]*tcpproxy.Stats, len(listeners)),
		rbacStats:     make(map[string]*rbac.Stats),
		rbacShadow:    make(map[string]*rbac.ShadowStats),
		httpStats:     make(map[string]*httpconn.Stats),
		sslStats:      make(map[string]*tlsctx.Stats),
		pools:         opts.Pools,
		store:         opts.Stats,
		Dump:          opts.Dump,
		secrets:       opts.Secrets,
		// A cluster counts into one stats block, a listener into its own
		// and usually one of its chain's: made at that size, the list
		// is not regrown (and copied) ~15 times on a 10,000-service
		// build. The maps above are sized likewise where the number of
		// entries follows from the input.
		scopes: make([]stats.Key, 0, len(clusters)+2*len(listeners)),
	}
	if s.secrets == nil {
		s.secrets = secrets.NewStore()
	}
	if s.pools == nil {
		s.pools = httpconn.NewPools()
	}
	if s.store == nil && prev != nil {
		s.store = prev.store
	}
	if s.store == nil {
		s.store = stats.New()
	}
	if s.Dump == nil {
		s.Dump = &Dump{}
	}
	secretStore := s.secrets
	var errs buildErrors
	var created []*cluster.Cluster
	lastCluster := lastIndex(clusters)
	for i, pb := range clusters {
		name := pb.GetName()
		dynamic := opts.AddedViaAPI || (opts.DynamicClusters[name] && lastCluster[name] == i)
		if name == "" && !dynamic {
			if errs.static == nil {
				errs.static = fmt.Errorf("clusters[%d]: name: must not be empty", i)
			}
			continue
		}
		if _, dup := s.Clusters[name]; dup {
			errs.add(xdsclient.ClusterType, "cluster", name, dynamic, errors.New("duplicate name"))
			continue
		}
		scope := scopeOf(s, clusterStatPrefix(pb), cluster.NewScope)
		var ssl *tlsctx.Stats
		if hasUpstreamTLS(pb) {
			ssl = scopeOf(s, clusterStatPrefix(pb), newSSLStats)
			s.sslStats[name] = ssl
		}
		if prev != nil {
			// The same message (unchanged resources keep their pointer), or
			// an equal one.
			if old := prev.Clusters[name]; old != nil && (prev.clusterProtos[name] == pb || proto.Equal(prev.clusterProtos[name], pb)) {
				s.Clusters[name], s.clusterProtos[name], s.httpOpts[name] = old, pb, prev.httpOpts[name]
				continue
			}
		}
		ho, err := cluster.ParseHTTPOptions(pb)
		if err != nil {
			errs.add(xdsclient.ClusterType, "cluster", name, dynamic, err)
			continue
		}
		co := opts.Cluster
		co.AddedViaAPI = dynamic
		co.Stats = scope
		co.Transport = upstreamParser(secretStore, ssl)
		c, err := cluster.New(pb, co)
		if err != nil {
			errs.add(xdsclient.ClusterType, "cluster", name, dynamic, err)
			continue
		}
		created = append(created, c)
		s.Clusters[name], s.clusterProtos[name], s.httpOpts[name] = c, pb, ho
	}
	s.stageEndpoints(prev, opts.Endpoints, &errs)
	for _, name := range sortedKeys(opts.Routes) {
		rc := opts.Routes[name]
		if prev != nil && prev.routeProtos[name] == rc && prev.routes[name] != nil {
			s.routes[name] = prev.routes[name]
			continue
		}
		r, err := httpconn.CompileRoutes(rc)
		if err != nil {
			errs.add(xdsclient.RouteType, "route_configuration", name, true, err)
			continue
		}
		s.routes[name] = r
	}
	exists := func(n string) bool { _, ok := s.Clusters[n]; return ok || opts.AllowUnknownClusters }
	lastListener := lastIndex(listeners)
	for i, pb := range listeners {
		name := pb.GetName()
		dynamic := opts.AddedViaAPI || (opts.DynamicListeners[name] && lastListener[name] == i)
		if name == "" {
			name = fmt.Sprintf("listeners[%d]", i)
		}
		if l := carryListener(s, prev, pb, dynamic, opts); l != nil {
			if err := s.add(l, opts.Roles); err != nil {
				errs.add(xdsclient.ListenerType, "listener", name, dynamic, err)
			}
			continue
		}
		mark := len(s.scopes)
		s.building = &listenerReg{}
		l, err := buildListener(s, pb, exists, prev)
		reg := s.building
		s.building = nil
		if err == nil {
			err = s.add(l, opts.Roles)
		}
		if err != nil {
			errs.add(xdsclient.ListenerType, "listener", name, dynamic, err)
			continue
		}
		l.dynamic = dynamic
		reg.scopes = append([]stats.Key(nil), s.scopes[mark:]...)
		l.reg = reg
	}
	if err := errs.err(); err != nil {
		for _, c := range created {
			c.Close()
		}
		return nil, err
	}
	for _, l := range s.Listeners {
		if l.BindToPort && l != s.outbound && l != s.inbound && l.UDP == nil {
			s.bound[bindKey(l)] = l
		}
	}
	return s, nil
}

// lastIndex maps each name to the index of its last resource: the static
// resources come first, so when a static and a dynamic one share a name,
// only the last is the dynamic one (and the duplicate is its error).
func lastIndex[M interface{ GetName() string }](rs []M) map[string]int {
	m := make(map[string]int, len(rs))
	for i, r := range rs {
		m[r.GetName()] = i
	}
	return m
}

// add enters a built listener into the snapshot's lookup tables. A
// listener whose name or address an earlier one already has is refused
// (the error is the later listener's, as Envoy rejects the listener that
// conflicts, not the one in force) and the tables are left as they were.
func (s *Snapshot) add(l *Listener, roles Roles) error {
	if _, dup := s.byName[l.Name]; dup {
		return errors.New("duplicate name")
	}
	if l.Pipe == "" {
		if l.UDP != nil {
			tbl, key := s.udpByAddr, l.Addr
			if l.Addr.Addr().IsUnspecified() {
				if err := claim(s.udpWild4, s.udpWild6, l, "udp "); err != nil {
					return err
				}
			} else if other := tbl[key]; other != nil {
				return fmt.Errorf("address udp %v: already used by listener %q", l.Addr, other.Name)
			} else {
				tbl[key] = l
			}
		} else {
			if l.Addr.Addr().IsUnspecified() {
				if err := claim(s.wildcard4, s.wildcard6, l, ""); err != nil {
					return err
				}
			} else if other := s.byAddr[l.Addr]; other != nil {
				return fmt.Errorf("address %v: already used by listener %q", l.Addr, other.Name)
			} else {
				s.byAddr[l.Addr] = l
			}
			port := l.Addr.Port()
			switch {
			case roles.OutboundPort != 0 && port == roles.OutboundPort && l.Addr.Addr().IsUnspecified() && s.outbound == nil:
				s.outbound = l
			case roles.InboundPort != 0 && port == roles.InboundPort && l.Addr.Addr().IsUnspecified() && s.inbound == nil:
				s.inbound = l
			}
		}
	}
	s.byName[l.Name] = l
	s.Listeners = append(s.Listeners, l)
	return nil
}

// claim takes l's port in the wildcard table of its family.
func claim(wild4, wild6 map[uint16]*Listener, l *Listener, proto string) error {
	wc := wild4
	if l.Addr.Addr().Is6() {
		wc = wild6
	}
	if other := wc[l.Addr.Port()]; other != nil {
		return fmt.Errorf("address %s%v: already used by listener %q", proto, l.Addr, other.Name)
	}
	wc[l.Addr.Port()] = l
	return nil
}

// stageEndpoints validates every assignment on its own and stages the
// host set of each EDS cluster whose assignment is new or changed (or
// whose cluster is new). Why staged and not applied: a cluster keeps its
// identity across endpoint updates (flows, HTTP pools and circuit
// breakers are keyed by it, and hosts whose address stays keep their
// *Host, stats and load, as Envoy's hosts do), so the new hosts must go
// into the very cluster the snapshot in force serves; putting them there
// now would change what that snapshot serves before this one is known to
// be accepted. Server.Apply commits them (one atomic store per cluster)
// just before the swap. An assignment no EDS cluster uses is still
// validated, so the NACK names it.
//
// An assignment prev was built with (the same message: the xDS client
// keeps the pointer of a resource that did not change) was validated by
// that build and is parsed again only for a cluster that is new: at
// 10,000 services, an update of the listeners used to parse all 10,000
// assignments again to throw the result away.
func (s *Snapshot) stageEndpoints(prev *Snapshot, assignments map[string]*endpointv3.ClusterLoadAssignment, errs *buildErrors) {
	parsed := make(map[string]*cluster.Endpoints)
	bad := make(map[string]bool)
	// parse validates the assignment of svc once; nil if there is none
	// or it is invalid (bad).
	parse := func(svc string) *cluster.Endpoints {
		if e, ok := parsed[svc]; ok || bad[svc] {
			return e
		}
		cla, ok := assignments[svc]
		if !ok {
			return nil
		}
		e, err := cluster.ParseEndpoints(cla)
		if err != nil {
			errs.add(xdsclient.EndpointType, "cluster_load_assignment", svc, true, err)
			bad[svc] = true
			return nil
		}
		parsed[svc] = e
		return e
	}
	for _, svc := range sortedKeys(assignments) {
		if prev == nil || prev.claProtos[svc] != assignments[svc] {
			parse(svc)
		}
	}
	for _, name := range sortedKeys(s.Clusters) {
		c := s.Clusters[name]
		if c.Type() != clusterv3.Cluster_EDS {
			continue
		}
		svc := c.EDSServiceName()
		if svc == "" {
			svc = name
		}
		carried := prev != nil && prev.Clusters[name] == c
		if bad[svc] {
			if carried {
				c.CountRejected() // update_rejected: its hosts stay
			}
			continue
		}
		cla, ok := assignments[svc]
		if carried && prev.endpoints[name] != nil {
			if old := prev.claProtos[svc]; !ok || old == cla || proto.Equal(old, cla) {
				s.endpoints[name] = prev.endpoints[name] // what is in force stays
				continue
			}
		}
		e := parse(svc)
		if e == nil {
			continue // no assignment yet: the cluster warms
		}
		st, err := c.Stage(e)
		if err != nil {
			errs.add(xdsclient.EndpointType, "cluster_load_assignment", svc, true, err)
			continue
		}
		s.endpoints[name] = st
		s.commits = append(s.commits, st)
	}
}

// commit puts the host sets staged by Build in force. Server.Apply calls
// it once every socket is bound, just before the swap; it writes into
// the clusters, not into the snapshot.
func (s *Snapshot) commit() {
	for _, st := range s.commits {
		st.Commit()
	}
}

// Hosts returns the hosts of cluster name as this snapshot has them: for
// an EDS cluster, the host set its build staged or kept, which a later
// snapshot does not change (a retired snapshot goes on reporting what it
// served); for other clusters, the cluster's hosts now (DNS refreshes
// move them without a snapshot).
func (s *Snapshot) Hosts(name string) []*cluster.Host {
	if st := s.endpoints[name]; st != nil {
		return st.Hosts()
	}
	if c := s.Clusters[name]; c != nil {
		return c.Hosts()
	}
	return nil
}

// scopeOf returns the block of type T named prefix from the snapshot's
// stats store, and records that the snapshot uses it (see Scopes).
func scopeOf[T any](s *Snapshot, prefix string, mk func() *T) *T {
	s.scopes = append(s.scopes, stats.KeyOf[T](prefix))
	return stats.Scope(s.store, prefix, mk)
}

// Scopes are the keys of the stats blocks the snapshot counts into: the
// blocks no snapshot still serving uses may be dropped from the store.
func (s *Snapshot) Scopes() []stats.Key { return s.scopes }

// clusterStatPrefix is the cluster's stat scope as the admin prints it:
// alt_stat_name when set, else the name (Istio's "PassthroughCluster;"
// alt_stat_name loses its ';').
func clusterStatPrefix(pb *clusterv3.Cluster) string {
	obs := pb.GetAltStatName()
	if obs == "" {
		obs = pb.GetName()
	}
	return "cluster." + strings.TrimSuffix(obs, ";") + "."
}

func buildListener(s *Snapshot, pb *listenerv3.Listener, clusterExists func(string) bool, prev *Snapshot) (*Listener, error) {
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
		prefix := "listener.udp_" + strings.TrimPrefix(listenerStatPrefix(pb), "listener.")
		l.Stats = scopeOf(s, prefix, func() *ListenerStats { return &ListenerStats{Prefix: prefix} })
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
	// The stats first: the chains' TLS contexts count into its ssl.*.
	prefix := listenerStatPrefix(pb)
	l.Stats = scopeOf(s, prefix, func() *ListenerStats { return &ListenerStats{Prefix: prefix} })
	for i, fc := range pb.GetFilterChains() {
		c, err := buildChain(s, fc, clusterExists, l.Stats)
		if err != nil {
			return nil, fmt.Errorf("filter_chains[%d]%s: %w", i, chainLabel(fc), err)
		}
		l.Chains = append(l.Chains, c)
	}
	if dfc := pb.GetDefaultFilterChain(); dfc != nil {
		if l.Default, err = buildChain(s, dfc, clusterExists, l.Stats); err != nil {
			return nil, fmt.Errorf("default_filter_chain: %w", err)
		}
	}
	if l.matcher, err = filterchain.Compile(pb.GetFilterChains(), pb.GetDefaultFilterChain()); err != nil {
		return nil, err
	}
	l.tls = l.Default != nil && l.Default.TLS != nil
	for _, c := range l.Chains {
		l.tls = l.tls || c.TLS != nil
	}
	if prev != nil {
		if old := prev.byName[l.Name]; old != nil && (old.Proto == pb || proto.Equal(old.Proto, pb)) {
			// The same listener: its flows, old and new, drain together.
			l.drain.close()
			l.drain = old.drain
		}
	}
	return l, nil
}

func chainLabel(fc *listenerv3.FilterChain) string {
	if fc.GetName() == "" {
		return ""
	}
	return fmt.Sprintf(" (%s)", fc.GetName())
}

// buildChain parses one filter chain and gives its tcp_proxy the
// tcp.<stat_prefix>. block, its http_connection_manager the
// http.<stat_prefix>. one (chains with the same prefix share them). Its
// transport_socket (a DownstreamTlsContext, or raw_buffer) compiles with
// the snapshot's secret store and counts into ssl, the listener's ssl.*.
func buildChain(s *Snapshot, fc *listenerv3.FilterChain, clusterExists func(string) bool, ls *ListenerStats) (*Chain, error) {
	var ssl *tlsctx.Stats
	if fc.GetTransportSocket() != nil {
		ssl = ls.SSL()
	}
	down, err := tlsctx.ParseDownstream("transport_socket", fc.GetTransportSocket(), s.secrets, ssl)
	if err != nil {
		return nil, err
	}
	timeout := DefaultHandshakeTimeout
	if d := fc.GetTransportSocketConnectTimeout(); d != nil && d.AsDuration() > 0 {
		timeout = d.AsDuration()
	}
	tcpStats := func(prefix string) *tcpproxy.Stats {
		st := scopeOf(s, prefix, func() *tcpproxy.Stats { return &tcpproxy.Stats{Prefix: prefix} })
		s.tcpStats[prefix] = st
		if r := s.building; r != nil {
			r.tcp = append(r.tcp, st)
		}
		return st
	}
	tp, hcm, authz, skipped, err := parseNetworkFilters(fc.GetFilters(), clusterExists, tcpStats)
	if err != nil {
		return nil, err
	}
	for _, f := range authz {
		s.shareRBACStats(f)
	}
	if hcm != nil {
		for _, f := range hcm.RBACFilters() {
			s.shareRBACStats(f)
		}
	}
	if hcm != nil {
		st := scopeOf(s, "http."+hcm.StatPrefix+".", func() *httpconn.Stats { return new(httpconn.Stats) })
		hcm.ShareStats(st)
		s.httpStats[hcm.StatPrefix] = st
		if r := s.building; r != nil {
			if r.http == nil {
				r.http = map[string]*httpconn.Stats{}
			}
			r.http[hcm.StatPrefix] = st
		}
	}
	return &Chain{Name: fc.GetName(), TCP: tp, HTTP: hcm, Skipped: skipped, TLS: down, HandshakeTimeout: timeout, RBAC: authz}, nil
}

// shareRBACStats gives an RBAC filter the stats store's blocks for its
// prefixes, so its counters survive updates and are shared with the
// filters counting under the same names.
func (s *Snapshot) shareRBACStats(f *rbac.Filter) {
	f.Stats = scopeOf(s, f.StatsPrefix, func() *rbac.Stats { return &rbac.Stats{Prefix: f.StatsPrefix} })
	sp := f.ShadowStatsPrefix()
	f.ShadowStats = scopeOf(s, sp, func() *rbac.ShadowStats { return &rbac.ShadowStats{Prefix: sp} })
	s.rbacStats[f.StatsPrefix] = f.Stats
	s.rbacShadow[sp] = f.ShadowStats
	if r := s.building; r != nil {
		r.rbac = append(r.rbac, f)
	}
}

// RBACStats returns the RBAC filters' counter blocks, enforced and
// shadow, each sorted by prefix.
func (s *Snapshot) RBACStats() ([]*rbac.Stats, []*rbac.ShadowStats) {
	st := make([]*rbac.Stats, 0, len(s.rbacStats))
	for _, b := range s.rbacStats {
		st = append(st, b)
	}
	sh := make([]*rbac.ShadowStats, 0, len(s.rbacShadow))
	for _, b := range s.rbacShadow {
		sh = append(sh, b)
	}
	sort.Slice(st, func(i, j int) bool { return st[i].Prefix < st[j].Prefix })
	sort.Slice(sh, func(i, j int) bool { return sh[i].Prefix < sh[j].Prefix })
	return st, sh
}

// TerminatesTLS reports whether a chain of l has a TLS context (and so
// l has ssl.* stats).
func (l *Listener) TerminatesTLS() bool { return l.tls }

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

// TCPStats returns the tcp.<stat_prefix>.* counters, sorted by prefix.
func (s *Snapshot) TCPStats() []*tcpproxy.Stats {
	out := make([]*tcpproxy.Stats, 0, len(s.tcpStats))
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

// ClusterSSL is the cluster.<name>.ssl.* block of cluster name, nil when
// it has no TLS transport socket.
func (s *Snapshot) ClusterSSL(name string) *tlsctx.Stats { return s.sslStats[name] }

func newSSLStats() *tlsctx.Stats { return new(tlsctx.Stats) }

// ClusterHTTP implements httpconn.Env.
func (s *Snapshot) ClusterHTTP(name string) cluster.HTTPOptions { return s.httpOpts[name] }

// Pools implements httpconn.Env.
func (s *Snapshot) Pools() *httpconn.Pools { return s.pools }

// The snapshot is also where the network filters find clusters: a flow
// connects to the clusters of the snapshot it started with.
var (
	_ tcpproxy.Clusters = (*Snapshot)(nil)
	_ udpproxy.Clusters = (*Snapshot)(nil)
)
