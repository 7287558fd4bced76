// Package stats is the proxy's one stats store. Every block of counters is
// kept under its Envoy stat scope ("cluster.<name>.", "listener.<addr>.",
// "tcp.<stat_prefix>.", "http.<stat_prefix>.") rather than in the
// configuration object that counts into it, so a CDS or LDS update that
// rebuilds a cluster or a listener finds its counters under the same name
// and they go on from where they were, as in Envoy, where stats live in the
// store and not in the config objects.
//
// A block is a typed struct of atomics defined by the package that counts
// into it (cluster.Scope, mesh.ListenerStats, httpconn.Stats, ...). Names
// are looked up only when a snapshot is built; the hot path adds to a
// field through the pointer it was given then, without a map or a lock.
package stats

import (
	"reflect"
	"sync"
)

// Key names one block: its scope and the type of counters under it (a
// cluster scope holds one block per type).
type Key struct {
	Prefix string
	typ    reflect.Type
}

// KeyOf is the key of the block of type T under prefix.
func KeyOf[T any](prefix string) Key { return Key{Prefix: prefix, typ: reflect.TypeFor[T]()} }

// Store holds the blocks by key. It is safe for concurrent use; lookups
// take its lock, which is why they belong to snapshot builds only.
type Store struct {
	mu  sync.Mutex
	m   map[Key]slot
	gen uint32 // RetainUsed's mark of the blocks in use
}

// slot is one block and the last RetainUsed pass that found it in use.
type slot struct {
	b    any
	mark uint32
}

// New returns an empty store.
func New() *Store { return &Store{m: make(map[Key]slot)} }

// Scope returns the block of type T under prefix, made by mk (with its
// zero counters) the first time the name is looked up. mk lets a block
// carry its own name (its Prefix field) from birth, before any reader can
// see it.
func Scope[T any](s *Store, prefix string, mk func() *T) *T {
	k := KeyOf[T](prefix)
	s.mu.Lock()
	defer s.mu.Unlock()
	if sl, ok := s.m[k]; ok {
		return sl.b.(*T)
	}
	b := mk()
	s.m[k] = slot{b: b, mark: s.gen}
	return b
}

// Retain drops every block whose key keep does not report in use: Envoy
// frees a removed cluster's or listener's stats with it, so a store that
// only grew would leak a block per name ever configured. Flows still
// holding a dropped block go on counting into it unseen; a name that comes
// back later gets a new block whose counters start from 0. It returns how
// many blocks were dropped.
func (s *Store) Retain(keep func(Key) bool) (dropped int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k := range s.m {
		if !keep(k) {
			delete(s.m, k)
			dropped++
		}
	}
	return dropped
}

// RetainUsed is Retain keeping exactly the blocks whose keys are in one of
// the used lists (which may repeat keys). It marks the blocks in place
// rather than collecting the keys in a set: at 10,000 services that set
// was a map of 30,000 keys (~4 MB) made on every update, at the moment the
// update's memory peaks.
func (s *Store) RetainUsed(used ...[]Key) (dropped int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.gen++
	for _, keys := range used {
		for _, k := range keys {
			if sl, ok := s.m[k]; ok && sl.mark != s.gen {
				sl.mark = s.gen
				s.m[k] = sl
			}
		}
	}
	for k, sl := range s.m {
		if sl.mark != s.gen {
			delete(s.m, k)
			dropped++
		}
	}
	return dropped
}

// Len is the number of blocks held.
func (s *Store) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.m)
}
