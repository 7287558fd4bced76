package filterchain

import (
	"testing"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
)

// The example of listener_components.proto: "www.example.com", then
// "*.example.com", then "*.com", then a chain without server_names.
func TestServerNames(t *testing.T) {
	chains := []*listenerv3.FilterChain{
		fc("www", names("www.example.com")),
		fc("wild-example", names("*.example.com")),
		fc("wild-com", names("*.COM")), // lower-cased at Compile
		fc("none"),
	}
	runCases(t, chains, nil, []matchCase{
		{"exact", conn("1.2.3.4:443", tls("www.example.com")), "www"},
		{"wildcard", conn("1.2.3.4:443", tls("a.example.com")), "wild-example"},
		{"wildcard spans labels", conn("1.2.3.4:443", tls("a.b.example.com")), "wild-example"},
		{"wildcard excludes the bare domain", conn("1.2.3.4:443", tls("example.com")), "wild-com"},
		{"shorter wildcard", conn("1.2.3.4:443", tls("foo.com")), "wild-com"},
		{"no name matches", conn("1.2.3.4:443", tls("foo.org")), "none"},
		{"no SNI", conn("1.2.3.4:443", tls("")), "none"},
		{"plaintext", conn("1.2.3.4:443"), "none"},
		{"SNI lower-cased", conn("1.2.3.4:443", tls("WWW.Example.COM")), "www"},
		{"SNI lower-cased wildcard", conn("1.2.3.4:443", tls("A.EXAMPLE.com")), "wild-example"},
		// Envoy only tries the suffixes at a dot before the last byte.
		{"trailing dot", conn("1.2.3.4:443", tls("www.example.com.")), "none"},
		// An SNI that is itself a stored wildcard key hits it on the exact
		// lookup, as in Envoy.
		{"leading dot", conn("1.2.3.4:443", tls(".example.com")), "wild-example"},
	})
}

// At the server-name level the most specific bucket is final: an exact
// name whose chains want TLS does not fall back to the wildcard.
func TestServerNameNoBacktracking(t *testing.T) {
	chains := []*listenerv3.FilterChain{
		fc("a-tls", names("a.example.com"), transport("tls")),
		fc("wild", names("*.example.com")),
		fc("any"),
	}
	runCases(t, chains, dflt, []matchCase{
		{"exact tls", conn("1.2.3.4:443", tls("a.example.com")), "a-tls"},
		{"exact name, plaintext", conn("1.2.3.4:443", func(c *ConnInfo) { c.ServerName = "a.example.com" }), "default"},
		{"wildcard", conn("1.2.3.4:443", tls("b.example.com")), "wild"},
	})
}

// An exact destination_port bucket decides alone: when nothing in it
// matches, Envoy uses the default chain and does not try the chains
// without destination_port.
func TestDestinationPort(t *testing.T) {
	chains := []*listenerv3.FilterChain{
		fc("80-a", dstPort(80), names("a")),
		fc("catchall"),
	}
	runCases(t, chains, dflt, []matchCase{
		{"exact port and name", conn("1.2.3.4:80", tls("a")), "80-a"},
		{"exact port, other name: default, not catchall", conn("1.2.3.4:80", tls("b")), "default"},
		{"exact port, no SNI: default", conn("1.2.3.4:80"), "default"},
		{"other port", conn("1.2.3.4:81", tls("b")), "catchall"},
		{"other port, same name", conn("1.2.3.4:81", tls("a")), "catchall"},
		{"pipe skips the port lookup", conn("1.2.3.4:80", pipe, tls("b")), "catchall"},
	})
	runCases(t, chains, nil, []matchCase{
		{"no default: closed", conn("1.2.3.4:80", tls("b")), "closed"},
	})
	runCases(t, chains[:1], nil, []matchCase{
		{"no port-0 bucket", conn("1.2.3.4:81"), "closed"},
	})
	runCases(t, chains[:1], dflt, []matchCase{
		{"no port-0 bucket, default", conn("1.2.3.4:81"), "default"},
	})
}

