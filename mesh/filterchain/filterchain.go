// Package filterchain selects a listener's filter chain the way Envoy's
// FilterChainManagerImpl does, so that meshtun and Envoy pick the same chain
// for the same connection and the same Listener resource.
//
// Envoy narrows the candidates one criterion at a time, in a fixed order:
// destination port, destination IP, server name, transport protocol,
// application protocol, directly connected source IP, source type, source
// IP, source port. At each level only the most specific bucket that matches
// the connection survives (an exact port over "any port", a longer prefix
// over a shorter one, "www.example.com" over "*.example.com" over "*.com"
// over no names), and there is no backtracking: when the surviving bucket
// has nothing for a later criterion, no chain matches and the listener's
// default_filter_chain, if any, is used. One more rule breaks the symmetry:
// when an exact destination-port bucket exists but nothing inside it
// matches, Envoy goes straight to the default chain without trying the
// chains that have no destination_port.
//
// Compile builds the tree once per listener (off the hot path, when a
// snapshot is built); Match walks it once per connection without
// allocating.
package filterchain

import (
	"net/netip"
	"strings"
	"unsafe"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	"google.golang.org/protobuf/proto"
)

// ConnInfo is what is known of a connection when its chain is chosen, that
// is after the listener filters (original_dst, tls_inspector,
// http_inspector) have run.
type ConnInfo struct {
	DstIP   netip.Addr // original destination (restored)
	DstPort uint16
	SrcIP   netip.Addr // remote peer
	SrcPort uint16
	// DirectSrcIP is the directly connected peer; it differs from SrcIP
	// only behind the proxy protocol. The zero Addr means SrcIP.
	DirectSrcIP netip.Addr
	// ServerName is the SNI found by tls_inspector, "" if none. Envoy keeps
	// it lower case; Match lower-cases it too.
	ServerName string
	// TransportProtocol is "tls" when tls_inspector found TLS; "" means
	// "raw_buffer", Envoy's default when no listener filter set one.
	TransportProtocol string
	// ApplicationProtocols are the ALPN values, or http_inspector's result
	// ("http/1.1", "h2c", ...), in the client's order of preference.
	ApplicationProtocols []string
	// Pipe marks a connection over a Unix domain socket. Envoy then skips
	// the destination-port lookup, matches every IP criterion against the
	// fake address 255.255.255.255 with source port 0, and counts the
	// connection as SAME_IP_OR_LOOPBACK.
	Pipe bool
}

// Matcher is the compiled selection tree of one listener. It is immutable
// after Compile and safe for concurrent use.
type Matcher struct {
	// only is set when the listener has one chain with an empty
	// filter_chain_match (every Istio service listener's shape): that
	// chain serves every connection, so no tree is built. At 10,000
	// services the trees were ~18 MB and a third of a listener's build.
	only       bool
	ports      map[uint16]*dstNode // exact destination_port buckets; nil if none
	anyPort    *dstNode            // chains without destination_port; nil if none
	hasDefault bool
	needTLS    bool
	needHTTP   bool
}

// Compile builds the matcher for a listener's filter_chains. defaultChain is
// the listener's default_filter_chain (nil if none); only its presence
// matters, since Envoy ignores its filter_chain_match. The returned index of
// Match refers to chains. Errors name the chain (by name, else by index) and
// the offending filter_chain_match field, as an xDS NACK should.
func Compile(chains []*listenerv3.FilterChain, defaultChain *listenerv3.FilterChain) (*Matcher, error) {
	if len(chains) == 1 && proto.Size(chains[0].GetFilterChainMatch()) == 0 {
		// Nothing to validate, nothing to inspect, one answer.
		return &Matcher{only: true, hasDefault: defaultChain != nil}, nil
	}
	return compileTree(chains, defaultChain)
}

// compileTree builds the selection tree, whatever the chains.
func compileTree(chains []*listenerv3.FilterChain, defaultChain *listenerv3.FilterChain) (*Matcher, error) {
	b := newBuilder(chains)
	for i := range chains {
		if err := b.add(i); err != nil {
			return nil, err
		}
	}
	m := b.seal()
	m.hasDefault = defaultChain != nil
	return m, nil
}

// fakeAddr is what Envoy matches IP criteria against when the connection
// is not over IP (a Unix domain socket).
var fakeAddr = netip.AddrFrom4([4]byte{255, 255, 255, 255})

