package caclient

import (
	"context"
	"crypto/ecdsa"
	"crypto/rsa"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshtun/meshtun/controlplane/ca"
	"github.com/meshtun/meshtun/internal/leakcheck"
	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"
)

func TestMain(m *testing.M) { leakcheck.VerifyTestMain(m) }

// testCA is controlplane/ca served over loopback TLS on a fixed address,
// so it can be stopped and started again under the client.
type testCA struct {
	pb.UnimplementedIstioCertificateServiceServer
	t        *testing.T
	dir      string
	srv      *ca.Server
	addr     string
	RootFile string

	mu      sync.Mutex
	gs      *grpc.Server
	lastMD  metadata.MD
	oneElem bool // answer a one-element chain, as a broken CA would
}

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	dir := t.TempDir()
	a, err := ca.LoadOrCreate(filepath.Join(dir, "state"), "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	tk, err := ca.LoadTokens(filepath.Join(dir, "state"))
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close()
	c := &testCA{t: t, dir: dir, addr: addr, RootFile: filepath.Join(dir, "root-cert.pem"),
		srv: &ca.Server{CA: a, Tokens: tk, Log: zerolog.Nop()}}
	if err := os.WriteFile(c.RootFile, a.RootPEM(), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.stop)
	return c
}

func (c *testCA) CreateCertificate(ctx context.Context, r *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	c.mu.Lock()
	c.lastMD = md
	one := c.oneElem
	c.mu.Unlock()
	resp, err := c.srv.CreateCertificate(ctx, r)
	if err == nil && one {
		resp.CertChain = resp.CertChain[:1]
	}
	return resp, err
}

func (c *testCA) start() {
	c.t.Helper()
	cert, err := c.srv.CA.ServingCertificate(ca.DNSNames, []net.IP{net.IPv4(127, 0, 0, 1)})
	if err != nil {
		c.t.Fatal(err)
	}
	var lis net.Listener
	for i := 0; ; i++ { // the port was just released by stop
		if lis, err = net.Listen("tcp", c.addr); err == nil || i == 50 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		c.t.Fatal(err)
	}
	gs := grpc.NewServer(grpc.Creds(ca.ServerCredentials(cert, c.srv.CA)))
	pb.RegisterIstioCertificateServiceServer(gs, c)
	c.mu.Lock()
	c.gs = gs
	c.mu.Unlock()
	go gs.Serve(lis)
}

func (c *testCA) stop() {
	c.mu.Lock()
	gs := c.gs
	c.gs = nil
	c.mu.Unlock()
	if gs != nil {
		gs.Stop()
	}
}

// tokenFile writes a token for ns/sa and returns its path.
func (c *testCA) tokenFile(ns, sa string) string {
	c.t.Helper()
	tok, err := c.srv.Tokens.Mint(ca.Identity{Namespace: ns, ServiceAccount: sa}, time.Hour)
	if err != nil {
		c.t.Fatal(err)
	}
	p := filepath.Join(c.dir, "istio-token")
	if err := os.WriteFile(p, []byte(tok+"\n"), 0o600); err != nil {
		c.t.Fatal(err)
	}
	return p
}

func (c *testCA) options(tokenFile string) Options {
	return Options{Addr: c.addr, RootFile: c.RootFile, ServerName: "istiod.istio-system.svc", TokenFile: tokenFile,
		ClusterID: "Kubernetes", Namespace: "shop", ServiceAccount: "cart",
		InitialBackoff: 50 * time.Millisecond, MaxBackoff: 200 * time.Millisecond, CallTimeout: 5 * time.Second, Log: zerolog.Nop()}
}

func newClient(t *testing.T, o Options) *Client {
	t.Helper()
	c, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// runClient runs c until the test ends.
func runClient(t *testing.T, c *Client) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); c.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
}

func waitFor(d time.Duration, cond func() bool) bool {
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		if cond() {
			return true
		}
	}
	return cond()
}

