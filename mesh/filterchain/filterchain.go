// Package filterchain selects a listener's filter chain the way Envoy does.
//
// Envoy narrows the candidate chains one criterion at a time, in a fixed
// order: destination port, destination IP, server name, transport
// protocol, application protocol, direct source IP, source type, source
// IP, source port. At each level only the most specific bucket that
// matches the connection survives (an exact port over "any port", a longer
// prefix over a shorter one, "www.example.com" over "*.example.com" over
// "*.com" over no names), and there is no backtracking: if the surviving
// bucket has nothing for a later criterion, no chain matches and the
// listener's default_filter_chain (if any) is used. The tree is built once
// per listener; Match walks it without allocating.
package filterchain

import (
	"fmt"
	"net/netip"
	"sort"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
)

// ConnInfo is what is known of a connection when its chain is chosen.
type ConnInfo struct {
	DstIP                netip.Addr
	DstPort              uint16
	SrcIP                netip.Addr
	SrcPort              uint16
	DirectSrcIP          netip.Addr
	ServerName           string   // SNI, lower case; "" if none
	TransportProtocol    string   // "raw_buffer" or "tls"
	ApplicationProtocols []string // ALPN, or the HTTP inspector's result
	Pipe                 bool     // a Unix domain socket: Envoy matches IPs against 255.255.255.255
}

var pipeIP = netip.AddrFrom4([4]byte{255, 255, 255, 255})

// Matcher is the compiled selection tree of one listener.
type Matcher struct {
	ports      map[uint16]*ipLevel // 0 = no destination_port
	hasDefault bool
	needTLS    bool
	needHTTP   bool
}

// Compile builds the matcher for a listener's filter_chains (and whether
// it has a default_filter_chain). Errors name the chain and the field.
func Compile(chains []*listenerv3.FilterChain, defaultChain *listenerv3.FilterChain) (*Matcher, error) {
	m := &Matcher{ports: map[uint16]*ipLevel{}, hasDefault: defaultChain != nil}
	for i, fc := range chains {
		label := fmt.Sprintf("filter_chains[%d]", i)
		if fc.GetName() != "" {
			label = fmt.Sprintf("filter chain %q", fc.GetName())
		}
		if err := m.add(i, label, fc.GetFilterChainMatch(), chains); err != nil {
			return nil, fmt.Errorf("%s: filter_chain_match.%w", label, err)
		}
	}
	return m, nil
}

// Match returns the index of the chain for c. index -1 with ok means the
// default filter chain; !ok means no chain and no default: Envoy closes
// the connection and counts no_filter_chain_match.
func (m *Matcher) Match(c *ConnInfo) (index int, ok bool) {
	dst, src, direct := c.DstIP, c.SrcIP, c.DirectSrcIP
	if c.Pipe {
		dst, src, direct = pipeIP, pipeIP, pipeIP
	}
	if !direct.IsValid() {
		direct = src
	}
	lvl := m.ports[c.DstPort]
	if lvl == nil {
		lvl = m.ports[0]
	}
	if i := lvl.match(c, dst, src, direct); i >= 0 {
		return i, true
	}
	return -1, m.hasDefault
}

// NeedsTLSInspection reports whether any chain matches on server names or
// on transport protocol "tls": such a listener needs the tls_inspector.
func (m *Matcher) NeedsTLSInspection() bool { return m.needTLS }

// NeedsHTTPInspection reports whether any chain matches on application
// protocols: such a listener needs a listener filter that sets them.
func (m *Matcher) NeedsHTTPInspection() bool { return m.needHTTP }

