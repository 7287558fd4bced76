package mesh

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/meshtun/meshtun/mesh/upstream"
	"github.com/meshtun/meshtun/netstack"
)

func TestLocalAddrs(t *testing.T) {
	a4, a6 := netip.MustParseAddr("10.1.2.3"), netip.MustParseAddr("fd00::3")
	in := []netip.Addr{a6, a4, {}, a6}
	l := NewLocalAddrs(in)
	if got, want := l.Addrs(), []netip.Addr{a4, a6}; !slices.Equal(got, want) {
		t.Fatalf("Addrs() = %v, want %v (sorted, deduplicated, the invalid one dropped)", got, want)
	}
	in[0] = netip.MustParseAddr("10.9.9.9") // the caller's slice is not shared
	l.Addrs()[0] = netip.MustParseAddr("10.8.8.8")
	for _, tc := range []struct {
		ip   netip.Addr
		want bool
	}{
		{a4, true}, {a6, true},
		{netip.MustParseAddr("10.9.9.9"), false}, {netip.MustParseAddr("10.8.8.8"), false},
		{netip.MustParseAddr("10.1.2.4"), false}, {netip.Addr{}, false},
		{netip.MustParseAddr("::ffff:10.1.2.3"), false}, // as today: addresses compare as they are
	} {
		if got := l.Contains(tc.ip); got != tc.want {
			t.Errorf("Contains(%v) = %v, want %v", tc.ip, got, tc.want)
		}
	}
	if (LocalAddrs{}).Contains(a4) || NewLocalAddrs(nil).Contains(netip.Addr{}) {
		t.Error("an empty LocalAddrs contains an address")
	}
	if n := testing.AllocsPerRun(100, func() { l.Contains(a6) }); n != 0 {
		t.Errorf("Contains allocates %v times per call, want 0", n)
	}
}

func BenchmarkLocalAddrsContains(b *testing.B) {
	l := NewLocalAddrs([]netip.Addr{netip.MustParseAddr("10.1.2.3"), netip.MustParseAddr("fd00::3")})
	dst := netip.MustParseAddr("10.96.0.1") // outbound: the whole set is scanned
	for b.Loop() {
		if l.Contains(dst) {
			b.Fatal("outbound address taken as local")
		}
	}
}

// TestGateDirection: the Gate takes the pod's addresses from NewGate, and a
// flow to one of them is inbound: closed by Close(true), while outbound
// flows are still admitted and counted.
func TestGateDirection(t *testing.T) {
	pod := netip.MustParseAddr("10.1.2.3")
	g := NewGate(NewDispatcher(DispatcherOptions{}), NewLocalAddrs([]netip.Addr{pod}))
	g.Close(true)
	if in, out := g.Closed(); !in || out {
		t.Fatalf("Closed() = %v, %v after Close(true), want true, false", in, out)
	}
	if g.admit(pod) {
		t.Error("a flow to the pod's address was admitted after Close(true)")
	}
	if !g.admit(netip.MustParseAddr("10.96.0.1")) {
		t.Error("an outbound flow was refused after Close(true)")
	}
	if n := g.Active(); n != 1 {
		t.Errorf("Active() = %d, want 1 (the outbound flow)", n)
	}
	defer func() {
		if recover() == nil {
			t.Error("NewGate accepted a nil handler")
		}
	}()
	NewGate(nil, LocalAddrs{})
}

func TestPassthroughDirection(t *testing.T) {
	pod := netip.MustParseAddr("fd00::3")
	p := NewPassthrough(PassthroughOptions{Dialer: &upstream.Dialer{}, Local: NewLocalAddrs([]netip.Addr{pod})})
	if dir, c := p.direction(pod); dir != "inbound" || c != InboundPassthroughCluster {
		t.Errorf("flow to the pod: %s %s, want inbound %s", dir, c, InboundPassthroughCluster)
	}
	if dir, c := p.direction(netip.MustParseAddr("fd00::4")); dir != "outbound" || c != PassthroughCluster {
		t.Errorf("flow elsewhere: %s %s, want outbound %s", dir, c, PassthroughCluster)
	}
	var _ netstack.Handler = p
}