// Istio's virtualOutbound (15001): a blackhole chain for the listener's own
// port, so traffic addressed to it does not loop, and a catch-all.
func TestIstioVirtualOutbound(t *testing.T) {
	chains := []*listenerv3.FilterChain{
		fc("virtualOutbound-blackhole", dstPort(15001)),
		fc("virtualOutbound-catchall-tcp"),
	}
	runCases(t, chains, nil, []matchCase{
		{"own port", conn("10.96.0.1:15001"), "virtualOutbound-blackhole"},
		{"own port v6", conn("[fd00::1]:15001"), "virtualOutbound-blackhole"},
		{"own port tls", conn("10.96.0.1:15001", tls("x")), "virtualOutbound-blackhole"},
		{"other port", conn("10.96.0.1:443", tls("api.example.com")), "virtualOutbound-catchall-tcp"},
		{"other port v6", conn("[fd00::1]:80"), "virtualOutbound-catchall-tcp"},
		{"loopback source", conn("10.96.0.1:80", from("127.0.0.1:1234")), "virtualOutbound-catchall-tcp"},
	})
}

// istioInbound is the shape of Istio's virtualInbound (15006) in
// PERMISSIVE mode: a blackhole for 15006; per service port, mTLS chains
// keyed by Istio's ALPN, plaintext chains keyed by http_inspector's
// result; then passthrough chains for any other port over 0.0.0.0/0 and
// ::/0.
func istioInbound(ports ...uint32) []*listenerv3.FilterChain {
	chains := []*listenerv3.FilterChain{fc("virtualInbound-blackhole", dstPort(15006))}
	for _, p := range ports {
		chains = append(chains,
			fc(portName(p, "tls-http"), dstPort(p), transport("tls"), alpns("istio-http/1.0", "istio-http/1.1", "istio-h2")),
			fc(portName(p, "tls-tcp"), dstPort(p), transport("tls")),
			fc(portName(p, "raw-http"), dstPort(p), transport("raw_buffer"), alpns("http/1.1", "h2c")),
			fc(portName(p, "raw-tcp"), dstPort(p), transport("raw_buffer")))
	}
	return append(chains,
		fc("virtualInbound-tls", dstIPs("0.0.0.0/0", "::/0"), transport("tls")),
		fc("virtualInbound-catchall-http", dstIPs("0.0.0.0/0", "::/0"), transport("raw_buffer"), alpns("http/1.1", "h2c")),
		fc("virtualInbound", dstIPs("0.0.0.0/0", "::/0"), transport("raw_buffer")))
}

func portName(p uint32, kind string) string {
	return "inbound|" + itoa(p) + "|" + kind
}

func itoa(p uint32) string {
	if p == 0 {
		return "0"
	}
	var b [10]byte
	i := len(b)
	for ; p > 0; p /= 10 {
		i--
		b[i] = byte('0' + p%10)
	}
	return string(b[i:])
}

