package cluster

import (
	"sort"
	"sync/atomic"

	"golang.org/x/sys/cpu"
)

// Stat is one counter or gauge, named as Envoy names it under the
// cluster.<observability name>. scope (the prefix is not included).
type Stat struct {
	Name  string
	Value uint64
	Gauge bool
}

// clusterStats holds the cluster-wide counters. The byte counters are
// touched on every Read/Write of every upstream connection of the cluster,
// so each sits on its own cache line; the rest change once per connection.
type clusterStats struct {
	_       cpu.CacheLinePad
	rxBytes atomic.Uint64
	_       cpu.CacheLinePad
	txBytes atomic.Uint64
	_       cpu.CacheLinePad

	cxTotal                 atomic.Uint64
	cxActive                atomic.Int64
	cxConnectFail           atomic.Uint64
	cxConnectTimeout        atomic.Uint64
	cxOverflow              atomic.Uint64
	cxNoneHealthy           atomic.Uint64
	cxDestroy               atomic.Uint64
	cxConnectAttemptsExceed atomic.Uint64

	membershipChange atomic.Uint64

	updateAttempt   atomic.Uint64
	updateSuccess   atomic.Uint64
	updateFailure   atomic.Uint64
	updateRejected  atomic.Uint64
	updateEmpty     atomic.Uint64
	updateNoRebuild atomic.Uint64

	rqTotal           atomic.Uint64
	rqActive          atomic.Int64
	rqPendingTotal    atomic.Uint64
	rqPendingActive   atomic.Int64
	rqPendingOverflow atomic.Uint64
	rqRetry           atomic.Uint64
	rqRetryOverflow   atomic.Uint64
}

func gauge(v int64) uint64 {
	if v < 0 {
		return 0
	}
	return uint64(v)
}

// Scope is the block of a cluster.<observability name>. stats scope: the
// cluster-wide counters and the HTTP request counters. It lives in the
// proxy's stats store (mesh/stats), keyed by that name, not in the
// Cluster: a cluster rebuilt by a CDS update is given the same Scope and
// its counters go on, as Envoy keeps cluster.<name>.* across updates. The
// membership gauges are not in it: they are read from the host set in
// force, so a cluster built but never put in force moves no gauge.
type Scope struct {
	clusterStats
	// http is made on first use: its per-code counters are 4 KiB, which
	// 10,000 clusters that never see HTTP should not cost.
	http atomic.Pointer[HTTPStats]
	// lastSet is the host set last put in force by a cluster counting
	// into the Scope, so that the first set of a cluster replacing
	// another counts as a membership_change only if the hosts differ.
	lastSet atomic.Pointer[hostSet]
}

// NewScope returns a Scope with every counter at 0.
func NewScope() *Scope { return new(Scope) }

// Scope returns the block the cluster counts into (Options.Stats).
func (c *Cluster) Scope() *Scope { return c.stats }

// Stats returns the cluster's counters and gauges sorted by name, with
// Envoy's names relative to the cluster.<ObservabilityName()>. scope.
func (c *Cluster) Stats() []Stat {
	s := c.stats
	hs := c.hosts.Load()
	total, healthy, degraded, excluded := int64(len(hs.all)), int64(hs.healthy), int64(hs.degraded), int64(hs.excluded)
	if c.origDst != nil {
		total = c.origDst.n.Load()
		healthy = total
	}
	out := []Stat{
		{"upstream_cx_total", s.cxTotal.Load(), false},
		{"upstream_cx_active", gauge(s.cxActive.Load()), true},
		{"upstream_cx_connect_fail", s.cxConnectFail.Load(), false},
		{"upstream_cx_connect_timeout", s.cxConnectTimeout.Load(), false},
		{"upstream_cx_connect_attempts_exceeded", s.cxConnectAttemptsExceed.Load(), false},
		{"upstream_cx_overflow", s.cxOverflow.Load(), false},
		{"upstream_cx_none_healthy", s.cxNoneHealthy.Load(), false},
		{"upstream_cx_destroy", s.cxDestroy.Load(), false},
		{"upstream_cx_rx_bytes_total", s.rxBytes.Load(), false},
		{"upstream_cx_tx_bytes_total", s.txBytes.Load(), false},
		{"membership_total", gauge(total), true},
		{"membership_healthy", gauge(healthy), true},
		{"membership_degraded", gauge(degraded), true},
		{"membership_excluded", gauge(excluded), true},
		{"membership_change", s.membershipChange.Load(), false},
		{"update_attempt", s.updateAttempt.Load(), false},
		{"update_success", s.updateSuccess.Load(), false},
		{"update_failure", s.updateFailure.Load(), false},
		{"update_rejected", s.updateRejected.Load(), false},
		{"update_empty", s.updateEmpty.Load(), false},
		{"update_no_rebuild", s.updateNoRebuild.Load(), false},
		{"upstream_rq_total", s.rqTotal.Load(), false},
		{"upstream_rq_active", gauge(s.rqActive.Load()), true},
		{"upstream_rq_pending_total", s.rqPendingTotal.Load(), false},
		{"upstream_rq_pending_active", gauge(s.rqPendingActive.Load()), true},
		{"upstream_rq_pending_overflow", s.rqPendingOverflow.Load(), false},
		{"upstream_rq_retry", s.rqRetry.Load(), false},
		{"upstream_rq_retry_overflow", s.rqRetryOverflow.Load(), false},
	}
	for _, r := range c.resources {
		out = r.appendStats(out)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Stat returns the value of one stat by its name as listed by Stats, and
// whether it exists.
func (c *Cluster) Stat(name string) (uint64, bool) {
	for _, s := range c.Stats() {
		if s.Name == name {
			return s.Value, true
		}
	}
	return 0, false
}

// CountConnectAttemptsExceeded records that a caller (tcp_proxy) gave up
// after max_connect_attempts failed connects
// (upstream_cx_connect_attempts_exceeded).
func (c *Cluster) CountConnectAttemptsExceeded() { c.stats.cxConnectAttemptsExceed.Add(1) }
