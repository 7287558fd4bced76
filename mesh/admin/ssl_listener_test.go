package admin

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"

	"github.com/meshtun/meshtun/internal/testpki"
	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/mesh"
	"github.com/meshtun/meshtun/mesh/cluster"
	"github.com/meshtun/meshtun/mesh/secrets"
	"github.com/meshtun/meshtun/mesh/upstream"
)

// TestListenerSSLStats: a listener with a TLS chain has Envoy's
// listener.<address>.ssl.* (a version or cipher once seen), in /stats and
// in Prometheus with the listener_address tag; a listener without TLS has
// none, as in Envoy.
func TestListenerSSLStats(t *testing.T) {
	ca := testpki.NewCA(t)
	app := ca.Leaf(t, "spiffe://cluster.local/ns/default/sa/app", testpki.LeafOpts{})
	client := ca.Leaf(t, "spiffe://cluster.local/ns/default/sa/sleep", testpki.LeafOpts{})
	store := secrets.NewStore()
	store.SetRefs(&secrets.Refs{Names: map[string]secrets.Source{"default": {Cluster: "sds-grpc"}, "ROOTCA": {Cluster: "sds-grpc"}}})
	if err := store.Put("1", app.Secret("default"), time.Now()); err != nil {
		t.Fatal(err)
	}
	if err := store.Put("1", ca.RootSecret("ROOTCA"), time.Now()); err != nil {
		t.Fatal(err)
	}
	tp := &listenerv3.Filter{Name: mesh.TCPProxyFilter, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: xdstest.MustAny(t,
		&tcpproxyv3.TcpProxy{StatPrefix: "in", ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: "BlackHoleCluster"}})}}
	in := &listenerv3.Listener{Name: "virtualInbound", Address: xdstest.SocketAddress("0.0.0.0", 15006),
		FilterChains: []*listenerv3.FilterChain{{Name: "mtls", Filters: []*listenerv3.Filter{tp}, TransportSocket: testpki.DownstreamSocket("istio-peer-exchange", "h2", "http/1.1")}}}
	out := xdstest.TCPListener(t, "virtualOutbound", "0.0.0.0", 15001, "BlackHoleCluster", false)
	snap, err := mesh.Build("1", []*listenerv3.Listener{out, in}, []*clusterv3.Cluster{xdstest.StaticCluster("BlackHoleCluster")}, nil,
		mesh.BuildOptions{Roles: mesh.IstioRoles, Cluster: cluster.Options{Dialer: &upstream.Dialer{}}, Secrets: store})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { snap.Retire(nil) })
	d := &mesh.Dispatcher{}
	d.Swap(snap)
	ts := httptest.NewServer((&Server{D: d, Start: time.Now()}).Handler())
	t.Cleanup(ts.Close)

	// One handshake through the chain's context, one refused (no client
	// certificate).
	for _, cert := range []*testpki.Leaf{client, nil} {
		cli, srv := net.Pipe()
		cfg := &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"istio"}}
		if cert != nil {
			cfg.Certificates = []tls.Certificate{cert.TLS}
		}
		go func() {
			tc := tls.Client(cli, cfg)
			if tc.Handshake() == nil {
				io.Copy(io.Discard, tc)
			}
			cli.Close()
		}()
		if tc, err := snap.Listener("virtualInbound").Chains[0].TLS.Handshake(context.Background(), srv); err == nil {
			tc.Close()
		}
	}

	_, body := get(t, ts, "/stats?filter=ssl")
	for _, line := range []string{
		"listener.0.0.0.0_15006.ssl.handshake: 1",
		"listener.0.0.0.0_15006.ssl.connection_error: 1",
		"listener.0.0.0.0_15006.ssl.fail_verify_no_cert: 1",
		"listener.0.0.0.0_15006.ssl.versions.TLSv1.3: 1",
		"listener.0.0.0.0_15006.ssl.fail_verify_san: 0",
	} {
		if !strings.Contains(body, line+"\n") {
			t.Errorf("/stats lacks %q:\n%s", line, body)
		}
	}
	if strings.Contains(body, "listener.0.0.0.0_15001.ssl") || strings.Contains(body, "versions.TLSv1.2") {
		t.Errorf("ssl stats of a listener without TLS, or of a version never seen:\n%s", body)
	}
	_, prom := get(t, ts, "/stats/prometheus")
	for _, line := range []string{
		`envoy_listener_ssl_handshake{listener_address="0.0.0.0_15006"} 1`,
		`envoy_listener_ssl_versions_TLSv1_3{listener_address="0.0.0.0_15006"} 1`,
	} {
		if !strings.Contains(prom, "\n"+line+"\n") {
			t.Errorf("/stats/prometheus lacks %s", line)
		}
	}
}
