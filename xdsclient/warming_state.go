package xdsclient

import (
	"time"

	"google.golang.org/protobuf/proto"
)

// WarmingResource is a listener or cluster the control plane sent that is not
// in force yet: it waits for the route configurations or endpoints it names
// (Envoy's warming state, shown in the admin /config_dump).
type WarmingResource struct {
	Msg     proto.Message
	Version string    // version_info of the response it came in (delta: system_version_info)
	Since   time.Time // when this version arrived
}

// Warming are the resources warming on the current stream, by name.
type Warming struct {
	Listeners map[string]WarmingResource
	Clusters  map[string]WarmingResource
}

// Warming returns the listeners and clusters received but still warming, or nil
// when nothing warms. It is safe to call from any goroutine.
func (c *Client) Warming() *Warming { return c.warming.Load() }

// publishWarming recomputes what warms after the session's state changed: the
// primary resources of a pending lane whose received message is not the one in
// force. A resource keeps the time it started warming while its message stays
// the same. Runs on the session goroutine.
func (s *session) publishWarming() {
	prev := s.c.warming.Load()
	acc := s.c.current()
	// Counted first, so that the maps are made at their size: filling a map
	// of 10,000 warming clusters or listeners (a big push, while it waits
	// for its endpoints) by growth left ~13 MB of garbage behind.
	var count [numKinds]int
	for i := range s.lanes {
		ln := &s.lanes[i]
		if !ln.pending {
			continue
		}
		k := ln.primary
		for name, e := range s.recv[k] {
			if a := acc.entries[k][name]; a == nil || a.msg != e.msg {
				count[k]++
			}
		}
	}
	var w *Warming
	if count[kindListener]+count[kindCluster] > 0 {
		w = &Warming{Listeners: make(map[string]WarmingResource, count[kindListener]), Clusters: make(map[string]WarmingResource, count[kindCluster])}
		now := time.Now()
		for i := range s.lanes {
			ln := &s.lanes[i]
			if !ln.pending {
				continue
			}
			k := ln.primary
			dst, old := w.Clusters, prev.clusters()
			if k == kindListener {
				dst, old = w.Listeners, prev.listeners()
			}
			for name, e := range s.recv[k] {
				if a := acc.entries[k][name]; a != nil && a.msg == e.msg {
					continue // in force
				}
				// As Envoy's dump: the version_info of the response it came in
				// (delta: system_version_info), like the active state's.
				r := WarmingResource{Msg: e.msg, Version: s.recvVersion[k], Since: now}
				if o, ok := old[name]; ok && o.Msg == e.msg {
					r.Since = o.Since
				}
				dst[name] = r
			}
		}
	}
	if w != nil || prev != nil {
		s.c.warming.Store(w)
	}
}

func (w *Warming) listeners() map[string]WarmingResource {
	if w == nil {
		return nil
	}
	return w.Listeners
}

func (w *Warming) clusters() map[string]WarmingResource {
	if w == nil {
		return nil
	}
	return w.Clusters
}
