package httpconn

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshtun/meshtun/mesh/cluster"
)

// Pools are the proxy's upstream HTTP connection pools: one per cluster,
// holding persistent connections per host address (an http.Transport per
// cluster and protocol keys its idle connections by the host's address).
// Every connection is dialed through the cluster (ConnectHost), so circuit
// breakers, the capture-bypass mark and cx stats apply to pooled
// connections as to tcp_proxy's.
//
// A pool is found by cluster name with one lock-free map read. When the
// cluster behind a name is replaced (CDS update) or removed (Retain,
// Forget), its pool is drained: idle connections close at once, busy ones
// when their request ends (within retiredPoolGrace at the latest).
type Pools struct {
	m      sync.Map // cluster name → *clusterPool
	mu     sync.Mutex
	closed bool
	wg     sync.WaitGroup // draining pools' sweepers
	abort  chan struct{}  // closed when Close's context ends: sweepers close all; made under mu
}

// retiredPoolGrace bounds how long the busy connections of a pool whose
// cluster was replaced or removed may finish their requests. Pools.Close
// takes its bound from its caller instead.
const retiredPoolGrace = time.Minute

// NewPools returns empty pools.
func NewPools() *Pools { return &Pools{} }

type clusterPool struct {
	c     *cluster.Cluster
	opts  cluster.HTTPOptions
	stats *cluster.HTTPStats
	h1    *h1Transport    // nil unless the cluster speaks HTTP/1.1
	h2    *http.Transport // nil unless it speaks h2c

	hosts sync.Map // *cluster.Host → *hostConns

	// The sweep (maybeSweep) drops what the pool keeps for hosts that
	// left the cluster.
	sweptVersion atomic.Uint64 // the cluster's MembershipVersion last swept
	sweepPending atomic.Bool   // a removed host was busy: sweep again
	nextSweep    atomic.Int64  // nanotime before which no sweep runs
	sweepMu      sync.Mutex

	mu     sync.Mutex
	conns  map[*pooledConn]struct{}
	closed atomic.Bool
}

// hostConns tracks one host's pooled connections and requests, to
// coalesce dials: a request that finds no idle connection while one is
// about to be returned waits for it instead of opening another (Go's
// Transport dials for every such request; Envoy's pool does not).
type hostConns struct {
	open    atomic.Int64 // established pooled connections
	dialing atomic.Int64
	active  atomic.Int64 // requests in flight
	waiting atomic.Int64 // requests waiting for a connection
}

func (cp *clusterPool) host(h *cluster.Host) *hostConns {
	if v, ok := cp.hosts.Load(h); ok {
		return v.(*hostConns)
	}
	v, _ := cp.hosts.LoadOrStore(h, new(hostConns))
	return v.(*hostConns)
}

// sweepInterval bounds how often a pool sweeps: ORIGINAL_DST clusters
// change membership with every new destination.
const sweepInterval = 100 * time.Millisecond

// maybeSweep runs the sweep when the cluster's membership changed since
// the last one (or a removed host was still busy then), lazily from the
// requests of the cluster: no goroutine per pool. The check is two atomic
// loads.
func (cp *clusterPool) maybeSweep() {
	v := cp.c.MembershipVersion()
	if v == cp.sweptVersion.Load() && !cp.sweepPending.Load() {
		return
	}
	now := nanotime()
	if now < cp.nextSweep.Load() || !cp.sweepMu.TryLock() {
		return
	}
	defer cp.sweepMu.Unlock()
	cp.sweptVersion.Store(v) // a change during the sweep makes another
	cp.nextSweep.Store(now + int64(sweepInterval))
	cp.sweepPending.Store(cp.sweep())
}

