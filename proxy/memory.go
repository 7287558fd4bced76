package proxy

import (
	"runtime/debug"

	"github.com/meshtun/meshtun/xdsclient"
)

// releaseThreshold is how many resources an xDS update must add, change
// or remove for the proxy to hand the memory its build freed back to the
// OS at once. Building a large configuration (10,000 services: ~100 MB
// kept) leaves as much garbage again, which the Go runtime would keep
// mapped as headroom (GOGC) and return only slowly: RSS stayed at 2.4
// times the configuration's size. Small updates (an endpoint moving,
// Istio's usual push) leave little and do not pay for a full collection.
const releaseThreshold = 1000

// releaseAfterUpdate returns freed memory to the OS when next differs
// from prev by at least releaseThreshold resources. Resources that did
// not change keep their pointers from one Resources to the next
// (xdsclient.Resources), so counting changes is map lookups, no
// comparison of messages.
func releaseAfterUpdate(prev, next *xdsclient.Resources) {
	if changedResources(prev, next) >= releaseThreshold {
		debug.FreeOSMemory()
	}
}

// changedResources counts the resources of next that prev lacks or holds
// in another version, and those prev has and next lacks.
func changedResources(prev, next *xdsclient.Resources) int {
	if prev == nil {
		prev = &xdsclient.Resources{}
	}
	return changed(prev.Listeners, next.Listeners) + changed(prev.Clusters, next.Clusters) +
		changed(prev.Endpoints, next.Endpoints) + changed(prev.Routes, next.Routes)
}

func changed[M comparable](prev, next map[string]M) int {
	n := 0
	for name, m := range next {
		if old, ok := prev[name]; !ok || old != m {
			n++
		}
	}
	for name := range prev {
		if _, ok := next[name]; !ok {
			n++
		}
	}
	return n
}
