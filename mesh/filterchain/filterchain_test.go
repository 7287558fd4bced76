package filterchain

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

func chain(name string, m *listenerv3.FilterChainMatch) *listenerv3.FilterChain {
	return &listenerv3.FilterChain{Name: name, FilterChainMatch: m}
}

func cidr(s string) *corev3.CidrRange {
	p := netip.MustParsePrefix(s)
	return &corev3.CidrRange{AddressPrefix: p.Addr().String(), PrefixLen: wrapperspb.UInt32(uint32(p.Bits()))}
}

func conn(dst string, mods ...func(*ConnInfo)) *ConnInfo {
	ap := netip.MustParseAddrPort(dst)
	c := &ConnInfo{DstIP: ap.Addr(), DstPort: ap.Port(), SrcIP: netip.MustParseAddr("10.0.0.2"), SrcPort: 40000, TransportProtocol: "raw_buffer"}
	for _, m := range mods {
		m(c)
	}
	return c
}

func sni(n string) func(*ConnInfo) {
	return func(c *ConnInfo) { c.ServerName, c.TransportProtocol = n, "tls" }
}
func alpn(p ...string) func(*ConnInfo) { return func(c *ConnInfo) { c.ApplicationProtocols = p } }
func from(ip string, port uint16) func(*ConnInfo) {
	return func(c *ConnInfo) { c.SrcIP, c.SrcPort = netip.MustParseAddr(ip), port }
}

// name returns the chosen chain's name, "default" or "closed".
func name(t *testing.T, m *Matcher, chains []*listenerv3.FilterChain, c *ConnInfo) string {
	t.Helper()
	i, ok := m.Match(c)
	switch {
	case !ok:
		return "closed"
	case i < 0:
		return "default"
	}
	return chains[i].GetName()
}

type tcase struct {
	c    *ConnInfo
	want string
}

func run(t *testing.T, chains []*listenerv3.FilterChain, def *listenerv3.FilterChain, cases []tcase) {
	t.Helper()
	m, err := Compile(chains, def)
	if err != nil {
		t.Fatal(err)
	}
	for i, tc := range cases {
		if got := name(t, m, chains, tc.c); got != tc.want {
			t.Errorf("case %d (%+v): got %q, want %q", i, *tc.c, got, tc.want)
		}
	}
}

// The example of listener_components.proto: the most specific server
// name wins, then wildcards from the longest, then chains without names.
func TestServerNameSpecificity(t *testing.T) {
	chains := []*listenerv3.FilterChain{
		chain("exact", &listenerv3.FilterChainMatch{ServerNames: []string{"www.example.com"}}),
		chain("wild-example", &listenerv3.FilterChainMatch{ServerNames: []string{"*.example.com"}}),
		chain("wild-com", &listenerv3.FilterChainMatch{ServerNames: []string{"*.COM"}}),
		chain("none", nil),
	}
	run(t, chains, nil, []tcase{
		{conn("1.2.3.4:443", sni("www.example.com")), "exact"},
		{conn("1.2.3.4:443", sni("a.example.com")), "wild-example"},
		{conn("1.2.3.4:443", sni("a.b.example.com")), "wild-example"},
		{conn("1.2.3.4:443", sni("example.com")), "wild-com"}, // *.example.com does not match the bare domain
		{conn("1.2.3.4:443", sni("foo.com")), "wild-com"},
		{conn("1.2.3.4:443", sni("foo.org")), "none"},
		{conn("1.2.3.4:443"), "none"},
	})
}

// An exact destination_port bucket is taken even when nothing inside it
// matches: Envoy does not fall back to the chains without a port.
func TestNoBacktrackingFromPort(t *testing.T) {
	chains := []*listenerv3.FilterChain{
		chain("port80-a", &listenerv3.FilterChainMatch{DestinationPort: wrapperspb.UInt32(80), ServerNames: []string{"a"}}),
		chain("catchall", nil),
	}
	def := chain("the-default", nil)
	run(t, chains, def, []tcase{
		{conn("1.2.3.4:80", sni("a")), "port80-a"},
		{conn("1.2.3.4:80", sni("b")), "default"},
		{conn("1.2.3.4:81", sni("b")), "catchall"},
	})
	// Without a default the connection is closed.
	run(t, chains, nil, []tcase{{conn("1.2.3.4:80", sni("b")), "closed"}})
}