// sweep drops the per-host entries of hosts no longer in the cluster (EDS
// removed them, or an ORIGINAL_DST cleanup swept them) and closes their
// idle connections, as Envoy drains the pools of removed hosts; h1 idle
// connections past the idle timeout close too. A removed host with
// requests in flight keeps its entry until a later sweep, when its
// connections are idle. It reports whether to sweep again: after any
// removal once more, for a request that picked the host just before.
func (cp *clusterPool) sweep() (again bool) {
	hosts := cp.c.Hosts()
	live := make(map[*cluster.Host]struct{}, len(hosts))
	liveAddr := make(map[string]struct{}, len(hosts))
	for _, h := range hosts {
		live[h] = struct{}{}
		liveAddr[h.Address().String()] = struct{}{}
	}
	var gone map[*hostConns]bool
	cp.hosts.Range(func(k, v any) bool {
		h, hc := k.(*cluster.Host), v.(*hostConns)
		if _, ok := live[h]; ok {
			return true
		}
		again = true
		if hc.active.Load() > 0 || hc.dialing.Load() > 0 || hc.waiting.Load() > 0 {
			return true
		}
		if gone == nil {
			gone = map[*hostConns]bool{}
		}
		gone[hc] = true
		cp.hosts.Delete(k)
		return true
	})
	if cp.h1 != nil {
		cp.h1.closeIdleExcept(func(addr string) bool { _, ok := liveAddr[addr]; return ok })
	}
	if len(gone) == 0 {
		return again
	}
	// What is left of the removed hosts' connections (h2c ones, which
	// http.Transport keeps) carries no request: close it.
	var closing []*pooledConn
	cp.mu.Lock()
	for pc := range cp.conns {
		if gone[pc.hc] {
			closing = append(closing, pc)
		}
	}
	cp.mu.Unlock()
	for _, pc := range closing {
		pc.Close()
	}
	return again
}

// errDialNotNeeded ends a dial whose request got a returning connection;
// the Transport discards the error of a dial nobody waits for.
var errDialNotNeeded = errors.New("httpconn: dial not needed")

// dialNeeded waits (briefly) while the host's connections, open and being
// dialed, outnumber its requests: one of them will be idle shortly. It
// reports false once no request waits for a connection.
func (hc *hostConns) dialNeeded() bool {
	for i := 0; i < 25; i++ {
		if hc.waiting.Load() == 0 {
			return false
		}
		if hc.open.Load()+hc.dialing.Load() <= hc.active.Load() {
			return true
		}
		time.Sleep(200 * time.Microsecond)
	}
	return true
}

// errPoolsClosed fails requests after Close.
var errPoolsClosed = errors.New("httpconn: connection pools closed")

