package controlplane

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"sort"
	"time"

	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
)

// The order in which a change reaches the nodes: make before break.
//
// Envoy takes clusters before listeners (the ADS order), ACKs a cluster set
// before warming it, and tolerates a listener whose cluster is missing.
// meshtun's proxy is stricter: it refuses listeners that name a cluster it
// does not have, refuses a cluster set that drops a cluster one of its
// listeners uses, and ACKs a cluster set only once it has the endpoints of
// every EDS cluster in it. And go-control-plane's state-of-the-world ADS
// cache answers an endpoints request only if it names every assignment of
// the snapshot (a routes request likewise). So:
//
//   - a change to the set of cluster names goes out alone, and the next one
//     only once every node has ACKed it (a node still warming the first set
//     asks for its endpoints by the first set's names: were the snapshot's
//     names changed again meanwhile, that request would never be answered,
//     and the node would wait forever);
//   - new clusters go out first, next to those in use, with the listeners
//     of before; the new listeners once every node has ACKed the clusters;
//     clusters no listener uses any more are dropped once every node has
//     ACKed those listeners.
//
// Route configurations (RDS) travel with the listeners: an HTTP listener
// names its route configuration, and a route configuration names clusters
// (validate_clusters is false, so a missing one would not be refused, but
// its requests would fail with 503 NC). They are taken from the same
// configuration as the listeners served, so the routes served are exactly
// those the listeners name (the snapshot is consistent) and name only
// clusters every node has ACKed; clusters are dropped only once every node
// has ACKed the listeners and the routes that no longer use them. A delta
// stream sends only resources that changed: a node whose listeners (or
// routes) did not change in a version never ACKs that version of them, so
// it counts as up to date once it has ACKed the version in which they last
// changed for its class (classChanges).
//
// Changes of content (endpoints, a cluster's settings, the catch-all of a
// listener, allow_any/block_all) go out at once when no change of names is
// under way; a profile change goes out at once even then, in what that
// change still serves from earlier configurations (remesh). A node that has not ACKed within maxStepWait (it NACKs, or
// hangs) does not hold the others back: the next step goes out anyway,
// with a warning naming it.

// maxStepWait bounds each step's wait for the nodes' ACKs.
const maxStepWait = 5 * time.Second

// maxKept bounds the earlier configurations kept as sources of clusters.
const maxKept = 8

// sequence is what is served while the configuration in force, target,
// makes its way to the nodes.
type sequence struct {
	target *generator      // the configuration in force
	lis    *generator      // whose listeners are served
	names  map[string]bool // the cluster names served
	// olds are earlier configurations, newest first: the sources of the
	// served clusters target does not have.
	olds []*generator

	clustersAt  uint64 // the version of the last change of names
	listenersAt uint64 // the version of the last change of lis
	clustersT   time.Time
	listenersT  time.Time
	timer       *time.Timer
}

func (q *sequence) pending() bool {
	if q.target == nil {
		return false
	}
	want := q.target.clusterNames()
	return q.lis != q.target || len(want) != len(q.names) || !subset(want, q.names)
}

func (q *sequence) describe() string {
	if !q.pending() {
		return ""
	}
	switch want := q.target.clusterNames(); {
	case !subset(want, q.names):
		return fmt.Sprintf("new clusters go out once every node has ACKed the clusters of version %d", q.clustersAt)
	case q.lis != q.target:
		return fmt.Sprintf("the new listeners go out once every node has ACKed the clusters of version %d", q.clustersAt)
	}
	return fmt.Sprintf("unused clusters are removed once every node has ACKed the listeners and routes of version %d", q.listenersAt)
}

func subset(a, b map[string]bool) bool {
	for n := range a {
		if !b[n] {
			return false
		}
	}
	return true
}

// rebuild puts the registry and profile in force: their content goes out
// at once, changes of cluster names and listeners in order. Called with
// s.mu held.
func (s *Server) rebuild() {
	q := &s.seq
	next := newGenerator(s.reg, &s.profile.Spec, s.trustDomain)
	if q.target == nil {
		q.target, q.lis, q.names = next, next, next.clusterNames()
		s.push("configuration loaded")
		return
	}
	q.olds = append([]*generator{q.target}, q.olds...)
	if len(q.olds) > maxKept {
		q.olds = q.olds[:maxKept]
	}
	if !slices.Contains(q.olds, q.lis) {
		q.olds = append(q.olds, q.lis)
	}
	q.target = next
	q.remesh()
	if !s.step() {
		s.push("configuration changed")
	}
	if q.pending() {
		s.armTimer()
		s.wake()
	}
}

