package filterchain

import (
	"cmp"
	"encoding/binary"
	"net/netip"
	"slices"
)

// prefixTable answers longest-prefix-match for one criterion, as Envoy's
// LC trie built with exclusive=true does: the value of the most specific
// prefix containing the address, nothing if none does. IPv4 and IPv6 are
// separate tables; an IPv4-mapped IPv6 prefix lives in the IPv6 table and
// so never matches an (unmapped) IPv4 connection, as in Envoy.
//
// Istio's tables are tiny (usually just the catch-all 0.0.0.0/0 and ::/0),
// so small tables are a slice scanned longest prefix first. Past
// prefixLinear entries the table keeps one hash map per distinct prefix
// length instead, so a lookup costs one probe per length.
type prefixTable[T any] struct {
	v4    []entry4[T] // longest first
	v6    []entry6[T]
	v4len []level4[T] // longest first; set instead of v4 when large
	v6len []level6[T]
}

const prefixLinear = 16

type entry4[T any] struct {
	addr, mask uint32
	val        T
}

type entry6[T any] struct {
	addr, mask u128
	val        T
}

type level4[T any] struct {
	mask uint32
	m    map[uint32]T
}

type level6[T any] struct {
	mask u128
	m    map[u128]T
}

type u128 struct{ hi, lo uint64 }

func (a u128) and(b u128) u128 { return u128{a.hi & b.hi, a.lo & b.lo} }

func addr4(a netip.Addr) uint32 {
	b := a.As4()
	return binary.BigEndian.Uint32(b[:])
}

func addr6(a netip.Addr) u128 {
	b := a.As16()
	return u128{binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:])}
}

func mask4(bits int) uint32 {
	if bits == 0 {
		return 0
	}
	return ^uint32(0) << (32 - bits)
}

func mask6(bits int) u128 {
	switch {
	case bits == 0:
		return u128{}
	case bits <= 64:
		return u128{^uint64(0) << (64 - bits), 0}
	default:
		return u128{^uint64(0), ^uint64(0) << (128 - bits)}
	}
}

// prefixVal is one masked prefix and its value, as given to newPrefixTable.
type prefixVal[T any] struct {
	p   netip.Prefix
	val T
}

// newPrefixTable builds the table from distinct masked prefixes.
func newPrefixTable[T any](in []prefixVal[T]) prefixTable[T] {
	// Longest first; equal lengths cannot contain the same address, but
	// order them anyway so that the table does not depend on map order.
	slices.SortFunc(in, func(a, b prefixVal[T]) int {
		if c := cmp.Compare(b.p.Bits(), a.p.Bits()); c != 0 {
			return c
		}
		return a.p.Addr().Compare(b.p.Addr())
	})
	n4 := 0
	for _, e := range in {
		if e.p.Addr().Is4() {
			n4++
		}
	}
	var t prefixTable[T]
	lin4, lin6 := n4 <= prefixLinear, len(in)-n4 <= prefixLinear
	for _, e := range in {
		bits := e.p.Bits()
		switch {
		case e.p.Addr().Is4() && lin4:
			t.v4 = append(t.v4, entry4[T]{addr4(e.p.Addr()), mask4(bits), e.val})
		case e.p.Addr().Is4():
			mk := mask4(bits)
			if n := len(t.v4len); n == 0 || t.v4len[n-1].mask != mk {
				t.v4len = append(t.v4len, level4[T]{mk, map[uint32]T{}})
			}
			t.v4len[len(t.v4len)-1].m[addr4(e.p.Addr())] = e.val
		case lin6:
			t.v6 = append(t.v6, entry6[T]{addr6(e.p.Addr()), mask6(bits), e.val})
		default:
			mk := mask6(bits)
			if n := len(t.v6len); n == 0 || t.v6len[n-1].mask != mk {
				t.v6len = append(t.v6len, level6[T]{mk, map[u128]T{}})
			}
			t.v6len[len(t.v6len)-1].m[addr6(e.p.Addr())] = e.val
		}
	}
	return t
}

// lookup returns the value of the longest prefix containing a (an unmapped
// address), or the zero T.
func (t *prefixTable[T]) lookup(a netip.Addr) T {
	if a.Is4() {
		x := addr4(a)
		for i := range t.v4 {
			if e := &t.v4[i]; x&e.mask == e.addr {
				return e.val
			}
		}
		for i := range t.v4len {
			l := &t.v4len[i]
			if v, ok := l.m[x&l.mask]; ok {
				return v
			}
		}
	} else {
		x := addr6(a)
		for i := range t.v6 {
			if e := &t.v6[i]; x.and(e.mask) == e.addr {
				return e.val
			}
		}
		for i := range t.v6len {
			l := &t.v6len[i]
			if v, ok := l.m[x.and(l.mask)]; ok {
				return v
			}
		}
	}
	var zero T
	return zero
}
