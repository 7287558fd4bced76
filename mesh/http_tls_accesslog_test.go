package mesh

import (
	"bufio"
	"crypto/tls"
	"encoding/json"
	"io"
	"log"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	streamv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/stream/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"github.com/rs/zerolog"

	"github.com/meshtun/meshtun/internal/testpki"
	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/mesh/accesslog"
	"github.com/meshtun/meshtun/mesh/secrets"
	"github.com/meshtun/meshtun/netstack"
)

// HTTP lines name the TLS upstream's SPIFFE ID (upstream_peer_uri_san),
// or, when its handshake failed, why (upstream_transport_failure_reason,
// flag UF).
func TestHTTPAccessLogUpstreamTLS(t *testing.T) {
	ca := testpki.NewCA(t)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{ca.Leaf(t, httpbinID, testpki.LeafOpts{}).TLS},
		ClientAuth:   tls.RequireAndVerifyClientCert, ClientCAs: ca.Pool, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{ErrorLog: log.New(io.Discard, "", 0), Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(204) })}
	go srv.Serve(ln)
	defer srv.Close()
	addr := ln.Addr().(*net.TCPAddr).AddrPort()

	mk := func(name, san string) *clusterv3.Cluster {
		return xdstest.Cluster(name, xdstest.WithEndpoints(xdstest.Endpoint{Addr: addr, SocketMatch: xdstest.IstioTLS}),
			xdstest.WithSocketMatches(xdstest.IstioSocketMatches(testpki.UpstreamSocket("sni", san))...))
	}
	clusters := append(passthroughClusters(), mk("good", httpbinID), mk("bad", "spiffe://cluster.local/ns/default/sa/other"))
	store := secrets.NewStore()
	refs, err := secrets.Find(clusters, nil)
	if err != nil {
		t.Fatal(err)
	}
	store.SetRefs(refs)
	store.Put("1", ca.Leaf(t, appID, testpki.LeafOpts{}).Secret("default"), time.Now())
	store.Put("1", ca.RootSecret("ROOTCA"), time.Now())

	route := func(host, cluster string) *routev3.VirtualHost {
		return &routev3.VirtualHost{Name: host, Domains: []string{host}, Routes: []*routev3.Route{{
			Match:  &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
			Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: cluster}}}}}}
	}
	rc := &routev3.RouteConfiguration{Name: "inline", VirtualHosts: []*routev3.VirtualHost{route("good", "good"), route("bad", "bad")}}
	a := anyOf(t, &hcmv3.HttpConnectionManager{
		StatPrefix:     "p",
		RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: rc},
		HttpFilters: []*hcmv3.HttpFilter{{Name: "envoy.filters.http.router",
			ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: anyOf(t, &routerv3.Router{})}}},
		AccessLog: []*accesslogv3.AccessLog{{Name: "envoy.access_loggers.stream",
			ConfigType: &accesslogv3.AccessLog_TypedConfig{TypedConfig: anyOf(t, &streamv3.StdoutAccessLog{})}}},
	})
	chain := &listenerv3.FilterChain{Filters: []*listenerv3.Filter{{Name: HCMFilter, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: a}}}}
	f := false
	opts := buildOpts()
	opts.Secrets = store
	snap, err := Build("1", []*listenerv3.Listener{listener(t, "0.0.0.0_80", "0.0.0.0", 80, false, &f, chain)}, clusters, nil, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Retire(nil)
	defer snap.Pools().Close(t.Context())
	l := snap.Listener("0.0.0.0_80")
	var out syncBuf
	d := NewDispatcher(DispatcherOptions{Access: accesslog.New(zerolog.New(&out).Level(zerolog.InfoLevel))})
	d.Swap(snap)

	cli, down := net.Pipe()
	fid := netstack.FlowID{Src: netip.MustParseAddrPort("10.0.0.1:40000"), Dst: netip.MustParseAddrPort("10.96.0.1:80")}
	e := accesslog.Entry{Transport: "tcp", Direction: "outbound", Start: time.Now(), DownstreamLocal: fid.Dst, DownstreamPeer: fid.Src}
	done := make(chan struct{})
	go func() {
		defer close(done)
		serveHTTP(d, snap, l, l.Chains[0], down, fid, "", &e)
	}()
	cli.SetDeadline(time.Now().Add(5 * time.Second))
	br := bufio.NewReader(cli)
	for _, tc := range []struct {
		host string
		code int
	}{{"good", 204}, {"bad", 503}} {
		io.WriteString(cli, "GET / HTTP/1.1\r\nHost: "+tc.host+"\r\n\r\n")
		resp, err := http.ReadResponse(br, nil)
		if err != nil || resp.StatusCode != tc.code {
			t.Fatalf("%s: %v %v, want %d", tc.host, resp, err, tc.code)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	cli.Close()
	<-done
	var lines []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(out.String()), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("%q: %v", l, err)
		}
		if m["method"] == "GET" {
			lines = append(lines, m)
		}
	}
	if len(lines) != 2 {
		t.Fatalf("request lines:\n%s", out.String())
	}
	if lines[0]["upstream_peer_uri_san"] != httpbinID || lines[0]["upstream_transport_failure_reason"] != nil {
		t.Errorf("TLS request line: %v", lines[0])
	}
	reason, _ := lines[1]["upstream_transport_failure_reason"].(string)
	if lines[1]["response_flags"] != "UF" || !strings.HasPrefix(reason, "verify SAN: ") || lines[1]["upstream_peer_uri_san"] != nil {
		t.Errorf("refused upstream's line: %v", lines[1])
	}
}
