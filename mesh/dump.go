package mesh

import (
	"sort"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	"google.golang.org/protobuf/proto"

	"github.com/meshtun/meshtun/xdsclient"
)

// Record is one resource as the admin /config_dump shows it: the message
// as received (telemetry filters meshtun skips included), the version it
// arrived in and when it last changed.
type Record struct {
	Name        string
	Version     string
	LastUpdated time.Time
	Msg         proto.Message
	// DrainUntil is set on a listener removed or changed by an update: it
	// is dumped in draining_state until then.
	DrainUntil time.Time
}

// Dump is the configuration of a snapshot as received. It is immutable
// once the snapshot is swapped in.
type Dump struct {
	StaticListeners, StaticClusters, StaticEndpoints []Record
	// Dynamic (xDS) resources in force, sorted by name.
	Listeners, Clusters, Routes, Endpoints []Record
	DrainingListeners                      []Record
	// Versions are the last accepted version_info by type URL.
	Versions map[string]string
}

// StaticDump records the bootstrap's static resources, loaded at t.
func StaticDump(listeners []*listenerv3.Listener, clusters []*clusterv3.Cluster, t time.Time) *Dump {
	d := &Dump{}
	for _, l := range listeners {
		d.StaticListeners = append(d.StaticListeners, Record{Name: l.GetName(), LastUpdated: t, Msg: l})
	}
	for _, c := range clusters {
		d.StaticClusters = append(d.StaticClusters, Record{Name: c.GetName(), LastUpdated: t, Msg: c})
		if la := c.GetLoadAssignment(); la != nil {
			d.StaticEndpoints = append(d.StaticEndpoints, Record{Name: c.GetName(), LastUpdated: t, Msg: la})
		}
	}
	return d
}

// recorder turns successive accepted xDS states into Dumps: a resource
// keeps the version and time it last changed, as in Envoy's dump.
type recorder struct {
	prev     map[string][]Record // by type URL: the last dump's records, sorted by name
	draining []Record
}

func (r *recorder) next(static *Dump, res *xdsclient.Resources, drain time.Duration, now time.Time) *Dump {
	d := &Dump{Versions: make(map[string]string, len(res.Versions))}
	if static != nil {
		d.StaticListeners, d.StaticClusters, d.StaticEndpoints = static.StaticListeners, static.StaticClusters, static.StaticEndpoints
	}
	for k, v := range res.Versions {
		d.Versions[k] = v
	}
	cur := make(map[string][]Record, 4)
	d.Listeners = track(r, cur, xdsclient.ListenerType, res.Listeners, res.Versions[xdsclient.ListenerType], now)
	d.Clusters = track(r, cur, xdsclient.ClusterType, res.Clusters, res.Versions[xdsclient.ClusterType], now)
	d.Routes = track(r, cur, xdsclient.RouteType, res.Routes, res.Versions[xdsclient.RouteType], now)
	d.Endpoints = track(r, cur, xdsclient.EndpointType, res.Endpoints, res.Versions[xdsclient.EndpointType], now)

	// Listeners removed or changed drain for the drain duration.
	kept := r.draining[:0]
	for _, rec := range r.draining {
		if now.Before(rec.DrainUntil) {
			kept = append(kept, rec)
		}
	}
	r.draining = kept
	for _, old := range r.prev[xdsclient.ListenerType] {
		if n, ok := findRecord(d.Listeners, old.Name); !ok || n.LastUpdated != old.LastUpdated {
			old.DrainUntil = now.Add(drain)
			r.draining = append(r.draining, old)
		}
	}
	d.DrainingListeners = append([]Record(nil), r.draining...)
	sortRecords(d.DrainingListeners)
	r.prev = cur
	return d
}

// track records the resources of one type: one unchanged since the last
// state (the same message, or an equal one re-sent by a state-of-the-world
// server) keeps its version and time. The previous state is the last
// dump's sorted records, searched by name: no map beside them (one per
// type was ~6 MB at 10,000 services). When every message of the type is
// the one recorded last time (the xDS client keeps an unchanged resource's
// pointer), the last records are the answer as they are: the listener
// update of a 10,000-service push re-recorded 10,000 clusters and 10,000
// assignments, sorting them again, for nothing.
func track[M proto.Message](r *recorder, cur map[string][]Record, typ string, in map[string]M, version string, now time.Time) []Record {
	old := r.prev[typ]
	if sameRecords(old, in) {
		cur[typ] = old
		return old
	}
	out := make([]Record, 0, len(in))
	for name, msg := range in {
		rec, ok := findRecord(old, name)
		if !ok || (rec.Msg != proto.Message(msg) && !proto.Equal(rec.Msg, msg)) {
			rec = Record{Name: name, Version: version, LastUpdated: now}
		}
		rec.Msg = msg
		out = append(out, rec)
	}
	sortRecords(out)
	cur[typ] = out
	return out
}

// sameRecords reports whether in holds exactly the messages recorded in
// old, by name and pointer.
func sameRecords[M proto.Message](old []Record, in map[string]M) bool {
	if len(old) != len(in) {
		return false
	}
	for _, rec := range old {
		msg, ok := in[rec.Name]
		if !ok || proto.Message(msg) != rec.Msg {
			return false
		}
	}
	return true
}

// findRecord finds name in rs, sorted by name.
func findRecord(rs []Record, name string) (Record, bool) {
	i := sort.Search(len(rs), func(i int) bool { return rs[i].Name >= name })
	if i < len(rs) && rs[i].Name == name {
		return rs[i], true
	}
	return Record{}, false
}

func sortRecords(rs []Record) {
	sort.Slice(rs, func(i, j int) bool { return rs[i].Name < rs[j].Name })
}