// Istio's virtualOutbound: a blackhole chain for the listener's own port
// (no loops), a catch-all for everything else.
func TestIstioVirtualOutbound(t *testing.T) {
	chains := []*listenerv3.FilterChain{
		chain("virtualOutbound-blackhole", &listenerv3.FilterChainMatch{DestinationPort: wrapperspb.UInt32(15001)}),
		chain("virtualOutbound-catchall-tcp", nil),
	}
	run(t, chains, nil, []tcase{
		{conn("10.96.0.1:15001"), "virtualOutbound-blackhole"},
		{conn("10.96.0.1:443"), "virtualOutbound-catchall-tcp"},
		{conn("[fd00::1]:80"), "virtualOutbound-catchall-tcp"},
	})
}

// Istio's virtualInbound shape: per-port chains split by transport and
// application protocol, plus catch-all chains over 0.0.0.0/0 and ::/0.
func TestIstioVirtualInbound(t *testing.T) {
	all := []*corev3.CidrRange{cidr("0.0.0.0/0"), cidr("::/0")}
	p := func(n uint32) *wrapperspb.UInt32Value { return wrapperspb.UInt32(n) }
	chains := []*listenerv3.FilterChain{
		chain("inbound-blackhole", &listenerv3.FilterChainMatch{DestinationPort: p(15006)}),
		chain("8080-tls-http", &listenerv3.FilterChainMatch{DestinationPort: p(8080), TransportProtocol: "tls", ApplicationProtocols: []string{"istio-http/1.1", "istio-h2"}}),
		chain("8080-tls-tcp", &listenerv3.FilterChainMatch{DestinationPort: p(8080), TransportProtocol: "tls"}),
		chain("8080-raw-http", &listenerv3.FilterChainMatch{DestinationPort: p(8080), TransportProtocol: "raw_buffer", ApplicationProtocols: []string{"http/1.1", "h2c"}}),
		chain("8080-raw-tcp", &listenerv3.FilterChainMatch{DestinationPort: p(8080), TransportProtocol: "raw_buffer"}),
		chain("catchall-tls", &listenerv3.FilterChainMatch{PrefixRanges: all, TransportProtocol: "tls"}),
		chain("catchall-raw", &listenerv3.FilterChainMatch{PrefixRanges: all}),
	}
	tls := func(c *ConnInfo) { c.TransportProtocol = "tls" }
	run(t, chains, nil, []tcase{
		{conn("10.0.0.5:15006"), "inbound-blackhole"},
		{conn("10.0.0.5:8080", tls, alpn("istio-h2")), "8080-tls-http"},
		{conn("10.0.0.5:8080", tls), "8080-tls-tcp"},
		{conn("10.0.0.5:8080", alpn("h2c")), "8080-raw-http"},
		{conn("10.0.0.5:8080", alpn("smtp", "http/1.1")), "8080-raw-http"}, // the first protocol present decides
		{conn("10.0.0.5:8080"), "8080-raw-tcp"},
		{conn("10.0.0.5:9090", tls), "catchall-tls"},
		{conn("10.0.0.5:9090"), "catchall-raw"},
		{conn("[fd00::5]:9090"), "catchall-raw"},
	})
}

func TestPrefixAndSourceCriteria(t *testing.T) {
	chains := []*listenerv3.FilterChain{
		chain("10/8", &listenerv3.FilterChainMatch{PrefixRanges: []*corev3.CidrRange{cidr("10.0.0.0/8")}}),
		chain("10.1/16", &listenerv3.FilterChainMatch{PrefixRanges: []*corev3.CidrRange{cidr("10.1.0.0/16")}}),
		chain("10.1/16-local", &listenerv3.FilterChainMatch{PrefixRanges: []*corev3.CidrRange{cidr("10.1.0.0/16")}, SourceType: listenerv3.FilterChainMatch_SAME_IP_OR_LOOPBACK}),
		chain("v6", &listenerv3.FilterChainMatch{PrefixRanges: []*corev3.CidrRange{cidr("fd00::/8")}, SourcePrefixRanges: []*corev3.CidrRange{cidr("fd00:1::/32")}}),
		chain("v6-port", &listenerv3.FilterChainMatch{PrefixRanges: []*corev3.CidrRange{cidr("fd00::/8")}, SourcePrefixRanges: []*corev3.CidrRange{cidr("fd00:1::/32")}, SourcePorts: []uint32{5000}}),
		chain("ext", &listenerv3.FilterChainMatch{SourceType: listenerv3.FilterChainMatch_EXTERNAL}),
	}
	run(t, chains, chain("dflt", nil), []tcase{
		{conn("10.2.0.1:80"), "10/8"},
		{conn("10.1.0.1:80"), "10.1/16"},                                       // longest prefix, external source: ANY bucket
		{conn("10.1.0.1:80", from("127.0.0.6", 1)), "10.1/16-local"},           // loopback source
		{conn("10.1.0.1:80", from("10.1.0.1", 1)), "10.1/16-local"},            // same IP
		{conn("[fd00::1]:80", from("fd00:1::9", 1)), "v6"},                     // source prefix
		{conn("[fd00::1]:80", from("fd00:1::9", 5000)), "v6-port"},             // source port beats any port
		{conn("[fd00::1]:80", from("fd00:2::9", 5000)), "default"},             // source prefix misses: no backtracking
		{conn("192.0.2.1:80"), "ext"},                                          // no prefix bucket: catch-all, EXTERNAL
		{conn("192.0.2.1:80", from("192.0.2.1", 9)), "default"},                // same IP: no LOCAL or ANY bucket there
		{conn("192.0.2.1:80", func(c *ConnInfo) { c.Pipe = true }), "default"}, // pipe: 255.255.255.255 is same IP
	})
}

