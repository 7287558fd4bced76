package filterchain

import (
	"fmt"
	"net/netip"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	"google.golang.org/protobuf/proto"
)

// Compiling follows FilterChainManagerImpl::addFilterChains: every chain is
// validated, then inserted once per combination of its values (each prefix
// × each server name × each application protocol × ... × each source
// port). Two insertions reaching the same leaf are an error, whether they
// come from two chains or from one chain listing a value twice.
//
// One deliberate difference: Envoy keys "no prefix_ranges" apart from an
// explicit 0.0.0.0/0 in its maps but inserts both as 0.0.0.0/0 (and ::/0)
// into the same LC trie node, which then holds two buckets and picks one
// arbitrarily (a debug ASSERT fails). Here both are the same bucket: the
// chains under it are matched together, and a true overlap between them is
// reported at Compile time instead of being resolved by chance.

// The build-time tree mirrors the runtime one with plain maps.
type (
	bDst    struct{ ips map[netip.Prefix]*bSNI }
	bSNI    struct{ names map[string]*bTP }
	bTP     struct{ protos map[string]*bALPN }
	bALPN   struct{ protos map[string]*bDirect }
	bDirect struct{ ips map[netip.Prefix]*bType }
	bType   struct{ byType [3]*bSrc }
	bSrc    struct{ ips map[netip.Prefix]*bPort }
	bPort   struct{ ports map[uint16]int32 }
)

type builder struct {
	chains    []*listenerv3.FilterChain
	ports     map[uint16]*bDst
	identical map[string]int // deterministic encoding of filter_chain_match → chain
	needTLS   bool
	needHTTP  bool
}

func newBuilder(chains []*listenerv3.FilterChain) *builder {
	return &builder{chains: chains, ports: map[uint16]*bDst{}, identical: map[string]int{}}
}

// spec is one chain's filter_chain_match, validated and normalised: every
// list holds at least one value, the catch-all one when the field is empty.
type spec struct {
	port      uint16
	dsts      []netip.Prefix
	names     []string // lower case; wildcards as ".suffix"; "" = any
	transport string
	alpns     []string
	directs   []netip.Prefix
	srcType   listenerv3.FilterChainMatch_ConnectionSourceType
	srcs      []netip.Prefix
	srcPorts  []uint16 // 0 = any
}

var catchAll = []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")}

// label names a chain in errors: by name when it has one.
func (b *builder) label(i int) string {
	if n := b.chains[i].GetName(); n != "" {
		return fmt.Sprintf("filter chain %q", n)
	}
	return fmt.Sprintf("filter_chains[%d]", i)
}

func (b *builder) fieldErr(i int, field, format string, args ...any) error {
	return fmt.Errorf("%s: filter_chain_match.%s: %s", b.label(i), field, fmt.Sprintf(format, args...))
}

func (b *builder) add(i int) error {
	fcm := b.chains[i].GetFilterChainMatch()
	if fcm == nil {
		fcm = &listenerv3.FilterChainMatch{} // Envoy reads the default instance
	}
	s, err := b.parse(i, fcm)
	if err != nil {
		return err
	}

	// Identical matchers first, for the clearer message (Envoy:
	// verifyNoDuplicateMatchers); overlaps are found on insertion.
	key, err := proto.MarshalOptions{Deterministic: true}.Marshal(fcm)
	if err != nil {
		return fmt.Errorf("%s: filter_chain_match: %w", b.label(i), err)
	}
	if prev, dup := b.identical[string(key)]; dup {
		return fmt.Errorf("%s: filter_chain_match: multiple filter chains with the same matching rules are defined: %s and %s",
			b.label(i), b.label(prev), b.label(i))
	}
	b.identical[string(key)] = i

	tp := fcm.GetTransportProtocol()
	if tp == "tls" || (tp == "" && (len(fcm.GetServerNames()) > 0 || len(fcm.GetApplicationProtocols()) > 0)) {
		b.needTLS = true
	}
	if len(fcm.GetApplicationProtocols()) > 0 && tp != "tls" {
		b.needHTTP = true
	}
	return b.insert(i, s)
}

