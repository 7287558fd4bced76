package filterchain

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
)

// refMatch is Envoy's selection written the naive way, as a filter over
// the list of chains rather than a tree: at each criterion, keep the
// chains whose value for it is the most specific one that matches. It
// returns -2 if more than one chain is left (Compile should have refused).
func refMatch(chains []*listenerv3.FilterChain, c *ConnInfo) int {
	cands := make([]int, 0, len(chains))
	fcm := func(i int) *listenerv3.FilterChainMatch { return chains[i].GetFilterChainMatch() }
	keep := func(f func(i int) bool) {
		out := cands[:0]
		for _, i := range cands {
			if f(i) {
				out = append(out, i)
			}
		}
		cands = out
	}
	anyHas := func(f func(i int) bool) bool {
		for _, i := range cands {
			if f(i) {
				return true
			}
		}
		return false
	}
	ranges := func(i int, field string) []netip.Prefix {
		var rs []netip.Prefix
		src := fcm(i).GetPrefixRanges()
		switch field {
		case "direct":
			src = fcm(i).GetDirectSourcePrefixRanges()
		case "src":
			src = fcm(i).GetSourcePrefixRanges()
		}
		if len(src) == 0 {
			return []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")}
		}
		for _, r := range src {
			a := netip.MustParseAddr(r.GetAddressPrefix())
			bits := int(r.GetPrefixLen().GetValue())
			if a.Is4() && bits > 32 {
				bits = 32
			}
			rs = append(rs, netip.PrefixFrom(a, bits))
		}
		return rs
	}
	// longest keeps the chains with the longest range containing a.
	longest := func(field string, a netip.Addr) {
		best := -1
		for _, i := range cands {
			for _, p := range ranges(i, field) {
				if p.Contains(a) && p.Bits() > best {
					best = p.Bits()
				}
			}
		}
		keep(func(i int) bool {
			for _, p := range ranges(i, field) {
				if p.Contains(a) && p.Bits() == best {
					return true
				}
			}
			return false
		})
	}
	fake := netip.MustParseAddr("255.255.255.255")
	norm := func(a netip.Addr) netip.Addr {
		if c.Pipe || !a.IsValid() {
			return fake
		}
		return a.Unmap()
	}

	// Destination port.
	for i := range chains {
		cands = append(cands, i)
	}
	port := func(i int) uint32 { return fcm(i).GetDestinationPort().GetValue() }
	if !c.Pipe && anyHas(func(i int) bool { return port(i) == uint32(c.DstPort) }) {
		keep(func(i int) bool { return port(i) == uint32(c.DstPort) })
	} else {
		keep(func(i int) bool { return port(i) == 0 })
	}
	dst, src := norm(c.DstIP), norm(c.SrcIP)
	longest("dst", dst)

	// Server name.
	keys := func(i int) []string {
		if len(fcm(i).GetServerNames()) == 0 {
			return []string{""}
		}
		var ks []string
		for _, n := range fcm(i).GetServerNames() {
			ks = append(ks, strings.TrimPrefix(strings.ToLower(n), "*"))
		}
		return ks
	}
	hasKey := func(k string) func(int) bool {
		return func(i int) bool {
			for _, x := range keys(i) {
				if x == k {
					return true
				}
			}
			return false
		}
	}
	sni := strings.ToLower(c.ServerName)
	chosen := ""
	if anyHas(hasKey(sni)) {
		chosen = sni
	} else {
		for j := 1; j < len(sni)-1; j++ {
			if sni[j] == '.' && anyHas(hasKey(sni[j:])) {
				chosen = sni[j:]
				break
			}
		}
	}
	keep(hasKey(chosen))

	// Transport protocol.
	tp := c.TransportProtocol
	if tp == "" {
		tp = "raw_buffer"
	}
	if !anyHas(func(i int) bool { return fcm(i).GetTransportProtocol() == tp }) {
		tp = ""
	}
	keep(func(i int) bool { return fcm(i).GetTransportProtocol() == tp })

	// Application protocols.
	hasProto := func(p string) func(int) bool {
		return func(i int) bool {
			ps := fcm(i).GetApplicationProtocols()
			if len(ps) == 0 {
				return p == ""
			}
			for _, x := range ps {
				if x == p {
					return true
				}
			}
			return false
		}
	}
	proto := ""
	for _, p := range c.ApplicationProtocols {
		if anyHas(hasProto(p)) {
			proto = p
			break
		}
	}
	keep(hasProto(proto))

	// Direct source, source type, source IP, source port.
	d := c.DirectSrcIP
	if !d.IsValid() {
		d = c.SrcIP
	}
	longest("direct", norm(d))
	local := c.Pipe || src == netip.MustParseAddr("127.0.0.1") || src == netip.IPv6Loopback() || src == dst
	st := func(i int) listenerv3.FilterChainMatch_ConnectionSourceType { return fcm(i).GetSourceType() }
	want := listenerv3.FilterChainMatch_EXTERNAL
	if local {
		want = listenerv3.FilterChainMatch_SAME_IP_OR_LOOPBACK
	}
	if !anyHas(func(i int) bool { return st(i) == want }) {
		want = listenerv3.FilterChainMatch_ANY
	}
	keep(func(i int) bool { return st(i) == want })
	longest("src", src)
	sport := uint32(c.SrcPort)
	if c.Pipe {
		sport = 0
	}
	hasPort := func(p uint32) func(int) bool {
		return func(i int) bool {
			ps := fcm(i).GetSourcePorts()
			if len(ps) == 0 {
				return p == 0
			}
			for _, x := range ps {
				if x == p {
					return true
				}
			}
			return false
		}
	}
	if !anyHas(hasPort(sport)) {
		sport = 0
	}
	keep(hasPort(sport))

	switch len(cands) {
	case 0:
		return -1
	case 1:
		return cands[0]
	}
	return -2
}

