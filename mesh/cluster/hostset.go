package cluster

import (
	"net/netip"
	"slices"
)

// hostSet is an immutable snapshot of a cluster's hosts and the pickers
// built from them. Updates build a new one and publish it with an atomic
// pointer swap; Connect loads it once and never locks.
type hostSet struct {
	all    []*Host // configuration order
	levels []level // ascending priority; only priorities with hosts

	healthy, degraded, excluded int
}

type level struct {
	priority uint32
	healthy  *picker // nil when the level has no healthy host
	degraded *picker // nil when the level has no degraded host
}

// hostSpec is one host of an update before it is matched to an existing
// *Host.
type hostSpec struct {
	addr netip.AddrPort
	pipe string // pipe endpoints of STATIC clusters
	meta *hostMeta
}

func (s hostSpec) key() hostKey { return hostKey{s.addr, s.pipe} }

var emptySet = &hostSet{}

// pickFrom chooses a host from the snapshot (simplified Envoy priority
// load: the lowest priority with a healthy host takes all traffic; no
// overprovisioning-factor spill, no panic mode). Hosts for which exclude
// is true are skipped: first within the level, then at lower priorities,
// then among degraded hosts. If only excluded hosts are left, one of them
// is returned anyway, as Envoy does once its host-selection retries are
// used up (a single-host cluster retries its one host).
func (hs *hostSet) pick(exclude func(*Host) bool) *Host {
	for i := range hs.levels {
		if p := hs.levels[i].healthy; p != nil {
			if h := p.pick(exclude); h != nil {
				return h
			}
		}
	}
	for i := range hs.levels {
		if p := hs.levels[i].degraded; p != nil {
			if h := p.pick(exclude); h != nil {
				return h
			}
		}
	}
	if exclude != nil {
		return hs.pick(nil)
	}
	return nil
}

// buildSet groups hosts into priority levels and health classes and builds
// their pickers. metas[i] is all[i]'s metadata as the set will have it:
// a staged set is built before its hosts' metadata is updated (Commit).
func (c *Cluster) buildSet(all []*Host, metas []*hostMeta) *hostSet {
	hs := &hostSet{all: all}
	prios := make([]uint32, 0, 2)
	for _, m := range metas {
		switch classify(m.health) {
		case classHealthy:
			hs.healthy++
		case classDegraded:
			hs.degraded++
		case classExcluded:
			hs.excluded++
		}
		if !slices.Contains(prios, m.priority) {
			prios = append(prios, m.priority)
		}
	}
	slices.Sort(prios)
	for _, prio := range prios {
		lv := level{priority: prio}
		lv.healthy = c.buildPicker(all, metas, prio, classHealthy)
		lv.degraded = c.buildPicker(all, metas, prio, classDegraded)
		hs.levels = append(hs.levels, lv)
	}
	return hs
}

func (c *Cluster) buildPicker(all []*Host, metas []*hostMeta, prio uint32, class healthClass) *picker {
	var hosts []*Host
	var ms []*hostMeta
	for i, h := range all {
		if m := metas[i]; m.priority == prio && classify(m.health) == class {
			hosts = append(hosts, h)
			ms = append(ms, m)
		}
	}
	if len(hosts) == 0 {
		return nil
	}
	if c.localityWeighted {
		if p := c.buildLocalityPicker(hosts, ms); p != nil {
			return p
		}
	}
	return c.flatPicker(hosts, ms)
}

func (c *Cluster) flatPicker(hosts []*Host, metas []*hostMeta) *picker {
	weights := make([]uint32, len(hosts))
	for i, m := range metas {
		weights[i] = m.weight
	}
	return newPicker(c.lb, c.choiceCount, hosts, weights)
}

type localityKey struct{ region, zone, subZone string }

// buildLocalityPicker implements locality_weighted_lb_config, simplified:
// a locality's share is its configured load_balancing_weight (Envoy also
// scales it by the locality's healthy fraction × overprovisioning factor).
// Localities without a weight get no traffic, as in Envoy; if no locality
// has a weight it returns nil and the level is balanced flat.
func (c *Cluster) buildLocalityPicker(hosts []*Host, metas []*hostMeta) *picker {
	var keys []localityKey
	groups := map[localityKey][]*Host{}
	groupMetas := map[localityKey][]*hostMeta{}
	weight := map[localityKey]uint32{}
	for i, h := range hosts {
		m := metas[i]
		k := localityKey{m.region, m.zone, m.subZone}
		if _, ok := groups[k]; !ok {
			keys = append(keys, k)
			weight[k] = m.localityWeight
		}
		groups[k] = append(groups[k], h)
		groupMetas[k] = append(groupMetas[k], m)
	}
	var subs []*picker
	var weights []uint32
	for _, k := range keys {
		if weight[k] == 0 {
			continue
		}
		subs = append(subs, c.flatPicker(groups[k], groupMetas[k]))
		weights = append(weights, weight[k])
	}
	if len(subs) == 0 {
		return nil
	}
	if len(subs) == 1 {
		return subs[0]
	}
	return newLocalityPicker(subs, weights)
}

// dedupe drops repeated addresses (the first entry wins): a host is
// identified by its address. specs is returned as it is, not copied, when
// nothing repeats (specs are never written once made), and a short list is
// checked pairwise rather than through a map: a 10,000-service push parsed
// and prepared 20,000 three-endpoint lists, and their maps and copies were
// ~8 MB of garbage on the way to the ACK.
func dedupe(specs []hostSpec) []hostSpec {
	if len(specs) <= dedupeScan {
		for i := 1; i < len(specs); i++ {
			for j := range i {
				if specs[i].key() == specs[j].key() {
					return dedupeMap(specs)
				}
			}
		}
		return specs
	}
	return dedupeMap(specs)
}

