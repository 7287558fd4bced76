// Package cluster is the runtime of an Envoy v3 Cluster: its hosts (from
// static config, DNS, EDS or the connection's original destination), the
// load balancer that picks one, the circuit breakers that bound it, and
// the upstream connection with Envoy's cluster and host stats.
//
// It follows Envoy's names and semantics so that a user who knows Envoy
// finds the same fields, stats and behaviour; where it simplifies, the doc
// comment of the affected function says how. The host set is an immutable
// snapshot swapped atomically on every EDS update or DNS refresh, so
// picking a host never takes a lock, and every upstream socket comes from
// upstream.Dialer, whose mark keeps the proxy's own traffic out of capture.
//
// A host's transport socket (plaintext, or TLS such as istiod's
// tlsMode-istio match) is chosen from its envoy.transport_socket_match
// labels when the host set is built, and runs after the dial; TLS itself
// comes from outside (Options.Transport, the proxy's tlsctx), so this
// package knows no certificates or secrets.
package cluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	"github.com/rs/zerolog"

	"github.com/meshtun/meshtun/mesh/upstream"
)

// Resolver resolves host names for STRICT_DNS clusters; net.DefaultResolver
// implements it. network is "ip", "ip4" or "ip6".
type Resolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// Options are the cluster's collaborators.
type Options struct {
	// Dialer opens every upstream socket (required: its mark prevents
	// capture loops). Its ConnectTimeout, if set, caps connect_timeout.
	Dialer *upstream.Dialer
	Log    zerolog.Logger
	// Resolver is used by STRICT_DNS clusters; net.DefaultResolver if nil.
	Resolver Resolver
	// AddedViaAPI is reported by the admin /clusters (true for CDS
	// clusters, false for bootstrap static_resources).
	AddedViaAPI bool
	// Stats is the cluster.<name>. block the cluster counts into, from
	// the proxy's stats store so that it outlives this Cluster (nil: a
	// block of its own).
	Stats *Scope
	// Transport compiles the cluster's transport_socket and
	// transport_socket_matches (TLS: tlsctx.ParseUpstream over the
	// proxy's secret store). Nil: only raw_buffer is accepted.
	Transport TransportParser
}

// Sentinel errors Connect wraps; callers branch on them with errors.Is.
var (
	// ErrNoHealthyUpstream: no host to pick (Envoy's response flag UH).
	ErrNoHealthyUpstream = errors.New("no healthy upstream")
	// ErrOverflow: the max_connections circuit breaker is open (UO).
	ErrOverflow = errors.New("upstream connection overflow (circuit breaker max_connections)")
)

// Default values Envoy uses when the field is unset.
const (
	defaultConnectTimeout  = 5 * time.Second
	defaultDNSRefreshRate  = 5 * time.Second
	defaultCleanupInterval = 5 * time.Second
	defaultChoiceCount     = 2
)

type dialFunc func(ctx context.Context, dst netip.AddrPort, src netip.Addr) (*net.TCPConn, error)

// Cluster is a running Envoy cluster. All methods are safe for concurrent
// use.
type Cluster struct {
	name           string
	obsName        string
	edsServiceName string
	typ            clusterv3.Cluster_DiscoveryType
	lb             lbPolicy
	choiceCount    int
	connectTimeout time.Duration
	bindSrc        []netip.Addr // source_address first, then extra_source_addresses
	addedViaAPI    bool
	// locality_weighted_lb_config: pick a locality by weight, then a host.
	localityWeighted bool
	tr               transports

	// log is the proxy's logger; lines add the cluster's name themselves: a child logger per cluster was ~650 bytes each.
	log      zerolog.Logger
	dial     dialFunc
	dialPipe func(ctx context.Context, path string) (*net.UnixConn, error)

	hosts    atomic.Pointer[hostSet]
	updateMu sync.Mutex

	origDst *origDstHosts // ORIGINAL_DST only

	dns *dnsConfig // STRICT_DNS only

	resources [2]*Resources
	stats     *Scope // Options.Stats

	// The errors a flow gets, made with the cluster, not per flow, and
	// held in it rather than allocated beside it.
	errNoHealthy, errOverflow clusterError

	initOnce    sync.Once
	initialized chan struct{}

	closeOnce sync.Once
	cancel    context.CancelFunc
	done      chan struct{} // closed when the cluster's goroutine returned
}

