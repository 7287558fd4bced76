package filterchain

import (
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

func TestCompileErrors(t *testing.T) {
	unnamed := func(opts ...fcmOpt) *listenerv3.FilterChain { return fc("", opts...) }
	rawRange := func(addr string, bits *wrapperspb.UInt32Value) fcmOpt {
		return func(m *listenerv3.FilterChainMatch) {
			m.PrefixRanges = []*corev3.CidrRange{{AddressPrefix: addr, PrefixLen: bits}}
		}
	}
	for _, tc := range []struct {
		name   string
		chains []*listenerv3.FilterChain
		want   []string // all must appear in the error
	}{
		{"identical matchers", []*listenerv3.FilterChain{fc("a", dstPort(80)), fc("b", dstPort(80))},
			[]string{`filter chain "b": filter_chain_match: multiple filter chains with the same matching rules are defined: filter chain "a" and filter chain "b"`}},
		{"identical empty matchers", []*listenerv3.FilterChain{fc("a"), {Name: "b", FilterChainMatch: &listenerv3.FilterChainMatch{}}},
			[]string{`multiple filter chains with the same matching rules are defined: filter chain "a" and filter chain "b"`}},
		{"identical unnamed", []*listenerv3.FilterChain{unnamed(transport("tls")), fc("x", transport("raw_buffer")), unnamed(transport("tls"))},
			[]string{`filter_chains[2]: filter_chain_match: multiple filter chains with the same matching rules are defined: filter_chains[0] and filter_chains[2]`}},
		{"overlapping server names", []*listenerv3.FilterChain{fc("a", names("x.com", "y.com")), fc("b", names("Y.com"))},
			[]string{`filter chain "b"`, `overlapping matching rules`, `filter chain "a" and filter chain "b" both match server_name "y.com"`}},
		{"overlap through the implicit catch-all", []*listenerv3.FilterChain{fc("a", dstIPs("0.0.0.0/0")), fc("b")},
			[]string{`filter chain "a" and filter chain "b" both match every connection`}},
		{"overlapping source ports", []*listenerv3.FilterChain{fc("a", dstPort(80), srcPorts(1, 2)), fc("b", dstPort(80), srcPorts(2, 3))},
			[]string{`filter chain "a" and filter chain "b" both match destination_port 80, source_port 2`}},
		{"value listed twice", []*listenerv3.FilterChain{fc("a", srcPorts(7, 7))},
			[]string{`filter chain "a": filter_chain_match: overlapping matching rules within the chain: source_port 7`}},
		{"prefixes equal once masked", []*listenerv3.FilterChain{fc("a", dstIPs("10.0.0.0/8", "10.1.2.3/8"))},
			[]string{`filter chain "a"`, `prefix_range 10.0.0.0/8 is listed twice`}},
		{"partial wildcard", []*listenerv3.FilterChain{fc("w", names("ok.com", "a*.com"))},
			[]string{`filter chain "w": filter_chain_match.server_names[1]: "a*.com": partial wildcards are not supported`}},
		{"inner wildcard", []*listenerv3.FilterChain{fc("w", names("www.*.com"))},
			[]string{`server_names[0]: "www.*.com"`}},
		{"bare star", []*listenerv3.FilterChain{unnamed(names("*"))},
			[]string{`filter_chains[0]: filter_chain_match.server_names[0]: "*"`}},
		{"destination port too large", []*listenerv3.FilterChain{fc("p", dstPort(70000))},
			[]string{`filter chain "p": filter_chain_match.destination_port: 70000 is not in [1, 65535]`}},
		{"destination port zero", []*listenerv3.FilterChain{fc("p", dstPort(0))},
			[]string{`filter chain "p": filter_chain_match.destination_port: 0`}},
		{"invalid address", []*listenerv3.FilterChain{fc("ok"), unnamed(rawRange("10.0.0.300", wrapperspb.UInt32(8)))},
			[]string{`filter_chains[1]: filter_chain_match.prefix_ranges[0].address_prefix: "10.0.0.300" is not an IP address`}},
		{"empty address", []*listenerv3.FilterChain{fc("e", rawRange("", nil))},
			[]string{`filter chain "e": filter_chain_match.prefix_ranges[0].address_prefix: must not be empty`}},
		{"prefix_len above 128", []*listenerv3.FilterChain{fc("l", rawRange("fd00::", wrapperspb.UInt32(129)))},
			[]string{`filter chain "l": filter_chain_match.prefix_ranges[0].prefix_len: 129`}},
		{"invalid source range", []*listenerv3.FilterChain{fc("s", func(m *listenerv3.FilterChainMatch) {
			m.SourcePrefixRanges = []*corev3.CidrRange{{AddressPrefix: "10.0.0.0"}, {AddressPrefix: "nope"}}
		})}, []string{`filter chain "s": filter_chain_match.source_prefix_ranges[1].address_prefix: "nope"`}},
		{"invalid direct source range", []*listenerv3.FilterChain{fc("d", func(m *listenerv3.FilterChainMatch) {
			m.DirectSourcePrefixRanges = []*corev3.CidrRange{{AddressPrefix: "fe80::1%eth0"}}
		})}, []string{`filter chain "d": filter_chain_match.direct_source_prefix_ranges[0].address_prefix: "fe80::1%eth0"`}},
		{"suffix_len", []*listenerv3.FilterChain{fc("s", func(m *listenerv3.FilterChainMatch) { m.SuffixLen = wrapperspb.UInt32(1) })},
			[]string{`filter chain "s": filter_chain_match.suffix_len: not implemented`}},
		{"address_suffix", []*listenerv3.FilterChain{unnamed(func(m *listenerv3.FilterChainMatch) { m.AddressSuffix = "::1" })},
			[]string{`filter_chains[0]: filter_chain_match.address_suffix: not implemented`}},
		{"source_type out of range", []*listenerv3.FilterChain{fc("t", srcType(7))},
			[]string{`filter chain "t": filter_chain_match.source_type: 7`}},
		{"source port zero", []*listenerv3.FilterChain{fc("p", srcPorts(80, 0))},
			[]string{`filter chain "p": filter_chain_match.source_ports[1]: 0 is not in [1, 65535]`}},
		{"source port too large", []*listenerv3.FilterChain{fc("p", srcPorts(65536))},
			[]string{`filter_chain_match.source_ports[0]: 65536`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := Compile(tc.chains, nil)
			if err == nil {
				t.Fatalf("Compile succeeded (%v), want an error", m)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q\ndoes not contain %q", err, w)
				}
			}
		})
	}
}