// dedupeScan is the longest list dedupe checks pairwise (at most 120
// comparisons of two small keys).
const dedupeScan = 16

func dedupeMap(specs []hostSpec) []hostSpec {
	seen := make(map[hostKey]struct{}, len(specs))
	out := specs[:0:0]
	for _, s := range specs {
		if _, dup := seen[s.key()]; dup {
			continue
		}
		seen[s.key()] = struct{}{}
		out = append(out, s)
	}
	if len(out) == len(specs) {
		return specs
	}
	return out
}

// hostUpdate is a host set built from specs against base, the set in
// force when it was built, and what putting it in force changes. Building
// it reads base and its hosts and writes nothing, so it can be done for a
// snapshot that may never be put in force.
type hostUpdate struct {
	specs  []hostSpec // deduplicated
	base   *hostSet
	set    *hostSet // base itself when nothing changes
	metas  []*hostMeta
	noop   bool
	added  int
	remove int
}

// prepare builds the host set specs make of base: hosts whose address is
// in base keep their *Host (and its stats, connections and load), as
// Envoy keeps a host across EDS updates and DNS refreshes; an update that
// changes nothing keeps base (and its rotation state).
func (c *Cluster) prepare(base *hostSet, specs []hostSpec) *hostUpdate {
	prev := make(map[hostKey]*Host, len(base.all))
	for _, h := range base.all {
		prev[h.key()] = h
	}
	specs = dedupe(specs)
	u := &hostUpdate{specs: specs, base: base, metas: make([]*hostMeta, 0, len(specs))}
	all := make([]*Host, 0, len(specs))
	same := len(specs) == len(base.all)
	var tsCache map[[2]string]uint16
	if len(c.tr.matches) > 0 {
		tsCache = make(map[[2]string]uint16, 2)
	}
	for i, s := range specs {
		h, ok := prev[s.key()]
		m := s.meta
		// The transport the host's labels select in this cluster. The
		// specs may be shared (an assignment staged for several
		// clusters), so a different choice is a copy, made only when
		// the host's metadata in force does not already say the same.
		ts := c.tr.resolve(m.tsEndpoint, m.tsLocality, tsCache)
		if ok {
			delete(prev, s.key())
			if old := h.meta.Load(); sameMeta(old, m, ts) {
				m = old
			} else {
				m = withTS(m, ts)
				same = false
			}
		} else {
			m = withTS(m, ts)
			h = newHost(s.addr, m)
			h.pipe = s.pipe
			u.added++
		}
		if same && base.all[i] != h {
			same = false
		}
		all = append(all, h)
		u.metas = append(u.metas, m)
	}
	u.remove = len(prev)
	if same && u.added == 0 && u.remove == 0 {
		u.set, u.noop = base, true
		return u
	}
	u.set = c.buildSet(all, u.metas)
	return u
}

// sameMeta reports whether old is m with transport choice ts.
func sameMeta(old, m *hostMeta, ts uint16) bool {
	o := *old
	o.ts = m.ts
	return old.ts == ts && o == *m
}

// withTS is m with transport choice ts: m itself if it has it.
func withTS(m *hostMeta, ts uint16) *hostMeta {
	if m.ts == ts {
		return m
	}
	cp := new(hostMeta)
	*cp = *m
	cp.ts = ts
	return cp
}

// commitLocked puts u in force: the hosts' new metadata, then the set, in
// one atomic store, and returns the update it put in force. c.updateMu is
// held. A set built against a base that
// is no longer in force (a DNS refresh or a direct update came between)
// is rebuilt against the current one first.
func (c *Cluster) commitLocked(u *hostUpdate) *hostUpdate {
	if cur := c.hosts.Load(); cur != u.base {
		u = c.prepare(cur, u.specs)
	}
	if u.noop {
		c.stats.updateNoRebuild.Add(1)
		return u
	}
	for i, h := range u.set.all {
		if h.meta.Load() != u.metas[i] {
			h.meta.Store(u.metas[i])
		}
	}
	c.hosts.Store(u.set)
	changed := u.added+u.remove > 0
	if last := c.stats.lastSet.Swap(u.set); last != nil && last != u.base {
		// The first set of a cluster that replaces another of its name
		// (a CDS update): membership changed only if the hosts did.
		changed = !sameAddrs(last, u.set)
	}
	if changed {
		c.stats.membershipChange.Add(1)
	}
	c.log.Debug().Str("cluster", c.name).Int("hosts", len(u.set.all)).Int("healthy", u.set.healthy).
		Int("added", u.added).Int("removed", u.remove).Msg("cluster membership updated")
	return u
}

// setHosts builds and publishes the host set of specs at once.
func (c *Cluster) setHosts(specs []hostSpec) {
	c.updateMu.Lock()
	defer c.updateMu.Unlock()
	c.commitLocked(c.prepare(c.hosts.Load(), specs))
}

// sameAddrs reports whether a and b hold the same addresses.
func sameAddrs(a, b *hostSet) bool {
	if len(a.all) != len(b.all) {
		return false
	}
	in := make(map[hostKey]struct{}, len(a.all))
	for _, h := range a.all {
		in[h.key()] = struct{}{}
	}
	for _, h := range b.all {
		if _, ok := in[h.key()]; !ok {
			return false
		}
	}
	return true
}