func (m *Matcher) add(idx int, label string, fcm *listenerv3.FilterChainMatch, chains []*listenerv3.FilterChain) error {
	if fcm.GetSuffixLen() != nil || len(fcm.GetAddressSuffix()) > 0 {
		return fmt.Errorf("address_suffix/suffix_len: not implemented (as in Envoy)")
	}
	var port uint16
	if dp := fcm.GetDestinationPort(); dp != nil {
		if dp.GetValue() < 1 || dp.GetValue() > 65535 {
			return fmt.Errorf("destination_port: %d is not a port", dp.GetValue())
		}
		port = uint16(dp.GetValue())
	}
	dsts, err := prefixes(fcm.GetPrefixRanges(), "prefix_ranges")
	if err != nil {
		return err
	}
	names := fcm.GetServerNames()
	if len(names) == 0 {
		names = []string{""}
	}
	for i, n := range names {
		if n == "" && len(fcm.GetServerNames()) > 0 {
			return fmt.Errorf("server_names[%d]: empty name", i)
		}
		if strings.Contains(n, "*") && (!strings.HasPrefix(n, "*.") || strings.Count(n, "*") > 1) {
			return fmt.Errorf("server_names[%d]: %q: only a leading \"*.\" wildcard is supported", i, n)
		}
	}
	transport := fcm.GetTransportProtocol()
	alpns := fcm.GetApplicationProtocols()
	if len(alpns) == 0 {
		alpns = []string{""}
	}
	directs, err := prefixes(fcm.GetDirectSourcePrefixRanges(), "direct_source_prefix_ranges")
	if err != nil {
		return err
	}
	srcType := fcm.GetSourceType()
	srcs, err := prefixes(fcm.GetSourcePrefixRanges(), "source_prefix_ranges")
	if err != nil {
		return err
	}
	sports := []uint16{0}
	if len(fcm.GetSourcePorts()) > 0 {
		sports = sports[:0]
		for i, p := range fcm.GetSourcePorts() {
			if p < 1 || p > 65535 {
				return fmt.Errorf("source_ports[%d]: %d is not a port", i, p)
			}
			sports = append(sports, uint16(p))
		}
	}
	if len(fcm.GetServerNames()) > 0 || transport == "tls" {
		m.needTLS = true
	}
	if len(fcm.GetApplicationProtocols()) > 0 {
		m.needHTTP = true
	}

	// Insert every combination of the chain's criteria into the tree.
	pl := m.ports[port]
	if pl == nil {
		pl = &ipLevel{}
		m.ports[port] = pl
	}
	for _, d := range dsts {
		sn := pl.child(d, func() any { return &sniLevel{names: map[string]*stringLevel{}} }).(*sniLevel)
		for _, n := range names {
			tl := sn.child(normalizeName(n))
			al := tl.child(transport, false)
			for _, a := range alpns {
				dl := al.child(a, true)
				for _, ds := range directs {
					stl := dl.ipChild(ds, func() any { return &typeLevel{} }).(*typeLevel)
					sl := stl.child(srcType)
					for _, s := range srcs {
						spl := sl.ipChild(s, func() any { return &portLevel{ports: map[uint16]int{}} }).(*portLevel)
						for _, sp := range sports {
							if prev, dup := spl.ports[sp]; dup {
								return fmt.Errorf("… multiple filter chains with the same matching rules are defined (%s and %s)",
									chainName(chains, prev), label)
							}
							spl.ports[sp] = idx
						}
					}
				}
			}
		}
	}
	return nil
}

func chainName(chains []*listenerv3.FilterChain, i int) string {
	if n := chains[i].GetName(); n != "" {
		return fmt.Sprintf("filter chain %q", n)
	}
	return fmt.Sprintf("filter_chains[%d]", i)
}

// normalizeName lower-cases a server name and stores "*.example.com" as
// its suffix ".example.com".
func normalizeName(n string) string {
	n = strings.ToLower(n)
	return strings.TrimPrefix(n, "*")
}

// anyPrefix stands for "no prefix_ranges": every address of both families.
var anyPrefix = netip.Prefix{}

func prefixes(ranges []*corev3.CidrRange, field string) ([]netip.Prefix, error) {
	if len(ranges) == 0 {
		return []netip.Prefix{anyPrefix}, nil
	}
	out := make([]netip.Prefix, 0, len(ranges))
	for i, r := range ranges {
		ip, err := netip.ParseAddr(r.GetAddressPrefix())
		if err != nil {
			return nil, fmt.Errorf("%s[%d].address_prefix: %q is not an IP address", field, i, r.GetAddressPrefix())
		}
		bits := int(r.GetPrefixLen().GetValue())
		ip = ip.Unmap()
		if bits > ip.BitLen() {
			return nil, fmt.Errorf("%s[%d].prefix_len: %d is longer than the address", field, i, bits)
		}
		out = append(out, netip.PrefixFrom(ip, bits).Masked())
	}
	return out, nil
}

// ipBuckets holds per-prefix children, longest prefix first, plus the
// catch-all child for "no ranges".
type ipBuckets struct {
	entries []ipEntry
	any     any
}

type ipEntry struct {
	p     netip.Prefix
	child any
}