// parse validates fcm as Envoy does (the proto's validation rules, then
// FilterChainManagerImpl's own checks) and normalises it.
func (b *builder) parse(i int, fcm *listenerv3.FilterChainMatch) (*spec, error) {
	s := &spec{transport: fcm.GetTransportProtocol()}
	if dp := fcm.GetDestinationPort(); dp != nil {
		if v := dp.GetValue(); v < 1 || v > 65535 {
			return nil, b.fieldErr(i, "destination_port", "%d is not in [1, 65535]", v)
		}
		s.port = uint16(dp.GetValue())
	}
	if fcm.GetAddressSuffix() != "" {
		return nil, b.fieldErr(i, "address_suffix", "not implemented (Envoy rejects it: \"contains unimplemented fields\")")
	}
	if fcm.GetSuffixLen() != nil {
		return nil, b.fieldErr(i, "suffix_len", "not implemented (Envoy rejects it: \"contains unimplemented fields\")")
	}
	st := fcm.GetSourceType()
	if _, ok := listenerv3.FilterChainMatch_ConnectionSourceType_name[int32(st)]; !ok {
		return nil, b.fieldErr(i, "source_type", "%d is not a defined ConnectionSourceType", int32(st))
	}
	s.srcType = st

	var err error
	if s.dsts, err = b.prefixes(i, "prefix_ranges", fcm.GetPrefixRanges()); err != nil {
		return nil, err
	}
	if s.directs, err = b.prefixes(i, "direct_source_prefix_ranges", fcm.GetDirectSourcePrefixRanges()); err != nil {
		return nil, err
	}
	if s.srcs, err = b.prefixes(i, "source_prefix_ranges", fcm.GetSourcePrefixRanges()); err != nil {
		return nil, err
	}

	s.names = []string{""}
	if names := fcm.GetServerNames(); len(names) > 0 {
		s.names = make([]string, len(names))
		for j, n := range names {
			// Only a leading "*." is a wildcard; "*" elsewhere (or "*"
			// alone) is rejected, as Envoy does ("partial wildcards are
			// not supported"). "*.*.com" starts with "*." and is accepted.
			if strings.Contains(n, "*") && !strings.HasPrefix(n, "*.") {
				return nil, b.fieldErr(i, fmt.Sprintf("server_names[%d]", j),
					"%q: partial wildcards are not supported; only a leading \"*.\" is", n)
			}
			s.names[j], _ = wildcardKey(n)
		}
	}

	s.alpns = []string{""}
	if len(fcm.GetApplicationProtocols()) > 0 {
		s.alpns = fcm.GetApplicationProtocols()
	}

	s.srcPorts = []uint16{0}
	if ports := fcm.GetSourcePorts(); len(ports) > 0 {
		s.srcPorts = make([]uint16, len(ports))
		for j, p := range ports {
			if p < 1 || p > 65535 {
				return nil, b.fieldErr(i, fmt.Sprintf("source_ports[%d]", j), "%d is not in [1, 65535]", p)
			}
			s.srcPorts[j] = uint16(p)
		}
	}
	return s, nil
}

// prefixes parses CIDR ranges as Envoy's CidrRange::create: an unset
// prefix_len is 0, an IPv4 prefix_len above 32 is 32, host bits are
// cleared. An empty list is the catch-all 0.0.0.0/0 and ::/0.
func (b *builder) prefixes(i int, field string, ranges []*corev3.CidrRange) ([]netip.Prefix, error) {
	if len(ranges) == 0 {
		return catchAll, nil
	}
	out := make([]netip.Prefix, len(ranges))
	for j, r := range ranges {
		f := fmt.Sprintf("%s[%d]", field, j)
		if r.GetAddressPrefix() == "" {
			return nil, b.fieldErr(i, f+".address_prefix", "must not be empty")
		}
		ip, err := netip.ParseAddr(r.GetAddressPrefix())
		if err != nil || ip.Zone() != "" {
			return nil, b.fieldErr(i, f+".address_prefix", "%q is not an IP address", r.GetAddressPrefix())
		}
		bits := r.GetPrefixLen().GetValue()
		if bits > 128 {
			return nil, b.fieldErr(i, f+".prefix_len", "%d is more than 128", bits)
		}
		if ip.Is4() && bits > 32 {
			bits = 32
		}
		out[j] = netip.PrefixFrom(ip, int(bits)).Masked()
	}
	return out, nil
}

// child returns (*m)[k], creating the map and the node if needed.
func child[K comparable, V any](m *map[K]*V, k K) *V {
	if *m == nil {
		*m = map[K]*V{}
	}
	v := (*m)[k]
	if v == nil {
		v = new(V)
		(*m)[k] = v
	}
	return v
}

// insert adds chain i under every combination of its values.
func (b *builder) insert(i int, s *spec) error {
	d := child(&b.ports, s.port)
	for _, dst := range s.dsts {
		sn := child(&d.ips, dst)
		for _, name := range s.names {
			tp := child(&child(&sn.names, name).protos, s.transport)
			for _, alpn := range s.alpns {
				dr := child(&tp.protos, alpn)
				for _, direct := range s.directs {
					ty := child(&dr.ips, direct)
					if ty.byType[s.srcType] == nil {
						ty.byType[s.srcType] = &bSrc{}
					}
					sr := ty.byType[s.srcType]
					for _, src := range s.srcs {
						pn := child(&sr.ips, src)
						if pn.ports == nil {
							pn.ports = map[uint16]int32{}
						}
						for _, sp := range s.srcPorts {
							if prev, dup := pn.ports[sp]; dup {
								at := describe(s.port, dst, name, s.transport, alpn, direct, s.srcType, src, sp)
								if int(prev) == i {
									return fmt.Errorf("%s: filter_chain_match: overlapping matching rules within the chain: %s is listed twice",
										b.label(i), at)
								}
								return fmt.Errorf("%s: filter_chain_match: multiple filter chains with overlapping matching rules are defined: %s and %s both match %s",
									b.label(i), b.label(int(prev)), b.label(i), at)
							}
							pn.ports[sp] = int32(i)
						}
					}
				}
			}
		}
	}
	return nil
}

