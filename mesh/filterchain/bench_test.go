package filterchain

import (
	"fmt"
	"net/netip"
	"testing"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
)

// BenchmarkMatch measures one filter-chain selection. The main case is an
// Istio-sized virtualInbound: 50 service ports × 4 chains, the blackhole and
// the passthrough chains (204 chains).
func BenchmarkMatch(b *testing.B) {
	ports := make([]uint32, 50)
	for i := range ports {
		ports[i] = uint32(8000 + i)
	}
	inbound := istioInbound(ports...)

	var sniChains []*listenerv3.FilterChain
	for i := range 200 {
		sniChains = append(sniChains, fc(fmt.Sprint("sni", i), names(fmt.Sprintf("*.ns%d.svc.cluster.local", i), fmt.Sprintf("svc%d.example.com", i))))
	}
	sniChains = append(sniChains, fc("no-sni"))

	var prefixChains []*listenerv3.FilterChain
	for i := range 500 {
		prefixChains = append(prefixChains, fc(fmt.Sprint("vip", i), dstIPs(netip.AddrFrom4([4]byte{10, 96, byte(i >> 8), byte(i)}).String()+"/32")))
	}
	prefixChains = append(prefixChains, fc("passthrough"))

	for _, bc := range []struct {
		name   string
		chains []*listenerv3.FilterChain
		c      *ConnInfo
		want   string
	}{
		{"virtualInbound/mtls-http", inbound, conn("10.0.0.5:8025", tls("outbound_.8025_._.svc.ns.svc.cluster.local"), alpn("istio-peer-exchange", "istio-h2")), "inbound|8025|tls-http"},
		{"virtualInbound/plaintext-h2c", inbound, conn("10.0.0.5:8025", raw, alpn("h2c")), "inbound|8025|raw-http"},
		{"virtualInbound/plaintext-tcp", inbound, conn("10.0.0.5:8049", raw), "inbound|8049|raw-tcp"},
		{"virtualInbound/passthrough-v6", inbound, conn("[fd00::5]:9999", raw), "virtualInbound"},
		{"virtualOutbound", []*listenerv3.FilterChain{fc("virtualOutbound-blackhole", dstPort(15001)), fc("virtualOutbound-catchall-tcp")}, conn("10.96.0.10:443"), "virtualOutbound-catchall-tcp"},
		{"sni-200/wildcard", sniChains, conn("1.2.3.4:443", tls("a.b.ns150.svc.cluster.local")), "sni150"},
		{"sni-200/upper-case", sniChains, conn("1.2.3.4:443", tls("SVC150.Example.com")), "sni150"},
		{"prefix-500/host", prefixChains, conn("10.96.1.44:80"), "vip300"},
		{"prefix-500/miss", prefixChains, conn("10.97.0.1:80"), "passthrough"},
	} {
		m, err := Compile(bc.chains, nil)
		if err != nil {
			b.Fatal(err)
		}
		if got := chosen(m, bc.chains, bc.c); got != bc.want {
			b.Fatalf("%s: chose %q, want %q", bc.name, got, bc.want)
		}
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				m.Match(bc.c)
			}
		})
	}
}

func BenchmarkCompile(b *testing.B) {
	ports := make([]uint32, 50)
	for i := range ports {
		ports[i] = uint32(8000 + i)
	}
	chains := istioInbound(ports...)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Compile(chains, nil); err != nil {
			b.Fatal(err)
		}
	}
}
