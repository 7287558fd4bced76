package cluster

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	xdsmatcherv3 "github.com/cncf/xds/go/xds/type/matcher/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"

	"github.com/meshtun/meshtun/internal/testpki"
	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/mesh/upstream"
)

const (
	httpbinID  = "spiffe://cluster.local/ns/default/sa/httpbin"
	httpbinSNI = "outbound_.80_._.httpbin.default.svc.cluster.local"
)

// fakeTLS is a TLS client transport on crypto/tls standing in for
// tlsctx.Upstream: it offers ALPN as istio.alpn does, verifies the chain
// against roots and the first URI SAN against sans.
type fakeTLS struct {
	name  string
	sni   string
	sans  []string
	roots *x509.CertPool
}

func (f *fakeTLS) Secure(ctx context.Context, raw net.Conn, appProto string) (net.Conn, error) {
	protos := []string{"istio"}
	switch appProto {
	case "http/1.1":
		protos = []string{"istio-http/1.1", "istio", "http/1.1"}
	case "h2":
		protos = []string{"istio-h2", "istio", "h2"}
	}
	cfg := &tls.Config{
		ServerName:         f.sni,
		NextProtos:         protos,
		InsecureSkipVerify: true, // verified below, by SAN and not host name
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("no peer certificate")
			}
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			leaf := cs.PeerCertificates[0]
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: f.roots, Intermediates: inter}); err != nil {
				return fmt.Errorf("verify chain: %w", err)
			}
			var got string
			if len(leaf.URIs) > 0 {
				got = leaf.URIs[0].String()
			}
			if len(f.sans) > 0 && !slices.Contains(f.sans, got) {
				return fmt.Errorf("verify SAN: %q not in match_subject_alt_names", got)
			}
			return nil
		},
	}
	tc := tls.Client(raw, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		return nil, err
	}
	return tc, nil
}

// parser compiles TLS sockets into fakeTLS transports and records the
// fields it was asked for.
type parser struct {
	roots  *x509.CertPool
	mu     sync.Mutex
	fields []string
}

func (p *parser) parse(field string, ts *corev3.TransportSocket) (Transport, error) {
	p.mu.Lock()
	p.fields = append(p.fields, field)
	p.mu.Unlock()
	switch ts.GetName() {
	case "envoy.transport_sockets.raw_buffer":
		return nil, nil
	case "envoy.transport_sockets.tls":
		var u tlsv3.UpstreamTlsContext
		if err := ts.GetTypedConfig().UnmarshalTo(&u); err != nil {
			return nil, fmt.Errorf("%s: %w", field, err)
		}
		f := &fakeTLS{name: field, sni: u.GetSni(), roots: p.roots}
		for _, m := range u.GetCommonTlsContext().GetCombinedValidationContext().GetDefaultValidationContext().GetMatchSubjectAltNames() {
			f.sans = append(f.sans, m.GetExact())
		}
		return f, nil
	}
	return nil, fmt.Errorf("%s: %q not supported", field, ts.GetName())
}

func withParser(p *parser) func(*Options) { return func(o *Options) { o.Transport = p.parse } }

// transportOf names the transport the host's cluster chose for it: the
// field of its TLS socket, or "raw".
func transportOf(c *Cluster, h *Host) string {
	if f, ok := c.tr.at(h.meta.Load().ts).(*fakeTLS); ok {
		return f.name
	}
	return "raw"
}

const istioMatch = "transport_socket_matches[1] (tlsMode-istio).transport_socket"

