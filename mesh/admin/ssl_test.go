package admin

import (
	"context"
	"net"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"

	"github.com/meshtun/meshtun/internal/testpki"
	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/mesh"
	"github.com/meshtun/meshtun/mesh/cluster"
	"github.com/meshtun/meshtun/mesh/upstream"
)

// A cluster with a TLS transport socket has cluster.<name>.ssl.* in
// /stats and Prometheus (cluster_name tag); a plaintext one has none.
func TestClusterSSLStats(t *testing.T) {
	// An upstream that hangs up at once: the handshake fails
	// (ssl.connection_error).
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	xdstest.ServeConns(t, ln, func(net.Conn) {}) // hangs up at once
	const name = "outbound|80||httpbin.default.svc.cluster.local"
	tlsCluster := xdstest.Cluster(name, xdstest.WithEndpoints(xdstest.Endpoint{Addr: ln.Addr().(*net.TCPAddr).AddrPort(), SocketMatch: xdstest.IstioTLS}),
		xdstest.WithSocketMatches(xdstest.IstioSocketMatches(testpki.UpstreamSocket("sni", "spiffe://cluster.local/ns/default/sa/httpbin"))...))
	tlsCluster.AltStatName = name + ";"
	snap, err := mesh.Build("1", nil, []*clusterv3.Cluster{tlsCluster, xdstest.StaticCluster("plain")}, nil,
		mesh.BuildOptions{Roles: mesh.IstioRoles, Cluster: cluster.Options{Dialer: &upstream.Dialer{}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { snap.Retire(nil) })
	if _, err := snap.Cluster(name).Connect(context.Background(), netip.AddrPort{}, nil); err == nil {
		t.Fatal("handshake with a server that hangs up succeeded")
	}
	d := &mesh.Dispatcher{}
	d.Swap(snap)
	ts := httptest.NewServer((&Server{D: d, Start: time.Now()}).Handler())
	defer ts.Close()

	_, body := get(t, ts, "/stats?filter=ssl")
	for _, line := range []string{"cluster." + name + ".ssl.connection_error: 1", "cluster." + name + ".ssl.handshake: 0", "cluster." + name + ".ssl.fail_verify_san: 0"} {
		if !strings.Contains(body, line+"\n") {
			t.Errorf("/stats lacks %q:\n%s", line, body)
		}
	}
	if strings.Contains(body, "cluster.plain.ssl") {
		t.Errorf("a plaintext cluster has ssl stats:\n%s", body)
	}
	_, prom := get(t, ts, "/stats/prometheus")
	if want := `envoy_cluster_ssl_connection_error{cluster_name="` + name + `"} 1`; !strings.Contains(prom, "\n"+want+"\n") {
		t.Errorf("/stats/prometheus lacks %s", want)
	}
}