// describe names one leaf of the tree, leaving out catch-all values.
func describe(port uint16, dst netip.Prefix, name, transport, alpn string, direct netip.Prefix,
	st listenerv3.FilterChainMatch_ConnectionSourceType, src netip.Prefix, srcPort uint16) string {
	var parts []string
	if port != 0 {
		parts = append(parts, fmt.Sprintf("destination_port %d", port))
	}
	if dst.Bits() != 0 {
		parts = append(parts, "prefix_range "+dst.String())
	}
	if name != "" {
		if name[0] == '.' {
			name = "*" + name
		}
		parts = append(parts, fmt.Sprintf("server_name %q", name))
	}
	if transport != "" {
		parts = append(parts, fmt.Sprintf("transport_protocol %q", transport))
	}
	if alpn != "" {
		parts = append(parts, fmt.Sprintf("application_protocol %q", alpn))
	}
	if direct.Bits() != 0 {
		parts = append(parts, "direct_source_prefix_range "+direct.String())
	}
	if st != typeAny {
		parts = append(parts, "source_type "+st.String())
	}
	if src.Bits() != 0 {
		parts = append(parts, "source_prefix_range "+src.String())
	}
	if srcPort != 0 {
		parts = append(parts, fmt.Sprintf("source_port %d", srcPort))
	}
	if len(parts) == 0 {
		return "every connection (no criteria)"
	}
	return strings.Join(parts, ", ")
}

// seal turns the build-time maps into the lookup structures of Match.
func (b *builder) seal() *Matcher {
	m := &Matcher{needTLS: b.needTLS, needHTTP: b.needHTTP}
	for port, d := range b.ports {
		n := d.seal()
		if port == 0 {
			m.anyPort = n
			continue
		}
		if m.ports == nil {
			m.ports = map[uint16]*dstNode{}
		}
		m.ports[port] = n
	}
	return m
}

func sealPrefixes[B, N any](in map[netip.Prefix]*B, f func(*B) *N) prefixTable[*N] {
	out := make([]prefixVal[*N], 0, len(in))
	for p, b := range in {
		out = append(out, prefixVal[*N]{p, f(b)})
	}
	return newPrefixTable(out)
}

func (d *bDst) seal() *dstNode { return &dstNode{ips: sealPrefixes(d.ips, (*bSNI).seal)} }

func (s *bSNI) seal() *sniNode {
	n := &sniNode{}
	for name, t := range s.names {
		tn := t.seal()
		if name == "" {
			n.any = tn
			continue
		}
		if n.names == nil {
			n.names = map[string]*tpNode{}
		}
		n.names[name] = tn
		if name[0] == '.' {
			n.wild = true
		}
	}
	return n
}

func (t *bTP) seal() *tpNode {
	n := &tpNode{}
	protos := map[string]*alpnNode{}
	for p, a := range t.protos {
		if p == "" {
			n.any = a.seal()
		} else {
			protos[p] = a.seal()
		}
	}
	n.protos = newStrTable(protos)
	return n
}

func (a *bALPN) seal() *alpnNode {
	n := &alpnNode{}
	protos := map[string]*directNode{}
	for p, d := range a.protos {
		if p == "" {
			n.any = d.seal()
		} else {
			protos[p] = d.seal()
		}
	}
	n.protos = newStrTable(protos)
	return n
}

func (d *bDirect) seal() *directNode { return &directNode{ips: sealPrefixes(d.ips, (*bType).seal)} }

func (t *bType) seal() *typeNode {
	n := &typeNode{}
	for st, s := range t.byType {
		if s != nil {
			n.byType[st] = s.seal()
		}
	}
	return n
}

func (s *bSrc) seal() *srcNode { return &srcNode{ips: sealPrefixes(s.ips, (*bPort).seal)} }

func (p *bPort) seal() *portNode {
	n := &portNode{any: -1}
	for port, i := range p.ports {
		if port == 0 {
			n.any = i
			continue
		}
		if n.exact == nil {
			n.exact = map[uint16]int32{}
		}
		n.exact[port] = i
	}
	return n
}
