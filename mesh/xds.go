package mesh

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"

	"github.com/meshtun/meshtun/mesh/stats"
	"github.com/meshtun/meshtun/xdsclient"
)

// XDSApplier installs what the xDS client delivers: the bootstrap's static
// resources plus the dynamic ones, validated into a new snapshot built off
// the hot path and swapped in whole. Every resource is validated on its
// own (EDS assignments included) and every invalid one is named in the
// xdsclient.ResourceErrors returned, with nothing live changed: the
// client then applies the update again with those resources at their
// last accepted version and NACKs naming them. A static resource that
// fails rejects the whole update with a plain error.
type XDSApplier struct {
	Server          *Server
	StaticListeners []*listenerv3.Listener
	StaticClusters  []*clusterv3.Cluster
	// Options are the build options. Options.Stats, the stats store, is
	// created on the first Apply when nil (or taken from the snapshot in
	// force) and kept by Adopt across a bootstrap reload.
	Options   BuildOptions
	OnApplied func(*Snapshot) // optional, after a successful swap
	// DrainDuration is how long flows on a removed or changed listener may
	// go on (Istio's drainDuration, 45 s by default).
	DrainDuration time.Duration
	// StaticDump is the bootstrap's part of /config_dump (StaticDump).
	StaticDump *Dump

	mu  sync.Mutex // one Apply at a time
	rec recorder
	// draining are the snapshots replaced while listeners of theirs
	// still drain: the stats blocks they count into are kept until then.
	draining []drainingSnapshot
}

type drainingSnapshot struct {
	snap  *Snapshot
	until time.Time
}

var _ xdsclient.Applier = (*XDSApplier)(nil)

// Apply implements xdsclient.Applier.
func (a *XDSApplier) Apply(ctx context.Context, r *xdsclient.Resources) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	listeners := append([]*listenerv3.Listener(nil), a.StaticListeners...)
	dynListeners := make(map[string]bool, len(r.Listeners))
	for _, name := range sortedKeys(r.Listeners) {
		listeners = append(listeners, r.Listeners[name])
		dynListeners[name] = true
	}
	clusters := append([]*clusterv3.Cluster(nil), a.StaticClusters...)
	dynamic := make(map[string]bool, len(r.Clusters))
	for _, name := range sortedKeys(r.Clusters) {
		clusters = append(clusters, r.Clusters[name])
		dynamic[name] = true
	}
	prev := a.Server.D.Snapshot()
	if a.Options.Stats == nil {
		if prev != nil {
			a.Options.Stats = prev.store
		} else {
			a.Options.Stats = stats.New()
		}
	}
	now := time.Now()
	// The dump is computed for the state this update would put in force
	// and is part of the snapshot; the recorder itself moves on only if
	// the snapshot is swapped in.
	rec := recorder{prev: a.rec.prev, draining: append([]Record(nil), a.rec.draining...)}
	opts := a.Options
	opts.DynamicClusters = dynamic
	opts.DynamicListeners = dynListeners
	opts.Routes = r.Routes
	opts.Endpoints = r.Endpoints
	opts.Dump = rec.next(a.StaticDump, r, a.DrainDuration, now)
	version := "static"
	if len(r.Versions) > 0 {
		version = fmt.Sprintf("cds:%s lds:%s", r.Versions[xdsclient.ClusterType], r.Versions[xdsclient.ListenerType])
	}
	snap, err := Build(version, listeners, clusters, prev, opts)
	if err != nil {
		return err
	}
	if err := a.Server.Apply(snap); err != nil {
		snap.Retire(prev)
		return err
	}
	a.rec = rec
	if p := opts.Pools; p != nil {
		// Pools of clusters that are gone drain (a replaced cluster's
		// pool is replaced on its next request).
		p.Retain(func(name string) bool { return snap.Clusters[name] != nil })
	}
	if prev != nil {
		if prev.Drain(snap, a.DrainDuration) > 0 && a.DrainDuration > 0 {
			a.draining = append(a.draining, drainingSnapshot{prev, now.Add(a.DrainDuration)})
		}
		prev.Retire(snap)
	}
	a.sweep(snap, now)
	if a.OnApplied != nil {
		a.OnApplied(snap)
	}
	return nil
}

// sweep drops from the stats store the blocks that neither snap nor a
// snapshot whose listeners still drain counts into, as Envoy frees the
// stats of a removed cluster or listener: a store that only grew would
// keep a block for every name ever configured. A cluster or listener
// removed and added back later starts from 0, as in Envoy.
func (a *XDSApplier) sweep(snap *Snapshot, now time.Time) {
	kept := a.draining[:0]
	for _, d := range a.draining {
		if now.Before(d.until) {
			kept = append(kept, d)
		}
	}
	clear(a.draining[len(kept):])
	a.draining = kept
	used := make([][]stats.Key, 0, 1+len(a.draining))
	used = append(used, snap.Scopes())
	for _, d := range a.draining {
		used = append(used, d.snap.Scopes())
	}
	snap.store.RetainUsed(used...)
}

// Adopt carries over what old recorded of the resources in force (their
// versions and update times, the listeners draining) and its stats store,
// for an applier that replaces old after a bootstrap reload.
func (a *XDSApplier) Adopt(old *XDSApplier) {
	old.mu.Lock()
	defer old.mu.Unlock()
	a.mu.Lock()
	defer a.mu.Unlock()
	a.rec = recorder{prev: old.rec.prev, draining: append([]Record(nil), old.rec.draining...)}
	a.draining = append([]drainingSnapshot(nil), old.draining...)
	if a.Options.Stats == nil {
		a.Options.Stats = old.Options.Stats
	}
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
