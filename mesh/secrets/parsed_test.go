package secrets

import (
	"strings"
	"testing"
	"time"

	"github.com/meshtun/meshtun/internal/testpki"
)

// TestSecretsParsedForHandshakes: a tls_certificate secret carries its key
// pair (leaf set) and a validation context its CA pool, parsed once at
// Put; a chain whose key does not match is refused naming the field.
func TestSecretsParsedForHandshakes(t *testing.T) {
	ca := testpki.NewCA(t)
	leaf := ca.Leaf(t, spiffeID, testpki.LeafOpts{})
	s := NewStore()
	s.SetRefs(&Refs{Names: map[string]Source{"default": {Cluster: "sds-grpc"}, "ROOTCA": {Cluster: "sds-grpc"}}})
	if err := s.Put("1", leaf.Secret("default"), time.Now()); err != nil {
		t.Fatal(err)
	}
	if err := s.Put("1", ca.RootSecret("ROOTCA"), time.Now()); err != nil {
		t.Fatal(err)
	}
	d := s.Get("default")
	if d.TLS == nil || d.TLS.Leaf == nil || !d.TLS.Leaf.Equal(leaf.Cert) || d.Pool != nil {
		t.Errorf("default: TLS %v, Pool %v; want the key pair only", d.TLS != nil, d.Pool != nil)
	}
	r := s.Get("ROOTCA")
	if r.Pool == nil || r.TLS != nil {
		t.Fatalf("ROOTCA: Pool %v, TLS %v; want the pool only", r.Pool != nil, r.TLS != nil)
	}
	if !r.Pool.Equal(ca.Pool) {
		t.Error("ROOTCA pool is not the CA")
	}
	bad := leaf.Secret("default")
	bad.GetTlsCertificate().GetPrivateKey().Specifier = ca.Leaf(t, spiffeID, testpki.LeafOpts{}).Secret("x").GetTlsCertificate().GetPrivateKey().GetSpecifier()
	err := s.Put("2", bad, time.Now())
	if err == nil || !strings.Contains(err.Error(), `secret "default": tls_certificate: tls: private key does not match public key`) {
		t.Errorf("mismatched key: %v", err)
	}
	if s.Get("default").Version != "1" {
		t.Error("a refused version replaced the one in force")
	}
}