// Match returns the index (into the chains given to Compile) of the chain
// that serves c. index -1 with ok means the default_filter_chain; !ok means
// no chain and no default: Envoy closes the connection and counts
// no_filter_chain_match.
func (m *Matcher) Match(c *ConnInfo) (index int, ok bool) {
	if m.only {
		return 0, true
	}
	if hasUpper(c.ServerName) {
		return m.matchLowered(c)
	}
	return m.match(c, c.ServerName)
}

// matchLowered lower-cases the server name on the stack: Envoy keeps it
// lower case, and so do the compiled server_names.
func (m *Matcher) matchLowered(c *ConnInfo) (int, bool) {
	var buf [maxLowerSNI]byte
	return m.match(c, lowerSNI(c.ServerName, &buf))
}

func (m *Matcher) match(c *ConnInfo, sni string) (int, bool) {
	q := query{c: c, sni: sni, transport: c.TransportProtocol}
	if q.transport == "" {
		q.transport = "raw_buffer"
	}
	if c.Pipe {
		q.dst, q.src, q.direct = fakeAddr, fakeAddr, fakeAddr
		q.local = true // Envoy: a pipe peer is always local
	} else {
		q.dst, q.src = ipOf(c.DstIP), ipOf(c.SrcIP)
		q.direct = q.src
		if c.DirectSrcIP.IsValid() {
			q.direct = ipOf(c.DirectSrcIP)
		}
		q.srcPort = c.SrcPort
		// 127.0.0.1 and ::1 only, as Network::Utility::isLoopbackAddress:
		// Istio's 127.0.0.6 is not loopback here.
		q.local = sameIP(q.src, loop4) || sameIP(q.src, loop6) || sameIP(q.src, q.dst)
	}

	// Destination port: an exact bucket, if present, decides alone.
	if !c.Pipe && m.ports != nil {
		if n := m.ports[c.DstPort]; n != nil {
			if i := n.match(&q); i >= 0 {
				return int(i), true
			}
			return -1, m.hasDefault
		}
	}
	if m.anyPort != nil {
		if i := m.anyPort.match(&q); i >= 0 {
			return int(i), true
		}
	}
	return -1, m.hasDefault
}

// NeedsTLSInspection reports whether some chain can only be selected with
// what tls_inspector detects. It is Envoy's rule for injecting the TLS
// inspector (listener_impl.cc needTlsInspector): a chain with
// transport_protocol "tls", or with no transport_protocol and server_names
// or application_protocols.
func (m *Matcher) NeedsTLSInspection() bool { return m.needTLS }

// NeedsHTTPInspection reports whether some chain matches on
// application_protocols of a plaintext connection (transport_protocol other
// than "tls"): such values come from http_inspector.
func (m *Matcher) NeedsHTTPInspection() bool { return m.needHTTP }

var (
	loop4 = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	loop6 = netip.IPv6Loopback()
)

// ipOf normalises a connection address as Envoy sees it: IPv4-mapped IPv6
// is IPv4 (Envoy converts it when the socket is dual-stack), and a missing
// address is treated like a non-IP one. Zones play no part in matching.
func ipOf(a netip.Addr) netip.Addr {
	if !a.IsValid() {
		return fakeAddr
	}
	return a.Unmap()
}

// sameIP compares two normalised addresses, ignoring zones.
func sameIP(a, b netip.Addr) bool {
	return a.Is4() == b.Is4() && a.As16() == b.As16()
}

// maxLowerSNI bounds the stack buffer used to lower-case a server name
// (DNS names are at most 253 bytes).
const maxLowerSNI = 256

func hasUpper(s string) bool {
	for i := 0; i < len(s); i++ {
		if 'A' <= s[i] && s[i] <= 'Z' {
			return true
		}
	}
	return false
}

// lowerSNI returns s in ASCII lower case, in buf when it fits.
func lowerSNI(s string, buf *[maxLowerSNI]byte) string {
	if len(s) > len(buf) {
		return strings.ToLower(s) // not a DNS name; rare enough to allocate
	}
	n := copy(buf[:], s)
	for j := 0; j < n; j++ {
		if ch := buf[j]; 'A' <= ch && ch <= 'Z' {
			buf[j] = ch + ('a' - 'A')
		}
	}
	// The string lives only for this Match call, as a key to look up.
	return unsafe.String(&buf[0], n)
}
