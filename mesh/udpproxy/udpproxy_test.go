package udpproxy

import (
	"bytes"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	matcherv3 "github.com/cncf/xds/go/xds/type/matcher/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	udpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/udp/udp_proxy/v3"
	"github.com/rs/zerolog"
	wgnetstack "golang.zx2c4.com/wireguard/tun/netstack"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/mesh/accesslog"
	"github.com/meshtun/meshtun/mesh/cluster"
	"github.com/meshtun/meshtun/mesh/upstream"
	"github.com/meshtun/meshtun/netstack"
)

var known = func(n string) bool { return n == "dns" }

func toCluster(cl string) *udpproxyv3.UdpProxyConfig {
	return &udpproxyv3.UdpProxyConfig{StatPrefix: "dns", RouteSpecifier: &udpproxyv3.UdpProxyConfig_Cluster{Cluster: cl}}
}

func TestParse(t *testing.T) {
	u, err := Parse(toCluster("dns"), known)
	if err != nil {
		t.Fatal(err)
	}
	if u.Cluster != "dns" || u.StatPrefix != "dns" || u.IdleTimeout != time.Minute {
		t.Fatalf("parsed %+v, want cluster dns and Envoy's 60 s idle timeout", u)
	}
	pb := toCluster("dns")
	pb.IdleTimeout = durationpb.New(5 * time.Second)
	if u, err := Parse(pb, known); err != nil || u.IdleTimeout != 5*time.Second {
		t.Fatalf("idle_timeout 5s: %+v %v", u, err)
	}
	for _, tc := range []struct {
		name string
		pb   *udpproxyv3.UdpProxyConfig
		want string
	}{
		{"unknown cluster", toCluster("nope"), `cluster: "nope" is not a known cluster`},
		{"matcher", &udpproxyv3.UdpProxyConfig{StatPrefix: "dns", RouteSpecifier: &udpproxyv3.UdpProxyConfig_Matcher{Matcher: &matcherv3.Matcher{}}}, "matcher: not supported; use cluster"},
		{"empty stat_prefix", &udpproxyv3.UdpProxyConfig{RouteSpecifier: &udpproxyv3.UdpProxyConfig_Cluster{Cluster: "dns"}}, "StatPrefix"},
	} {
		if _, err := Parse(tc.pb, known); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error containing %q", tc.name, err, tc.want)
		}
	}
}

// clusterMap is the configuration a flow sees: clusters by name.
type clusterMap map[string]*cluster.Cluster

func (m clusterMap) Cluster(name string) *cluster.Cluster { return m[name] }

// echoUDP answers every datagram with itself, from a loopback socket.
func echoUDP(t *testing.T) netip.AddrPort {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { pc.Close(); <-done })
	go func() {
		defer close(done)
		buf := make([]byte, 64<<10)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(buf[:n], from)
		}
	}()
	return pc.LocalAddr().(*net.UDPAddr).AddrPort()
}

// session sends msg from a client stack to 10.96.0.10:53, captured by a
// netstack whose UDP flows Serve runs with clusters, and returns the
// reply (nil if none within a short wait) and the session's entry once
// the flow has idled out.
func session(t *testing.T, u *Config, clusters Clusters, msg []byte) ([]byte, accesslog.Entry) {
	t.Helper()
	entries := make(chan accesslog.Entry, 1)
	h := netstack.HandlerFuncs{UDP: func(f *netstack.UDPFlow) {
		var e accesslog.Entry
		u.Serve(f, clusters, &upstream.Dialer{}, &e)
		entries <- e
	}}
	client := netip.MustParseAddr("10.0.0.2")
	dev, tnet, err := wgnetstack.CreateNetTUN([]netip.Addr{client}, nil, 1500)
	if err != nil {
		t.Fatal(err)
	}
	s, err := netstack.New(dev, h, netstack.Config{UDPIdleTimeout: 200 * time.Millisecond}, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	stop := func() { once.Do(func() { s.Close(); dev.Close() }) }
	t.Cleanup(stop)
	c, err := tnet.DialUDPAddrPort(netip.AddrPort{}, netip.MustParseAddrPort("10.96.0.10:53"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(time.Second))
	buf := make([]byte, 64<<10)
	var reply []byte
	if n, err := c.Read(buf); err == nil {
		reply = buf[:n]
	}
	select {
	case e := <-entries:
		return reply, e
	case <-time.After(5 * time.Second):
		t.Fatal("the session never ended")
	}
	return nil, accesslog.Entry{}
}

func TestServeRelaysToAHostOfTheCluster(t *testing.T) {
	host := echoUDP(t)
	c, err := cluster.New(xdstest.StaticCluster("dns", host), cluster.Options{Dialer: &upstream.Dialer{}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	u, err := Parse(toCluster("dns"), known)
	if err != nil {
		t.Fatal(err)
	}
	msg := bytes.Repeat([]byte("q"), 512)
	reply, e := session(t, u, clusterMap{"dns": c}, msg)
	if !bytes.Equal(reply, msg) {
		t.Fatalf("reply %q, want the echo of %d bytes", reply, len(msg))
	}
	if e.UpstreamCluster != "dns" || e.UpstreamHost != host || !e.UpstreamLocal.IsValid() || e.BytesReceived != 512 || e.BytesSent != 512 || e.ResponseFlags != "" {
		t.Fatalf("entry %+v, want cluster dns, host %v, 512 bytes each way, no flag", e, host)
	}
}

// No session starts without a cluster (NC) or a host (UH): the flow is
// closed, nothing is relayed, and the entry says why.
func TestServeFlags(t *testing.T) {
	empty, err := cluster.New(&clusterv3.Cluster{Name: "dns", ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC}},
		cluster.Options{Dialer: &upstream.Dialer{}})
	if err != nil {
		t.Fatal(err)
	}
	defer empty.Close()
	u, err := Parse(toCluster("dns"), known)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		clusters clusterMap
		flag     string
	}{{"missing cluster", clusterMap{}, "NC"}, {"no host", clusterMap{"dns": empty}, "UH"}} {
		reply, e := session(t, u, tc.clusters, []byte("q"))
		if reply != nil || e.ResponseFlags != tc.flag || e.UpstreamCluster != "dns" || e.UpstreamHost.IsValid() {
			t.Errorf("%s: reply %q, entry %+v, want no reply and flag %s", tc.name, reply, e, tc.flag)
		}
	}
}
