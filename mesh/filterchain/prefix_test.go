package filterchain

import (
	"math/rand/v2"
	"net/netip"
	"testing"
)

// The prefix table against a brute-force longest match, in both its
// linear and its per-length-map forms.
func TestPrefixTableLongestMatch(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	randAddr := func(v6 bool) netip.Addr {
		if v6 {
			var b [16]byte
			b[0] = 0xfd
			b[1] = byte(rng.IntN(4)) // keep addresses close so prefixes nest
			for i := 2; i < 16; i++ {
				b[i] = byte(rng.IntN(256))
			}
			return netip.AddrFrom16(b)
		}
		return netip.AddrFrom4([4]byte{10, byte(rng.IntN(4)), byte(rng.IntN(256)), byte(rng.IntN(256))})
	}
	for _, n := range []int{1, 5, prefixLinear, prefixLinear + 1, 300} {
		m := map[netip.Prefix]int{}
		for len(m) < n {
			v6 := rng.IntN(2) == 0
			bits := rng.IntN(33)
			if v6 {
				bits = rng.IntN(129)
			}
			m[netip.PrefixFrom(randAddr(v6), bits).Masked()] = len(m) + 1
		}
		var in []prefixVal[int]
		for p, v := range m {
			in = append(in, prefixVal[int]{p, v})
		}
		tab := newPrefixTable(in)
		for range 5000 {
			a := randAddr(rng.IntN(2) == 0)
			want, best := 0, -1
			for p, v := range m {
				if p.Contains(a) && p.Bits() > best {
					want, best = v, p.Bits()
				}
			}
			if got := tab.lookup(a); got != want {
				t.Fatalf("n=%d: lookup(%v) = %d, want %d", n, a, got, want)
			}
		}
	}
}
