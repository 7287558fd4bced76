package xdsclient

import (
	"maps"
	"time"
)

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
func (s *session) apply(ln *lane, primary, deps entries, hs []held) {
	acc := s.c.current()
	versions := maps.Clone(acc.res.Versions)
	repl := map[kind]entries{ln.dep: deps}
	if primary != nil {
		repl[ln.primary] = primary
		versions[kinds[ln.primary].url] = s.recvVersion[ln.primary]
	}
	if s.seen[ln.dep] {
		versions[kinds[ln.dep].url] = s.recvVersion[ln.dep]
	}
	next, resChanged, verChanged := acc.with(repl, versions)
	switch {
	case resChanged, primary != nil && (verChanged || !acc.applied):
		if err := s.c.applier.Apply(s.ctx, next.res); err != nil {
			s.reject(hs, err)
			return
		}
		next.applied = true
		s.c.accepted.Store(next)
		ev := s.log.Debug() // endpoint and route updates are frequent
		if primary != nil {
			ev = s.log.Info()
		}
		ev.Str("lane", kinds[ln.primary].noun+"s").
			Int("clusters", len(next.res.Clusters)).Int("endpoints", len(next.res.Endpoints)).
			Int("listeners", len(next.res.Listeners)).Int("routes", len(next.res.Routes)).
			Any("versions", next.res.Versions).Msg("xds: configuration applied")
	case primary != nil:
		// Nothing changed at all (a resend after a reconnect): keep the entries,
		// whose per-resource versions may be newer.
		s.c.accepted.Store(next)
	}
	s.ack(hs)
	s.resubscribe(ln) // drop dependencies the replaced resources used
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

func (s *session) ack(hs []held) {
	for _, group := range byKind(hs) {
		k := group[0].kind
		s.c.stats.success[k].Add(uint64(len(group)))
		s.clearNack(k)
		s.send(k, group, nil)
	}
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
