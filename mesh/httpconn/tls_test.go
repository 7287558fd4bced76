package httpconn

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/rs/zerolog"

	"github.com/meshtun/meshtun/internal/testpki"
	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/mesh/cluster"
	"github.com/meshtun/meshtun/mesh/upstream"
)

// alpnTLS is a TLS client transport offering ALPN as Istio's istio.alpn
// filter does and accepting only a server whose first URI SAN is san
// (tlsctx.Upstream's part in these tests).
type alpnTLS struct {
	roots *x509.CertPool
	san   string
}

func (a alpnTLS) Secure(ctx context.Context, raw net.Conn, appProto string) (net.Conn, error) {
	protos := []string{"istio"}
	switch appProto {
	case "http/1.1":
		protos = []string{"istio-http/1.1", "istio", "http/1.1"}
	case "h2":
		protos = []string{"istio-h2", "istio", "h2"}
	}
	tc := tls.Client(raw, &tls.Config{NextProtos: protos, InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			leaf := cs.PeerCertificates[0]
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: a.roots}); err != nil {
				return err
			}
			if len(leaf.URIs) == 0 || leaf.URIs[0].String() != a.san {
				return fmt.Errorf("verify SAN: %v not in match_subject_alt_names", leaf.URIs)
			}
			return nil
		}})
	if err := tc.HandshakeContext(ctx); err != nil {
		return nil, err
	}
	return tc, nil
}

// tlsUpstream is an HTTPS server with a workload certificate that records
// the ALPN lists clients offered.
type tlsUpstream struct {
	addr    netip.AddrPort
	accepts atomic.Int64
	mu      sync.Mutex
	offered [][]string
}

func (u *tlsUpstream) offers() [][]string {
	u.mu.Lock()
	defer u.mu.Unlock()
	return slices.Clone(u.offered)
}

// startTLSUpstream serves HTTPS with server ALPN preference next; h2
// enables HTTP/2.
func startTLSUpstream(t *testing.T, ca *testpki.CA, id string, next []string, h2 bool) *tlsUpstream {
	t.Helper()
	cert := ca.Leaf(t, id, testpki.LeafOpts{}).TLS
	u := &tlsUpstream{}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: next,
		GetConfigForClient: func(hi *tls.ClientHelloInfo) (*tls.Config, error) {
			u.mu.Lock()
			u.offered = append(u.offered, hi.SupportedProtos)
			u.mu.Unlock()
			return nil, nil
		}}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u.addr = ln.Addr().(*net.TCPAddr).AddrPort()
	p := new(http.Protocols)
	p.SetHTTP1(true)
	p.SetHTTP2(h2)
	srv := &http.Server{TLSConfig: cfg, Protocols: p, ErrorLog: discardLog,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			alpn := "-"
			if r.TLS != nil {
				alpn = r.TLS.NegotiatedProtocol
			}
			w.Header().Set("X-Seen-Proto", r.Proto)
			w.Header().Set("X-Seen-ALPN", alpn)
			fmt.Fprint(w, "secure")
		})}
	go srv.ServeTLS(countingListener{ln, &u.accepts}, "", "")
	t.Cleanup(func() { srv.Close() })
	return u
}

// tlsEnv is newEnv with every cluster's TLS transport socket served by an
// alpnTLS that wants san.
func tlsEnv(t *testing.T, ca *testpki.CA, san string, pbs ...*clusterv3.Cluster) *testEnv {
	t.Helper()
	e := &testEnv{routes: map[string]*Routes{}, clusters: map[string]*cluster.Cluster{}, opts: map[string]cluster.HTTPOptions{}, pools: NewPools()}
	parse := func(string, *corev3.TransportSocket) (cluster.Transport, error) {
		return alpnTLS{roots: ca.Pool, san: san}, nil
	}
	for _, pb := range pbs {
		c, err := cluster.New(pb, cluster.Options{Dialer: &upstream.Dialer{}, Log: zerolog.Nop(), Transport: parse})
		if err != nil {
			t.Fatal(err)
		}
		o, err := cluster.ParseHTTPOptions(pb)
		if err != nil {
			t.Fatal(err)
		}
		e.clusters[pb.GetName()], e.opts[pb.GetName()] = c, o
		t.Cleanup(func() { c.Close() })
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		e.pools.Close(ctx)
	})
	return e
}