func TestSocketMatchSelection(t *testing.T) {
	ca := testpki.NewCA(t)
	istio := xdstest.IstioSocketMatches(testpki.UpstreamSocket(httpbinSNI, httpbinID))
	// istiod's two matches behind the hbone match it prepends for ambient.
	p := &parser{roots: ca.Pool}
	c := newTestCluster(t, xdstest.Cluster("outbound|80||httpbin", xdstest.WithEDS(),
		xdstest.WithSocketMatches(append([]*clusterv3.Cluster_TransportSocketMatch{xdstest.HBONEMatch()}, istio...)...)), withParser(p))
	if want := []string{istioMatch, "transport_socket_matches[2] (tlsMode-disabled).transport_socket"}; !slices.Equal(p.fields, want) {
		t.Errorf("parsed %q, want %q (the hbone match skipped)", p.fields, want)
	}
	ep := func(last byte, match map[string]string) xdstest.Endpoint {
		return xdstest.Endpoint{Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, 0, last}), 80), SocketMatch: match}
	}
	if err := c.UpdateEndpoints(xdstest.AssignmentOf("outbound|80||httpbin",
		ep(1, xdstest.IstioTLS),
		ep(2, nil),
		ep(3, map[string]string{"tunnel": "http", "tlsMode": "istio"}),
		ep(4, map[string]string{"tlsMode": "disabled"}),
		ep(5, map[string]string{"tunnel": "http"}),
	)); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"10.0.0.1:80": istioMatch, // tlsMode: istio
		"10.0.0.2:80": "raw",      // no labels: match {} (tlsMode-disabled)
		"10.0.0.3:80": istioMatch, // hbone skipped: the next match
		"10.0.0.4:80": "raw",      // another value: {}
		"10.0.0.5:80": "raw",      // tunnel only: {}
	}
	hosts := c.Hosts()
	if len(hosts) != len(want) {
		t.Fatalf("%d hosts, want %d", len(hosts), len(want))
	}
	for _, h := range hosts {
		if got := transportOf(c, h); got != want[h.String()] {
			t.Errorf("host %s: transport %s, want %s", h, got, want[h.String()])
		}
	}

	// The same address relabelled by an update keeps its *Host and
	// changes transport.
	h1 := hosts[0]
	if err := c.UpdateEndpoints(xdstest.AssignmentOf("outbound|80||httpbin", ep(1, nil))); err != nil {
		t.Fatal(err)
	}
	if got := c.Hosts(); len(got) != 1 || got[0] != h1 || transportOf(c, h1) != "raw" {
		t.Errorf("after relabel: hosts %v, transport %s; want the same host, raw", got, transportOf(c, h1))
	}
	// An update that changes nothing is not a rebuild.
	before := stat(t, c, "update_no_rebuild")
	if err := c.UpdateEndpoints(xdstest.AssignmentOf("outbound|80||httpbin", ep(1, nil))); err != nil {
		t.Fatal(err)
	}
	if stat(t, c, "update_no_rebuild") != before+1 {
		t.Error("an identical labelled assignment rebuilt the host set")
	}
}

