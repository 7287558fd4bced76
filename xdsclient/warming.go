package xdsclient

import (
	"maps"
	"time"

	"google.golang.org/protobuf/proto"
)

// lane is one warming pipeline: a primary kind whose resources cannot be used until
// the resources of a dependent kind they name have arrived (clusters wait for their
// endpoints, listeners for their route configurations). The two lanes are applied
// independently, as Envoy's cluster manager and listener manager are.
type lane struct {
	primary, dep kind
	// pending: a primary update arrived and is neither applied nor rejected yet;
	// while its dependencies are missing, it is warming.
	pending bool
	// held are the responses waiting for the ACK or NACK of the state they belong to.
	held []held
}

// handle processes one response: decode, merge into the server's view, subscribe
// to what it references, then let its lane apply what is complete.
func (s *session) handle(r *response) {
	s.c.stats.attempts.Add(1)
	k := r.kind
	ln := s.laneOf(k)
	h := held{kind: k, nonce: r.nonce, version: r.version}
	decoded, err := decode(r)
	// The raw resources (each an Any holding a copy of its wire bytes: ~10
	// MB for 10,000 listeners) are not needed once decoded: dropping them
	// here lets the collector take them while the update is applied,
	// instead of keeping them beside the build through Apply.
	clear(r.resources)
	r.resources = nil
	if err != nil {
		s.reject([]held{h}, err)
		if k == kindCluster {
			s.cdsResolved = true
			s.maybeStartListeners()
		}
		return
	}
	s.merge(ln, r, decoded)
	s.recvVersion[k] = r.version
	s.seen[k] = true
	ln.held = append(ln.held, h)
	if k == ln.primary {
		ln.pending = true
		s.resubscribe(ln)
	}
	s.step(ln)
	s.maybeStartListeners()
	s.publishWarming()
}

// merge applies a decoded response to the server's view of its kind. An entry whose
// resource did not change is kept, so unchanged resources keep their pointers.
func (s *session) merge(ln *lane, r *response, decoded []namedEntry) {
	k := r.kind
	cur := s.recv[k]
	wildcard := k == ln.primary
	if wildcard && !r.delta { // SotW LDS/CDS: the response is the whole set
		next := make(entries, len(decoded))
		for _, d := range decoded {
			if e := reuse(cur[d.name], d.entry); e != nil {
				next[d.name] = e
			}
		}
		s.recv[k] = next
		return
	}
	for _, d := range decoded {
		if d.entry == nil || (!wildcard && !s.subs[k][d.name]) {
			continue // heartbeat, or no longer subscribed
		}
		cur[d.name] = reuse(cur[d.name], d.entry)
		// Arrived: its initial fetch timer has nothing left to do for it,
		// and is stopped once nothing of its batch waits.
		s.fetched(k, d.name)
	}
	for _, name := range r.removed {
		switch {
		case wildcard:
			delete(cur, name)
		case s.subs[k][name]:
			// Envoy treats a removed assignment or route configuration that is
			// still referenced as empty.
			cur[name] = synthesized(k, name)
		}
	}
}

// reuse returns the entry to keep for a resource that arrived as e: old if nothing
// changed (old for a heartbeat, e == nil), else e, sharing old's message if equal.
func reuse(old, e *entry) *entry {
	if e == nil {
		return old
	}
	if old == nil || !proto.Equal(old.msg, e.msg) {
		return e
	}
	if old.version == e.version {
		return old
	}
	return &entry{msg: old.msg, version: e.version, refs: old.refs}
}

func synthesized(k kind, name string) *entry {
	return &entry{msg: kinds[k].empty(name), synth: true}
}

// wanted returns the dependent names a lane needs: those referenced by the primary
// resources the server sent and by the accepted ones (still in use while an update
// warms). The map is made at the size it will most likely have (a cluster
// names one assignment; a listener usually at most one route configuration):
// grown from empty to 10,000 names it left ~2 MB of garbage per big push.
func (s *session) wanted(ln *lane) map[string]bool {
	want := make(map[string]bool, max(len(s.recv[ln.primary]), len(s.c.current().entries[ln.primary])))
	for _, es := range []entries{s.recv[ln.primary], s.c.current().entries[ln.primary]} {
		for _, e := range es {
			for _, r := range e.refs {
				want[r] = true
			}
		}
	}
	return want
}