func TestIstioVirtualInbound(t *testing.T) {
	chains := istioInbound(8080, 9080)
	runCases(t, chains, nil, []matchCase{
		{"blackhole", conn("10.0.0.5:15006"), "virtualInbound-blackhole"},
		{"8080 mTLS istio-h2", conn("10.0.0.5:8080", tls("outbound_.8080_._.svc.ns.svc.cluster.local"), alpn("istio-h2", "h2")), "inbound|8080|tls-http"},
		{"8080 mTLS istio-http/1.1", conn("10.0.0.5:8080", tls(""), alpn("istio-http/1.1")), "inbound|8080|tls-http"},
		{"8080 mTLS istio-peer-exchange only", conn("10.0.0.5:8080", tls(""), alpn("istio-peer-exchange")), "inbound|8080|tls-tcp"},
		{"8080 TLS without ALPN", conn("10.0.0.5:8080", tls("app.example.com")), "inbound|8080|tls-tcp"},
		{"8080 plaintext h2c", conn("10.0.0.5:8080", raw, alpn("h2c")), "inbound|8080|raw-http"},
		{"8080 plaintext http/1.1", conn("10.0.0.5:8080", alpn("http/1.1")), "inbound|8080|raw-http"},
		{"8080 first listed protocol present decides", conn("10.0.0.5:8080", alpn("smtp", "http/1.1")), "inbound|8080|raw-http"},
		{"8080 plaintext tcp", conn("10.0.0.5:8080"), "inbound|8080|raw-tcp"},
		{"8080 plaintext http/1.0 (not listed)", conn("10.0.0.5:8080", alpn("http/1.0")), "inbound|8080|raw-tcp"},
		{"9080 v6 mTLS", conn("[fd00::5]:9080", tls(""), alpn("istio-h2")), "inbound|9080|tls-http"},
		{"9080 v6 plaintext", conn("[fd00::5]:9080"), "inbound|9080|raw-tcp"},
		{"passthrough tls", conn("10.0.0.5:7000", tls("x")), "virtualInbound-tls"},
		{"passthrough tls v6", conn("[fd00::5]:7000", tls("")), "virtualInbound-tls"},
		{"passthrough http", conn("10.0.0.5:7000", alpn("http/1.1")), "virtualInbound-catchall-http"},
		{"passthrough h2c v6", conn("[fd00::5]:7000", alpn("h2c")), "virtualInbound-catchall-http"},
		{"passthrough tcp", conn("10.0.0.5:7000"), "virtualInbound"},
		{"passthrough tcp v6", conn("[fd00::5]:7000"), "virtualInbound"},
		{"passthrough tcp ipv4-mapped", conn("[::ffff:10.0.0.5]:7000"), "virtualInbound"},
		{"passthrough unknown transport", conn("10.0.0.5:7000", func(c *ConnInfo) { c.TransportProtocol = "quic" }), "closed"},
	})
}

func TestDestinationPrefixes(t *testing.T) {
	chains := []*listenerv3.FilterChain{
		fc("10/8", dstIPs("10.0.0.0/8")),
		fc("10.1/16", dstIPs("10.1.0.0/16", "192.168.0.0/16")),
		fc("host", dstIPs("10.1.2.3/32")),
		fc("fd00/8", dstIPs("fd00::/8")),
		fc("fd00:1/32", dstIPs("fd00:1::/32")),
		fc("mapped", dstIPs("::ffff:172.16.0.0/108")), // an IPv6 prefix: never an IPv4 connection
		fc("rest"),
	}
	runCases(t, chains, dflt, []matchCase{
		{"/8", conn("10.2.0.1:80"), "10/8"},
		{"/16 beats /8", conn("10.1.0.1:80"), "10.1/16"},
		{"/32 beats /16", conn("10.1.2.3:80"), "host"},
		{"second range of a chain", conn("192.168.7.7:80"), "10.1/16"},
		{"no prefix is the catch-all", conn("172.16.0.1:80"), "rest"},
		{"ipv4-mapped connection is IPv4", conn("[::ffff:10.1.2.3]:80"), "host"},
		{"v6 /8", conn("[fd00:2::1]:80"), "fd00/8"},
		{"v6 /32", conn("[fd00:1::1]:80"), "fd00:1/32"},
		{"v6 catch-all", conn("[2001:db8::1]:80"), "rest"},
		{"pipe is 255.255.255.255", conn("10.1.2.3:80", pipe), "rest"},
	})
}

// Envoy inserts "no prefix_ranges" into its trie as 0.0.0.0/0 and ::/0, the
// same node as an explicit 0.0.0.0/0; the chains under both are matched as
// one bucket here.
func TestCatchAllPrefixIsZeroPrefix(t *testing.T) {
	chains := []*listenerv3.FilterChain{
		fc("v4-any-x", dstIPs("0.0.0.0/0"), names("x")),
		fc("none"),
	}
	runCases(t, chains, dflt, []matchCase{
		{"v4 sni x", conn("10.0.0.1:80", tls("x")), "v4-any-x"},
		{"v4 other", conn("10.0.0.1:80", tls("y")), "none"},
		{"v6 sni x", conn("[fd00::1]:80", tls("x")), "none"},
	})
	// A longer prefix still wins, with no fallback to the catch-all.
	chains = []*listenerv3.FilterChain{
		fc("10/8-x", dstIPs("10.0.0.0/8"), names("x")),
		fc("none"),
	}
	runCases(t, chains, dflt, []matchCase{
		{"/8 sni x", conn("10.0.0.1:80", tls("x")), "10/8-x"},
		{"/8 other sni: default", conn("10.0.0.1:80", tls("y")), "default"},
		{"outside /8", conn("11.0.0.1:80", tls("y")), "none"},
	})
}

