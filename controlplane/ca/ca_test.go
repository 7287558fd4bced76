package ca

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshtun/meshtun/internal/leakcheck"
	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"
)

func TestMain(m *testing.M) { leakcheck.VerifyTestMain(m) }

// csrFor makes a CSR asking for uri (what a malicious caller would ask).
func csrFor(t *testing.T, uri string) []byte {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	u, _ := url.Parse(uri)
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: "evil"}, URIs: []*url.URL{u}, DNSNames: []string{"evil.example"}}, k)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

func parseLeaf(t *testing.T, s string) *x509.Certificate {
	t.Helper()
	b, _ := pem.Decode([]byte(s))
	if b == nil {
		t.Fatalf("not PEM: %q", s)
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestTokens: a minted token verifies to its identity; an expired,
// tampered, foreign-key or garbage token does not; names are checked.
func TestTokens(t *testing.T) {
	dir := t.TempDir()
	tk, err := LoadTokens(dir)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(filepath.Join(dir, TokenKeyFile)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v %v", fi, err)
	}
	id := Identity{Namespace: "shop", ServiceAccount: "cart"}
	tok, err := tk.Mint(id, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := tk.Verify(tok); err != nil || got != id {
		t.Fatalf("Verify = %v, %v", got, err)
	}
	// The key is reloaded from the folder: a token outlives a restart.
	tk2, err := LoadTokens(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := tk2.Verify(tok); err != nil || got != id {
		t.Fatalf("after reload: %v, %v", got, err)
	}
	other, _ := LoadTokens(t.TempDir())
	if _, err := other.Verify(tok); err == nil || !strings.Contains(err.Error(), "signature") {
		t.Errorf("foreign key: %v", err)
	}
	// Tampering: another identity's claims with this signature.
	forged, _ := tk.Mint(Identity{Namespace: "shop", ServiceAccount: "admin"}, time.Hour)
	mixed := forged[:strings.LastIndexByte(forged, '.')] + tok[strings.LastIndexByte(tok, '.'):]
	if _, err := tk.Verify(mixed); err == nil || !strings.Contains(err.Error(), "signature") {
		t.Errorf("tampered claims: %v", err)
	}
	flipped := []byte(tok)
	flipped[len(flipped)-3] ^= 1
	if _, err := tk.Verify(string(flipped)); err == nil {
		t.Error("tampered signature accepted")
	}
	for _, bad := range []string{"", "eyJhbGciOiJSUzI1NiJ9.e30.sig", "mt1.", "mt1.x.y"} {
		if _, err := tk.Verify(bad); err == nil {
			t.Errorf("Verify(%q) accepted", bad)
		}
	}
	tk.now = func() time.Time { return time.Now().Add(time.Hour + time.Second) }
	if _, err := tk.Verify(tok); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Errorf("expired: %v", err)
	}
	if _, err := tk.Mint(Identity{Namespace: "a/b", ServiceAccount: "x"}, time.Hour); err == nil || !strings.Contains(err.Error(), `namespace "a/b"`) {
		t.Errorf("bad namespace: %v", err)
	}
	if _, err := tk.Mint(Identity{Namespace: "a"}, time.Hour); err == nil || !strings.Contains(err.Error(), "service account: empty") {
		t.Errorf("empty sa: %v", err)
	}
}

// TestSignAsIstiod: the leaf carries only the SAN it is given (not the
// CSR's names), istiod's key usages, a critical SAN, an empty subject,
// NotBefore back-dated 2 min; TTL 0 is 24h, over 90 days an error, and
// NotAfter never passes the CA's.
func TestSignAsIstiod(t *testing.T) {
	a, err := LoadOrCreate(t.TempDir(), "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	const id = "spiffe://cluster.local/ns/shop/sa/cart"
	before := time.Now()
	chain, err := a.Sign(csrFor(t, "spiffe://cluster.local/ns/kube-system/sa/admin"), id, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 2 || chain[1] != string(a.RootPEM()) {
		t.Fatalf("chain: %d elements, root last: %v", len(chain), chain[len(chain)-1] == string(a.RootPEM()))
	}
	leaf := parseLeaf(t, chain[0])
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id || len(leaf.DNSNames) != 0 || leaf.Subject.String() != "" {
		t.Errorf("names: uris %v dns %v subject %q", leaf.URIs, leaf.DNSNames, leaf.Subject)
	}
	if leaf.KeyUsage != x509.KeyUsageDigitalSignature|x509.KeyUsageKeyEncipherment {
		t.Errorf("key usage %v", leaf.KeyUsage)
	}
	if len(leaf.ExtKeyUsage) != 2 || leaf.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth || leaf.ExtKeyUsage[1] != x509.ExtKeyUsageClientAuth {
		t.Errorf("ext key usage %v", leaf.ExtKeyUsage)
	}
	critical := false
	for _, e := range leaf.Extensions {
		if e.Id.String() == "2.5.29.17" {
			critical = e.Critical
		}
	}
	if !critical {
		t.Error("SAN not critical")
	}
	if d := before.Sub(leaf.NotBefore); d < 2*time.Minute-time.Second || d > 2*time.Minute+5*time.Second {
		t.Errorf("NotBefore %v is %v before now", leaf.NotBefore, d)
	}
	if d := leaf.NotAfter.Sub(before); d < 24*time.Hour-5*time.Second || d > 24*time.Hour+5*time.Second {
		t.Errorf("default TTL: NotAfter in %v", d)
	}
	if leaf.IsCA {
		t.Error("leaf is a CA")
	}
	if _, err := a.Sign(csrFor(t, id), id, 91*24*time.Hour); err == nil || !strings.Contains(err.Error(), "greater than the max allowed TTL") {
		t.Errorf("TTL > 90d: %v", err)
	}
	a.now = func() time.Time { return a.cert.NotAfter.Add(-time.Hour) }
	chain, err = a.Sign(csrFor(t, id), id, 48*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if got := parseLeaf(t, chain[0]).NotAfter; !got.Equal(a.cert.NotAfter) {
		t.Errorf("NotAfter %v not clamped to the CA's %v", got, a.cert.NotAfter)
	}
	for _, bad := range []string{"", "garbage", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"} {
		if _, err := a.Sign([]byte(bad), id, 0); err == nil || !strings.HasPrefix(err.Error(), "csr:") {
			t.Errorf("Sign(%q): %v", bad, err)
		}
	}
}

// TestRootKeptAcrossRestarts: the generated root is written once (key
// 0600) and reloaded, not regenerated.
func TestRootKeptAcrossRestarts(t *testing.T) {
	dir := t.TempDir()
	a, err := LoadOrCreate(dir, "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(filepath.Join(dir, CAKeyFile)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key: %v %v", fi, err)
	}
	b, err := LoadOrCreate(dir, "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	if !a.root.Equal(b.root) || string(a.RootPEM()) != string(b.RootPEM()) {
		t.Fatal("a restart made a new root")
	}
	disk, _ := os.ReadFile(filepath.Join(dir, RootCertFile))
	if string(disk) != string(b.RootPEM()) {
		t.Error("root-cert.pem differs from the root in use")
	}
}

// TestCacertsWithIntermediate: istiod's plugged-in cacerts layout
// (intermediate signs, cert-chain.pem = intermediate + root): the response
// is [leaf, intermediate, root] and verifies; a key that does not match
// is refused naming the files.
func TestCacertsWithIntermediate(t *testing.T) {
	rootDir := t.TempDir()
	root, err := LoadOrCreate(rootDir, "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	ik, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: randomSerial(), Subject: pkix.Name{CommonName: "intermediate"},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, root.cert, ik.Public(), root.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, _ := x509.MarshalPKCS8PrivateKey(ik)
	interPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, CACertFile), interPEM, 0o644)
	os.WriteFile(filepath.Join(dir, CAKeyFile), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600)
	os.WriteFile(filepath.Join(dir, RootCertFile), root.RootPEM(), 0o644)
	os.WriteFile(filepath.Join(dir, CertChainFile), append(append([]byte{}, interPEM...), root.RootPEM()...), 0o644)
	a, err := LoadFiles(dir)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := a.Sign(csrFor(t, "x"), "spiffe://cluster.local/ns/a/sa/b", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 3 || chain[1] != string(interPEM) || chain[2] != string(root.RootPEM()) {
		t.Fatalf("chain of %d, want leaf, intermediate, root", len(chain))
	}
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(root.root)
	inter.AddCert(parseLeaf(t, chain[1]))
	if _, err := parseLeaf(t, chain[0]).Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Fatal(err)
	}
	// The intermediate's NotAfter (24h) bounds the leaf.
	if parseLeaf(t, chain[0]).NotAfter.After(a.cert.NotAfter) {
		t.Error("leaf outlives the intermediate")
	}
	os.WriteFile(filepath.Join(dir, CAKeyFile), mustReadFile(t, filepath.Join(rootDir, CAKeyFile)), 0o600)
	if _, err := LoadFiles(dir); err == nil || !strings.Contains(err.Error(), "does not match") || !strings.Contains(err.Error(), CACertFile) {
		t.Errorf("mismatched key: %v", err)
	}
	if _, err := LoadFiles(t.TempDir()); err == nil || !strings.Contains(err.Error(), CACertFile) {
		t.Errorf("empty dir: %v", err)
	}
}

func mustReadFile(t *testing.T, p string) []byte {
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestCreateCertificateOverTLS: the gRPC service over loopback TLS (the
// serving certificate verified as istiod.istio-system.svc): a good token
// gets a certificate whose only SAN is the token's, whatever the CSR asks;
// no token or a bad one is istiod's Unauthenticated; a bad CSR or TTL is
// InvalidArgument.
func TestCreateCertificateOverTLS(t *testing.T) {
	dir := t.TempDir()
	a, _ := LoadOrCreate(dir, "cluster.local")
	tk, _ := LoadTokens(dir)
	srv := &Server{CA: a, Tokens: tk, Log: zerolog.Nop()}
	cert, err := a.ServingCertificate(DNSNames, []net.IP{net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(grpc.Creds(ServerCredentials(cert, a)))
	srv.Register(gs)
	lis, _ := net.Listen("tcp", "127.0.0.1:0")
	go gs.Serve(lis)
	defer gs.Stop()

	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(a.RootPEM())
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: "istiod.istio-system.svc"})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := pb.NewIstioCertificateServiceClient(conn)
	call := func(token string, csr []byte, ttl int64) (*pb.IstioCertificateResponse, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if token != "" {
			ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
		}
		return c.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: string(csr), ValidityDuration: ttl})
	}
	good, _ := tk.Mint(Identity{Namespace: "shop", ServiceAccount: "cart"}, time.Hour)
	resp, err := call(good, csrFor(t, "spiffe://cluster.local/ns/kube-system/sa/admin"), 3600)
	if err != nil {
		t.Fatal(err)
	}
	leaf := parseLeaf(t, resp.CertChain[0])
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != "spiffe://cluster.local/ns/shop/sa/cart" || len(leaf.DNSNames) != 0 {
		t.Fatalf("SANs %v %v, want only the token's identity", leaf.URIs, leaf.DNSNames)
	}
	if d := time.Until(leaf.NotAfter); d < 59*time.Minute || d > time.Hour+time.Minute {
		t.Errorf("requested TTL 1h, NotAfter in %v", d)
	}
	other, _ := LoadTokens(t.TempDir())
	forged, _ := other.Mint(Identity{Namespace: "shop", ServiceAccount: "cart"}, time.Hour)
	for name, tok := range map[string]string{"none": "", "garbage": "x", "foreign key": forged} {
		_, err := call(tok, csrFor(t, "x"), 0)
		if st, _ := status.FromError(err); st.Code() != codes.Unauthenticated || st.Message() != "request authenticate failure" {
			t.Errorf("%s token: %v", name, err)
		}
	}
	_, err = call(good, []byte("not a csr"), 0)
	if st, _ := status.FromError(err); st.Code() != codes.InvalidArgument || !strings.Contains(st.Message(), "csr") {
		t.Errorf("bad csr: %v", err)
	}
	_, err = call(good, csrFor(t, "x"), int64(100*24*3600))
	if st, _ := status.FromError(err); st.Code() != codes.InvalidArgument || !strings.Contains(st.Message(), "TTL") {
		t.Errorf("TTL 100d: %v", err)
	}
}
