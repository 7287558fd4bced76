package stats

import "testing"

type blockA struct{ N int }
type blockB struct{ N int }

func TestScopeIsKeptByNameAndType(t *testing.T) {
	s := New()
	made := 0
	mk := func() *blockA { made++; return &blockA{} }
	a1 := Scope(s, "cluster.x.", mk)
	a1.N = 5
	if a2 := Scope(s, "cluster.x.", mk); a2 != a1 || made != 1 {
		t.Fatalf("second lookup of cluster.x.: new block (made %d)", made)
	}
	b := Scope(s, "cluster.x.", func() *blockB { return &blockB{} })
	if b.N != 0 || s.Len() != 2 {
		t.Fatalf("a block of another type under the same scope: %+v, %d blocks", b, s.Len())
	}
	if other := Scope(s, "cluster.y.", mk); other == a1 {
		t.Fatal("cluster.y. shares cluster.x.'s block")
	}
}

func TestRetainDropsUnused(t *testing.T) {
	s := New()
	mk := func() *blockA { return &blockA{} }
	keep := Scope(s, "listener.a.", mk)
	gone := Scope(s, "listener.b.", mk)
	gone.N = 3
	if n := s.Retain(func(k Key) bool { return k == KeyOf[blockA]("listener.a.") }); n != 1 {
		t.Fatalf("Retain dropped %d, want 1", n)
	}
	if Scope(s, "listener.a.", mk) != keep {
		t.Fatal("a retained block was replaced")
	}
	if again := Scope(s, "listener.b.", mk); again == gone || again.N != 0 {
		t.Fatal("a dropped scope came back with its old counters")
	}
}

// RetainUsed keeps the blocks named in any of its lists (repeats allowed)
// and drops the others, pass after pass; a block made after a pass and
// named in the next is kept.
func TestRetainUsed(t *testing.T) {
	s := New()
	mk := func() *blockA { return &blockA{} }
	a, b := Scope(s, "listener.a.", mk), Scope(s, "listener.b.", mk)
	c := Scope(s, "cluster.c.", func() *blockA { return &blockA{} })
	ka, kb, kc := KeyOf[blockA]("listener.a."), KeyOf[blockA]("listener.b."), KeyOf[blockA]("cluster.c.")
	if n := s.RetainUsed([]Key{ka, kc, ka}, []Key{kb}); n != 0 || s.Len() != 3 {
		t.Fatalf("all in use: dropped %d, %d left, want 0 and 3", n, s.Len())
	}
	if n := s.RetainUsed([]Key{ka}, []Key{ka, kc}); n != 1 || s.Len() != 2 {
		t.Fatalf("b unused: dropped %d, %d left, want 1 and 2", n, s.Len())
	}
	if Scope(s, "listener.a.", mk) != a || Scope(s, "cluster.c.", mk) != c {
		t.Fatal("a block in use was replaced")
	}
	d := Scope(s, "listener.d.", mk)
	kd := KeyOf[blockA]("listener.d.")
	if n := s.RetainUsed([]Key{kd}); n != 2 || s.Len() != 1 {
		t.Fatalf("only d in use: dropped %d, %d left, want 2 and 1", n, s.Len())
	}
	if Scope(s, "listener.d.", mk) != d {
		t.Fatal("d, made after the last pass, was replaced")
	}
	if again := Scope(s, "listener.b.", mk); again == b {
		t.Fatal("a dropped block came back")
	}
	if n := s.RetainUsed(); n != 2 || s.Len() != 0 {
		t.Fatalf("nothing in use: dropped %d, %d left, want 2 and 0", n, s.Len())
	}
}
