//go:build linux

package integration

import (
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Bootstrap building blocks, in Envoy v3 JSON, shaped like Istio's.
type obj = map[string]any

func sockAddr(ip netip.Addr, port uint16) obj {
	return obj{"socket_address": obj{"address": ip.String(), "port_value": port}}
}

func tcpProxy(cluster string) obj {
	return obj{"name": "envoy.filters.network.tcp_proxy", "typed_config": obj{
		"@type":       "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
		"stat_prefix": cluster, "cluster": cluster}}
}

func virtualOutbound(catchall string) obj {
	return obj{"name": "virtualOutbound", "address": sockAddr(netip.IPv4Unspecified(), 15001),
		"use_original_dst": true, "traffic_direction": "OUTBOUND",
		"filter_chains": []obj{
			{"name": "virtualOutbound-blackhole", "filter_chain_match": obj{"destination_port": 15001}, "filters": []obj{tcpProxy("BlackHoleCluster")}},
			{"name": "virtualOutbound-catchall-tcp", "filters": []obj{
				{"name": "istio.stats", "typed_config": obj{"@type": "type.googleapis.com/stats.PluginConfig"}},
				tcpProxy(catchall)}},
		}}
}

func virtualInbound() obj {
	return obj{"name": "virtualInbound", "address": sockAddr(netip.IPv4Unspecified(), 15006), "traffic_direction": "INBOUND",
		"listener_filters": []obj{{"name": "envoy.filters.listener.original_dst", "typed_config": obj{
			"@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}},
		"filter_chains": []obj{{"name": "virtualInbound-catchall-tcp", "filters": []obj{tcpProxy("InboundPassthroughCluster")}}}}
}

func serviceListener(vip netip.Addr, port uint16, cluster string) obj {
	return obj{"name": fmt.Sprintf("%s_%d", vip, port), "address": sockAddr(vip, port), "bind_to_port": false,
		"traffic_direction": "OUTBOUND", "filter_chains": []obj{{"filters": []obj{tcpProxy(cluster)}}}}
}

func staticCluster(name string, lb string, eps ...netip.AddrPort) obj {
	var lbe []obj
	for _, e := range eps {
		lbe = append(lbe, obj{"endpoint": obj{"address": sockAddr(e.Addr(), e.Port())}})
	}
	c := obj{"name": name, "type": "STATIC", "connect_timeout": "2s", "lb_policy": lb}
	if len(lbe) > 0 {
		c["load_assignment"] = obj{"cluster_name": name, "endpoints": []obj{{"lb_endpoints": lbe}}}
	}
	return c
}

func istioClusters() []obj {
	return []obj{
		{"name": "PassthroughCluster", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "2s", "alt_stat_name": "PassthroughCluster;"},
		{"name": "BlackHoleCluster", "type": "STATIC", "connect_timeout": "2s", "alt_stat_name": "BlackHoleCluster;"},
		{"name": "InboundPassthroughCluster", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED", "connect_timeout": "2s",
			"upstream_bind_config": obj{"source_address": obj{"address": "127.0.0.6", "port_value": 0}}},
	}
}

// writeBootstrap writes listeners and clusters as a bootstrap file.
func writeBootstrap(t *testing.T, listeners, clusters []obj) string {
	t.Helper()
	b, err := json.MarshalIndent(obj{
		"node":             obj{"id": "sidecar~10.0.0.2~test.default~default.svc.cluster.local", "cluster": "test.default"},
		"static_resources": obj{"listeners": listeners, "clusters": clusters},
	}, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "bootstrap.json")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// vip returns a service VIP in the topology's range that no interface has.
func vip(topo *topology, v6 bool, last byte) netip.Addr {
	if v6 {
		a := topo.SvcV6.As16()
		a[13], a[15] = 0x25, last // fd00:x:1::... -> a distinct /128 nobody owns
		return netip.AddrFrom16(a)
	}
	a := topo.SvcV4.As4()
	a[2], a[3] = 250, last
	return netip.AddrFrom4(a)
}

// TestMeshVIPRoundRobinAndPassthrough covers mesh cases 1, 2 and 8: a
// service VIP reaches its endpoints through the service listener and its
// cluster, round robin; an unregistered destination passes through under
// ALLOW_ANY; both over IPv4 and IPv6.
func TestMeshVIPRoundRobinAndPassthrough(t *testing.T) {
	requireRoot(t)
	for _, v6 := range []bool{false, true} {
		t.Run(map[bool]string{false: "ipv4", true: "ipv6"}[v6], func(t *testing.T) {
			topo := newTopology(t)
			s1, s2 := topo.SvcV4, topo.Svc2V4
			if v6 {
				s1, s2 = topo.SvcV6, topo.Svc2V6
			}
			ep1 := startTCPServer(t, topo.Services, ap(s1, 9080), echo)
			ep2 := startTCPServer(t, topo.Services, ap(s2, 9080), echo)
			ext := startTCPServer(t, topo.Services, ap(s1, 7000), echo)
			v := vip(topo, v6, 20)
			cl := "outbound|9080||reviews.default.svc.cluster.local"
			bs := writeBootstrap(t,
				[]obj{virtualOutbound("PassthroughCluster"), virtualInbound(), serviceListener(v, 9080, cl)},
				append(istioClusters(), staticCluster(cl, "ROUND_ROBIN", netip.AddrPortFrom(s1, 9080), netip.AddrPortFrom(s2, 9080))))
			px := startProxy(t, topo, "--bootstrap", bs)

			for i := 0; i < 6; i++ {
				if _, err := tcpEcho(topo.Pod, ap(v, 9080), 4096); err != nil {
					t.Fatalf("flow %d to the VIP: %v", i, err)
				}
			}
			// Round robin: exactly 3 and 3. The VIP never left the pod:
			// no interface in the services namespace owns it, yet both
			// endpoints were reached at their own addresses.
			if a, b := len(ep1.accepted()), len(ep2.accepted()); a != 3 || b != 3 {
				t.Fatalf("endpoints accepted %d and %d connections, want 3 and 3", a, b)
			}
			e, ok := px.waitAccess(byDst(ap(v, 9080)), accessWait)
			if !ok || e.UpstreamCluster != cl {
				t.Fatalf("access line for the VIP: %+v (found %v), want cluster %s", e, ok, cl)
			}
			// ALLOW_ANY: an unregistered destination is reached as addressed.
			if _, err := tcpEcho(topo.Pod, ap(s1, 7000), 4096); err != nil {
				t.Fatalf("passthrough: %v", err)
			}
			if len(ext.accepted()) != 1 {
				t.Fatalf("external server accepted %d, want 1", len(ext.accepted()))
			}
			e, ok = px.waitAccess(byDst(ap(s1, 7000)), accessWait)
			if !ok || e.UpstreamCluster != "PassthroughCluster" || e.UpstreamHost != ap(s1, 7000) {
				t.Fatalf("passthrough access line: %+v (found %v)", e, ok)
			}
		})
	}
}

// TestMeshRegistryOnly is mesh case 3: with BlackHoleCluster as the
// catch-all, a connect to an unregistered destination fails fast and the
// destination accepts nothing.
func TestMeshRegistryOnly(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	ext := startTCPServer(t, topo.Services, ap(topo.SvcV4, 7000), echo)
	bs := writeBootstrap(t, []obj{virtualOutbound("BlackHoleCluster"), virtualInbound()}, istioClusters())
	px := startProxy(t, topo, "--bootstrap", bs)
	start := time.Now()
	c, err := dialTCP(topo.Pod, ap(topo.SvcV4, 7000), 3*time.Second)
	if err == nil {
		c.Close()
		t.Fatal("connect to an unregistered destination succeeded under REGISTRY_ONLY")
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("refusal took %v, want under 1s", d)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("connect error %v, want connection refused", err)
	}
	if n := len(ext.accepted()); n != 0 {
		t.Fatalf("the external server accepted %d connections, want 0", n)
	}
	if e, ok := px.waitAccess(byDst(ap(topo.SvcV4, 7000)), accessWait); !ok || e.UpstreamCluster != "BlackHoleCluster" || e.ResponseFlags != "UH" {
		t.Fatalf("access line %+v (found %v), want BlackHoleCluster with UH", e, ok)
	}
}

// TestMeshInboundPassthrough is mesh case 4: inbound through
// virtualInbound to InboundPassthroughCluster, which binds 127.0.0.6.
func TestMeshInboundPassthrough(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	app := startTCPServer(t, topo.Pod, "0.0.0.0:8080", echo)
	bs := writeBootstrap(t, []obj{virtualOutbound("PassthroughCluster"), virtualInbound()}, istioClusters())
	px := startProxy(t, topo, "--bootstrap", bs)
	if _, err := tcpEcho(topo.Services, ap(topo.PodV4, 8080), 4096); err != nil {
		t.Fatal(err)
	}
	acc := app.accepted()
	if len(acc) != 1 || acc[0].Addr() != netip.MustParseAddr("127.0.0.6") {
		t.Fatalf("app saw %v, want one connection from 127.0.0.6", acc)
	}
	if e, ok := px.waitAccess(byDst(ap(topo.PodV4, 8080)), accessWait); !ok || e.UpstreamCluster != "InboundPassthroughCluster" || e.Direction != "inbound" {
		t.Fatalf("access line %+v (found %v)", e, ok)
	}
}

// TestMeshSNIRouting is mesh case 5: a listener on 0.0.0.0:443 with
// tls_inspector and one chain per server name.
func TestMeshSNIRouting(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	a := startTCPServer(t, topo.Services, ap(topo.SvcV4, 8443), echo)
	b := startTCPServer(t, topo.Services, ap(topo.Svc2V4, 8443), echo)
	sni := obj{"name": "0.0.0.0_443", "address": sockAddr(netip.IPv4Unspecified(), 443), "bind_to_port": false, "traffic_direction": "OUTBOUND",
		"listener_filters": []obj{{"name": "envoy.filters.listener.tls_inspector", "typed_config": obj{
			"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}},
		"filter_chains": []obj{
			{"filter_chain_match": obj{"server_names": []string{"a.example.com"}}, "filters": []obj{tcpProxy("outbound|443||a.example.com")}},
			{"filter_chain_match": obj{"server_names": []string{"*.b.example.com", "b.example.com"}}, "filters": []obj{tcpProxy("outbound|443||b.example.com")}},
		}}
	bs := writeBootstrap(t, []obj{virtualOutbound("PassthroughCluster"), virtualInbound(), sni},
		append(istioClusters(),
			staticCluster("outbound|443||a.example.com", "ROUND_ROBIN", netip.AddrPortFrom(topo.SvcV4, 8443)),
			staticCluster("outbound|443||b.example.com", "ROUND_ROBIN", netip.AddrPortFrom(topo.Svc2V4, 8443))))
	px := startProxy(t, topo, "--bootstrap", bs)
	hello := func(name string) {
		c, err := dialTCP(topo.Pod, ap(vip(topo, false, 30), 443), dialTimeout)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(2 * time.Second))
		// The echo server returns our ClientHello: the handshake fails,
		// but the bytes have reached the server chosen by SNI.
		tls.Client(c, &tls.Config{ServerName: name, InsecureSkipVerify: true}).Handshake()
	}
	hello("www.b.example.com")
	hello("a.example.com")
	hello("b.example.com")
	if na, nb := len(a.accepted()), len(b.accepted()); na != 1 || nb != 2 {
		t.Fatalf("a.example.com's server accepted %d, b's %d; want 1 and 2", na, nb)
	}
	px.waitAccessN(byDst(ap(vip(topo, false, 30), 443)), 3, accessWait)
}

// TestMeshBoundListeners is mesh case 6: a listener on a Unix domain
// socket and one on a TCP port both forward through their clusters.
func TestMeshBoundListeners(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	srv := startTCPServer(t, topo.Services, ap(topo.SvcV4, 9000), echo)
	sock := filepath.Join(t.TempDir(), "svc.sock")
	cl := "outbound|9000||db.default.svc.cluster.local"
	uds := obj{"name": "uds", "address": obj{"pipe": obj{"path": sock}}, "filter_chains": []obj{{"filters": []obj{tcpProxy(cl)}}}}
	tcpL := obj{"name": "127.0.0.1_19000", "address": sockAddr(netip.MustParseAddr("127.0.0.1"), 19000), "filter_chains": []obj{{"filters": []obj{tcpProxy(cl)}}}}
	bs := writeBootstrap(t, []obj{virtualOutbound("PassthroughCluster"), virtualInbound(), uds, tcpL},
		append(istioClusters(), staticCluster(cl, "ROUND_ROBIN", netip.AddrPortFrom(topo.SvcV4, 9000))))
	startProxy(t, topo, "--bootstrap", bs)

	uc, err := net.DialTimeout("unix", sock, dialTimeout)
	if err != nil {
		t.Fatalf("unix listener: %v", err)
	}
	defer uc.Close()
	msg := randomPayload(64 << 10)
	uc.SetDeadline(time.Now().Add(echoTimeout))
	go uc.Write(msg)
	got := make([]byte, len(msg))
	if _, err := readFull(uc, got); err != nil || string(got) != string(msg) {
		t.Fatalf("echo through the unix listener: %v", err)
	}
	if _, err := tcpEcho(topo.Pod, "127.0.0.1:19000", 64<<10); err != nil {
		t.Fatalf("TCP listener: %v", err)
	}
	if n := len(srv.accepted()); n != 2 {
		t.Fatalf("upstream accepted %d connections, want 2", n)
	}
}

func readFull(c net.Conn, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		k, err := c.Read(b[n:])
		n += k
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// TestMeshMaxConnections is mesh case 7: with max_connections 2 a third
// concurrent flow is refused and flagged as an overflow (UO).
func TestMeshMaxConnections(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	hold := make(chan struct{})
	defer close(hold)
	srv := startTCPServer(t, topo.Services, ap(topo.SvcV4, 9500), func(c *net.TCPConn) { <-hold })
	v := vip(topo, false, 40)
	cl := "outbound|9500||limited.default.svc.cluster.local"
	c := staticCluster(cl, "ROUND_ROBIN", netip.AddrPortFrom(topo.SvcV4, 9500))
	c["circuit_breakers"] = obj{"thresholds": []obj{{"max_connections": 2}}}
	bs := writeBootstrap(t, []obj{virtualOutbound("PassthroughCluster"), virtualInbound(), serviceListener(v, 9500, cl)}, append(istioClusters(), c))
	px := startProxy(t, topo, "--bootstrap", bs)
	var held []*net.TCPConn
	defer func() {
		for _, h := range held {
			h.Close()
		}
	}()
	for i := 0; i < 2; i++ {
		h, err := dialTCP(topo.Pod, ap(v, 9500), dialTimeout)
		if err != nil {
			t.Fatalf("connection %d: %v", i+1, err)
		}
		held = append(held, h)
	}
	deadline := time.Now().Add(3 * time.Second)
	for len(srv.accepted()) < 2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	_, err := dialTCP(topo.Pod, ap(v, 9500), dialTimeout)
	if err == nil || !strings.Contains(err.Error(), "refused") {
		t.Fatalf("third connection: %v, want refused", err)
	}
	if e, ok := px.waitAccess(func(e AccessEntry) bool { return e.DownstreamLocal == ap(v, 9500) && e.ResponseFlags == "UO" }, accessWait); !ok {
		t.Fatalf("no access line with UO (upstream overflow): %v", e)
	}
	if n := len(srv.accepted()); n != 2 {
		t.Fatalf("upstream accepted %d, want 2", n)
	}
	stats := adminGet(t, topo, "/stats?filter=upstream_cx_overflow")
	if !strings.Contains(stats, "cluster."+cl+".upstream_cx_overflow: 1\n") {
		t.Fatalf("admin /stats does not count the overflow:\n%s", stats)
	}
}

// adminGet fetches path from the proxy's admin API (127.0.0.1:15000 in
// the pod) and returns the body; non-200 fails the test.
func adminGet(t *testing.T, topo *topology, path string) string {
	t.Helper()
	c, err := dialTCP(topo.Pod, "127.0.0.1:15000", dialTimeout)
	if err != nil {
		t.Fatalf("admin: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n", path)
	resp, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("admin %s: %v", path, err)
	}
	head, body, _ := strings.Cut(string(resp), "\r\n\r\n")
	if !strings.HasPrefix(head, "HTTP/1.0 200") && !strings.HasPrefix(head, "HTTP/1.1 200") {
		t.Fatalf("admin %s: %s", path, head)
	}
	return body
}

// TestAdminListenersAndNotReachableFromOutside: /listeners prints Envoy's
// name::address lines, and the admin port is refused from outside the pod.
func TestAdminListenersAndNotReachableFromOutside(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	v := vip(topo, false, 60)
	cl := "outbound|80||web.default.svc.cluster.local"
	bs := writeBootstrap(t, []obj{virtualOutbound("PassthroughCluster"), virtualInbound(), serviceListener(v, 80, cl)},
		append(istioClusters(), staticCluster(cl, "ROUND_ROBIN", netip.AddrPortFrom(topo.SvcV4, 80))))
	startProxy(t, topo, "--bootstrap", bs)
	want := fmt.Sprintf("virtualOutbound::0.0.0.0:15001\nvirtualInbound::0.0.0.0:15006\n%s_80::%s:80\n", v, v)
	if got := adminGet(t, topo, "/listeners"); got != want {
		t.Fatalf("/listeners = %q, want %q", got, want)
	}
	// meshtun request (pilot-agent request) prints exactly the body.
	out, err := nsRun(topo.Pod, meshtunBin(t), "request", "GET", "/listeners")
	if err != nil || out != want {
		t.Fatalf("meshtun request GET /listeners = %q, %v; want %q", out, err, want)
	}
	if _, err := nsRun(topo.Pod, meshtunBin(t), "request", "GET", "/no-such-endpoint"); err == nil || !strings.Contains(err.Error(), "unsuccessful status code 404") {
		t.Fatalf("meshtun request on an unknown path: %v, want a failure naming the 404", err)
	}
	c, err := dialTCP(topo.Services, ap(topo.PodV4, 15000), dialTimeout)
	if err == nil {
		c.Close()
		t.Fatal("the admin port answered on the pod IP from the services namespace")
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("connect to pod-IP:15000: %v, want refused", err)
	}
}

// TestMeshBadBootstrap: the proxy refuses to start, names the problem, and
// leaves the namespace untouched.
func TestMeshBadBootstrap(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	bs := writeBootstrap(t, []obj{serviceListener(vip(topo, false, 50), 80, "no-such-cluster")}, istioClusters())
	before := podState(t, topo.Pod)
	_, err := nsRun(topo.Pod, meshtunBin(t), "proxy", "--bootstrap", bs, "--state-dir", topo.StateDir, "--log-format", "json")
	if err == nil {
		t.Fatal("proxy started with a listener pointing at a missing cluster")
	}
	// run() puts stderr in the error; the JSON log escapes the quotes.
	want := `filter_chains[0]: filters[0] (envoy.filters.network.tcp_proxy): cluster: \"no-such-cluster\" is not a known cluster`
	if !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), bs) {
		t.Fatalf("error does not name the file, field and value:\n%v", err)
	}
	if after := podState(t, topo.Pod); after != before {
		t.Fatalf("a failed start changed the namespace:\n%s", lineDiff(before, after))
	}
}

// TestMeshUDPProxy: a UDP listener (udp_proxy) at a VIP sends captured
// datagrams to its cluster's endpoint; other UDP still passes through.
func TestMeshUDPProxy(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	echoSvc := startUDPEcho(t, topo.Services, ap(topo.SvcV4, 5353))
	other := startUDPEcho(t, topo.Services, ap(topo.Svc2V4, 5353))
	v := vip(topo, false, 70)
	cl := "outbound|53||dns.default.svc.cluster.local"
	udpL := obj{"name": fmt.Sprintf("%s_53", v), "bind_to_port": false,
		"address": obj{"socket_address": obj{"address": v.String(), "port_value": 53, "protocol": "UDP"}},
		"listener_filters": []obj{{"name": "envoy.filters.udp_listener.udp_proxy", "typed_config": obj{
			"@type":       "type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig",
			"stat_prefix": cl, "cluster": cl, "idle_timeout": "1s"}}}}
	bs := writeBootstrap(t, []obj{virtualOutbound("PassthroughCluster"), virtualInbound(), udpL},
		append(istioClusters(), staticCluster(cl, "ROUND_ROBIN", netip.AddrPortFrom(topo.SvcV4, 5353))))
	px := startProxy(t, topo, "--bootstrap", bs, "--udp-idle-timeout", "1s")
	c, err := dialUDP(topo.Pod, ap(v, 53))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := udpRoundTrip(c, randomPayload(512), 5, time.Second); err != nil {
		t.Fatalf("datagram to the UDP VIP: %v", err)
	}
	if got := echoSvc.sources(); len(got) != 1 {
		t.Fatalf("endpoint saw sources %v, want the proxy's one session", got)
	}
	c2, err := dialUDP(topo.Pod, ap(topo.Svc2V4, 5353))
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if err := udpRoundTrip(c2, randomPayload(100), 5, time.Second); err != nil {
		t.Fatalf("unlisted UDP destination: %v", err)
	}
	if len(other.sources()) != 1 {
		t.Fatalf("passthrough destination saw %v", other.sources())
	}
	e, ok := px.waitAccess(func(e AccessEntry) bool { return e.Transport == "udp" && e.DownstreamLocal == ap(v, 53) }, 5*time.Second)
	if !ok || e.UpstreamCluster != cl || e.UpstreamHost != ap(topo.SvcV4, 5353) {
		t.Fatalf("udp access line %+v (found %v), want cluster %s host %s", e, ok, cl, ap(topo.SvcV4, 5353))
	}
}
