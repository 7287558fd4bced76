package rbac

import (
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"net/url"
	"testing"
)

func TestPeerOf(t *testing.T) {
	if PeerOf(nil) != nil || PeerOf(&tls.ConnectionState{}) != nil {
		t.Fatal("a peer without TLS or without a certificate")
	}
	u, _ := url.Parse("spiffe://cluster.local/ns/foo/sa/sleep")
	leaf := &x509.Certificate{URIs: []*url.URL{u}, DNSNames: []string{"sleep.foo"}, Subject: pkix.Name{CommonName: "sleep"}}
	p := PeerOf(&tls.ConnectionState{PeerCertificates: []*x509.Certificate{leaf}})
	if p == nil || len(p.URISANs) != 1 || p.URISANs[0] != u.String() || p.DNSSANs[0] != "sleep.foo" || p.Subject != "CN=sleep" {
		t.Fatalf("PeerOf = %+v", p)
	}
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
	if in.Peer = PeerOf(&tls.ConnectionState{PeerCertificates: []*x509.Certificate{leaf}}); !f.Evaluate(in).Allowed {
		t.Fatal("the second URI SAN is not matched")
	}
}