func TestSocketMatchLocalityAndDefault(t *testing.T) {
	ca := testpki.NewCA(t)
	p := &parser{roots: ca.Pool}
	tlsOnly := xdstest.IstioSocketMatches(testpki.UpstreamSocket(httpbinSNI, httpbinID))[:1]
	// No {} match: endpoints without labels fall back to the locality's,
	// then to transport_socket (here TLS too, with another SNI).
	def := testpki.UpstreamSocket("default-sni", httpbinID)
	c := newTestCluster(t, xdstest.Cluster("loc", xdstest.WithEDS(), xdstest.WithSocketMatches(tlsOnly...),
		xdstest.WithTransportSocket(def)), withParser(p))
	eps := []xdstest.Endpoint{
		{Addr: netip.MustParseAddrPort("10.0.1.1:80"), Region: "r1", LocalitySocketMatch: xdstest.IstioTLS},
		{Addr: netip.MustParseAddrPort("10.0.2.1:80"), Region: "r2"},
		{Addr: netip.MustParseAddrPort("10.0.2.2:80"), Region: "r2", SocketMatch: xdstest.IstioTLS},
	}
	if err := c.UpdateEndpoints(xdstest.AssignmentOf("loc", eps...)); err != nil {
		t.Fatal(err)
	}
	const m0 = "transport_socket_matches[0] (tlsMode-istio).transport_socket"
	want := map[string]string{"10.0.1.1:80": m0, "10.0.2.1:80": "transport_socket", "10.0.2.2:80": m0}
	for _, h := range c.Hosts() {
		if got := transportOf(c, h); got != want[h.String()] {
			t.Errorf("host %s: transport %s, want %s", h, got, want[h.String()])
		}
	}

	// A cluster with only transport_socket uses it for every host, and
	// an ORIGINAL_DST cluster's destinations (no metadata) take the
	// match with no labels.
	od := newTestCluster(t, &clusterv3.Cluster{
		Name:                   "od",
		ClusterDiscoveryType:   &clusterv3.Cluster_Type{Type: clusterv3.Cluster_ORIGINAL_DST},
		LbPolicy:               clusterv3.Cluster_CLUSTER_PROVIDED,
		TransportSocket:        def,
		TransportSocketMatches: xdstest.IstioSocketMatches(testpki.UpstreamSocket(httpbinSNI, httpbinID)),
	}, withParser(p))
	h := od.pick(netip.MustParseAddrPort("10.9.9.9:80"), nil)
	if got := transportOf(od, h); got != "raw" {
		t.Errorf("ORIGINAL_DST host with istiod's matches: %s, want raw (match {})", got)
	}
	// STRICT_DNS: every address of a name takes its endpoint's labels.
	r := &fakeResolver{}
	r.set("ip4", "svc.test", "10.3.0.1", "10.3.0.2")
	dnsEP := xdstest.HostPort("svc.test", 80)
	dnsEP.SocketMatch = xdstest.IstioTLS
	dns := newTestCluster(t, xdstest.Cluster("dns", xdstest.WithType(clusterv3.Cluster_STRICT_DNS), xdstest.WithEndpoints(dnsEP),
		xdstest.WithSocketMatches(xdstest.IstioSocketMatches(testpki.UpstreamSocket(httpbinSNI, httpbinID))...)),
		withParser(p), func(o *Options) { o.Resolver = r })
	<-dns.Initialized()
	if hs := dns.Hosts(); len(hs) != 2 || dns.TransportMatch(hs[0]) != "tlsMode-istio" || dns.TransportMatch(hs[1]) != "tlsMode-istio" {
		t.Errorf("STRICT_DNS hosts %v: want two on tlsMode-istio", hs)
	}
	static := newTestCluster(t, xdstest.Cluster("st", xdstest.WithEndpoints(xdstest.Endpoint{Addr: netip.MustParseAddrPort("10.0.0.9:80"), SocketMatch: xdstest.IstioTLS}),
		xdstest.WithTransportSocket(def)), withParser(p))
	if got := transportOf(static, static.Hosts()[0]); got != "transport_socket" {
		t.Errorf("STATIC host with no matches: %s, want transport_socket", got)
	}
}

func TestTransportSocketErrors(t *testing.T) {
	tlsTS := testpki.UpstreamSocket(httpbinSNI, httpbinID)
	failing := func(field string, ts *corev3.TransportSocket) (Transport, error) {
		return nil, fmt.Errorf("%s: secret %q: bad", field, "default")
	}
	cases := []struct {
		name  string
		pb    *clusterv3.Cluster
		parse TransportParser
		want  string
	}{
		{"no parser, TLS", xdstest.Cluster("a", xdstest.WithTransportSocket(tlsTS)), nil,
			`cluster "a": transport_socket: "envoy.transport_sockets.tls" not supported`},
		{"parser error names the match", xdstest.Cluster("b", xdstest.WithSocketMatches(xdstest.IstioSocketMatches(testpki.UpstreamSocket("s"))...)), failing,
			`cluster "b": transport_socket_matches[0] (tlsMode-istio).transport_socket: secret "default": bad`},
		{"transport_socket_matcher", func() *clusterv3.Cluster {
			pb := xdstest.Cluster("c")
			pb.TransportSocketMatcher = &xdsmatcherv3.Matcher{}
			return pb
		}(), nil, `cluster "c": transport_socket_matcher: not supported`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(tc.pb, Options{Dialer: &upstream.Dialer{}, Transport: tc.parse})
			if err == nil || !strings.HasPrefix(err.Error(), tc.want) {
				t.Fatalf("New: %v, want %q…", err, tc.want)
			}
		})
	}
	// Without a parser, raw_buffer and the skipped hbone match are fine.
	newTestCluster(t, xdstest.Cluster("raw", xdstest.WithTransportSocket(xdstest.RawBufferSocket()),
		xdstest.WithSocketMatches(xdstest.HBONEMatch())))
}

// tlsServer is a loopback TLS server with a workload certificate. Each
// connection reads until the client's close_notify, answers "pong" and
// closes; it records what the clients offered.
type tlsServer struct {
	addr netip.AddrPort
	mu   sync.Mutex
	sni  []string
	alpn [][]string
	got  [][]byte
	errs []error
	done chan struct{}
}