func TestTransportProtocol(t *testing.T) {
	chains := []*listenerv3.FilterChain{
		fc("raw", transport("raw_buffer")),
		fc("tls", transport("tls")),
	}
	runCases(t, chains, dflt, []matchCase{
		{"no listener filter: raw_buffer", conn("1.2.3.4:80"), "raw"},
		{"raw_buffer", conn("1.2.3.4:80", raw), "raw"},
		{"tls", conn("1.2.3.4:80", tls("")), "tls"},
		{"unknown", conn("1.2.3.4:80", func(c *ConnInfo) { c.TransportProtocol = "x" }), "default"},
	})
}

func TestApplicationProtocols(t *testing.T) {
	chains := []*listenerv3.FilterChain{
		fc("h2", alpns("h2")),
		fc("h1", alpns("http/1.1", "http/1.0")),
	}
	runCases(t, chains, dflt, []matchCase{
		{"h2", conn("1.2.3.4:443", tls(""), alpn("h2", "http/1.1")), "h2"},
		{"client order decides", conn("1.2.3.4:443", tls(""), alpn("http/1.1", "h2")), "h1"},
		{"skips unknown", conn("1.2.3.4:443", tls(""), alpn("h3", "http/1.0")), "h1"},
		{"none present, no catch-all", conn("1.2.3.4:443", tls(""), alpn("h3")), "default"},
		{"no ALPN", conn("1.2.3.4:443", tls("")), "default"},
	})
}

func TestDirectSourcePrefixes(t *testing.T) {
	chains := []*listenerv3.FilterChain{
		fc("lb", directIPs("192.168.0.0/16")),
		fc("other"),
	}
	runCases(t, chains, nil, []matchCase{
		{"proxy protocol: direct peer is the LB", conn("10.0.0.1:80", from("203.0.113.9:5000"), direct("192.168.1.1")), "lb"},
		{"proxy protocol: direct peer elsewhere", conn("10.0.0.1:80", from("192.168.1.1:5000"), direct("10.0.0.9")), "other"},
		{"no DirectSrcIP: the source", conn("10.0.0.1:80", from("192.168.1.1:5000")), "lb"},
		{"pipe", conn("10.0.0.1:80", from("192.168.1.1:5000"), pipe), "other"},
	})
}

