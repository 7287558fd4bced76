package xdsclient

import (
	"maps"
	"slices"
	"strings"
	"time"
)

// maxApplyRounds bounds how often one update goes to the Applier: as it came, then
// repaired (each rejected resource put back at its accepted version) for as long as
// the Applier names resources it had not named before. An Applier names every
// invalid resource at once, so a second repair is rare (a resource that was valid
// only next to a rejected one) and a third rarer still.
const maxApplyRounds = 4

// nackRepeat spaces out identical NACKs. A state-of-the-world server that answers a
// NACK by resending the rejected version at once (go-control-plane's snapshot cache
// does) would otherwise loop with the client as fast as the network allows.
type nackRepeat struct {
	version, msg string
	count        int
	timer        *time.Timer
	acks         []held
	err          error
}

// apply installs the lane's new state through the Applier and ACKs or NACKs hs by
// its verdict. primary is nil when only dependent resources change.
//
// The Applier judges each resource on its own (gRFC A46, Envoy): when it names the
// invalid ones (ResourceErrors), the update is applied without them, each rejected
// resource at its accepted version, absent if it has none, or, for an assignment or
// route configuration a primary resource still needs, empty as after the initial
// fetch timeout. The responses of a kind with rejected resources are NACKed with
// their errors, the others ACKed; the rejected resources are forgotten from the
// server's view so that no later update offers them again. Any other error rejects
// the whole update and leaves the server's view as it is.
func (s *session) apply(ln *lane, primary, deps entries, hs []held) {
	u := newUpdate(ln, s.c.current(), primary, deps)
	acc := u.acc
	var nacks map[kind]ResourceErrors
	for round := 1; ; round++ {
		nacks = u.nacks(hs)
		repl := map[kind]entries{ln.dep: u.curDeps}
		if primary != nil {
			repl[ln.primary] = u.curPrimary
		}
		next, resChanged, verChanged := acc.with(repl, s.versions(u, hs, nacks))
		primaryACKed := primary != nil && nacks[ln.primary] == nil
		if !resChanged && !(primary != nil && verChanged) && !(primaryACKed && !acc.applied) {
			// Nothing to install: a resend after a reconnect, or an update whose
			// every change was rejected. Keep the entries, whose per-resource
			// versions may be newer.
			if primary != nil {
				s.c.accepted.Store(next)
			}
			break
		}
		err := s.c.applier.Apply(s.ctx, next.res)
		if err == nil {
			next.applied = true
			s.c.accepted.Store(next)
			s.logApplied(ln, primary != nil, next)
			break
		}
		es, ok := AsResourceErrors(err)
		if !ok || round == maxApplyRounds || !u.reject(es) {
			s.reject(hs, u.wholeError(err))
			return
		}
	}
	s.forget(u)
	s.verdict(hs, u, nacks)
	s.resubscribe(ln) // drop dependencies the replaced or rejected resources used
}

func (s *session) logApplied(ln *lane, primary bool, next *state) {
	ev := s.log.Debug() // endpoint and route updates are frequent
	if primary {
		ev = s.log.Info()
	}
	ev.Str("lane", kinds[ln.primary].noun+"s").
		Int("clusters", len(next.res.Clusters)).Int("endpoints", len(next.res.Endpoints)).
		Int("listeners", len(next.res.Listeners)).Int("routes", len(next.res.Routes)).
		Any("versions", next.res.Versions).Msg("xds: configuration applied")
}

// versions returns Resources.Versions for the candidate: a kind whose responses
// are ACKed takes the version_info of the last of them; a NACKed kind keeps the
// accepted one (what Envoy sends in the NACK); a dependent kind with nothing held
// takes the version last ACKed on the stream (an assignment update ACKed before it
// was used).
func (s *session) versions(u *update, hs []held, nacks map[kind]ResourceErrors) map[string]string {
	v := maps.Clone(u.acc.res.Versions)
	for _, k := range [2]kind{u.ln.primary, u.ln.dep} {
		switch last, held := lastHeld(hs, k); {
		case k == u.ln.primary && u.primary == nil, nacks[k] != nil:
		case held:
			v[kinds[k].url] = last
		case s.seen[k] && s.ackedVersion[k] != v[kinds[k].url]:
			v[kinds[k].url] = s.ackedVersion[k]
		}
	}
	return v
}

func lastHeld(hs []held, k kind) (string, bool) {
	for i := len(hs) - 1; i >= 0; i-- {
		if hs[i].kind == k {
			return hs[i].version, true
		}
	}
	return "", false
}