func startTLSServer(t *testing.T, ca *testpki.CA, id string, next []string) *tlsServer {
	t.Helper()
	cert := ca.Leaf(t, id, testpki.LeafOpts{}).TLS
	s := &tlsServer{done: make(chan struct{}, 16)}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: next,
		GetConfigForClient: func(hi *tls.ClientHelloInfo) (*tls.Config, error) {
			s.mu.Lock()
			s.sni = append(s.sni, hi.ServerName)
			s.alpn = append(s.alpn, hi.SupportedProtos)
			s.mu.Unlock()
			return nil, nil
		}}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	s.addr = ln.Addr().(*net.TCPAddr).AddrPort()
	xdstest.ServeConns(t, ln, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		b, err := io.ReadAll(c)
		s.mu.Lock()
		s.got = append(s.got, b)
		s.errs = append(s.errs, err)
		s.mu.Unlock()
		if err == nil {
			c.Write([]byte("pong"))
		}
		s.done <- struct{}{}
	})
	return s
}

func TestTLSConnect(t *testing.T) {
	ca := testpki.NewCA(t)
	srv := startTLSServer(t, ca, httpbinID, []string{"istio"})
	plain := startServer(t, "127.0.0.1", 0, true)
	p := &parser{roots: ca.Pool}
	c := newTestCluster(t, xdstest.Cluster("tls", xdstest.WithEndpoints(
		xdstest.Endpoint{Addr: srv.addr, SocketMatch: xdstest.IstioTLS}),
		xdstest.WithSocketMatches(xdstest.IstioSocketMatches(testpki.UpstreamSocket(httpbinSNI, httpbinID))...)), withParser(p))

	u := mustConnect(t, c)
	defer u.Close()
	if u.TCPConn() != nil {
		t.Error("TCPConn of a TLS connection is not nil: splice or peek would bypass TLS")
	}
	if st := u.TLS(); st == nil || st.NegotiatedProtocol != "istio" || st.ServerName != httpbinSNI {
		t.Errorf("TLS state %+v, want ALPN istio, SNI %s", st, httpbinSNI)
	}
	if got := u.PeerURISAN(); got != httpbinID {
		t.Errorf("PeerURISAN = %q, want %q", got, httpbinID)
	}
	if _, err := u.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	// close_notify, then FIN: the server's TLS reads a clean EOF and can
	// still answer on the other half.
	if err := u.CloseWrite(); err != nil {
		t.Fatalf("CloseWrite: %v", err)
	}
	u.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := io.ReadAll(u)
	if err != nil || string(resp) != "pong" {
		t.Fatalf("read after CloseWrite: %q, %v; want pong", resp, err)
	}
	<-srv.done
	srv.mu.Lock()
	if !bytes.Equal(srv.got[0], []byte("ping")) || srv.errs[0] != nil {
		t.Errorf("server read %q, %v; want ping then a clean EOF", srv.got[0], srv.errs[0])
	}
	if !slices.Equal(srv.alpn[0], []string{"istio"}) || srv.sni[0] != httpbinSNI {
		t.Errorf("server saw ALPN %q SNI %q; want [istio] and %s", srv.alpn[0], srv.sni[0], httpbinSNI)
	}
	srv.mu.Unlock()
	if got := stat(t, c, "upstream_cx_rx_bytes_total"); got != 4 {
		t.Errorf("upstream_cx_rx_bytes_total = %d, want 4 (plaintext bytes)", got)
	}
	u.Close()
	if v := stat(t, c, "upstream_cx_active"); v != 0 {
		t.Errorf("upstream_cx_active = %d after Close", v)
	}

	// An endpoint without the label in the same cluster is plaintext.
	pc := newTestCluster(t, xdstest.Cluster("mixed", xdstest.WithEndpoints(xdstest.Endpoint{Addr: plain.addr}),
		xdstest.WithSocketMatches(xdstest.IstioSocketMatches(testpki.UpstreamSocket(httpbinSNI, httpbinID))...)), withParser(p))
	pu := mustConnect(t, pc)
	defer pu.Close()
	if pu.TCPConn() == nil || pu.TLS() != nil || pu.PeerURISAN() != "" {
		t.Errorf("plaintext host: TCPConn %v, TLS %v, SAN %q", pu.TCPConn(), pu.TLS(), pu.PeerURISAN())
	}
}