// remesh puts target's mesh configuration (the profile) into what a
// change of names still serves from earlier configurations: the
// listeners and routes held back, the clusters kept. A profile names no
// cluster — it sets the catch-all (PassthroughCluster or BlackHoleCluster,
// allow_any or block_all), access logs, timeouts — so it is content and
// goes out at once, not after the wait for a lagging node's ACK of the
// change of names under way. An earlier configuration of the same
// registry simply becomes target: with only the profile changed, nothing
// is left to sequence.
func (q *sequence) remesh() {
	next := q.target
	done := map[*generator]*generator{}
	conv := func(g *generator) *generator {
		if g == next || g.mesh == next.mesh {
			return g
		}
		if n, ok := done[g]; ok {
			return n
		}
		n := next
		if g.reg != next.reg {
			n = newGenerator(g.reg, next.mesh, next.trustDomain)
		}
		done[g] = n
		return n
	}
	q.lis = conv(q.lis)
	olds := q.olds[:0]
	for _, g := range q.olds {
		if g = conv(g); g != next && !slices.Contains(olds, g) {
			olds = append(olds, g)
		}
	}
	q.olds = olds
}

// armTimer wakes the sequencer once the current wait may have timed out.
func (s *Server) armTimer() {
	if s.seq.timer != nil {
		s.seq.timer.Stop()
	}
	s.seq.timer = time.AfterFunc(s.stepWait, s.wake)
}

// step takes the next step if the nodes are ready for it (or timed out)
// and reports whether it pushed. Called with s.mu held.
func (s *Server) step() bool {
	q := &s.seq
	if !q.pending() {
		q.olds = nil
		return false
	}
	now := time.Now()
	clustersDone := s.ready("clusters", q.clustersAt, q.clustersT, now, func(e *nodeEntry) bool { return e.clusters < q.clustersAt })
	want := q.target.clusterNames()
	switch {
	case !subset(want, q.names):
		if !clustersDone {
			return false
		}
		for n := range want {
			q.names[n] = true
		}
		q.clustersAt, q.clustersT = s.version+1, now
		s.push("new clusters first")
	case q.lis != q.target:
		if !clustersDone {
			return false
		}
		q.lis = q.target
		q.listenersAt, q.listenersT = s.version+1, now
		s.push("every node has the new clusters: the new listeners")
	default: // clusters to drop
		if !clustersDone || !s.ready("listeners", q.listenersAt, q.listenersT, now, func(e *nodeEntry) bool {
			return e.listeners < s.changes.need(e.node.class(s.reg), resource.ListenerType, q.listenersAt)
		}) || !s.ready("routes", q.listenersAt, q.listenersT, now, func(e *nodeEntry) bool {
			return e.routes < s.changes.need(e.node.class(s.reg), resource.RouteType, q.listenersAt)
		}) {
			return false
		}
		q.names = want
		q.olds = nil
		q.clustersAt, q.clustersT = s.version+1, now
		s.push("every node has the new listeners: unused clusters removed")
	}
	if q.pending() {
		s.armTimer()
	}
	return true
}

// ready reports whether no node is behind on version v of what (or the
// wait for it has timed out, which is logged with the lagging nodes).
func (s *Server) ready(what string, v uint64, since, now time.Time, behind func(*nodeEntry) bool) bool {
	var lag []string
	for id, e := range s.nodes {
		if behind(e) {
			lag = append(lag, id)
		}
	}
	if len(lag) == 0 {
		return true
	}
	if now.Sub(since) < s.stepWait {
		return false
	}
	sort.Strings(lag)
	s.log.Warn().Strs("nodes", lag).Uint64("version", v).Dur("waited", now.Sub(since)).
		Msg("nodes have not ACKed the " + what + "; going on without them")
	return true
}

// sequencer takes the next step whenever a node ACKs or a wait times out,
// outside the stream callbacks, until ctx is done.
func (s *Server) sequencer(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			s.mu.Lock()
			if s.seq.timer != nil {
				s.seq.timer.Stop()
			}
			s.mu.Unlock()
			return
		case <-s.advance:
		}
		s.mu.Lock()
		for s.step() {
		}
		s.mu.Unlock()
	}
}