// get returns the pool of c, creating (or replacing a stale) one.
func (p *Pools) get(c *cluster.Cluster, opts cluster.HTTPOptions) (*clusterPool, error) {
	if v, ok := p.m.Load(c.Name()); ok {
		if cp := v.(*clusterPool); cp.c == c && cp.opts == opts {
			cp.maybeSweep()
			return cp, nil
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, errPoolsClosed
	}
	if v, ok := p.m.Load(c.Name()); ok {
		cp := v.(*clusterPool)
		if cp.c == c && cp.opts == opts {
			return cp, nil
		}
		p.drainLocked(cp)
	}
	cp := newClusterPool(c, opts)
	p.m.Store(c.Name(), cp)
	return cp, nil
}

func newClusterPool(c *cluster.Cluster, opts cluster.HTTPOptions) *clusterPool {
	cp := &clusterPool{c: c, opts: opts, stats: c.HTTPStats(), conns: map[*pooledConn]struct{}{}}
	cp.sweptVersion.Store(c.MembershipVersion())
	if opts.Protocol != cluster.HTTP2 {
		cp.h1 = newH1Transport(cp)
	}
	if opts.Protocol != cluster.HTTP1 {
		cp.h2 = cp.h2Transport()
	}
	return cp
}

// h2Transport is the upstream HTTP/2 client: one multiplexed connection
// per host, dialed through the cluster. It speaks HTTP/2 with prior
// knowledge on whatever the dial returns: a plaintext socket (h2c) or, on
// a host whose transport socket is TLS, the TLS connection dialHost
// checked negotiated ALPN h2.
func (cp *clusterPool) h2Transport() *http.Transport {
	t := &http.Transport{
		DisableCompression:  true, // bytes pass through as the upstream sent them
		MaxIdleConnsPerHost: 4096,
		IdleConnTimeout:     cp.opts.IdleTimeout,
		WriteBufferSize:     16 << 10,
		ReadBufferSize:      16 << 10,
		HTTP2:               &http.HTTP2Config{MaxConcurrentStreams: 1 << 20},
		// Envoy's bound on response heads (max_response_headers_kb).
		MaxResponseHeaderBytes: maxResponseHeadBytes,
		// For HTTP/2 this bounds concurrent dials, not connections:
		// requests arriving together share the first connection instead
		// of each dialing one (Envoy's pool also connects once and queues).
		MaxConnsPerHost: 1,
	}
	t.Protocols = new(http.Protocols)
	t.Protocols.SetUnencryptedHTTP2(true)
	t.DialContext = func(ctx context.Context, _, addr string) (net.Conn, error) { return cp.dial(ctx, addr, true) }
	return t
}

// transportFor returns the transport for a request that came downstream
// over HTTP/major.
func (cp *clusterPool) transportFor(major int) http.RoundTripper {
	switch {
	case cp.h1 == nil:
		return cp.h2
	case cp.h2 == nil:
		return cp.h1
	case major == 2:
		return cp.h2
	}
	return cp.h1
}

type hostKey struct{}

// dial opens a pooled connection to the host the request picked (carried
// in the context; the address identifies it otherwise).
func (cp *clusterPool) dial(ctx context.Context, addr string, h2 bool) (net.Conn, error) {
	h, _ := ctx.Value(hostKey{}).(*cluster.Host)
	return cp.dialHost(ctx, addr, h, h2, true)
}

// dialHost connects to host h (found by addr when h is nil or another
// host). coalesce lets a dial give way to a connection about to return to
// http.Transport's pool; the h1 transport does not need it.
func (cp *clusterPool) dialHost(ctx context.Context, addr string, h *cluster.Host, h2, coalesce bool) (*pooledConn, error) {
	if cp.closed.Load() {
		return nil, errPoolsClosed
	}
	if h == nil || h.Address().String() != addr {
		h = nil
		if ap, err := netip.ParseAddrPort(addr); err == nil {
			for _, x := range cp.c.Hosts() {
				if x.Address() == ap {
					h = x
					break
				}
			}
		}
		if h == nil {
			return nil, errors.New("httpconn: no host " + addr + " in cluster " + cp.c.Name())
		}
	}
	hc := cp.host(h)
	hc.dialing.Add(1)
	if coalesce && !hc.dialNeeded() {
		hc.dialing.Add(-1)
		return nil, errDialNotNeeded
	}
	appProto := "http/1.1"
	if h2 {
		appProto = "h2"
	}
	uc, err := cp.c.ConnectHostFor(ctx, h, appProto)
	hc.dialing.Add(-1)
	if err != nil {
		return nil, err
	}
	if st := uc.TLS(); h2 && st != nil && st.NegotiatedProtocol != "h2" {
		// HTTP/2 frames to a server that agreed to something else (or
		// to nothing) would fail obscurely: refuse the connection.
		uc.Close()
		reason := "ALPN: the upstream selected " + strconv.Quote(st.NegotiatedProtocol) + ", not h2, for a cluster configured for HTTP/2"
		return nil, &cluster.ConnectError{Cluster: cp.c.Name(), Host: h, TransportFailure: reason, Err: errors.New(reason)}
	}
	hc.open.Add(1)
	if h2 {
		cp.stats.CxHTTP2Total.Add(1)
	} else {
		cp.stats.CxHTTP1Total.Add(1)
	}
	pc := &pooledConn{UpstreamConn: uc, cp: cp, hc: hc}
	cp.mu.Lock()
	cp.conns[pc] = struct{}{}
	cp.mu.Unlock()
	return pc, nil
}

// pooledConn is an upstream connection owned by a pool.
type pooledConn struct {
	*cluster.UpstreamConn
	cp   *clusterPool
	hc   *hostConns
	once sync.Once
}

func (c *pooledConn) Close() error {
	err := c.UpstreamConn.Close()
	c.once.Do(func() {
		c.hc.open.Add(-1)
		c.cp.mu.Lock()
		delete(c.cp.conns, c)
		c.cp.mu.Unlock()
	})
	return err
}

func (cp *clusterPool) closeIdle() {
	if cp.h1 != nil {
		cp.h1.CloseIdleConnections()
	}
	if cp.h2 != nil {
		cp.h2.CloseIdleConnections()
	}
}

func (cp *clusterPool) open() int {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	return len(cp.conns)
}

func (cp *clusterPool) closeAll() {
	cp.mu.Lock()
	conns := make([]*pooledConn, 0, len(cp.conns))
	for c := range cp.conns {
		conns = append(conns, c)
	}
	cp.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
}

// drainLocked retires cp: no new connections; idle ones close now, busy
// ones as they become idle, all by retiredPoolGrace or when Close's
// context ends. p.mu is held.
func (p *Pools) drainLocked(cp *clusterPool) {
	if !cp.closed.CompareAndSwap(false, true) {
		return
	}
	p.m.CompareAndDelete(cp.c.Name(), cp)
	cp.closeIdle()
	if cp.open() == 0 {
		return
	}
	if p.abort == nil {
		p.abort = make(chan struct{})
	}
	abort := p.abort
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		grace := time.NewTimer(retiredPoolGrace)
		defer grace.Stop()
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-tick.C:
				cp.closeIdle()
				if cp.open() == 0 {
					return
				}
				continue
			case <-grace.C:
			case <-abort:
			}
			cp.closeAll()
			return
		}
	}()
}

