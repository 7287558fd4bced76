package cluster

import (
	"fmt"
	"net/netip"
	"testing"
)

// dedupe keeps the first of repeated addresses, in order, for short lists
// (checked pairwise) and long ones (through a map), and hands back the
// list itself, not a copy, when nothing repeats.
func TestDedupe(t *testing.T) {
	spec := func(i int) hostSpec {
		return hostSpec{addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(i / 250), byte(i%250 + 1)}), 8080)}
	}
	for _, n := range []int{1, 3, dedupeScan, dedupeScan + 1, 100} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			var in []hostSpec
			for i := range n {
				in = append(in, spec(i))
			}
			out := dedupe(in)
			if len(out) != n || &out[0] != &in[0] {
				t.Fatalf("no repeats: got %d specs (copied: %v), want the %d given, not copied", len(out), &out[0] != &in[0], n)
			}
			// Repeat the first and the last address, the repeat carrying
			// other metadata: the first occurrence wins.
			first, last := spec(0), spec(n-1)
			first.pipe, last.pipe = "", ""
			first.meta, last.meta = &hostMeta{}, &hostMeta{}
			withDups := append(append([]hostSpec(nil), in...), first, last)
			out = dedupe(withDups)
			if len(out) != n {
				t.Fatalf("with 2 repeats: got %d specs, want %d", len(out), n)
			}
			for i := range out {
				if out[i].key() != in[i].key() || out[i].meta != in[i].meta {
					t.Fatalf("spec %d: got %v, want the first occurrence %v", i, out[i].key(), in[i].key())
				}
			}
		})
	}
	pipes := []hostSpec{{pipe: "/a"}, {pipe: "/b"}, {pipe: "/a"}}
	if out := dedupe(pipes); len(out) != 2 || out[0].pipe != "/a" || out[1].pipe != "/b" {
		t.Fatalf("pipes: got %v, want /a, /b", out)
	}
}