// istioTLSCluster is an istiod-shaped cluster whose one endpoint,
// labelled tlsMode: istio, takes the tlsMode-istio match.
func istioTLSCluster(name string, addr netip.AddrPort, san string) *clusterv3.Cluster {
	return xdstest.Cluster(name, xdstest.WithEndpoints(xdstest.Endpoint{Addr: addr, SocketMatch: xdstest.IstioTLS}),
		xdstest.WithSocketMatches(xdstest.IstioSocketMatches(testpki.UpstreamSocket("sni", san))...))
}

// HTTP/1.1 and HTTP/2 to TLS upstreams: the offered ALPN is istio.alpn's
// list for the protocol, the server's choice is the plain protocol, the
// pooled TLS connection is reused, and the access log names the
// upstream's SPIFFE ID.
func TestUpstreamOverTLS(t *testing.T) {
	const id = "spiffe://cluster.local/ns/default/sa/httpbin"
	ca := testpki.NewCA(t)
	for _, tc := range []struct {
		name       string
		h2         bool
		wantOffer  []string
		wantProto  string
		wantALPN   string
		wantCounts string
	}{
		{"http/1.1", false, []string{"istio-http/1.1", "istio", "http/1.1"}, "HTTP/1.1", "http/1.1", "upstream_cx_http1_total"},
		{"h2", true, []string{"istio-h2", "istio", "h2"}, "HTTP/2.0", "h2", "upstream_cx_http2_total"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			u := startTLSUpstream(t, ca, id, []string{"h2", "http/1.1"}, true)
			pb := istioTLSCluster("c", u.addr, id)
			if tc.h2 {
				pb = withH2(pb)
			}
			env := tlsEnv(t, ca, id, pb)
			p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))), env)
			c := client(tc.h2)
			for i := 0; i < 3; i++ {
				resp, body := get(t, c, p, "httpbin", "/")
				if resp.StatusCode != 200 || body != "secure" {
					t.Fatalf("request %d: %d %q", i, resp.StatusCode, body)
				}
				if got := resp.Header.Get("X-Seen-Proto"); got != tc.wantProto {
					t.Errorf("upstream saw %s, want %s", got, tc.wantProto)
				}
				if got := resp.Header.Get("X-Seen-ALPN"); got != tc.wantALPN {
					t.Errorf("negotiated ALPN %q, want %q", got, tc.wantALPN)
				}
			}
			if offers := u.offers(); len(offers) != 1 || !slices.Equal(offers[0], tc.wantOffer) {
				t.Errorf("server saw offers %q, want one handshake offering %q", offers, tc.wantOffer)
			}
			if n := u.accepts.Load(); n != 1 {
				t.Errorf("%d upstream connections for 3 requests, want 1 (pooled over TLS)", n)
			}
			e := p.lastEntry(t)
			if e.UpstreamPeerURISAN != id || e.UpstreamTransportFailureReason != "" {
				t.Errorf("entry peer SAN %q, failure %q; want %s", e.UpstreamPeerURISAN, e.UpstreamTransportFailureReason, id)
			}
			if got := clusterStat(t, env.clusters["c"], tc.wantCounts); got != 1 {
				t.Errorf("%s = %d, want 1", tc.wantCounts, got)
			}
		})
	}
}