func TestSourceType(t *testing.T) {
	var (
		anyType  = srcType(listenerv3.FilterChainMatch_ANY)
		local    = srcType(listenerv3.FilterChainMatch_SAME_IP_OR_LOOPBACK)
		external = srcType(listenerv3.FilterChainMatch_EXTERNAL)
	)
	t.Run("local beats any", func(t *testing.T) {
		runCases(t, []*listenerv3.FilterChain{fc("local", local), fc("any", anyType)}, dflt, []matchCase{
			{"127.0.0.1", conn("10.0.0.5:80", from("127.0.0.1:1")), "local"},
			{"::1", conn("[fd00::5]:80", from("[::1]:1")), "local"},
			{"same IP", conn("10.0.0.5:80", from("10.0.0.5:1")), "local"},
			{"same IP, mapped", conn("10.0.0.5:80", from("[::ffff:10.0.0.5]:1")), "local"},
			{"127.0.0.6 is not loopback for Envoy", conn("10.0.0.5:80", from("127.0.0.6:1")), "any"},
			{"external", conn("10.0.0.5:80", from("10.0.0.9:1")), "any"},
			{"pipe", conn("10.0.0.5:80", pipe), "local"},
		})
	})
	t.Run("external beats any", func(t *testing.T) {
		runCases(t, []*listenerv3.FilterChain{fc("external", external), fc("any", anyType)}, dflt, []matchCase{
			{"external", conn("10.0.0.5:80", from("10.0.0.9:1")), "external"},
			{"loopback", conn("10.0.0.5:80", from("127.0.0.1:1")), "any"},
			{"pipe", conn("10.0.0.5:80", pipe), "any"},
		})
	})
	t.Run("no any bucket", func(t *testing.T) {
		runCases(t, []*listenerv3.FilterChain{fc("local", local), fc("external", external)}, dflt, []matchCase{
			{"local", conn("10.0.0.5:80", from("127.0.0.1:1")), "local"},
			{"external", conn("10.0.0.5:80", from("10.0.0.9:1")), "external"},
		})
		runCases(t, []*listenerv3.FilterChain{fc("external", external)}, dflt, []matchCase{
			{"local: nothing", conn("10.0.0.5:80", from("10.0.0.5:1")), "default"},
		})
	})
	t.Run("no backtracking to any", func(t *testing.T) {
		chains := []*listenerv3.FilterChain{fc("ext-10.1", external, srcIPs("10.1.0.0/16")), fc("any", anyType)}
		runCases(t, chains, dflt, []matchCase{
			{"external in prefix", conn("10.0.0.5:80", from("10.1.0.9:1")), "ext-10.1"},
			{"external outside prefix: default", conn("10.0.0.5:80", from("10.2.0.9:1")), "default"},
			{"local: any", conn("10.0.0.5:80", from("127.0.0.1:1")), "any"},
		})
	})
}

func TestSourcePrefixesAndPorts(t *testing.T) {
	chains := []*listenerv3.FilterChain{
		fc("10/8", srcIPs("10.0.0.0/8")),
		fc("10.1/16", srcIPs("10.1.0.0/16")),
		fc("10.1/16:5000", srcIPs("10.1.0.0/16"), srcPorts(5000, 5001)),
		fc("v6", srcIPs("fd00:1::/32")),
		fc("any"),
	}
	runCases(t, chains, dflt, []matchCase{
		{"/16 and listed port", conn("10.0.0.5:80", from("10.1.2.3:5000")), "10.1/16:5000"},
		{"/16 and second listed port", conn("10.0.0.5:80", from("10.1.2.3:5001")), "10.1/16:5000"},
		{"/16 other port", conn("10.0.0.5:80", from("10.1.2.3:6000")), "10.1/16"},
		{"/8", conn("10.0.0.5:80", from("10.9.0.1:5000")), "10/8"},
		{"catch-all v4", conn("10.0.0.5:80", from("192.168.0.1:5000")), "any"},
		{"v6", conn("[fd00::5]:80", from("[fd00:1::9]:5000")), "v6"},
		{"catch-all v6", conn("[fd00::5]:80", from("[fd00:2::9]:5000")), "any"},
		{"pipe: 255.255.255.255 port 0", conn("10.0.0.5:80", from("10.1.2.3:5000"), pipe), "any"},
	})
	// A source prefix bucket without a chain for the port is final.
	chains = []*listenerv3.FilterChain{
		fc("10.1/16:5000", srcIPs("10.1.0.0/16"), srcPorts(5000)),
		fc("any"),
	}
	runCases(t, chains, dflt, []matchCase{
		{"port listed", conn("10.0.0.5:80", from("10.1.2.3:5000")), "10.1/16:5000"},
		{"port not listed: default", conn("10.0.0.5:80", from("10.1.2.3:6000")), "default"},
		{"outside prefix", conn("10.0.0.5:80", from("10.2.2.3:6000")), "any"},
	})
}

func TestNoChains(t *testing.T) {
	runCases(t, nil, nil, []matchCase{{"closed", conn("1.2.3.4:80"), "closed"}})
	runCases(t, nil, dflt, []matchCase{{"default", conn("1.2.3.4:80"), "default"}})
}

