package mesh

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"

	"github.com/meshtun/meshtun/internal/testpki"
	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/mesh/cluster"
	"github.com/meshtun/meshtun/mesh/secrets"
	"github.com/meshtun/meshtun/mesh/tlsctx"
)

// httpbinID is the upstream's identity; appID (inbound_tls_test.go) the
// client's.
const httpbinID = "spiffe://cluster.local/ns/default/sa/httpbin"

// mtlsServer is a TLS echo server requiring a client certificate from ca,
// as a STRICT sidecar's inbound does; it records the client's URI SAN
// and offered ALPN.
type mtlsServer struct {
	addr    netip.AddrPort
	mu      sync.Mutex
	clients []string
	offers  [][]string
}

func startMTLSServer(t *testing.T, ca *testpki.CA, id string) *mtlsServer {
	t.Helper()
	s := &mtlsServer{}
	cfg := &tls.Config{
		Certificates: []tls.Certificate{ca.Leaf(t, id, testpki.LeafOpts{}).TLS},
		ClientAuth:   tls.RequireAndVerifyClientCert, ClientCAs: ca.Pool,
		NextProtos: []string{"istio"},
		GetConfigForClient: func(hi *tls.ClientHelloInfo) (*tls.Config, error) {
			s.mu.Lock()
			s.offers = append(s.offers, hi.SupportedProtos)
			s.mu.Unlock()
			return nil, nil
		},
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	s.addr = ln.Addr().(*net.TCPAddr).AddrPort()
	xdstest.ServeConns(t, ln, func(c net.Conn) {
		tc := c.(*tls.Conn)
		if tc.Handshake() != nil {
			return
		}
		if pc := tc.ConnectionState().PeerCertificates; len(pc) > 0 && len(pc[0].URIs) > 0 {
			s.mu.Lock()
			s.clients = append(s.clients, pc[0].URIs[0].String())
			s.mu.Unlock()
		}
		io.Copy(c, c)
	})
	return s
}

// istiod's clusters, compiled with tlsctx over the SDS store: the
// workload certificate presented, the server's SAN checked, ALPN istio
// offered (never istio-peer-exchange), cluster.<name>.ssl.* counted; a
// server outside match_subject_alt_names refused with the reason and
// ssl.fail_verify_san.
func TestUpstreamTLSThroughTLSContext(t *testing.T) {
	ca := testpki.NewCA(t)
	srv := startMTLSServer(t, ca, httpbinID)
	mk := func(name, san string) *clusterv3.Cluster {
		return xdstest.Cluster(name, xdstest.WithEndpoints(xdstest.Endpoint{Addr: srv.addr, SocketMatch: xdstest.IstioTLS}),
			xdstest.WithSocketMatches(xdstest.IstioSocketMatches(testpki.UpstreamSocket("outbound_.80_._.httpbin", san))...))
	}
	clusters := append(passthroughClusters(), mk("good", httpbinID), mk("bad", "spiffe://cluster.local/ns/default/sa/other"))
	store := secrets.NewStore()
	refs, err := secrets.Find(clusters, nil)
	if err != nil {
		t.Fatal(err)
	}
	store.SetRefs(refs)
	now := time.Now()
	if err := store.Put("1", ca.Leaf(t, appID, testpki.LeafOpts{}).Secret("default"), now); err != nil {
		t.Fatal(err)
	}
	if err := store.Put("1", ca.RootSecret("ROOTCA"), now); err != nil {
		t.Fatal(err)
	}
	opts := buildOpts()
	opts.Secrets = store
	s, err := Build("1", nil, clusters, nil, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Retire(nil)
	if s.ClusterSSL("PassthroughCluster") != nil {
		t.Error("a plaintext cluster has an ssl block")
	}

	up, err := s.Cluster("good").Connect(context.Background(), netip.AddrPort{}, nil)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	if up.PeerURISAN() != httpbinID || up.TCPConn() != nil || up.TLS().NegotiatedProtocol != "istio" {
		t.Errorf("peer %q, TCPConn %v, ALPN %q", up.PeerURISAN(), up.TCPConn(), up.TLS().NegotiatedProtocol)
	}
	up.Write([]byte("hi"))
	buf := make([]byte, 2)
	if _, err := io.ReadFull(up, buf); err != nil || string(buf) != "hi" {
		t.Fatalf("echo: %q %v", buf, err)
	}
	up.Close()
	srv.mu.Lock()
	if !slices.Equal(srv.clients, []string{appID}) || !slices.Equal(srv.offers[0], []string{"istio"}) {
		t.Errorf("server saw clients %q offering %q; want %s offering [istio]", srv.clients, srv.offers, appID)
	}
	srv.mu.Unlock()
	if got := sslStat(s.ClusterSSL("good"), "handshake"); got != 1 {
		t.Errorf("cluster.good.ssl.handshake = %d, want 1", got)
	}

	_, err = s.Cluster("bad").Connect(context.Background(), netip.AddrPort{}, nil)
	var ce *cluster.ConnectError
	var he *tlsctx.HandshakeError
	if !errors.As(err, &ce) || !errors.As(err, &he) || !strings.HasPrefix(ce.TransportFailure, "verify SAN: ") || ce.TransportFailure != he.Reason {
		t.Fatalf("connect to a server outside the SANs: %v; want a ConnectError whose TransportFailure is the HandshakeError's Reason", err)
	}
	if got := sslStat(s.ClusterSSL("bad"), "fail_verify_san"); got != 1 {
		t.Errorf("cluster.bad.ssl.fail_verify_san = %d, want 1", got)
	}
	if v, _ := s.Cluster("bad").Stat("upstream_cx_connect_fail"); v != 1 {
		t.Errorf("cluster.bad.upstream_cx_connect_fail = %d, want 1", v)
	}

	// A rebuild keeps the ssl block and its counts, whether the cluster
	// is lent unchanged or rebuilt.
	changed := slices.Clone(clusters)
	changed[3] = mk("bad", "spiffe://cluster.local/ns/default/sa/still-other")
	s2, err := Build("2", nil, changed, s, opts)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Retire(nil)
	if s2.ClusterSSL("good") != s.ClusterSSL("good") || sslStat(s2.ClusterSSL("bad"), "fail_verify_san") != 1 {
		t.Error("the ssl blocks did not survive a CDS update")
	}
}

func sslStat(st *tlsctx.Stats, name string) uint64 {
	if st == nil {
		return 0
	}
	for _, s := range st.List() {
		if s.Name == name {
			return s.Value
		}
	}
	return 0
}