func pick[T any](rng *rand.Rand, from []T, max int) []T {
	n := rng.IntN(max + 1)
	var out []T
	for _, j := range rng.Perm(len(from))[:min(n, len(from))] {
		out = append(out, from[j])
	}
	return out
}

// Random listeners and connections: Match must agree with refMatch.
func TestMatchAgreesWithReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 11))
	var (
		ports     = []uint32{0, 80, 443}
		dsts      = []string{"10.0.0.0/8", "10.1.0.0/16", "10.1.2.3/32", "0.0.0.0/0", "fd00::/8", "::/0"}
		snis      = []string{"a.example.com", "*.example.com", "*.com", "b.org", "*.b.example.com"}
		tps       = []string{"", "", "tls", "raw_buffer"}
		protos    = []string{"h2", "http/1.1", "istio-h2"}
		directs   = []string{"192.168.0.0/16", "10.0.0.0/8"}
		srcs      = []string{"10.0.0.0/8", "10.1.0.0/16", "127.0.0.1/32", "fd00::/16"}
		srcPortsV = []uint32{1000, 2000}
		types     = []listenerv3.FilterChainMatch_ConnectionSourceType{0, 0, 1, 2}

		connDst  = []string{"10.1.2.3", "10.1.9.9", "10.9.9.9", "192.0.2.1", "fd00::1", "2001:db8::1", "::ffff:10.1.2.3"}
		connSrc  = []string{"10.1.2.3", "10.1.5.5", "10.7.7.7", "127.0.0.1", "127.0.0.6", "192.168.1.1", "fd00::9", "::1"}
		connSNI  = []string{"", "a.example.com", "b.example.com", "x.b.example.com", "example.com", "x.com", "b.org", "A.EXAMPLE.COM"}
		connTP   = []string{"", "raw_buffer", "tls"}
		connALPN = [][]string{nil, {"h2"}, {"http/1.1", "h2"}, {"h3"}, {"h3", "istio-h2"}}
	)
	compiled, matched := 0, 0
	for range 1500 {
		n := 1 + rng.IntN(8)
		chains := make([]*listenerv3.FilterChain, n)
		for i := range chains {
			var opts []fcmOpt
			if p := ports[rng.IntN(len(ports))]; p != 0 {
				opts = append(opts, dstPort(p))
			}
			if r := pick(rng, dsts, 2); len(r) > 0 {
				opts = append(opts, dstIPs(r...))
			}
			if s := pick(rng, snis, 2); len(s) > 0 {
				opts = append(opts, names(s...))
			}
			opts = append(opts, transport(tps[rng.IntN(len(tps))]))
			if p := pick(rng, protos, 2); len(p) > 0 {
				opts = append(opts, alpns(p...))
			}
			if rng.IntN(4) == 0 {
				opts = append(opts, directIPs(pick(rng, directs, 1)...))
			}
			opts = append(opts, srcType(types[rng.IntN(len(types))]))
			if rng.IntN(3) == 0 {
				opts = append(opts, srcIPs(pick(rng, srcs, 1)...))
			}
			if rng.IntN(4) == 0 {
				opts = append(opts, srcPorts(pick(rng, srcPortsV, 1)...))
			}
			chains[i] = fc(fmt.Sprint("c", i), opts...)
		}
		m, err := Compile(chains, nil)
		if err != nil {
			continue
		}
		compiled++
		for range 100 {
			c := &ConnInfo{
				DstIP:                netip.MustParseAddr(connDst[rng.IntN(len(connDst))]),
				DstPort:              []uint16{80, 443, 8080}[rng.IntN(3)],
				SrcIP:                netip.MustParseAddr(connSrc[rng.IntN(len(connSrc))]),
				SrcPort:              []uint16{1000, 2000, 3000}[rng.IntN(3)],
				ServerName:           connSNI[rng.IntN(len(connSNI))],
				TransportProtocol:    connTP[rng.IntN(len(connTP))],
				ApplicationProtocols: connALPN[rng.IntN(len(connALPN))],
				Pipe:                 rng.IntN(20) == 0,
			}
			if rng.IntN(5) == 0 {
				c.DirectSrcIP = netip.MustParseAddr(connSrc[rng.IntN(len(connSrc))])
			}
			want := refMatch(chains, c)
			if want == -2 {
				t.Fatalf("Compile accepted overlapping chains: %v\nconnection %+v", chains, *c)
			}
			got, ok := m.Match(c)
			if !ok {
				got = -1
			}
			if got != want {
				t.Fatalf("Match = %d, reference = %d\nchains: %v\nconnection: %+v", got, want, chains, *c)
			}
			if got >= 0 {
				matched++
			}
		}
	}
	t.Logf("%d listeners compiled, %d connections matched a chain", compiled, matched)
	if compiled < 500 || matched < 10000 {
		t.Errorf("too few cases exercised: %d listeners, %d matches", compiled, matched)
	}
}