// An empty filter_chain_match is the same as none.
func TestEmptyMatchIsNoMatch(t *testing.T) {
	chains := []*listenerv3.FilterChain{{Name: "empty", FilterChainMatch: &listenerv3.FilterChainMatch{}}}
	runCases(t, chains, nil, []matchCase{
		{"v4", conn("1.2.3.4:80"), "empty"},
		{"v6 tls", conn("[::1]:443", tls("a")), "empty"},
		{"pipe", conn("1.2.3.4:80", pipe), "empty"},
	})
}

// A lone chain with an empty (or absent) filter_chain_match skips the
// tree; the shortcut must answer exactly as the tree does, for every kind
// of connection, with and without a default chain; a lone chain with any
// field set, even a zero wrapper, is not taken for empty.
func TestLoneEmptyChainShortcut(t *testing.T) {
	conns := []*ConnInfo{
		conn("1.2.3.4:80"), conn("[::1]:443", tls("A.example.com"), alpn("h2")),
		conn("10.0.0.5:8080", raw, alpn("http/1.1")), conn("127.0.0.1:15001", from("127.0.0.1:5")),
		conn("[::ffff:10.0.0.5]:7000", from("[fe80::1%eth0]:1")), conn("1.2.3.4:80", pipe),
	}
	for _, chain := range []*listenerv3.FilterChain{
		{Name: "none"}, {Name: "empty", FilterChainMatch: &listenerv3.FilterChainMatch{}},
	} {
		for _, def := range []*listenerv3.FilterChain{nil, dflt} {
			chains := []*listenerv3.FilterChain{chain}
			fast, err := Compile(chains, def)
			if err != nil {
				t.Fatal(err)
			}
			tree, err := compileTree(chains, def)
			if err != nil {
				t.Fatal(err)
			}
			if !fast.only || tree.only {
				t.Fatalf("%s: shortcut taken %v (want true), by the tree %v (want false)", chain.Name, fast.only, tree.only)
			}
			if fast.NeedsTLSInspection() != tree.NeedsTLSInspection() || fast.NeedsHTTPInspection() != tree.NeedsHTTPInspection() {
				t.Errorf("%s: inspection needs differ from the tree's", chain.Name)
			}
			for _, c := range conns {
				fi, fok := fast.Match(c)
				ti, tok := tree.Match(c)
				if fi != ti || fok != tok || fi != 0 || !fok {
					t.Errorf("%s: %+v: shortcut (%d, %v), tree (%d, %v), want (0, true)", chain.Name, c, fi, fok, ti, tok)
				}
			}
		}
	}
	m, err := Compile([]*listenerv3.FilterChain{fc("port0", dstPort(8080))}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if m.only {
		t.Fatal("a chain with destination_port set was taken for one with an empty match")
	}
	if _, ok := m.Match(conn("1.2.3.4:80")); ok {
		t.Fatal("a chain for port 8080 matched port 80")
	}
}

func TestMatchDoesNotAllocate(t *testing.T) {
	m, err := Compile(istioInbound(8080, 9080), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []*ConnInfo{
		conn("10.0.0.5:8080", tls("Outbound_.8080_._.Svc.NS.svc.cluster.local"), alpn("istio-h2")),
		conn("10.0.0.5:8080", alpn("smtp", "h2c")),
		conn("[::ffff:10.0.0.5]:7000", from("[fe80::1%eth0]:1")),
		conn("10.0.0.5:8080", pipe),
	} {
		if n := testing.AllocsPerRun(200, func() { m.Match(c) }); n != 0 {
			t.Errorf("Match(%+v) allocates %v times", *c, n)
		}
	}
	names := []*listenerv3.FilterChain{fc("a", names("*.example.com")), fc("b", names("www.example.com")), fc("c")}
	if m, err = Compile(names, nil); err != nil {
		t.Fatal(err)
	}
	c := conn("1.2.3.4:443", tls("A.B.C.Example.COM"))
	if n := testing.AllocsPerRun(200, func() { m.Match(c) }); n != 0 {
		t.Errorf("Match with an upper-case SNI allocates %v times", n)
	}
}
