package sds

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/url"
	"testing"
	"time"
)

// testSPIFFE is the workload identity the test leaves carry.
const testSPIFFE = "spiffe://cluster.local/ns/default/sa/app"

// testCA is a self-signed root that issues leaves the way istiod does:
// one URI SAN, serverAuth+clientAuth, chain = [leaf, root].
type testCA struct {
	cert *x509.Certificate
	key  crypto.Signer
	pem  []byte
}

// nextSerial is a random serial, as a CA would give, so two issues differ.
func nextSerial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		panic(err)
	}
	return n
}

func newCA(t testing.TB, cn string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          nextSerial(),
		Subject:               pkix.Name{Organization: []string{cn}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// issue returns a leaf chain (leaf then root, PEM), its key and serial.
func (ca *testCA) issue(t testing.TB) (chainPEM, keyPEM []byte, serial *big.Int) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(testSPIFFE)
	tmpl := &x509.Certificate{
		SerialNumber: nextSerial(),
		NotBefore:    time.Now().Add(-2 * time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:         []*url.URL{u},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	chain := append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), ca.pem...)
	return chain, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), tmpl.SerialNumber
}

// identity is what the CA client would feed after an issue by ca.
func (ca *testCA) identity(t testing.TB) (Identity, *big.Int) {
	t.Helper()
	chain, key, serial := ca.issue(t)
	roots, err := TrustBundle(chain)
	if err != nil {
		t.Fatal(err)
	}
	return Identity{ChainPEM: chain, KeyPEM: key, RootsPEM: roots}, serial
}

func mustCerts(t testing.TB, p []byte) []*x509.Certificate {
	t.Helper()
	certs, err := parseCerts(p)
	if err != nil {
		t.Fatal(err)
	}
	return certs
}

func TestTrustBundleIsChainRootPlusExtraRootsOnce(t *testing.T) {
	ca, other := newCA(t, "root-a"), newCA(t, "root-b")
	chain, _, _ := ca.issue(t)
	b, err := TrustBundle(chain, append(append([]byte(nil), other.pem...), ca.pem...))
	if err != nil {
		t.Fatal(err)
	}
	got := mustCerts(t, b)
	if len(got) != 2 || !got[0].Equal(ca.cert) || !got[1].Equal(other.cert) {
		t.Fatalf("bundle has %d certificates, want [root-a, root-b]", len(got))
	}
	if _, err := TrustBundle([]byte("garbage")); err == nil || !bytes.Contains([]byte(err.Error()), []byte("certificate chain")) {
		t.Fatalf("garbage chain: err = %v, want one naming the certificate chain", err)
	}
	if _, err := TrustBundle(chain, []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")); err == nil ||
		!bytes.Contains([]byte(err.Error()), []byte("extra roots[0]")) {
		t.Fatalf("bad extra root: err = %v, want one naming extra roots[0]", err)
	}
}