func (b *ipBuckets) ipChild(p netip.Prefix, mk func() any) any {
	if p == anyPrefix {
		if b.any == nil {
			b.any = mk()
		}
		return b.any
	}
	for _, e := range b.entries {
		if e.p == p {
			return e.child
		}
	}
	c := mk()
	b.entries = append(b.entries, ipEntry{p, c})
	sort.SliceStable(b.entries, func(i, j int) bool { return b.entries[i].p.Bits() > b.entries[j].p.Bits() })
	return c
}

// lookup returns the child of the longest prefix containing ip, else the
// catch-all.
func (b *ipBuckets) lookup(ip netip.Addr) any {
	ip = ip.Unmap()
	for _, e := range b.entries {
		if e.p.Contains(ip) {
			return e.child
		}
	}
	return b.any
}

type ipLevel struct{ ipBuckets }

func (l *ipLevel) child(p netip.Prefix, mk func() any) any { return l.ipChild(p, mk) }

func (l *ipLevel) match(c *ConnInfo, dst, src, direct netip.Addr) int {
	if l == nil {
		return -1
	}
	sn, _ := l.lookup(dst).(*sniLevel)
	if sn == nil {
		return -1
	}
	tl := sn.lookup(c.ServerName)
	if tl == nil {
		return -1
	}
	al := tl.exact(c.TransportProtocol)
	if al == nil {
		return -1
	}
	dl := al.firstOf(c.ApplicationProtocols)
	if dl == nil {
		return -1
	}
	stl, _ := dl.lookup(direct).(*typeLevel)
	if stl == nil {
		return -1
	}
	sl := stl.pick(src, dst)
	if sl == nil {
		return -1
	}
	spl, _ := sl.lookup(src).(*portLevel)
	if spl == nil {
		return -1
	}
	if i, ok := spl.ports[c.SrcPort]; ok {
		return i
	}
	if i, ok := spl.ports[0]; ok {
		return i
	}
	return -1
}

// sniLevel maps server names: exact names, ".suffix" wildcards, "" for
// chains without server_names.
type sniLevel struct{ names map[string]*stringLevel }

func (l *sniLevel) child(name string) *stringLevel {
	c := l.names[name]
	if c == nil {
		c = &stringLevel{m: map[string]*stringLevel{}}
		l.names[name] = c
	}
	return c
}

func (l *sniLevel) lookup(sni string) *stringLevel {
	if sni != "" {
		if c := l.names[sni]; c != nil {
			return c
		}
		// Wildcards, longest first: "a.b.example.com" tries ".b.example.com",
		// ".example.com", ".com". Substrings share sni's memory.
		for i := 0; i < len(sni); i++ {
			if sni[i] == '.' {
				if c := l.names[sni[i:]]; c != nil {
					return c
				}
			}
		}
	}
	return l.names[""]
}

// stringLevel is a level keyed by a string with "" as the catch-all
// (transport protocol, application protocol); its leaves are ipBuckets
// for the direct source level.
type stringLevel struct {
	m map[string]*stringLevel
	ipBuckets
}

func (l *stringLevel) child(key string, _ bool) *stringLevel {
	c := l.m[key]
	if c == nil {
		c = &stringLevel{m: map[string]*stringLevel{}}
		l.m[key] = c
	}
	return c
}

func (l *stringLevel) exact(key string) *stringLevel {
	if c := l.m[key]; c != nil {
		return c
	}
	return l.m[""]
}

func (l *stringLevel) firstOf(keys []string) *stringLevel {
	for _, k := range keys {
		if c := l.m[k]; c != nil {
			return c
		}
	}
	return l.m[""]
}

// typeLevel is the source_type level: a LOCAL or EXTERNAL bucket beats
// ANY for connections of that kind.
type typeLevel struct{ byType [3]*srcLevel }

type srcLevel struct{ ipBuckets }

func (l *typeLevel) child(t listenerv3.FilterChainMatch_ConnectionSourceType) *srcLevel {
	c := l.byType[t]
	if c == nil {
		c = &srcLevel{}
		l.byType[t] = c
	}
	return c
}

func (l *typeLevel) pick(src, dst netip.Addr) *srcLevel {
	local := l.byType[listenerv3.FilterChainMatch_SAME_IP_OR_LOOPBACK]
	external := l.byType[listenerv3.FilterChainMatch_EXTERNAL]
	if local != nil || external != nil {
		if src.Unmap() == dst.Unmap() || src.IsLoopback() {
			if local != nil {
				return local
			}
		} else if external != nil {
			return external
		}
	}
	return l.byType[listenerv3.FilterChainMatch_ANY]
}

// portLevel is the last level: source port (0 = any) to chain index.
type portLevel struct{ ports map[uint16]int }
