package testpki

import (
	"crypto/x509"
	"encoding/pem"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
)

// TestLeafShape: a leaf carries the SPIFFE ID as its only URI SAN, both
// EKUs and istiod's back-dated NotBefore, verifies against the CA (through
// an intermediate too), and its PEM chain is leaf first, root last.
func TestLeafShape(t *testing.T) {
	ca := NewCA(t)
	const id = "spiffe://cluster.local/ns/default/sa/app"
	l := ca.Leaf(t, id, LeafOpts{DNS: []string{"app.default"}})
	if len(l.Cert.URIs) != 1 || l.Cert.URIs[0].String() != id || l.Cert.DNSNames[0] != "app.default" {
		t.Errorf("SANs = %v %v", l.Cert.URIs, l.Cert.DNSNames)
	}
	if d := time.Since(l.Cert.NotBefore); d < time.Minute || d > 3*time.Minute {
		t.Errorf("NotBefore %v ago, want about 2m", d)
	}
	if _, err := l.Cert.Verify(x509.VerifyOptions{Roots: ca.Pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("leaf does not verify as a client: %v", err)
	}
	if l.TLS.Leaf != l.Cert || len(l.TLS.Certificate) != 1 {
		t.Errorf("tls.Certificate: leaf %v, %d certificates", l.TLS.Leaf != nil, len(l.TLS.Certificate))
	}
	var blocks []*pem.Block
	for rest := l.ChainPEM; ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		blocks = append(blocks, b)
	}
	if len(blocks) != 2 || string(blocks[0].Bytes) != string(l.Cert.Raw) || string(blocks[1].Bytes) != string(ca.Cert.Raw) {
		t.Errorf("chain PEM has %d blocks, want leaf then root", len(blocks))
	}

	mid := ca.Intermediate(t)
	ml := ca.Leaf(t, id, LeafOpts{Intermediate: mid})
	inter := x509.NewCertPool()
	inter.AddCert(mid.Cert)
	if _, err := ml.Cert.Verify(x509.VerifyOptions{Roots: ca.Pool, Intermediates: inter}); err != nil {
		t.Errorf("leaf under an intermediate: %v", err)
	}
	if len(ml.TLS.Certificate) != 2 {
		t.Errorf("leaf under an intermediate sends %d certificates, want 2", len(ml.TLS.Certificate))
	}
}

// TestSecretsAndSockets: the SDS secrets and istiod-shaped sockets carry
// what they say.
func TestSecretsAndSockets(t *testing.T) {
	ca := NewCA(t)
	l := ca.Leaf(t, "spiffe://td/ns/a/sa/b", LeafOpts{})
	if got := l.Secret("default").GetTlsCertificate().GetPrivateKey().GetInlineBytes(); string(got) != string(l.KeyPEM) {
		t.Error("default secret does not carry the key")
	}
	if got := ca.RootSecret("ROOTCA").GetValidationContext().GetTrustedCa().GetInlineBytes(); string(got) != string(ca.CertPEM) {
		t.Error("ROOTCA secret does not carry the root")
	}
	var uc tlsv3.UpstreamTlsContext
	ts := UpstreamSocket("outbound_.80_._.b", "spiffe://td/ns/a/sa/b")
	if err := ts.GetTypedConfig().UnmarshalTo(&uc); err != nil || ts.GetName() != "envoy.transport_sockets.tls" {
		t.Fatal(ts.GetName(), err)
	}
	sans := uc.GetCommonTlsContext().GetCombinedValidationContext().GetDefaultValidationContext().GetMatchSubjectAltNames()
	if uc.GetSni() != "outbound_.80_._.b" || len(sans) != 1 || sans[0].GetExact() != "spiffe://td/ns/a/sa/b" ||
		uc.GetCommonTlsContext().GetTlsCertificateSdsSecretConfigs()[0].GetSdsConfig().GetApiConfigSource().GetGrpcServices()[0].GetEnvoyGrpc().GetClusterName() != "sds-grpc" {
		t.Errorf("upstream socket = %v", &uc)
	}
	var dc tlsv3.DownstreamTlsContext
	if err := DownstreamSocket("h2", "http/1.1").GetTypedConfig().UnmarshalTo(&dc); err != nil {
		t.Fatal(err)
	}
	if !dc.GetRequireClientCertificate().GetValue() || len(dc.GetCommonTlsContext().GetAlpnProtocols()) != 2 {
		t.Errorf("downstream socket = %v", &dc)
	}
}