// TestIssueSANFromToken: with RSA (default) and ECDSA keys, the client
// gets a chain whose leaf's only SAN is the token's identity, even though
// its CSR asks for another one; the root is the chain's last element; the
// token and ClusterID went as gRPC metadata.
func TestIssueSANFromToken(t *testing.T) {
	c := newTestCA(t)
	c.start()
	for _, kt := range []KeyType{RSA, ECDSA} {
		t.Run(kt.String(), func(t *testing.T) {
			o := c.options(c.tokenFile("shop", "cart"))
			o.Namespace, o.ServiceAccount, o.KeyType = "kube-system", "admin", kt
			cl := newClient(t, o)
			id, err := cl.Fetch(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if len(id.Leaf.URIs) != 1 || id.SPIFFEID != "spiffe://cluster.local/ns/shop/sa/cart" || len(id.Leaf.DNSNames) != 0 {
				t.Fatalf("SANs %v, want only the token's spiffe://cluster.local/ns/shop/sa/cart", id.Leaf.URIs)
			}
			if string(id.RootPEM) != string(c.srv.CA.RootPEM()) || len(splitPEM(id.ChainPEM)) != 2 {
				t.Errorf("root is not the CA's, or the chain has %d elements", len(splitPEM(id.ChainPEM)))
			}
			switch id.Leaf.PublicKey.(type) {
			case *rsa.PublicKey:
				if kt != RSA || id.Leaf.PublicKey.(*rsa.PublicKey).N.BitLen() != 2048 || !strings.Contains(string(id.KeyPEM), "RSA PRIVATE KEY") {
					t.Errorf("RSA key for %v", kt)
				}
			case *ecdsa.PublicKey:
				if kt != ECDSA || !strings.Contains(string(id.KeyPEM), "EC PRIVATE KEY") {
					t.Errorf("ECDSA key for %v", kt)
				}
			}
			if d := time.Until(id.NotAfter); d < 23*time.Hour || d > 25*time.Hour {
				t.Errorf("SECRET_TTL default 24h: expires in %v", d)
			}
			if id.Serial != strings.ToLower(id.Leaf.SerialNumber.Text(16)) && id.Serial != "0"+strings.ToLower(id.Leaf.SerialNumber.Text(16)) {
				t.Errorf("serial %s vs %x", id.Serial, id.Leaf.SerialNumber)
			}
			c.mu.Lock()
			md := c.lastMD
			c.mu.Unlock()
			if got := md.Get("clusterid"); len(got) != 1 || got[0] != "Kubernetes" {
				t.Errorf("ClusterID metadata %v", got)
			}
			if got := md.Get("authorization"); len(got) != 1 || !strings.HasPrefix(got[0], "Bearer mt1.") {
				t.Errorf("authorization metadata %v", got)
			}
		})
	}
}

// TestTokenReReadEveryCall: a new token in the file is used by the next
// call without restarting the client (Kubernetes rotates projected tokens).
func TestTokenReReadEveryCall(t *testing.T) {
	c := newTestCA(t)
	c.start()
	cl := newClient(t, c.options(c.tokenFile("shop", "cart")))
	if id, err := cl.Fetch(context.Background()); err != nil || id.SPIFFEID != "spiffe://cluster.local/ns/shop/sa/cart" {
		t.Fatal(id, err)
	}
	c.tokenFile("shop", "web") // same path, new content
	if id, err := cl.Fetch(context.Background()); err != nil || id.SPIFFEID != "spiffe://cluster.local/ns/shop/sa/web" {
		t.Fatalf("after the token changed: %v %v", id, err)
	}
}

// TestBadToken: a token the CA did not sign, and a missing token file,
// give an error that says the CA rejected the token and names the file.
func TestBadToken(t *testing.T) {
	c := newTestCA(t)
	c.start()
	other := newTestCA(t)
	bad := other.tokenFile("shop", "cart")
	cl := newClient(t, c.options(bad))
	_, err := cl.Fetch(context.Background())
	if err == nil || !strings.Contains(err.Error(), "CA rejected the token (file "+bad) || !strings.Contains(err.Error(), "request authenticate failure") {
		t.Errorf("foreign token: %v", err)
	}
	missing := filepath.Join(t.TempDir(), "istio-token")
	cl = newClient(t, c.options(missing))
	_, err = cl.Fetch(context.Background())
	if err == nil || !strings.Contains(err.Error(), "CA rejected the token (file "+missing+", which could not be read") {
		t.Errorf("missing token: %v", err)
	}
	c.mu.Lock()
	if got := c.lastMD.Get("authorization"); len(got) != 0 {
		t.Errorf("missing token file sent authorization %v", got)
	}
	c.mu.Unlock()
}

// TestWrongRoot: a root file of another CA is a TLS error naming the root
// file; a missing one too; a server name the certificate lacks as well.
func TestWrongRoot(t *testing.T) {
	c := newTestCA(t)
	c.start()
	o := c.options(c.tokenFile("shop", "cart"))
	o.RootFile = newTestCA(t).RootFile
	_, err := newClient(t, o).Fetch(context.Background())
	if err == nil || !strings.Contains(err.Error(), "TLS to the CA at "+c.addr) || !strings.Contains(err.Error(), "root file "+o.RootFile) {
		t.Errorf("wrong root: %v", err)
	}
	o.RootFile = filepath.Join(t.TempDir(), "root-cert.pem")
	_, err = newClient(t, o).Fetch(context.Background())
	if err == nil || !strings.Contains(err.Error(), o.RootFile) || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing root: %v", err)
	}
	o = c.options(o.TokenFile)
	o.ServerName = "istiod.other.svc"
	_, err = newClient(t, o).Fetch(context.Background())
	if err == nil || !strings.Contains(err.Error(), `server name "istiod.other.svc"`) || !strings.Contains(err.Error(), c.RootFile) {
		t.Errorf("wrong server name: %v", err)
	}
}

