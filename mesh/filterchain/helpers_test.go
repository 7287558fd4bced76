package filterchain

import (
	"net/netip"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// A small vocabulary to write listeners and connections as tables.

type fcmOpt func(*listenerv3.FilterChainMatch)

// fc builds a named chain; without options it has no filter_chain_match.
func fc(name string, opts ...fcmOpt) *listenerv3.FilterChain {
	c := &listenerv3.FilterChain{Name: name}
	if len(opts) > 0 {
		c.FilterChainMatch = &listenerv3.FilterChainMatch{}
		for _, o := range opts {
			o(c.FilterChainMatch)
		}
	}
	return c
}

func cidrs(ss ...string) []*corev3.CidrRange {
	out := make([]*corev3.CidrRange, len(ss))
	for i, s := range ss {
		p := netip.MustParsePrefix(s)
		out[i] = &corev3.CidrRange{AddressPrefix: p.Addr().String(), PrefixLen: wrapperspb.UInt32(uint32(p.Bits()))}
	}
	return out
}

func dstPort(p uint32) fcmOpt {
	return func(m *listenerv3.FilterChainMatch) { m.DestinationPort = wrapperspb.UInt32(p) }
}
func dstIPs(ss ...string) fcmOpt {
	return func(m *listenerv3.FilterChainMatch) { m.PrefixRanges = cidrs(ss...) }
}
func names(ns ...string) fcmOpt {
	return func(m *listenerv3.FilterChainMatch) { m.ServerNames = ns }
}
func transport(t string) fcmOpt {
	return func(m *listenerv3.FilterChainMatch) { m.TransportProtocol = t }
}
func alpns(ps ...string) fcmOpt {
	return func(m *listenerv3.FilterChainMatch) { m.ApplicationProtocols = ps }
}
func directIPs(ss ...string) fcmOpt {
	return func(m *listenerv3.FilterChainMatch) { m.DirectSourcePrefixRanges = cidrs(ss...) }
}
func srcType(t listenerv3.FilterChainMatch_ConnectionSourceType) fcmOpt {
	return func(m *listenerv3.FilterChainMatch) { m.SourceType = t }
}
func srcIPs(ss ...string) fcmOpt {
	return func(m *listenerv3.FilterChainMatch) { m.SourcePrefixRanges = cidrs(ss...) }
}
func srcPorts(ps ...uint32) fcmOpt {
	return func(m *listenerv3.FilterChainMatch) { m.SourcePorts = ps }
}

type connOpt func(*ConnInfo)

// conn is a raw_buffer connection to dst from 10.99.0.1:40000.
func conn(dst string, opts ...connOpt) *ConnInfo {
	ap := netip.MustParseAddrPort(dst)
	c := &ConnInfo{DstIP: ap.Addr(), DstPort: ap.Port(), SrcIP: netip.MustParseAddr("10.99.0.1"), SrcPort: 40000}
	for _, o := range opts {
		o(c)
	}
	return c
}

// tls sets transport "tls" and the SNI (none if "").
func tls(sni string) connOpt {
	return func(c *ConnInfo) { c.TransportProtocol, c.ServerName = "tls", sni }
}
func raw(c *ConnInfo) { c.TransportProtocol = "raw_buffer" }
func alpn(ps ...string) connOpt {
	return func(c *ConnInfo) { c.ApplicationProtocols = ps }
}
func from(src string) connOpt {
	return func(c *ConnInfo) {
		ap := netip.MustParseAddrPort(src)
		c.SrcIP, c.SrcPort = ap.Addr(), ap.Port()
	}
}
func direct(ip string) connOpt {
	return func(c *ConnInfo) { c.DirectSrcIP = netip.MustParseAddr(ip) }
}
func pipe(c *ConnInfo) { c.Pipe = true }

// chosen names the outcome of Match: the chain's name, "default" or
// "closed".
func chosen(m *Matcher, chains []*listenerv3.FilterChain, c *ConnInfo) string {
	i, ok := m.Match(c)
	switch {
	case !ok:
		return "closed"
	case i < 0:
		return "default"
	}
	return chains[i].GetName()
}

type matchCase struct {
	name string
	c    *ConnInfo
	want string
}

func runCases(t *testing.T, chains []*listenerv3.FilterChain, def *listenerv3.FilterChain, cases []matchCase) {
	t.Helper()
	m, err := Compile(chains, def)
	if err != nil {
		t.Fatalf("Compile: %v", err)
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := chosen(m, chains, tc.c); got != tc.want {
				t.Errorf("Match(%+v) = %q, want %q", *tc.c, got, tc.want)
			}
		})
	}
}

var dflt = fc("default-chain")
