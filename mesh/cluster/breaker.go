package cluster

import (
	"sync/atomic"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
)

// ResourcePriority selects one of a cluster's two circuit-breaker resource
// sets, as Envoy's routing priority does.
type ResourcePriority uint8

const (
	PriorityDefault ResourcePriority = iota
	PriorityHigh
)

func (p ResourcePriority) String() string {
	if p == PriorityHigh {
		return "high"
	}
	return "default"
}

// Thresholds are the circuit-breaker limits of one priority.
type Thresholds struct {
	MaxConnections     uint32
	MaxPendingRequests uint32
	MaxRequests        uint32
	MaxRetries         uint32
	TrackRemaining     bool
}

// Envoy's defaults when circuit_breakers (or a field) is not set.
var defaultThresholds = Thresholds{
	MaxConnections:     1024,
	MaxPendingRequests: 1024,
	MaxRequests:        1024,
	MaxRetries:         3,
}

func thresholdsFromProto(cb *clusterv3.CircuitBreakers) [2]Thresholds {
	th := [2]Thresholds{defaultThresholds, defaultThresholds}
	for _, t := range cb.GetThresholds() {
		p := PriorityDefault
		if t.GetPriority() == corev3.RoutingPriority_HIGH {
			p = PriorityHigh
		}
		x := defaultThresholds
		if v := t.GetMaxConnections(); v != nil {
			x.MaxConnections = v.GetValue()
		}
		if v := t.GetMaxPendingRequests(); v != nil {
			x.MaxPendingRequests = v.GetValue()
		}
		if v := t.GetMaxRequests(); v != nil {
			x.MaxRequests = v.GetValue()
		}
		if v := t.GetMaxRetries(); v != nil {
			x.MaxRetries = v.GetValue()
		}
		x.TrackRemaining = t.GetTrackRemaining()
		th[p] = x
	}
	return th
}

// limit is a counter that may not exceed max.
type limit struct {
	max uint32
	n   atomic.Int64
}

func (l *limit) tryAcquire() bool {
	for {
		cur := l.n.Load()
		if cur >= int64(l.max) {
			return false
		}
		if l.n.CompareAndSwap(cur, cur+1) {
			return true
		}
	}
}

func (l *limit) release() { l.n.Add(-1) }

func (l *limit) open() uint64 {
	if l.n.Load() >= int64(l.max) {
		return 1
	}
	return 0
}

func (l *limit) remaining() uint64 { return gauge(int64(l.max) - l.n.Load()) }

// Resources is the circuit-breaker state of one priority: Envoy's
// ResourceManager. Limits are exact (compare-and-swap), unlike Envoy's
// check-then-increment.
type Resources struct {
	priority ResourcePriority
	th       Thresholds
	c        *Cluster

	cx, pending, rq, retries limit

	// cxFreed is closed when a connection slot is released, for HTTP
	// requests waiting for max_connections (ConnectionReleased); nil while
	// nobody waits, so a release costs one atomic load.
	cxFreed atomic.Pointer[chan struct{}]
}

// connectionReleased returns a channel closed by the next release of a
// connection slot (see Cluster.ConnectionReleased).
func (r *Resources) connectionReleased() <-chan struct{} {
	for {
		if p := r.cxFreed.Load(); p != nil {
			return *p
		}
		ch := make(chan struct{})
		if r.cxFreed.CompareAndSwap(nil, &ch) {
			return ch
		}
	}
}

// releaseCx gives back a connection slot and wakes its waiters.
func (r *Resources) releaseCx() {
	r.cx.release()
	if r.cxFreed.Load() != nil {
		if p := r.cxFreed.Swap(nil); p != nil {
			close(*p)
		}
	}
}

func newResources(c *Cluster, p ResourcePriority, th Thresholds) *Resources {
	r := &Resources{priority: p, th: th, c: c}
	r.cx.max = th.MaxConnections
	r.pending.max = th.MaxPendingRequests
	r.rq.max = th.MaxRequests
	r.retries.max = th.MaxRetries
	return r
}

// Thresholds returns the configured limits.
func (r *Resources) Thresholds() Thresholds { return r.th }

// Connections, PendingRequests, Requests and Retries return the current use.
func (r *Resources) Connections() int64     { return r.cx.n.Load() }
func (r *Resources) PendingRequests() int64 { return r.pending.n.Load() }
func (r *Resources) Requests() int64        { return r.rq.n.Load() }
func (r *Resources) Retries() int64         { return r.retries.n.Load() }

// releaser returns an idempotent release function.
func releaser(l *limit, gauge interface{ Add(int64) int64 }) func() {
	var done atomic.Bool
	return func() {
		if done.CompareAndSwap(false, true) {
			l.release()
			if gauge != nil {
				gauge.Add(-1)
			}
		}
	}
}