// Configurations Envoy accepts that look suspicious.
func TestCompileAccepts(t *testing.T) {
	chains := []*listenerv3.FilterChain{
		fc("double-wild", names("*.*.com")), // starts with "*.": Envoy accepts it, stored as ".*.com"
		fc("v4-len-40", func(m *listenerv3.FilterChainMatch) { // CidrRange::create clamps to /32
			m.PrefixRanges = []*corev3.CidrRange{{AddressPrefix: "10.9.9.9", PrefixLen: wrapperspb.UInt32(40)}}
		}),
		fc("no-len", func(m *listenerv3.FilterChainMatch) { // unset prefix_len is 0
			m.PrefixRanges = []*corev3.CidrRange{{AddressPrefix: "192.168.1.1"}}
		}, transport("raw_buffer")),
		fc("empty-name", names(""), transport("tls")), // "" is the no-name key
	}
	runCases(t, chains, dflt, []matchCase{
		{"double wildcard", conn("1.1.1.1:443", tls("a.*.com")), "double-wild"},
		{"double wildcard is not *.com", conn("1.1.1.1:443", tls("a.com")), "empty-name"},
		{"clamped /32", conn("10.9.9.9:80"), "v4-len-40"},
		{"clamped /32 only", conn("10.9.9.8:80"), "no-len"},
		{"unset prefix_len", conn("8.8.8.8:80"), "no-len"},
		{"empty server name", conn("8.8.8.8:443", tls("q.org")), "empty-name"},
	})
}

func TestNeedsInspection(t *testing.T) {
	for _, tc := range []struct {
		name              string
		chains            []*listenerv3.FilterChain
		wantTLS, wantHTTP bool
	}{
		{"none", []*listenerv3.FilterChain{fc("a", dstPort(80)), fc("b", dstIPs("10.0.0.0/8"))}, false, false},
		{"server_names", []*listenerv3.FilterChain{fc("a", names("x"))}, true, false},
		{"transport tls", []*listenerv3.FilterChain{fc("a", transport("tls"))}, true, false},
		{"transport raw_buffer", []*listenerv3.FilterChain{fc("a", transport("raw_buffer"))}, false, false},
		{"ALPN without transport", []*listenerv3.FilterChain{fc("a", alpns("h2"))}, true, true},
		{"ALPN over tls", []*listenerv3.FilterChain{fc("a", transport("tls"), alpns("istio-h2"))}, true, false},
		{"ALPN over raw_buffer", []*listenerv3.FilterChain{fc("a", transport("raw_buffer"), alpns("h2c"))}, false, true},
		{"Istio virtualInbound", istioInbound(8080), true, true},
		{"Istio virtualOutbound", []*listenerv3.FilterChain{fc("bh", dstPort(15001)), fc("tcp")}, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := Compile(tc.chains, nil)
			if err != nil {
				t.Fatal(err)
			}
			if m.NeedsTLSInspection() != tc.wantTLS || m.NeedsHTTPInspection() != tc.wantHTTP {
				t.Errorf("NeedsTLSInspection, NeedsHTTPInspection = %v, %v; want %v, %v",
					m.NeedsTLSInspection(), m.NeedsHTTPInspection(), tc.wantTLS, tc.wantHTTP)
			}
		})
	}
}