func TestTLSConnectSANMismatch(t *testing.T) {
	ca := testpki.NewCA(t)
	srv := startTLSServer(t, ca, "spiffe://cluster.local/ns/default/sa/impostor", []string{"istio"})
	c := newTestCluster(t, xdstest.Cluster("tls", xdstest.WithEndpoints(
		xdstest.Endpoint{Addr: srv.addr, SocketMatch: xdstest.IstioTLS}),
		xdstest.WithSocketMatches(xdstest.IstioSocketMatches(testpki.UpstreamSocket(httpbinSNI, httpbinID))...)),
		withParser(&parser{roots: ca.Pool}))
	_, err := c.Connect(context.Background(), netip.AddrPort{}, nil)
	var ce *ConnectError
	if !errors.As(err, &ce) {
		t.Fatalf("Connect: %v, want a *ConnectError", err)
	}
	if ce.Timeout || !strings.Contains(ce.TransportFailure, "not in match_subject_alt_names") {
		t.Errorf("ConnectError timeout %v, TransportFailure %q; want the SAN reason", ce.Timeout, ce.TransportFailure)
	}
	if !strings.Contains(err.Error(), "TLS handshake to "+srv.addr.String()) {
		t.Errorf("error %q does not say the TLS handshake failed", err)
	}
	for name, want := range map[string]uint64{"upstream_cx_connect_fail": 1, "upstream_cx_connect_timeout": 0, "upstream_cx_active": 0, "upstream_cx_destroy": 1} {
		if got := stat(t, c, name); got != want {
			t.Errorf("%s = %d, want %d", name, got, want)
		}
	}
	if got := hostStat(c.Hosts()[0], "cx_connect_fail"); got != 1 {
		t.Errorf("host cx_connect_fail = %d, want 1", got)
	}
}

func TestTLSHandshakeTimeout(t *testing.T) {
	// A server that accepts and never answers the ClientHello.
	silent := startServer(t, "127.0.0.1", 0, false)
	c := newTestCluster(t, xdstest.Cluster("tls", xdstest.WithConnectTimeout(200*time.Millisecond), xdstest.WithEndpoints(
		xdstest.Endpoint{Addr: silent.addr}), xdstest.WithTransportSocket(testpki.UpstreamSocket(httpbinSNI))),
		withParser(&parser{roots: x509.NewCertPool()}))
	_, err := c.Connect(context.Background(), netip.AddrPort{}, nil)
	var ce *ConnectError
	if !errors.As(err, &ce) || !ce.Timeout || ce.TransportFailure == "" {
		t.Fatalf("Connect: %v, want a handshake timeout with its reason", err)
	}
	if stat(t, c, "upstream_cx_connect_timeout") != 1 || stat(t, c, "upstream_cx_connect_fail") != 1 {
		t.Error("a handshake past connect_timeout is not counted as a connect timeout")
	}
}

func TestTLSResetSendsRST(t *testing.T) {
	ca := testpki.NewCA(t)
	cert := ca.Leaf(t, httpbinID, testpki.LeafOpts{}).TLS
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c := newTestCluster(t, xdstest.Cluster("rst", xdstest.WithEndpoints(xdstest.Endpoint{Addr: ln.Addr().(*net.TCPAddr).AddrPort()}),
		xdstest.WithTransportSocket(testpki.UpstreamSocket(httpbinSNI, httpbinID))),
		withParser(&parser{roots: ca.Pool}))
	accepted := make(chan net.Conn, 1)
	go func() {
		sc, err := ln.Accept()
		if err == nil {
			sc.(*tls.Conn).Handshake()
		}
		accepted <- sc
	}()
	u := mustConnect(t, c)
	sc := <-accepted
	if sc == nil {
		t.Fatal("no server connection")
	}
	defer sc.Close()
	u.Reset()
	sc.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = sc.Read(make([]byte, 1))
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("server read after Reset: %v, want ECONNRESET (no close_notify first)", err)
	}
	if v := stat(t, c, "upstream_cx_active"); v != 0 {
		t.Errorf("upstream_cx_active = %d after Reset", v)
	}
}