// A TLS upstream refused by its SAN, and an HTTP/2 cluster whose TLS
// upstream selects another protocol than h2: 503 UF with the reason.
func TestUpstreamTLSFailures(t *testing.T) {
	const id = "spiffe://cluster.local/ns/default/sa/httpbin"
	ca := testpki.NewCA(t)
	impostor := startTLSUpstream(t, ca, "spiffe://cluster.local/ns/default/sa/impostor", []string{"http/1.1"}, false)
	noH2 := startTLSUpstream(t, ca, id, []string{"istio", "http/1.1"}, false)
	env := tlsEnv(t, ca, id, istioTLSCluster("impostor", impostor.addr, id), withH2(istioTLSCluster("noh2", noH2.addr, id)))
	p := startProxy(t, mustParse(t, hcm(routeConfig(
		vhost("a", []string{"impostor"}, prefixRoute("/", "impostor")),
		vhost("b", []string{"noh2"}, prefixRoute("/", "noh2"))))), env)
	for _, tc := range []struct{ host, reason string }{
		{"impostor", "not in match_subject_alt_names"},
		{"noh2", `selected "istio", not h2`},
	} {
		resp, body := get(t, client(true), p, tc.host, "/")
		if resp.StatusCode != 503 || !strings.Contains(body, "transport failure reason") {
			t.Errorf("%s: %d %q, want 503 naming the transport failure", tc.host, resp.StatusCode, body)
		}
		e := p.lastEntry(t)
		if !e.ResponseFlags.Has(FlagUF) || !strings.Contains(e.UpstreamTransportFailureReason, tc.reason) || e.UpstreamPeerURISAN != "" {
			t.Errorf("%s: flags %s, reason %q, SAN %q; want UF and %q", tc.host, e.ResponseFlags, e.UpstreamTransportFailureReason, e.UpstreamPeerURISAN, tc.reason)
		}
		// Envoy's details: the reset reason, then the transport's, spaces made '_'.
		if want := "upstream_reset_before_response_started{connection_failure|" + strings.ReplaceAll(e.UpstreamTransportFailureReason, " ", "_") + "}"; e.ResponseCodeDetails != want {
			t.Errorf("%s: response_code_details %q, want %q", tc.host, e.ResponseCodeDetails, want)
		}
	}
	if got := clusterStat(t, env.clusters["impostor"], "upstream_cx_connect_fail"); got == 0 {
		t.Error("a refused handshake is not counted as upstream_cx_connect_fail")
	}
}

// A pooled HTTP/1.1 TLS connection the upstream closed while idle (its
// close_notify and FIN): there is no socket peek over TLS, so the request
// written into it meets the end of stream before any response byte and
// is resent on a new connection, not failed.
func TestStaleTLSKeepAliveConnection(t *testing.T) {
	const id = "spiffe://cluster.local/ns/default/sa/httpbin"
	ca := testpki.NewCA(t)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{ca.Leaf(t, id, testpki.LeafOpts{}).TLS}, NextProtos: []string{"http/1.1"}})
	if err != nil {
		t.Fatal(err)
	}
	states := make(chan http.ConnState, 16)
	var accepts atomic.Int64
	srv := &http.Server{ErrorLog: discardLog,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "ok") }),
		ConnState: func(_ net.Conn, s http.ConnState) {
			if s == http.StateIdle || s == http.StateClosed {
				states <- s
			}
		}}
	go srv.Serve(countingListener{ln, &accepts})
	t.Cleanup(func() { srv.Close() })
	env := tlsEnv(t, ca, id, istioTLSCluster("c", ln.Addr().(*net.TCPAddr).AddrPort(), id))
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))), env)
	c := client(false)
	if resp, body := get(t, c, p, "h", "/"); resp.StatusCode != 200 || body != "ok" {
		t.Fatalf("first request: %d %q", resp.StatusCode, body)
	}
	if s := <-states; s != http.StateIdle {
		t.Fatalf("upstream connection state %v, want idle", s)
	}
	srv.SetKeepAlivesEnabled(false) // closes the idle connection
	if s := <-states; s != http.StateClosed {
		t.Fatalf("upstream connection state %v, want closed", s)
	}
	if resp, body := get(t, c, p, "h", "/"); resp.StatusCode != 200 || body != "ok" {
		t.Fatalf("request on the closed pooled connection: %d %q, want it resent", resp.StatusCode, body)
	}
	v, _ := env.pools.m.Load("c")
	if resent := v.(*clusterPool).h1.resent.Load(); resent != 1 || accepts.Load() != 2 {
		t.Errorf("resent %d, upstream connections %d; want 1 and 2", resent, accepts.Load())
	}
}
