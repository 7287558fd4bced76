package proxy

import (
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"

	"github.com/meshtun/meshtun/xdsclient"
)

// changedResources counts what an update adds, replaces or removes, by
// pointer: a resource carried over unchanged keeps its pointer and is not
// counted, so routine pushes stay below the release threshold.
func TestChangedResources(t *testing.T) {
	a, b, c := &listenerv3.Listener{Name: "a"}, &listenerv3.Listener{Name: "b"}, &clusterv3.Cluster{Name: "c"}
	prev := &xdsclient.Resources{
		Listeners: map[string]*listenerv3.Listener{"a": a, "b": b},
		Clusters:  map[string]*clusterv3.Cluster{"c": c},
	}
	same := &xdsclient.Resources{Listeners: prev.Listeners, Clusters: map[string]*clusterv3.Cluster{"c": c}}
	if n := changedResources(prev, same); n != 0 {
		t.Errorf("an update carrying everything over: %d changed, want 0", n)
	}
	next := &xdsclient.Resources{
		Listeners: map[string]*listenerv3.Listener{"a": a, "b": {Name: "b"}, "new": {Name: "new"}},
	}
	// b replaced, new added, c removed.
	if n := changedResources(prev, next); n != 3 {
		t.Errorf("%d changed, want 3 (b replaced, new added, c removed)", n)
	}
	if n := changedResources(nil, next); n != 3 {
		t.Errorf("first update: %d changed, want its 3 resources", n)
	}
}