// TestRejectsShortChain: a response without the root (one element) is an
// error, as pilot-agent's "invalid empty CertChain".
func TestRejectsShortChain(t *testing.T) {
	c := newTestCA(t)
	c.oneElem = true
	c.start()
	_, err := newClient(t, c.options(c.tokenFile("shop", "cart"))).Fetch(context.Background())
	if !errors.Is(err, errNoChain) {
		t.Errorf("one-element chain: %v", err)
	}
}

// TestCADownAtStart: the client keeps retrying (short backoff here) and
// has a certificate within 2 s of the CA coming up; meanwhile Err says
// why there is none.
func TestCADownAtStart(t *testing.T) {
	c := newTestCA(t)
	cl := newClient(t, c.options(c.tokenFile("shop", "cart")))
	runClient(t, cl)
	if !waitFor(5*time.Second, func() bool { return cl.Err() != nil }) {
		t.Fatal("no error recorded while the CA is down")
	}
	time.Sleep(300 * time.Millisecond) // several failed attempts
	if cl.Current() != nil {
		t.Fatal("an identity without a CA")
	}
	if !strings.Contains(cl.Err().Error(), c.addr) {
		t.Errorf("error does not name the CA: %v", cl.Err())
	}
	c.start()
	if !waitFor(2*time.Second, func() bool { return cl.Current() != nil }) {
		t.Fatalf("no certificate within 2 s of the CA coming up: %v", cl.Err())
	}
	if cl.Err() != nil {
		t.Errorf("Err after success: %v", cl.Err())
	}
}

// TestRotationAndCADownLater: with a 4 s TTL the certificate is re-issued
// at about half its lifetime (a new serial, subscribers told); then, with
// the CA gone, the current certificate keeps serving until it expires,
// and only then is there none.
func TestRotationAndCADownLater(t *testing.T) {
	c := newTestCA(t)
	c.start()
	o := c.options(c.tokenFile("shop", "cart"))
	o.TTL = 4 * time.Second
	o.KeyType = ECDSA
	cl := newClient(t, o)
	ch, unsub := cl.Subscribe()
	defer unsub()
	runClient(t, cl)
	select {
	case <-ch:
	case <-time.After(5 * time.Second):
		t.Fatal("no first certificate")
	}
	first := cl.Current()
	if first == nil {
		t.Fatal("signalled without an identity")
	}
	life := first.NotAfter.Sub(first.Received) // 3-4 s: x509 times are whole seconds
	select {
	case <-ch:
	case <-time.After(life):
		t.Fatalf("not rotated within the lifetime %v", life)
	}
	second := cl.Current()
	took := second.Received.Sub(first.Received)
	if second.Serial == first.Serial || took < life*4/10 || took > life*6/10+200*time.Millisecond {
		t.Fatalf("rotation after %v of a %v lifetime (serial %s -> %s), want about half", took, life, first.Serial, second.Serial)
	}
	c.stop()
	if !waitFor(life, func() bool { return cl.Err() != nil }) {
		t.Fatal("the next rotation did not fail with the CA down")
	}
	if cur := cl.Current(); cur == nil || cur.Serial != second.Serial {
		t.Fatal("the current certificate stopped serving before it expired")
	}
	if time.Now().After(second.NotAfter) {
		t.Fatal("test too slow: the certificate already expired")
	}
	if !waitFor(time.Until(second.NotAfter)+time.Second, func() bool { return cl.Current() == nil }) {
		t.Fatal("an expired certificate is still served")
	}
	if cl.Err() == nil {
		t.Error("no error while there is no certificate")
	}
}

