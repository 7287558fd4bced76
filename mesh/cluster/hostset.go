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
	meta *hostMeta
}

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
// their pickers.
func (c *Cluster) buildSet(all []*Host) *hostSet {
	hs := &hostSet{all: all}
	prios := make([]uint32, 0, 2)
	for _, h := range all {
		m := h.meta.Load()
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
		lv.healthy = c.buildPicker(all, prio, classHealthy)
		lv.degraded = c.buildPicker(all, prio, classDegraded)
		hs.levels = append(hs.levels, lv)
	}
	return hs
}

func (c *Cluster) buildPicker(all []*Host, prio uint32, class healthClass) *picker {
	var hosts []*Host
	for _, h := range all {
		m := h.meta.Load()
		if m.priority == prio && classify(m.health) == class {
			hosts = append(hosts, h)
		}
	}
	if len(hosts) == 0 {
		return nil
	}
	if c.localityWeighted {
		if p := c.buildLocalityPicker(hosts); p != nil {
			return p
		}
	}
	return c.flatPicker(hosts)
}

func (c *Cluster) flatPicker(hosts []*Host) *picker {
	weights := make([]uint32, len(hosts))
	for i, h := range hosts {
		weights[i] = h.meta.Load().weight
	}
	return newPicker(c.lb, c.choiceCount, hosts, weights)
}

type localityKey struct{ region, zone, subZone string }

// buildLocalityPicker implements locality_weighted_lb_config, simplified:
// a locality's share is its configured load_balancing_weight (Envoy also
// scales it by the locality's healthy fraction × overprovisioning factor).
// Localities without a weight get no traffic, as in Envoy; if no locality
// has a weight it returns nil and the level is balanced flat.
func (c *Cluster) buildLocalityPicker(hosts []*Host) *picker {
	var keys []localityKey
	groups := map[localityKey][]*Host{}
	weight := map[localityKey]uint32{}
	for _, h := range hosts {
		m := h.meta.Load()
		k := localityKey{m.region, m.zone, m.subZone}
		if _, ok := groups[k]; !ok {
			keys = append(keys, k)
			weight[k] = m.localityWeight
		}
		groups[k] = append(groups[k], h)
	}
	var subs []*picker
	var weights []uint32
	for _, k := range keys {
		if weight[k] == 0 {
			continue
		}
		subs = append(subs, c.flatPicker(groups[k]))
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
// identified by its address.
func dedupe(specs []hostSpec) []hostSpec {
	seen := make(map[netip.AddrPort]struct{}, len(specs))
	out := specs[:0:0]
	for _, s := range specs {
		if _, dup := seen[s.addr]; dup {
			continue
		}
		seen[s.addr] = struct{}{}
		out = append(out, s)
	}
	return out
}

// setHosts publishes a new host set built from specs. Hosts whose address
// was already present keep their *Host (and stats); an update that changes
// nothing keeps the current snapshot (update_no_rebuild).
func (c *Cluster) setHosts(specs []hostSpec) {
	c.updateMu.Lock()
	defer c.updateMu.Unlock()

	old := c.hosts.Load()
	prev := make(map[netip.AddrPort]*Host, len(old.all))
	for _, h := range old.all {
		prev[h.addr] = h
	}
	specs = dedupe(specs)
	all := make([]*Host, 0, len(specs))
	added, same := 0, len(specs) == len(old.all)
	for i, s := range specs {
		h, ok := prev[s.addr]
		if ok {
			delete(prev, s.addr)
			if m := h.meta.Load(); *m != *s.meta {
				h.meta.Store(s.meta)
				same = false
			}
		} else {
			h = newHost(s.addr, s.meta)
			added++
		}
		if same && old.all[i] != h {
			same = false
		}
		all = append(all, h)
	}
	removed := len(prev)
	if same && added == 0 && removed == 0 {
		// Nothing changed: keep the snapshot (and its rotation state).
		c.stats.updateNoRebuild.Add(1)
		return
	}

	hs := c.buildSet(all)
	c.hosts.Store(hs)

	st := &c.stats
	st.membershipTotal.Store(int64(len(all)))
	st.membershipHealthy.Store(int64(hs.healthy))
	st.membershipDegraded.Store(int64(hs.degraded))
	st.membershipExcluded.Store(int64(hs.excluded))
	if added+removed > 0 {
		st.membershipChange.Add(1)
	}
	c.log.Debug().Int("hosts", len(all)).Int("healthy", hs.healthy).
		Int("added", added).Int("removed", removed).Msg("cluster membership updated")
}
