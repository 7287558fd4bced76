package mesh

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"

	"github.com/meshtun/meshtun/xdsclient"
)

// XDSApplier installs what the xDS client delivers: the bootstrap's static
// resources plus the dynamic ones, validated into a new snapshot built off
// the hot path and swapped in. A build or bind error is returned, which
// the client turns into a NACK; the snapshot in force keeps serving.
type XDSApplier struct {
	Server          *Server
	StaticListeners []*listenerv3.Listener
	StaticClusters  []*clusterv3.Cluster
	Options         BuildOptions
	OnApplied       func(*Snapshot) // optional, after a successful swap
	// DrainDuration is how long flows on a removed or changed listener may
	// go on (Istio's drainDuration, 45 s by default).
	DrainDuration time.Duration
	// StaticDump is the bootstrap's part of /config_dump (StaticDump).
	StaticDump *Dump

	mu  sync.Mutex // one Apply at a time
	rec recorder
}

var _ xdsclient.Applier = (*XDSApplier)(nil)

// Apply implements xdsclient.Applier.
func (a *XDSApplier) Apply(ctx context.Context, r *xdsclient.Resources) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	listeners := append([]*listenerv3.Listener(nil), a.StaticListeners...)
	for _, name := range sortedKeys(r.Listeners) {
		listeners = append(listeners, r.Listeners[name])
	}
	clusters := append([]*clusterv3.Cluster(nil), a.StaticClusters...)
	dynamic := make(map[string]bool, len(r.Clusters))
	for _, name := range sortedKeys(r.Clusters) {
		clusters = append(clusters, r.Clusters[name])
		dynamic[name] = true
	}
	opts := a.Options
	opts.DynamicClusters = dynamic
	opts.Routes = r.Routes
	prev := a.Server.D.Snapshot()
	version := "static"
	if len(r.Versions) > 0 {
		version = fmt.Sprintf("cds:%s lds:%s", r.Versions[xdsclient.ClusterType], r.Versions[xdsclient.ListenerType])
	}
	snap, err := Build(version, listeners, clusters, prev, opts)
	if err != nil {
		return err
	}
	// Endpoints: EDS clusters take their assignment (an unchanged one is a
	// no-op for a cluster carried over from prev).
	for _, pb := range clusters {
		if pb.GetType() != clusterv3.Cluster_EDS {
			continue
		}
		svc := pb.GetEdsClusterConfig().GetServiceName()
		if svc == "" {
			svc = pb.GetName()
		}
		if cla := r.Endpoints[svc]; cla != nil {
			if err := snap.Clusters[pb.GetName()].UpdateEndpoints(cla); err != nil {
				snap.Retire(prev)
				return err
			}
		}
	}
	// The dump is recorded only for a state that will be in force; a
	// rejected one leaves the recorder as it was.
	rec := recorder{prev: a.rec.prev, draining: append([]Record(nil), a.rec.draining...)}
	snap.Dump = rec.next(a.StaticDump, r, a.DrainDuration, time.Now())
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
		prev.Drain(snap, a.DrainDuration)
		prev.Retire(snap)
	}
	if a.OnApplied != nil {
		a.OnApplied(snap)
	}
	return nil
}

// Adopt carries over what old recorded of the resources in force (their
// versions and update times, the listeners draining), for an applier that
// replaces old after a bootstrap reload.
func (a *XDSApplier) Adopt(old *XDSApplier) {
	old.mu.Lock()
	defer old.mu.Unlock()
	a.mu.Lock()
	defer a.mu.Unlock()
	a.rec = recorder{prev: old.rec.prev, draining: append([]Record(nil), old.rec.draining...)}
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