// TestOptionsFromEnv: pilot-agent's variables, and bad values named.
func TestOptionsFromEnv(t *testing.T) {
	env := map[string]string{"TRUST_DOMAIN": "example.org", "POD_NAMESPACE": "shop", "SERVICE_ACCOUNT": "cart",
		"SECRET_TTL": "60s", "ECC_SIGNATURE_ALGORITHM": "ECDSA", "ISTIOD_SAN": "istiod.x.svc", "ISTIO_META_CLUSTER_ID": "c1"}
	o, err := OptionsFromEnv(func(k string) string { return env[k] }, "istiod.istio-system.svc:15012")
	if err != nil {
		t.Fatal(err)
	}
	if o.Addr != "istiod.istio-system.svc:15012" || o.TTL != time.Minute || o.KeyType != ECDSA || o.ServerName != "istiod.x.svc" || o.ClusterID != "c1" {
		t.Errorf("%+v", o)
	}
	cl := newClient(t, o)
	if cl.SPIFFEID() != "spiffe://example.org/ns/shop/sa/cart" {
		t.Errorf("SPIFFE ID %s", cl.SPIFFEID())
	}
	for k, v := range map[string]string{"SECRET_TTL": "1d", "ECC_SIGNATURE_ALGORITHM": "EC", "WORKLOAD_RSA_KEY_SIZE": "1024", "SECRET_GRACE_PERIOD_RATIO": "2"} {
		_, err := OptionsFromEnv(func(n string) string {
			if n == k {
				return v
			}
			return ""
		}, "a:1")
		if err == nil || !strings.Contains(err.Error(), k) || !strings.Contains(err.Error(), v) {
			t.Errorf("%s=%s: %v", k, v, err)
		}
	}
	if _, err := New(Options{Addr: "a:1", Namespace: "x"}); err == nil || !strings.Contains(err.Error(), "SERVICE_ACCOUNT") {
		t.Errorf("no service account: %v", err)
	}
	if cl, _ := New(Options{Addr: "localhost:15012", Namespace: "a", ServiceAccount: "b"}); cl.o.ServerName != "istiod.istio-system.svc" {
		t.Errorf("localhost server name %q", cl.o.ServerName)
	}
}

// TestRetryWaitUnready: without a certificate the backoff is capped at
// MaxBackoffUnready (a pod waiting to be ready follows a CA coming back
// within about a second); with one, it may grow to MaxBackoff but never
// past the certificate's expiry.
func TestRetryWaitUnready(t *testing.T) {
	c, err := New(Options{Namespace: "ns", ServiceAccount: "sa", MaxBackoff: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	if got := c.retryWait(16*time.Second, nil, now); got != time.Second {
		t.Errorf("no certificate: wait %v, want 1s", got)
	}
	if got := c.retryWait(500*time.Millisecond, nil, now); got != 500*time.Millisecond {
		t.Errorf("no certificate, short backoff: wait %v, want 500ms", got)
	}
	cur := &Identity{NotAfter: now.Add(time.Hour)}
	if got := c.retryWait(16*time.Second, cur, now); got != 16*time.Second {
		t.Errorf("certificate in force: wait %v, want the backoff 16s", got)
	}
	cur.NotAfter = now.Add(3 * time.Second)
	if got := c.retryWait(16*time.Second, cur, now); got != 3*time.Second {
		t.Errorf("certificate expiring: wait %v, want 3s (its expiry)", got)
	}
	low, err := New(Options{Namespace: "ns", ServiceAccount: "sa", InitialBackoff: 50 * time.Millisecond, MaxBackoff: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if got := low.retryWait(time.Second, nil, now); got != 200*time.Millisecond {
		t.Errorf("MaxBackoff below 1s: wait %v, want 200ms", got)
	}
}
