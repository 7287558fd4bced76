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