func TestCompileErrors(t *testing.T) {
	for _, tc := range []struct {
		chains []*listenerv3.FilterChain
		want   string
	}{
		{[]*listenerv3.FilterChain{chain("a", nil), chain("b", nil)}, `multiple filter chains with the same matching rules are defined (filter chain "a" and filter chain "b")`},
		{[]*listenerv3.FilterChain{chain("w", &listenerv3.FilterChainMatch{ServerNames: []string{"a*.com"}})}, `filter chain "w": filter_chain_match.server_names[0]: "a*.com"`},
		{[]*listenerv3.FilterChain{chain("p", &listenerv3.FilterChainMatch{DestinationPort: wrapperspb.UInt32(70000)})}, "destination_port: 70000"},
		{[]*listenerv3.FilterChain{{FilterChainMatch: &listenerv3.FilterChainMatch{PrefixRanges: []*corev3.CidrRange{{AddressPrefix: "10.0.0.300"}}}}}, `filter_chains[0]: filter_chain_match.prefix_ranges[0].address_prefix: "10.0.0.300"`},
		{[]*listenerv3.FilterChain{chain("s", &listenerv3.FilterChainMatch{SuffixLen: wrapperspb.UInt32(1)})}, "suffix_len: not implemented"},
	} {
		_, err := Compile(tc.chains, nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Compile: %v, want an error containing %q", err, tc.want)
		}
	}
}

func TestMatchDoesNotAllocate(t *testing.T) {
	chains, c := inboundChains(20)
	m, err := Compile(chains, nil)
	if err != nil {
		t.Fatal(err)
	}
	if n := testing.AllocsPerRun(100, func() { m.Match(c) }); n != 0 {
		t.Fatalf("Match allocates %v times", n)
	}
}

// inboundChains builds an Istio-sized virtualInbound: 4 chains per port.
func inboundChains(ports int) ([]*listenerv3.FilterChain, *ConnInfo) {
	var chains []*listenerv3.FilterChain
	for i := 0; i < ports; i++ {
		p := wrapperspb.UInt32(uint32(8000 + i))
		chains = append(chains,
			chain(fmt.Sprint(i, "tls-http"), &listenerv3.FilterChainMatch{DestinationPort: p, TransportProtocol: "tls", ApplicationProtocols: []string{"istio-http/1.1"}}),
			chain(fmt.Sprint(i, "tls"), &listenerv3.FilterChainMatch{DestinationPort: p, TransportProtocol: "tls"}),
			chain(fmt.Sprint(i, "raw-http"), &listenerv3.FilterChainMatch{DestinationPort: p, ApplicationProtocols: []string{"http/1.1", "h2c"}}),
			chain(fmt.Sprint(i, "raw"), &listenerv3.FilterChainMatch{DestinationPort: p}))
	}
	c := conn(fmt.Sprintf("10.0.0.5:%d", 8000+ports/2), alpn("h2c"), func(c *ConnInfo) { c.ServerName = "svc.ns.svc.cluster.local" })
	return chains, c
}

func BenchmarkMatch(b *testing.B) {
	chains, c := inboundChains(50)
	m, err := Compile(chains, nil)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		if _, ok := m.Match(c); !ok {
			b.Fatal("no match")
		}
	}
}