// TryAcquirePending reserves a pending-request slot (max_pending_requests).
// On overflow it counts upstream_rq_pending_overflow and returns ok=false.
func (r *Resources) TryAcquirePending() (release func(), ok bool) {
	s := r.c.stats
	if !r.pending.tryAcquire() {
		s.rqPendingOverflow.Add(1)
		return nil, false
	}
	s.rqPendingTotal.Add(1)
	s.rqPendingActive.Add(1)
	return releaser(&r.pending, &s.rqPendingActive), true
}

// TryAcquireRequest reserves an active-request slot (max_requests) and
// counts upstream_rq_total. On overflow it counts
// upstream_rq_pending_overflow (Envoy's name for both request limits).
func (r *Resources) TryAcquireRequest() (release func(), ok bool) {
	s := r.c.stats
	if !r.rq.tryAcquire() {
		s.rqPendingOverflow.Add(1)
		return nil, false
	}
	s.rqTotal.Add(1)
	s.rqActive.Add(1)
	return releaser(&r.rq, &s.rqActive), true
}

// AcquireRequest is TryAcquireRequest for a caller that keeps track of
// the slot itself and gives it back with ReleaseRequest, exactly once:
// no release closure (two allocations) per request on the HTTP path.
func (r *Resources) AcquireRequest() bool {
	s := r.c.stats
	if !r.rq.tryAcquire() {
		s.rqPendingOverflow.Add(1)
		return false
	}
	s.rqTotal.Add(1)
	s.rqActive.Add(1)
	return true
}

// ReleaseRequest gives back a slot AcquireRequest reserved.
func (r *Resources) ReleaseRequest() {
	r.rq.release()
	r.c.stats.rqActive.Add(-1)
}

// TryAcquireRetry reserves a retry slot (max_retries), counting
// upstream_rq_retry, or upstream_rq_retry_overflow when full.
func (r *Resources) TryAcquireRetry() (release func(), ok bool) {
	s := r.c.stats
	if !r.retries.tryAcquire() {
		s.rqRetryOverflow.Add(1)
		return nil, false
	}
	s.rqRetry.Add(1)
	return releaser(&r.retries, nil), true
}

// appendStats adds Envoy's circuit_breakers.<priority>.* gauges.
func (r *Resources) appendStats(out []Stat) []Stat {
	p := "circuit_breakers." + r.priority.String() + "."
	out = append(out,
		Stat{p + "cx_open", r.cx.open(), true},
		Stat{p + "rq_pending_open", r.pending.open(), true},
		Stat{p + "rq_open", r.rq.open(), true},
		Stat{p + "rq_retry_open", r.retries.open(), true},
	)
	if r.th.TrackRemaining {
		out = append(out,
			Stat{p + "remaining_cx", r.cx.remaining(), true},
			Stat{p + "remaining_pending", r.pending.remaining(), true},
			Stat{p + "remaining_rq", r.rq.remaining(), true},
			Stat{p + "remaining_retries", r.retries.remaining(), true},
		)
	}
	return out
}

// Resources returns the circuit-breaker state of priority p.
func (c *Cluster) Resources(p ResourcePriority) *Resources {
	if p == PriorityHigh {
		return c.resources[1]
	}
	return c.resources[0]
}

// Thresholds returns the circuit-breaker limits of priority p.
func (c *Cluster) Thresholds(p ResourcePriority) Thresholds { return c.Resources(p).th }

// ConnectionReleased returns a channel that is closed the next time one of
// the cluster's connections (default priority, as ConnectHost counts them)
// closes and frees a max_connections slot. An HTTP request that got
// ErrOverflow waits on it as pending, as in Envoy, where a request the
// pool cannot give a connection to is queued, not failed: take the channel
// before the ConnectHost that may overflow, so a release in between is not
// missed.
func (c *Cluster) ConnectionReleased() <-chan struct{} {
	return c.resources[PriorityDefault].connectionReleased()
}

// TryAcquirePending is Resources(PriorityDefault).TryAcquirePending.
func (c *Cluster) TryAcquirePending() (release func(), ok bool) {
	return c.resources[0].TryAcquirePending()
}

// TryAcquireRequest is Resources(PriorityDefault).TryAcquireRequest.
func (c *Cluster) TryAcquireRequest() (release func(), ok bool) {
	return c.resources[0].TryAcquireRequest()
}

// AcquireRequest is Resources(PriorityDefault).AcquireRequest.
func (c *Cluster) AcquireRequest() bool { return c.resources[0].AcquireRequest() }

// ReleaseRequest is Resources(PriorityDefault).ReleaseRequest.
func (c *Cluster) ReleaseRequest() { c.resources[0].ReleaseRequest() }

// TryAcquireRetry is Resources(PriorityDefault).TryAcquireRetry.
func (c *Cluster) TryAcquireRetry() (release func(), ok bool) {
	return c.resources[0].TryAcquireRetry()
}