// Forget drains the pool of cluster name (the cluster was removed).
func (p *Pools) Forget(name string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if v, ok := p.m.Load(name); ok {
		p.drainLocked(v.(*clusterPool))
	}
}

// Retain drains the pools of clusters for which keep is false: call it
// after installing a configuration, with the new cluster set.
func (p *Pools) Retain(keep func(name string) bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.m.Range(func(k, v any) bool {
		if !keep(k.(string)) {
			p.drainLocked(v.(*clusterPool))
		}
		return true
	})
}

// Conns returns the number of open pooled connections of cluster name.
func (p *Pools) Conns(name string) int {
	if v, ok := p.m.Load(name); ok {
		return v.(*clusterPool).open()
	}
	return 0
}

// Close closes every pool: idle connections at once, busy ones when their
// request ends or, at the latest, when ctx is done (their requests fail);
// it returns when all are closed. The caller bounds it: a proxy that exits
// once its termination drain is over passes a context already done (what
// a request still holds then is cut, as the exit would). Later requests
// fail with 503 UO. Idempotent. It reports whether every busy connection
// finished on its own (false: ctx ended first and the rest were cut).
func (p *Pools) Close(ctx context.Context) bool {
	p.mu.Lock()
	if !p.closed {
		p.closed = true
		p.m.Range(func(_, v any) bool {
			p.drainLocked(v.(*clusterPool))
			return true
		})
	}
	abort := p.abort
	p.mu.Unlock()
	if abort == nil {
		return true // no pool had a busy connection: nothing to wait for
	}
	stop := context.AfterFunc(ctx, func() {
		p.mu.Lock()
		defer p.mu.Unlock()
		select {
		case <-p.abort:
		default:
			close(p.abort)
		}
	})
	p.wg.Wait()
	// stop reports false when ctx already fired the abort.
	return stop()
}