// New validates pb and starts the cluster. STRICT_DNS clusters resolve in
// a goroutine the Cluster owns (stopped by Close); Initialized reports when
// the first resolution finished.
func New(pb *clusterv3.Cluster, opts Options) (*Cluster, error) {
	if pb == nil {
		return nil, errors.New("cluster: nil Cluster")
	}
	if err := pb.ValidateAll(); err != nil {
		return nil, fmt.Errorf("cluster %q: %w", pb.GetName(), err)
	}
	if opts.Dialer == nil {
		return nil, fmt.Errorf("cluster %q: Options.Dialer is required", pb.GetName())
	}
	c := &Cluster{
		name:        pb.GetName(),
		obsName:     pb.GetName(),
		addedViaAPI: opts.AddedViaAPI,
		log:         opts.Log,
		dial:        opts.Dialer.DialTCP,
		dialPipe:    opts.Dialer.DialUnix,
		initialized: make(chan struct{}),
		stats:       opts.Stats,
	}
	if c.stats == nil {
		c.stats = NewScope()
	}
	if alt := pb.GetAltStatName(); alt != "" {
		c.obsName = alt
	}
	c.hosts.Store(emptySet)
	specs, err := c.configure(pb, opts.Transport)
	if err != nil {
		return nil, fmt.Errorf("cluster %q: %w", c.name, err)
	}
	c.errNoHealthy = clusterError{c.name, ErrNoHealthyUpstream}
	c.errOverflow = clusterError{c.name, ErrOverflow}

	switch c.typ {
	case clusterv3.Cluster_STRICT_DNS:
		r := opts.Resolver
		if r == nil {
			r = net.DefaultResolver
		}
		ctx, cancel := context.WithCancel(context.Background())
		c.cancel = cancel
		c.done = make(chan struct{})
		go c.dnsLoop(ctx, r)
	case clusterv3.Cluster_EDS:
		// Inline endpoints serve until the first EDS update; the cluster
		// is initialized (warm) only once EDS delivered.
		if len(specs) > 0 {
			c.setHosts(specs)
		}
	default:
		if len(specs) > 0 {
			c.setHosts(specs)
		}
		c.markInitialized()
	}
	return c, nil
}

// clusterError is `cluster "<name>": <err>`, as fmt.Errorf with %w
// would say it.
type clusterError struct {
	cluster string
	err     error
}

func (e *clusterError) Error() string { return fmt.Sprintf("cluster %q: %v", e.cluster, e.err) }
func (e *clusterError) Unwrap() error { return e.err }

func (c *Cluster) markInitialized() { c.initOnce.Do(func() { close(c.initialized) }) }

// Initialized is closed once the cluster has its first host set: at once
// for STATIC and ORIGINAL_DST, after the first resolution of every name
// for STRICT_DNS, after the first UpdateEndpoints for EDS (Envoy's
// cluster warming).
func (c *Cluster) Initialized() <-chan struct{} { return c.initialized }

// Close stops the cluster's background work (DNS refresh). It does not
// close upstream connections already handed out. Idempotent.
func (c *Cluster) Close() error {
	c.closeOnce.Do(func() {
		if c.cancel != nil {
			c.cancel()
			<-c.done
		}
	})
	return nil
}

// Name is the cluster's name.
func (c *Cluster) Name() string { return c.name }

// ObservabilityName is alt_stat_name when set, else the name: the
// cluster.<...>. stats scope and the /clusters observability_name.
func (c *Cluster) ObservabilityName() string { return c.obsName }

// AddedViaAPI reports Options.AddedViaAPI.
func (c *Cluster) AddedViaAPI() bool { return c.addedViaAPI }

// EDSServiceName is eds_cluster_config.service_name ("" when unset).
func (c *Cluster) EDSServiceName() string { return c.edsServiceName }

// Type is the discovery type.
func (c *Cluster) Type() clusterv3.Cluster_DiscoveryType { return c.typ }

// LbPolicy is the effective load-balancing policy, by its Envoy enum name.
func (c *Cluster) LbPolicy() string { return c.lb.String() }

// ConnectTimeout is connect_timeout (5 s when unset).
func (c *Cluster) ConnectTimeout() time.Duration { return c.connectTimeout }

// Hosts returns a snapshot of the cluster's hosts in configuration order
// (ORIGINAL_DST: the destinations currently tracked, sorted by address).
func (c *Cluster) Hosts() []*Host {
	if c.origDst != nil {
		return c.origDst.list()
	}
	return slices.Clone(c.hosts.Load().all)
}