// forget takes the rejected resources out of the server's view (recv), putting back
// what the accepted state holds for them: otherwise the next update of the lane,
// which starts from that view, would offer them again and fail the same way until
// the server happened to resend them. A dependent resource still needed is never
// left missing, or the lane would warm for it forever.
func (s *session) forget(u *update) {
	for key := range u.rejected {
		if e := u.keep(key.kind, key.name); e != nil {
			s.recv[key.kind][key.name] = e
		} else {
			delete(s.recv[key.kind], key.name)
		}
	}
}

// verdict ACKs or NACKs each kind of hs after an apply that may have rejected some
// resources (nacks, by kind).
func (s *session) verdict(hs []held, u *update, nacks map[kind]ResourceErrors) {
	if len(u.errs) > 0 {
		all := slices.Clone(u.errs)
		slices.SortStableFunc(all, func(a, b ResourceError) int {
			ka, _ := kindOf(a.TypeURL)
			kb, _ := kindOf(b.TypeURL)
			if ka != kb {
				return int(ka) - int(kb)
			}
			return strings.Compare(a.Name, b.Name)
		})
		s.c.setLastError(all)
		names := make([]string, len(all))
		for i, e := range all {
			names[i] = kinds[mustKind(e.TypeURL)].noun + " " + e.Name
		}
		s.log.Warn().Err(all).Strs("rejected", names).Str("lane", kinds[u.ln.primary].noun+"s").
			Msg("xds: update rejected in part: the rest is applied, the rejected resources keep their last accepted version")
	}
	for _, group := range byKind(hs) {
		k := group[0].kind
		if es := nacks[k]; es != nil {
			s.c.stats.rejected[k].Add(uint64(len(group)))
			s.nack(k, group, es)
			continue
		}
		s.ackGroup(k, group)
	}
}

func mustKind(typeURL string) kind {
	k, _ := kindOf(typeURL)
	return k
}

// byKind splits hs into runs of one kind, keeping the order of first appearance.
func byKind(hs []held) [][]held {
	var out [][]held
	idx := map[kind]int{}
	for _, h := range hs {
		i, ok := idx[h.kind]
		if !ok {
			i = len(out)
			idx[h.kind] = i
			out = append(out, nil)
		}
		out[i] = append(out[i], h)
	}
	return out
}

func (s *session) ackGroup(k kind, group []held) {
	s.c.stats.success[k].Add(uint64(len(group)))
	s.ackedVersion[k] = group[len(group)-1].version
	s.clearNack(k)
	s.send(k, group, nil)
}

// reject NACKs hs with err as error_detail. The accepted state is unchanged.
func (s *session) reject(hs []held, err error) {
	s.c.setLastError(err)
	for _, group := range byKind(hs) {
		k := group[0].kind
		s.c.stats.rejected[k].Add(uint64(len(group)))
		s.log.Warn().Err(err).Str("type", kinds[k].url).Str("version", group[len(group)-1].version).
			Msg("xds: update rejected")
		s.nack(k, group, err)
	}
}

// nack sends a NACK, holding it back when it repeats the previous NACK of its type
// exactly (same version_info, same error) in state-of-the-world mode: such a
// server resends the rejected version in reply, and the client would spin. The hold
// doubles from BackoffBase up to maxNackDelay (or BackoffMax if smaller); any other
// request of the type takes the NACK along at once.
func (s *session) nack(k kind, group []held, err error) {
	n := &s.nacks[k]
	v, msg := group[len(group)-1].version, err.Error()
	if s.c.cfg.Delta || n.count == 0 || n.version != v || n.msg != msg {
		n.version, n.msg, n.count = v, msg, 1
		s.send(k, group, err)
		return
	}
	n.count++
	if n.timer != nil {
		n.timer.Stop()
	}
	n.acks, n.err = group, err
	d := spacing(s.c.cfg.BackoffBase, min(s.c.cfg.BackoffMax, maxNackDelay), n.count-1)
	var t *time.Timer
	t = s.after(d, func() {
		if n.timer != t {
			return
		}
		acks, err := n.acks, n.err
		n.timer, n.acks, n.err = nil, nil, nil
		s.send(k, acks, err)
	})
	n.timer = t
}

func (s *session) clearNack(k kind) {
	n := &s.nacks[k]
	if n.timer != nil {
		// An ACK supersedes a held NACK of the same type: the held one is stale.
		n.timer.Stop()
	}
	*n = nackRepeat{}
}