// resubscribe makes the dependent subscription of ln exactly what it needs,
// forgetting names no longer referenced and starting the initial fetch timer of
// names that have not arrived.
func (s *session) resubscribe(ln *lane) {
	dep := ln.dep
	want := s.wanted(ln)
	if maps.Equal(want, s.subs[dep]) {
		return
	}
	s.subs[dep] = want
	for name := range s.recv[dep] {
		if !want[name] {
			delete(s.recv[dep], name)
		}
	}
	for name := range s.fetchTimers[dep] {
		if !want[name] {
			s.fetched(dep, name)
		}
	}
	if d := s.c.cfg.InitialFetchTimeout; d > 0 {
		var missing []string
		for name := range want {
			if s.recv[dep][name] == nil && s.fetchTimers[dep][name] == nil {
				missing = append(missing, name)
			}
		}
		if len(missing) > 0 {
			s.startFetchTimer(dep, missing, d)
		}
	}
	s.request(dep)
}

// fetchBatch is the initial fetch timer of the names of one kind subscribed
// together: one timer, not one per name (10,000 of them, a timer and a
// closure each, were 40 ms of a 10,000-service push's way to its EDS
// request). left counts the names still waiting on it.
type fetchBatch struct {
	t    *time.Timer
	left int
}

// fetched takes name off its initial fetch timer (it arrived or is no longer
// wanted), stopping the timer once none of its names waits.
func (s *session) fetched(k kind, name string) {
	b := s.fetchTimers[k][name]
	if b == nil {
		return
	}
	delete(s.fetchTimers[k], name)
	if b.left--; b.left == 0 {
		b.t.Stop()
	}
}

func (s *session) startFetchTimer(dep kind, names []string, d time.Duration) {
	b := &fetchBatch{left: len(names)}
	b.t = s.after(d, func() {
		late := false
		for _, name := range names {
			if s.fetchTimers[dep][name] != b {
				continue // arrived, no longer wanted, or in a later batch
			}
			delete(s.fetchTimers[dep], name)
			if !s.subs[dep][name] || s.recv[dep][name] != nil {
				continue
			}
			s.log.Warn().Str("type", kinds[dep].url).Str("name", name).Dur("initial_fetch_timeout", d).
				Msg("xds: resource did not arrive in time, using an empty one")
			s.recv[dep][name] = synthesized(dep, name)
			late = true
		}
		b.left = 0
		if late {
			s.step(s.laneOf(dep))
			s.maybeStartListeners()
			s.publishWarming()
		}
	})
	for _, name := range names {
		s.fetchTimers[dep][name] = b
	}
}

// deps collects the dependent entries the given primary resources refer to. In
// strict mode a missing one makes the set incomplete (the update keeps warming);
// otherwise the accepted entry, or an empty resource, stands in.
func (s *session) deps(ln *lane, primary entries, strict bool) (entries, bool) {
	out := entries{}
	acc := s.c.current()
	for _, e := range primary {
		for _, r := range e.refs {
			if d := s.recv[ln.dep][r]; d != nil {
				out[r] = d
				continue
			}
			if strict {
				return nil, false
			}
			if d := acc.entries[ln.dep][r]; d != nil {
				out[r] = d
			} else {
				out[r] = synthesized(ln.dep, r)
			}
		}
	}
	return out, true
}

// step applies whatever the lane can apply now:
//   - a pending primary update whose dependencies are all present is applied with
//     them, and every held response of the lane is ACKed or NACKed by the result;
//   - otherwise, dependent responses are applied to the accepted primary set (an
//     endpoint update for a running cluster need not wait for a warming one). If
//     they change nothing running (their data is only for warming resources), they
//     are ACKed at once so that the server, which sends one response per type at a
//     time, can send the rest; the data is used when the warming update completes.
func (s *session) step(ln *lane) {
	// As Envoy does, a listener update waits while a cluster update warms:
	// it may name clusters that arrive with it, and applying it against
	// the clusters in force would reject a valid configuration.
	clustersWarming := ln.primary == kindListener && s.lanes[0].pending
	if ln.pending && !clustersWarming {
		if deps, ok := s.deps(ln, s.recv[ln.primary], true); ok {
			hs := ln.held
			ln.held, ln.pending = nil, false
			if ln.primary == kindCluster {
				s.cdsResolved = true
			}
			s.apply(ln, maps.Clone(s.recv[ln.primary]), deps, hs)
			if ln.primary == kindCluster {
				s.step(&s.lanes[1]) // a listener update held for these clusters
			}
			return
		}
	}
	var depHeld, rest []held
	for _, h := range ln.held {
		if h.kind == ln.dep {
			depHeld = append(depHeld, h)
		} else {
			rest = append(rest, h)
		}
	}
	if len(depHeld) == 0 {
		return
	}
	ln.held = rest
	deps, _ := s.deps(ln, s.c.current().entries[ln.primary], false)
	s.apply(ln, nil, deps, depHeld)
}
