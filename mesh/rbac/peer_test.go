package rbac

import (
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"net/url"
	"testing"

	"github.com/meshtun/meshtun/mesh/tlsctx"
)

// peerOf is the peer the TLS termination reports for a leaf.
func peerOf(t *testing.T, leaf *x509.Certificate) *Peer {
	p, ok := tlsctx.PeerOf(tls.ConnectionState{PeerCertificates: []*x509.Certificate{leaf}})
	if !ok {
		t.Fatal("no peer")
	}
	return &p
}

// TestPeerFromTLS: the TLS termination's peer is matched on any of its
// URI SANs, then DNS SANs, then the subject.
func TestPeerFromTLS(t *testing.T) {
	u, _ := url.Parse("spiffe://cluster.local/ns/foo/sa/sleep")
	leaf := &x509.Certificate{URIs: []*url.URL{u}, DNSNames: []string{"sleep.foo"}, Subject: pkix.Name{CommonName: "sleep"}}
	p := peerOf(t, leaf)
	f, err := loadGolden(t, "tcp/allow-both-http-tcp-out.yaml")
	if err != nil {
		t.Fatal(err)
	}
	in := tcpIn(80, p)
	if f.Evaluate(in).Allowed {
		t.Fatal("ns foo allowed by a policy for ns-1")
	}
	u2, _ := url.Parse("spiffe://cluster.local/ns/ns-1/sa/sleep")
	leaf.URIs = append(leaf.URIs, u2)
	if in.Peer = peerOf(t, leaf); !f.Evaluate(in).Allowed {
		t.Fatal("the second URI SAN is not matched")
	}
}

func TestPeerSubject(t *testing.T) {
	f, err := loadGolden(t, "tcp/allow-both-http-tcp-out.yaml")
	if err != nil {
		t.Fatal(err)
	}
	p := peerOf(t, &x509.Certificate{Subject: pkix.Name{CommonName: "x/ns/ns-1/y"}})
	if !f.Evaluate(tcpIn(80, p)).Allowed {
		t.Fatalf("subject %q not matched", p.Subject)
	}
}
