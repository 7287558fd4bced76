package tcpproxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"

	"github.com/meshtun/meshtun/internal/testpki"
	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/mesh/accesslog"
	"github.com/meshtun/meshtun/mesh/cluster"
	"github.com/meshtun/meshtun/mesh/upstream"
)

// sanTLS is a TLS client transport that trusts roots and accepts only a
// server whose first URI SAN is san (tlsctx.Upstream's part in these
// tests).
type sanTLS struct {
	roots *x509.CertPool
	san   string
}

func (s sanTLS) Secure(ctx context.Context, raw net.Conn, _ string) (net.Conn, error) {
	tc := tls.Client(raw, &tls.Config{RootCAs: s.roots, ServerName: "ignored", NextProtos: []string{"istio"},
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			leaf := cs.PeerCertificates[0]
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: s.roots}); err != nil {
				return err
			}
			if len(leaf.URIs) == 0 || leaf.URIs[0].String() != s.san {
				return fmt.Errorf("verify SAN: %v not in match_subject_alt_names", leaf.URIs)
			}
			return nil
		}})
	if err := tc.HandshakeContext(ctx); err != nil {
		return nil, err
	}
	return tc, nil
}

// tlsEcho echoes each TLS connection until the client's close_notify.
func tlsEcho(t *testing.T, cert tls.Certificate) netip.AddrPort {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"istio"}})
	if err != nil {
		t.Fatal(err)
	}
	xdstest.ServeConns(t, ln, func(c net.Conn) { io.Copy(c, c) })
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// A TCP flow to a TLS upstream: spliced through TLS (half-close included),
// the upstream's SPIFFE ID in the entry; a SAN mismatch is UF with the
// handshake's reason.
func TestConnectTLS(t *testing.T) {
	const id = "spiffe://cluster.local/ns/default/sa/postgres"
	ca := testpki.NewCA(t)
	cert := ca.Leaf(t, id, testpki.LeafOpts{}).TLS
	addr := tlsEcho(t, cert)
	mk := func(name, san string) *cluster.Cluster {
		pb := xdstest.StaticCluster(name, addr)
		pb.TransportSocket = testpki.UpstreamSocket("sni", san)
		c, err := cluster.New(pb, cluster.Options{Dialer: &upstream.Dialer{},
			Transport: func(string, *corev3.TransportSocket) (cluster.Transport, error) {
				return sanTLS{roots: ca.Pool, san: san}, nil
			}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	clusters := clusterMap{"c": mk("c", id), "bad": mk("bad", "spiffe://cluster.local/ns/default/sa/other")}

	tp := config(t, "c", 1)
	var e accesslog.Entry
	up, _, err := tp.Connect(clusters, netip.AddrPort{}, &e)
	if err != nil {
		t.Fatal(err)
	}
	if e.UpstreamPeerURISAN != id || e.UpstreamTransportFailureReason != "" {
		t.Errorf("entry peer SAN %q, failure %q; want %s and none", e.UpstreamPeerURISAN, e.UpstreamTransportFailureReason, id)
	}
	client, down := pair(t)
	done := make(chan struct{})
	go func() { tp.Serve(context.Background(), down, up, &e); close(done) }()
	msg := strings.Repeat("y", 100000)
	go func() { io.WriteString(client, msg); client.CloseWrite() }()
	got, err := io.ReadAll(client)
	if err != nil || string(got) != msg {
		t.Fatalf("echo over TLS: %d bytes, %v; want %d", len(got), err, len(msg))
	}
	<-done
	if e.BytesReceived != int64(len(msg)) || e.BytesSent != int64(len(msg)) || e.ResponseFlags != "-" {
		t.Errorf("entry %+v", e)
	}

	tp = config(t, "bad", 2)
	e = accesslog.Entry{}
	up, flag, err := tp.Connect(clusters, netip.AddrPort{}, &e)
	if up != nil || flag != "UF" || !strings.Contains(e.UpstreamTransportFailureReason, "not in match_subject_alt_names") {
		t.Fatalf("SAN mismatch: %v %q %v, reason %q; want UF with the SAN reason", up, flag, err, e.UpstreamTransportFailureReason)
	}
	if e.UpstreamPeerURISAN != "" {
		t.Errorf("a refused upstream's SAN %q is logged", e.UpstreamPeerURISAN)
	}
}