// served is what a node of class c receives now: lis's listeners and
// routes, and the served cluster names with their endpoints, each from
// target if it has it, else from the newest earlier configuration that
// does.
func (s *Server) served(c nodeClass) *resources {
	q := &s.seq
	r := q.target.forClass(c)
	if q.lis == q.target && len(q.names) == len(q.target.clusterNames()) {
		return r
	}
	out := &resources{Listeners: r.Listeners, Routes: r.Routes}
	if q.lis != q.target {
		l := q.lis.forClass(c)
		out.Listeners, out.Routes = l.Listeners, l.Routes
	}
	left := make(map[string]bool, len(q.names))
	for n := range q.names {
		left[n] = true
	}
	for _, g := range append([]*generator{q.target}, q.olds...) {
		if len(left) == 0 {
			break
		}
		res := r
		if g != q.target {
			res = g.forClass(c)
		}
		takeClusters(out, res, left)
	}
	sort.Slice(out.Clusters, func(i, j int) bool { return out.Clusters[i].GetName() < out.Clusters[j].GetName() })
	sort.Slice(out.Endpoints, func(i, j int) bool { return out.Endpoints[i].GetClusterName() < out.Endpoints[j].GetClusterName() })
	return out
}

// takeClusters moves the clusters of from named in left, with their
// assignments, to out.
func takeClusters(out, from *resources, left map[string]bool) {
	cla := make(map[string]*endpointv3.ClusterLoadAssignment, len(from.Endpoints))
	for _, e := range from.Endpoints {
		cla[e.GetClusterName()] = e
	}
	for _, cl := range from.Clusters {
		if !left[cl.GetName()] {
			continue
		}
		delete(left, cl.GetName())
		out.Clusters = append(out.Clusters, cl)
		if e := cla[cl.GetEdsClusterConfig().GetServiceName()]; e != nil {
			out.Endpoints = append(out.Endpoints, e)
		}
	}
}

// snapshot builds the current version's snapshot for class c.
func (s *Server) snapshot(c nodeClass) *cachev3.Snapshot {
	r := s.served(c)
	res := map[resource.Type][]types.Resource{
		resource.ListenerType: make([]types.Resource, 0, len(r.Listeners)),
		resource.ClusterType:  make([]types.Resource, 0, len(r.Clusters)),
		resource.EndpointType: make([]types.Resource, 0, len(r.Endpoints)),
		resource.RouteType:    make([]types.Resource, 0, len(r.Routes)),
	}
	for _, l := range r.Listeners {
		res[resource.ListenerType] = append(res[resource.ListenerType], l)
	}
	for _, cl := range r.Clusters {
		res[resource.ClusterType] = append(res[resource.ClusterType], cl)
	}
	for _, e := range r.Endpoints {
		res[resource.EndpointType] = append(res[resource.EndpointType], e)
	}
	for _, rc := range r.Routes {
		res[resource.RouteType] = append(res[resource.RouteType], rc)
	}
	snap, err := cachev3.NewSnapshot(s.versionString(), res)
	if err == nil {
		// Every EDS cluster has exactly its assignment, every RDS
		// listener exactly its route configuration.
		err = snap.Consistent()
	}
	if err == nil {
		// Built now, under s.mu, so that nodes sharing the snapshot never
		// race to build it inside the cache.
		err = snap.ConstructVersionMap()
	}
	if err != nil {
		// The generator gives every EDS cluster its assignment and every
		// HTTP listener its routes: a bug.
		panic(fmt.Sprintf("controlplane: snapshot: %v", err))
	}
	return snap
}

// classChanges records, per node class, the listeners and routes last
// served and the version in which each last changed.
type classChanges map[nodeClass]*servedTypes

type servedTypes struct {
	hashes map[resource.Type]map[string]string // resource name -> content hash
	at     map[resource.Type]uint64
}

var trackedTypes = []resource.Type{resource.ListenerType, resource.RouteType}

// note records snap, version v's snapshot of class c.
func (ch classChanges) note(c nodeClass, v uint64, snap *cachev3.Snapshot) {
	st := ch[c]
	if st == nil {
		st = &servedTypes{hashes: map[resource.Type]map[string]string{}, at: map[resource.Type]uint64{}}
		ch[c] = st
	}
	for _, typ := range trackedTypes {
		h := snap.GetVersionMap(typ)
		if old, seen := st.hashes[typ]; !seen || !maps.Equal(old, h) {
			st.hashes[typ], st.at[typ] = h, v
		}
	}
}

// need is the version of typ a node of class c must have ACKed to be up to
// date with version v: v, or the earlier version in which typ last changed
// for c. With no resource of typ (no HTTP port: no routes) nothing is
// needed: nothing the node has of that type is in use.
func (ch classChanges) need(c nodeClass, typ resource.Type, v uint64) uint64 {
	st := ch[c]
	if st == nil {
		return v
	}
	if len(st.hashes[typ]) == 0 {
		return 0
	}
	return min(v, st.at[typ])
}
