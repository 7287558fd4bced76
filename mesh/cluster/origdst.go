package cluster

import (
	"net/netip"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
)

// origDstHosts are the hosts of an ORIGINAL_DST cluster: one per original
// destination seen, created on first use and removed by a cleanup sweep
// once unused for a cleanup_interval (Envoy's default 5 s) with no active
// connection or request. The sweep runs lazily from Connect rather than
// from a timer, so an idle cluster keeps its last hosts until next used.
type origDstHosts struct {
	c            *Cluster
	m            sync.Map // netip.AddrPort → *Host
	n            atomic.Int64
	portOverride uint16
	meta         *hostMeta // every host's: no endpoint metadata
	interval     time.Duration
	nextSweep    atomic.Int64 // unix nanoseconds
	sweepMu      sync.Mutex
}

func newOrigDstHosts(c *Cluster, pb *clusterv3.Cluster) *origDstHosts {
	o := &origDstHosts{c: c, interval: dur(pb.GetCleanupInterval(), defaultCleanupInterval)}
	// A destination has no metadata: only a match with no labels (or
	// transport_socket) applies, the same for every host.
	o.meta = &hostMeta{weight: 1, ts: c.tr.resolve("", "", nil)}
	if v := pb.GetOriginalDstLbConfig().GetUpstreamPortOverride(); v != nil {
		o.portOverride = uint16(v.GetValue())
	}
	o.nextSweep.Store(time.Now().Add(o.interval).UnixNano())
	return o
}

// OriginalDestination is the address an ORIGINAL_DST cluster connects to
// for a flow whose original destination is dst (upstream_port_override
// applied); false for a cluster of another type, or a dst it would have
// no host for. Nothing is created or counted.
func (c *Cluster) OriginalDestination(dst netip.AddrPort) (netip.AddrPort, bool) {
	o := c.origDst
	if o == nil {
		return netip.AddrPort{}, false
	}
	ip, port := dst.Addr().Unmap(), dst.Port()
	if o.portOverride != 0 {
		port = o.portOverride
	}
	if !ip.IsValid() || ip.IsUnspecified() || port == 0 {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(ip, port), true
}

// get returns the host for the original destination dst (nil when dst is
// not a usable address: Envoy then has no host either).
func (o *origDstHosts) get(dst netip.AddrPort) *Host {
	key, ok := o.c.OriginalDestination(dst)
	if !ok {
		return nil
	}
	var h *Host
	if v, ok := o.m.Load(key); ok {
		h = v.(*Host)
	} else {
		nh := newHost(key, o.meta)
		v, loaded := o.m.LoadOrStore(key, nh)
		h = v.(*Host)
		if !loaded {
			o.n.Add(1)
			o.c.stats.membershipChange.Add(1)
		}
	}
	h.used.Store(true)
	if now := time.Now().UnixNano(); now >= o.nextSweep.Load() {
		o.sweep(now)
	}
	return h
}

// sweep removes hosts neither used since the previous sweep nor busy.
func (o *origDstHosts) sweep(now int64) {
	if !o.sweepMu.TryLock() {
		return
	}
	defer o.sweepMu.Unlock()
	if now < o.nextSweep.Load() {
		return
	}
	o.nextSweep.Store(now + int64(o.interval))
	o.m.Range(func(k, v any) bool {
		h := v.(*Host)
		if h.used.Swap(false) || h.cxActive.Load() > 0 || h.rqActive.Load() > 0 {
			return true
		}
		o.m.Delete(k)
		o.n.Add(-1)
		o.c.stats.membershipChange.Add(1)
		return true
	})
}

func (o *origDstHosts) list() []*Host {
	var out []*Host
	o.m.Range(func(_, v any) bool {
		out = append(out, v.(*Host))
		return true
	})
	sort.Slice(out, func(i, j int) bool { return out[i].addr.Compare(out[j].addr) < 0 })
	return out
}
