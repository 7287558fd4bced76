package xdsclient

import (
	"errors"
	"maps"
	"slices"
	"strings"
)

// This file is the repair of an update the Applier rejected in part: which
// resources a repair can take out, and the candidate state without them.

// resKey names one resource.
type resKey struct {
	kind kind
	name string
}

// update is one apply of a lane: the entries the update offers, what the Applier
// rejected of them so far, and the candidate of the current round (the offer with
// the rejected resources repaired).
type update struct {
	ln      *lane
	acc     *state
	primary entries // as offered; nil when the accepted primary resources stay
	deps    entries // as offered

	rejected map[resKey]bool
	errs     ResourceErrors // the rejections, in the order the Applier named them
	stand    entries        // empty stand-ins for rejected dependent resources

	curPrimary, curDeps entries
}

func newUpdate(ln *lane, acc *state, primary, deps entries) *update {
	return &update{ln: ln, acc: acc, primary: primary, deps: deps,
		rejected: map[resKey]bool{}, stand: entries{},
		curPrimary: primary, curDeps: deps}
}

// entry returns a resource's entry in the current candidate (nil if absent).
func (u *update) entry(k kind, name string) *entry {
	switch {
	case k == u.ln.primary && u.curPrimary == nil:
		return u.acc.entries[k][name]
	case k == u.ln.primary:
		return u.curPrimary[name]
	case k == u.ln.dep:
		return u.curDeps[name]
	}
	return nil
}

// reject records the resources es names that a repair can change and rebuilds the
// candidate without them. It reports whether anything new was rejected; if not, a
// repaired update would be the same update, and it fails as a whole. Names a repair
// cannot change (a resource of another lane, or one at its accepted version) are
// left out: if they are still invalid, the next round names them again.
func (u *update) reject(es ResourceErrors) bool {
	added := false
	for _, e := range es {
		k, ok := kindOf(e.TypeURL)
		key := resKey{k, e.Name}
		if !ok || u.rejected[key] || !u.repairable(k, e.Name) {
			continue
		}
		u.rejected[key] = true
		u.errs = append(u.errs, e)
		added = true
	}
	if added {
		u.rebuild()
	}
	return added
}

// repairable reports whether the resource is part of the candidate and differs from
// what replaces it when it is rejected.
func (u *update) repairable(k kind, name string) bool {
	if k != u.ln.primary && k != u.ln.dep {
		return false
	}
	cur := u.entry(k, name)
	if cur == nil {
		return false
	}
	if a := u.acc.entries[k][name]; a != nil {
		return cur.msg != a.msg
	}
	return !cur.synth
}

// rebuild makes the candidate from the offer: rejected primary resources at their
// accepted version or absent, then exactly the dependent resources the primary set
// refers to, each as offered unless rejected, else as accepted, else empty.
func (u *update) rebuild() {
	pk, dk := u.ln.primary, u.ln.dep
	base := u.acc.entries[pk]
	if u.primary != nil {
		p := maps.Clone(u.primary)
		for key := range u.rejected {
			if key.kind != pk {
				continue
			}
			if a := u.acc.entries[pk][key.name]; a != nil {
				p[key.name] = a
			} else {
				delete(p, key.name)
			}
		}
		u.curPrimary, base = p, p
	}
	d := entries{}
	for _, e := range base {
		for _, r := range e.refs {
			switch a := u.acc.entries[dk][r]; {
			case !u.rejected[resKey{dk, r}] && u.deps[r] != nil:
				d[r] = u.deps[r]
			case a != nil:
				d[r] = a
			default:
				if u.stand[r] == nil {
					u.stand[r] = synthesized(dk, r)
				}
				d[r] = u.stand[r]
			}
		}
	}
	u.curDeps = d
}

// nacks groups the rejections by the kind of held response that carries them: their
// own kind, or, when no response of it is held (an assignment or route configuration
// ACKed on arrival because nothing in force used it yet), the lane's primary kind,
// whose update brought it into use. Each group is sorted by name so that a repeated
// rejection has the same text (see nackRepeat).
func (u *update) nacks(hs []held) map[kind]ResourceErrors {
	if len(u.errs) == 0 {
		return nil
	}
	isHeld := [numKinds]bool{}
	for _, h := range hs {
		isHeld[h.kind] = true
	}
	out := map[kind]ResourceErrors{}
	for _, e := range u.errs {
		k, _ := kindOf(e.TypeURL)
		if !isHeld[k] && isHeld[u.ln.primary] {
			k = u.ln.primary
		}
		out[k] = append(out[k], e)
	}
	for _, es := range out {
		slices.SortStableFunc(es, func(a, b ResourceError) int { return strings.Compare(a.Name, b.Name) })
	}
	return out
}

// wholeError is the NACK of an update rejected as a whole after repairs: what was
// rejected on the way, and why the last repair failed too.
func (u *update) wholeError(err error) error {
	if len(u.errs) == 0 {
		return err
	}
	return errors.Join(u.errs, err)
}

// keep returns what stands for a rejected resource from now on: its accepted entry,
// or for a dependent resource still referenced, the stand-in the accepted state
// holds; nil if nothing does.
func (u *update) keep(k kind, name string) *entry {
	if k == u.ln.dep {
		if e := u.curDeps[name]; e != nil {
			return e
		}
	}
	return u.acc.entries[k][name]
}
