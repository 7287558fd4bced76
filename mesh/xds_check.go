package mesh

import (
	"context"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"

	"github.com/meshtun/meshtun/xdsclient"
)

// Check validates the configuration made of the given static resources
// and r as Apply would, and puts nothing in force: the snapshot it builds
// is retired at once. The proxy checks a configuration whole before it
// puts in force only the part whose secrets have arrived, so that a
// resource warming on a secret is rejected (NACKed) when it arrives, as
// Envoy rejects it, not later when nobody can be told. The error is what
// Apply would return (xdsclient.ResourceErrors for xDS resources).
func (a *XDSApplier) Check(ctx context.Context, staticListeners []*listenerv3.Listener, staticClusters []*clusterv3.Cluster, r *xdsclient.Resources) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	listeners := append([]*listenerv3.Listener(nil), staticListeners...)
	dynListeners := make(map[string]bool, len(r.Listeners))
	for _, name := range sortedKeys(r.Listeners) {
		listeners = append(listeners, r.Listeners[name])
		dynListeners[name] = true
	}
	clusters := append([]*clusterv3.Cluster(nil), staticClusters...)
	dynamic := make(map[string]bool, len(r.Clusters))
	for _, name := range sortedKeys(r.Clusters) {
		clusters = append(clusters, r.Clusters[name])
		dynamic[name] = true
	}
	prev := a.Server.D.Snapshot()
	opts := a.Options
	if opts.Stats == nil && prev != nil {
		opts.Stats = prev.store
	}
	opts.DynamicClusters = dynamic
	opts.DynamicListeners = dynListeners
	opts.Routes = r.Routes
	opts.Endpoints = r.Endpoints
	opts.Dump = nil
	snap, err := Build("check", listeners, clusters, prev, opts)
	if err != nil {
		return err
	}
	snap.Retire(prev)
	return nil
}
