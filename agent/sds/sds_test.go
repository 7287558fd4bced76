package sds

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/rs/zerolog"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshtun/meshtun/internal/leakcheck"
	"github.com/meshtun/meshtun/internal/xdstest"
)

func TestMain(m *testing.M) { leakcheck.VerifyTestMain(m) }

// logBuf collects the server's log for assertions.
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

type harness struct {
	s      *Server
	path   string
	log    *logBuf
	client secretv3.SecretDiscoveryServiceClient
}

// start runs a server on a socket in a temp dir (in a directory that does
// not exist yet, as on a fresh pod) and connects a client to it.
func start(t *testing.T) *harness {
	t.Helper()
	h := &harness{path: filepath.Join(shortDir(t), "workload-spiffe-uds", "socket"), log: &logBuf{}}
	s, err := New(Options{SocketPath: h.path, Log: zerolog.New(h.log)})
	if err != nil {
		t.Fatal(err)
	}
	h.s = s
	t.Cleanup(func() { s.Close() })
	h.client = dial(t, h.path)
	return h
}

// shortDir is a temporary directory with a short path: t.TempDir's names
// (the test's name) would overflow a Unix socket path's 107 bytes.
func shortDir(t *testing.T) string {
	d, err := os.MkdirTemp("", "sds")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func dial(t *testing.T, path string) secretv3.SecretDiscoveryServiceClient {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return secretv3.NewSecretDiscoveryServiceClient(conn)
}

// streamCtx bounds a test's streams so a missing push fails the test
// instead of hanging it.
func streamCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// envoyNode is the node a sidecar Envoy sends.
var envoyNode = &corev3.Node{Id: "sidecar~10.0.0.7~app-1.default~default.svc.cluster.local", Cluster: "app.default"}

func (h *harness) subscribers(name string) int {
	h.s.mu.Lock()
	defer h.s.mu.Unlock()
	return h.s.subs[name]
}

// secrets decodes a response's resources by name.
func secrets(t *testing.T, res []*anypb.Any) map[string]*tlsv3.Secret {
	t.Helper()
	out := map[string]*tlsv3.Secret{}
	for _, a := range res {
		if a.GetTypeUrl() != SecretTypeURL {
			t.Fatalf("resource type %q, want %q", a.GetTypeUrl(), SecretTypeURL)
		}
		var s tlsv3.Secret
		if err := a.UnmarshalTo(&s); err != nil {
			t.Fatal(err)
		}
		out[s.GetName()] = &s
	}
	return out
}

func names(m map[string]*tlsv3.Secret) []string {
	var out []string
	for n := range m {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// checkDefault asserts sec is the tls_certificate of the identity: the
// whole chain (leaf with the SPIFFE URI SAN and the wanted serial, then the
// root) and a key that goes with the leaf.
func checkDefault(t *testing.T, sec *tlsv3.Secret, ca *testCA, serial *big.Int) {
	t.Helper()
	tc := sec.GetTlsCertificate()
	if tc == nil {
		t.Fatalf("secret %q has no tls_certificate: %v", sec.GetName(), sec)
	}
	chain := mustCerts(t, tc.GetCertificateChain().GetInlineBytes())
	if len(chain) != 2 || !chain[1].Equal(ca.cert) {
		t.Fatalf("certificate_chain has %d certificates, want [leaf, root %s]", len(chain), ca.cert.Subject)
	}
	if chain[0].SerialNumber.Cmp(serial) != 0 {
		t.Fatalf("leaf serial %v, want %v", chain[0].SerialNumber, serial)
	}
	if len(chain[0].URIs) != 1 || chain[0].URIs[0].String() != testSPIFFE {
		t.Fatalf("leaf URI SANs %v, want [%s]", chain[0].URIs, testSPIFFE)
	}
	if _, err := tls.X509KeyPair(tc.GetCertificateChain().GetInlineBytes(), tc.GetPrivateKey().GetInlineBytes()); err != nil {
		t.Fatalf("private_key does not go with the leaf: %v", err)
	}
}

// checkRoot asserts sec is the validation_context trusting exactly roots.
func checkRoot(t *testing.T, sec *tlsv3.Secret, roots ...*testCA) {
	t.Helper()
	vc := sec.GetValidationContext()
	if vc == nil {
		t.Fatalf("secret %q has no validation_context: %v", sec.GetName(), sec)
	}
	got := mustCerts(t, vc.GetTrustedCa().GetInlineBytes())
	if len(got) != len(roots) {
		t.Fatalf("trusted_ca has %d certificates, want %d", len(got), len(roots))
	}
	for i, r := range roots {
		if !got[i].Equal(r.cert) {
			t.Fatalf("trusted_ca[%d] is %s, want %s", i, got[i].Subject, r.cert.Subject)
		}
	}
}

func sotwReq(names ...string) *discoveryv3.DiscoveryRequest {
	return &discoveryv3.DiscoveryRequest{Node: envoyNode, ResourceNames: names, TypeUrl: SecretTypeURL}
}

func ack(resp *discoveryv3.DiscoveryResponse, names ...string) *discoveryv3.DiscoveryRequest {
	return &discoveryv3.DiscoveryRequest{VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce(), ResourceNames: names, TypeUrl: SecretTypeURL}
}

func TestSotWWaitsForIdentityThenPushesWhatChanged(t *testing.T) {
	h := start(t)
	st, err := h.client.StreamSecrets(streamCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(sotwReq(WorkloadCert, RootCA)); err != nil {
		t.Fatal(err)
	}
	// The request is registered and nothing is there to answer it with.
	xdstest.Eventually(t, 10*time.Second, "both names pending", func() bool {
		return slices.Equal(h.s.Pending(), []string{RootCA, WorkloadCert})
	})
	if _, ok := h.s.Current(); ok {
		t.Fatal("Current reports an identity before any Update")
	}

	ca := newCA(t, "root-a")
	id1, serial1 := ca.identity(t)
	if err := h.s.Update(id1); err != nil {
		t.Fatal(err)
	}
	// The first response is the one the Update caused: nothing (not even an
	// empty response) was sent while the names were pending.
	resp, err := st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetVersionInfo() != "1" || resp.GetTypeUrl() != SecretTypeURL || resp.GetNonce() == "" {
		t.Fatalf("first response version %q type %q nonce %q, want version 1, the Secret type and a nonce", resp.GetVersionInfo(), resp.GetTypeUrl(), resp.GetNonce())
	}
	got := secrets(t, resp.GetResources())
	if !slices.Equal(names(got), []string{RootCA, WorkloadCert}) {
		t.Fatalf("first response has %v, want [ROOTCA default]", names(got))
	}
	checkDefault(t, got[WorkloadCert], ca, serial1)
	checkRoot(t, got[RootCA], ca)
	if len(h.s.Pending()) != 0 {
		t.Fatalf("Pending = %v after the identity arrived", h.s.Pending())
	}
	if cur, ok := h.s.Current(); !ok || !cur.Expire.Equal(mustCerts(t, id1.ChainPEM)[0].NotAfter) {
		t.Fatalf("Current = %v, %v; want the identity with Expire = the leaf's NotAfter", cur.Expire, ok)
	}
	if err := st.Send(ack(resp, WorkloadCert, RootCA)); err != nil {
		t.Fatal(err)
	}

	// A rotation with the same root pushes default only, with the new serial.
	id2, serial2 := ca.identity(t)
	if err := h.s.Update(id2); err != nil {
		t.Fatal(err)
	}
	resp, err = st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	got = secrets(t, resp.GetResources())
	if resp.GetVersionInfo() != "2" || !slices.Equal(names(got), []string{WorkloadCert}) {
		t.Fatalf("rotation pushed %v at version %q, want [default] at 2", names(got), resp.GetVersionInfo())
	}
	checkDefault(t, got[WorkloadCert], ca, serial2)
	if err := st.Send(ack(resp, WorkloadCert, RootCA)); err != nil {
		t.Fatal(err)
	}
	xdstest.Eventually(t, 10*time.Second, "the ACK logged", func() bool {
		return strings.Contains(h.log.String(), `"nonce":"`+resp.GetNonce()+`","version":"2","message":"SDS ACK"`)
	})

	// A new root pushes ROOTCA too.
	ca2 := newCA(t, "root-b")
	id3, serial3 := ca2.identity(t)
	if err := h.s.Update(id3); err != nil {
		t.Fatal(err)
	}
	resp, err = st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	got = secrets(t, resp.GetResources())
	if resp.GetVersionInfo() != "3" || !slices.Equal(names(got), []string{RootCA, WorkloadCert}) {
		t.Fatalf("root change pushed %v at version %q, want [ROOTCA default] at 3", names(got), resp.GetVersionInfo())
	}
	checkDefault(t, got[WorkloadCert], ca2, serial3)
	checkRoot(t, got[RootCA], ca2)
}

// Envoy's own request: one SdsApi per secret config, so one stream per
// name, node set, the Secret type_url; the secret exists already.
func TestSotWEnvoyRequestShape(t *testing.T) {
	h := start(t)
	ca := newCA(t, "root")
	id, serial := ca.identity(t)
	if err := h.s.Update(id); err != nil {
		t.Fatal(err)
	}
	st, err := h.client.StreamSecrets(streamCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&discoveryv3.DiscoveryRequest{
		Node:          envoyNode,
		ResourceNames: []string{"default"},
		TypeUrl:       "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
	}); err != nil {
		t.Fatal(err)
	}
	resp, err := st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	got := secrets(t, resp.GetResources())
	if !slices.Equal(names(got), []string{WorkloadCert}) {
		t.Fatalf("response has %v, want only the requested [default]", names(got))
	}
	checkDefault(t, got[WorkloadCert], ca, serial)

	// Another type on the SDS service is refused with a reason.
	bad, err := h.client.StreamSecrets(streamCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := bad.Send(&discoveryv3.DiscoveryRequest{Node: envoyNode, ResourceNames: []string{"x"}, TypeUrl: "type.googleapis.com/envoy.config.cluster.v3.Cluster"}); err != nil {
		t.Fatal(err)
	}
	if _, err := bad.Recv(); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "envoy.config.cluster.v3.Cluster") {
		t.Fatalf("wrong type_url: err = %v, want InvalidArgument naming the type", err)
	}
}

func TestSotWNackIsLoggedAndNotResent(t *testing.T) {
	h := start(t)
	ca := newCA(t, "root")
	id, _ := ca.identity(t)
	if err := h.s.Update(id); err != nil {
		t.Fatal(err)
	}
	st, err := h.client.StreamSecrets(streamCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(sotwReq(WorkloadCert)); err != nil {
		t.Fatal(err)
	}
	resp, err := st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	nack := ack(resp, WorkloadCert)
	nack.VersionInfo = ""
	nack.ErrorDetail = &rpcstatus.Status{Code: int32(codes.InvalidArgument), Message: "Failed to load private key from <inline>"}
	if err := st.Send(nack); err != nil {
		t.Fatal(err)
	}
	xdstest.Eventually(t, 10*time.Second, "the NACK logged with its error_detail", func() bool {
		return strings.Contains(h.log.String(), "Failed to load private key from <inline>")
	})
	// Nothing was resent for the NACK: the next response is the next Update's.
	id2, serial2 := ca.identity(t)
	if err := h.s.Update(id2); err != nil {
		t.Fatal(err)
	}
	resp, err = st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetVersionInfo() != "2" {
		t.Fatalf("response after the NACK has version %q, want 2 (the rejected version must not be resent)", resp.GetVersionInfo())
	}
	checkDefault(t, secrets(t, resp.GetResources())[WorkloadCert], ca, serial2)
	if n := strings.Count(h.log.String(), "SDS NACK"); n != 1 {
		t.Fatalf("NACK logged %d times, want once", n)
	}
}

func TestDeltaWaitsThenSendsOnlyChangedAndHonoursUnsubscribe(t *testing.T) {
	h := start(t)
	st, err := h.client.DeltaSecrets(streamCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&discoveryv3.DeltaDiscoveryRequest{Node: envoyNode, TypeUrl: SecretTypeURL, ResourceNamesSubscribe: []string{WorkloadCert, RootCA}}); err != nil {
		t.Fatal(err)
	}
	xdstest.Eventually(t, 10*time.Second, "both names pending", func() bool {
		return slices.Equal(h.s.Pending(), []string{RootCA, WorkloadCert})
	})
	ca := newCA(t, "root-a")
	id1, serial1 := ca.identity(t)
	if err := h.s.Update(id1); err != nil {
		t.Fatal(err)
	}
	resp, err := st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	got, versions := deltaSecrets(t, resp)
	if resp.GetSystemVersionInfo() != "1" || !slices.Equal(names(got), []string{RootCA, WorkloadCert}) || len(resp.GetRemovedResources()) != 0 {
		t.Fatalf("first delta response %v at %q (removed %v), want [ROOTCA default] at 1", names(got), resp.GetSystemVersionInfo(), resp.GetRemovedResources())
	}
	if versions[WorkloadCert] != "1" || versions[RootCA] != "1" {
		t.Fatalf("resource versions %v, want 1 for both", versions)
	}
	checkDefault(t, got[WorkloadCert], ca, serial1)
	checkRoot(t, got[RootCA], ca)
	if err := st.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: SecretTypeURL, ResponseNonce: resp.GetNonce()}); err != nil {
		t.Fatal(err)
	}

	// Rotation, same root: only default, at its new version.
	id2, serial2 := ca.identity(t)
	if err := h.s.Update(id2); err != nil {
		t.Fatal(err)
	}
	resp, err = st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	got, versions = deltaSecrets(t, resp)
	if !slices.Equal(names(got), []string{WorkloadCert}) || versions[WorkloadCert] != "2" {
		t.Fatalf("rotation sent %v %v, want default at version 2 only", names(got), versions)
	}
	checkDefault(t, got[WorkloadCert], ca, serial2)
	// NACK it, and unsubscribe ROOTCA in the same request.
	if err := st.Send(&discoveryv3.DeltaDiscoveryRequest{
		TypeUrl: SecretTypeURL, ResponseNonce: resp.GetNonce(), ResourceNamesUnsubscribe: []string{RootCA},
		ErrorDetail: &rpcstatus.Status{Code: int32(codes.InvalidArgument), Message: "delta says no"},
	}); err != nil {
		t.Fatal(err)
	}
	xdstest.Eventually(t, 10*time.Second, "ROOTCA unsubscribed", func() bool { return h.subscribers(RootCA) == 0 })
	if !strings.Contains(h.log.String(), "delta says no") {
		t.Fatal("the delta NACK's error_detail is not in the log")
	}

	// A new root now: the stream no longer wants ROOTCA, so only default.
	ca2 := newCA(t, "root-b")
	id3, serial3 := ca2.identity(t)
	if err := h.s.Update(id3); err != nil {
		t.Fatal(err)
	}
	resp, err = st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	got, versions = deltaSecrets(t, resp)
	if !slices.Equal(names(got), []string{WorkloadCert}) || versions[WorkloadCert] != "3" {
		t.Fatalf("after unsubscribing ROOTCA the push has %v %v, want default at 3 only", names(got), versions)
	}
	checkDefault(t, got[WorkloadCert], ca2, serial3)
}

// A reconnecting delta client that has default's current version gets only
// what it lacks.
func TestDeltaReconnectSendsOnlyNewerThanInitialVersions(t *testing.T) {
	h := start(t)
	ca := newCA(t, "root")
	id, _ := ca.identity(t)
	if err := h.s.Update(id); err != nil {
		t.Fatal(err)
	}
	st, err := h.client.DeltaSecrets(streamCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&discoveryv3.DeltaDiscoveryRequest{
		Node: envoyNode, TypeUrl: SecretTypeURL, ResourceNamesSubscribe: []string{WorkloadCert, RootCA},
		InitialResourceVersions: map[string]string{WorkloadCert: "1", RootCA: "0"},
	}); err != nil {
		t.Fatal(err)
	}
	resp, err := st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	got, _ := deltaSecrets(t, resp)
	if !slices.Equal(names(got), []string{RootCA}) {
		t.Fatalf("reconnect got %v, want only [ROOTCA] (default at version 1 is current)", names(got))
	}
	checkRoot(t, got[RootCA], ca)
}

func deltaSecrets(t *testing.T, resp *discoveryv3.DeltaDiscoveryResponse) (map[string]*tlsv3.Secret, map[string]string) {
	t.Helper()
	if resp.GetTypeUrl() != SecretTypeURL || resp.GetNonce() == "" {
		t.Fatalf("delta response type %q nonce %q", resp.GetTypeUrl(), resp.GetNonce())
	}
	var res []*anypb.Any
	versions := map[string]string{}
	for _, r := range resp.GetResources() {
		res = append(res, r.GetResource())
		versions[r.GetName()] = r.GetVersion()
	}
	got := secrets(t, res)
	for n := range versions {
		if got[n] == nil {
			t.Fatalf("delta resource %q carries a secret named otherwise", n)
		}
	}
	return got, versions
}

func TestTwoStreamsBothReceiveEveryUpdate(t *testing.T) {
	h := start(t)
	sotw, err := h.client.StreamSecrets(streamCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	delta, err := dial(t, h.path).DeltaSecrets(streamCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := sotw.Send(sotwReq(WorkloadCert)); err != nil {
		t.Fatal(err)
	}
	if err := delta.Send(&discoveryv3.DeltaDiscoveryRequest{Node: envoyNode, TypeUrl: SecretTypeURL, ResourceNamesSubscribe: []string{WorkloadCert}}); err != nil {
		t.Fatal(err)
	}
	xdstest.Eventually(t, 10*time.Second, "two streams on default", func() bool { return h.subscribers(WorkloadCert) == 2 })
	ca := newCA(t, "root")
	for round := 1; round <= 2; round++ {
		id, serial := ca.identity(t)
		if err := h.s.Update(id); err != nil {
			t.Fatal(err)
		}
		r1, err := sotw.Recv()
		if err != nil {
			t.Fatal(err)
		}
		checkDefault(t, secrets(t, r1.GetResources())[WorkloadCert], ca, serial)
		if err := sotw.Send(ack(r1, WorkloadCert)); err != nil {
			t.Fatal(err)
		}
		r2, err := delta.Recv()
		if err != nil {
			t.Fatal(err)
		}
		got, _ := deltaSecrets(t, r2)
		checkDefault(t, got[WorkloadCert], ca, serial)
		if err := delta.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: SecretTypeURL, ResponseNonce: r2.GetNonce()}); err != nil {
			t.Fatal(err)
		}
		// A delta ACK lists no names and must not change the subscription
		// (an empty list is a wildcard only in a stream's first request).
		xdstest.Eventually(t, 10*time.Second, "the delta ACK logged", func() bool {
			return strings.Contains(h.log.String(), `"mode":"delta","node":"`+envoyNode.Id+`","nonce":"`+r2.GetNonce()+`","version":"","message":"SDS ACK"`)
		})
		if n := h.subscribers(RootCA); n != 0 {
			t.Fatalf("a delta ACK subscribed %d stream(s) to ROOTCA", n)
		}
	}
}

// A name the agent does not serve (Istio's file-cert:/file-root: names) gets
// no answer, is logged once however many streams ask, and does not hold up
// the names that exist.
func TestUnknownNameLoggedOnceAndNotAnswered(t *testing.T) {
	h := start(t)
	const fileCert = "file-cert:/etc/certs/cert-chain.pem~/etc/certs/key.pem"
	var streams []secretv3.SecretDiscoveryService_StreamSecretsClient
	for range 2 {
		st, err := h.client.StreamSecrets(streamCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		if err := st.Send(sotwReq(fileCert, WorkloadCert)); err != nil {
			t.Fatal(err)
		}
		streams = append(streams, st)
	}
	xdstest.Eventually(t, 10*time.Second, "two streams on the unknown name", func() bool { return h.subscribers(fileCert) == 2 })
	if n := strings.Count(h.log.String(), fileCert); n != 1 {
		t.Fatalf("unknown name logged %d times, want once:\n%s", n, h.log.String())
	}
	if !slices.Equal(h.s.Pending(), []string{WorkloadCert, fileCert}) {
		t.Fatalf("Pending = %v, want [default %s]", h.s.Pending(), fileCert)
	}
	ca := newCA(t, "root")
	id, serial := ca.identity(t)
	if err := h.s.Update(id); err != nil {
		t.Fatal(err)
	}
	for _, st := range streams {
		resp, err := st.Recv()
		if err != nil {
			t.Fatal(err)
		}
		got := secrets(t, resp.GetResources())
		if !slices.Equal(names(got), []string{WorkloadCert}) {
			t.Fatalf("got %v, want [default] only", names(got))
		}
		checkDefault(t, got[WorkloadCert], ca, serial)
	}
}

func TestFetchSecrets(t *testing.T) {
	h := start(t)
	ctx := streamCtx(t)
	if _, err := h.client.FetchSecrets(ctx, sotwReq(WorkloadCert)); status.Code(err) != codes.Unavailable {
		t.Fatalf("fetch before the identity: err = %v, want Unavailable", err)
	}
	ca := newCA(t, "root")
	id, serial := ca.identity(t)
	if err := h.s.Update(id); err != nil {
		t.Fatal(err)
	}
	resp, err := h.client.FetchSecrets(ctx, sotwReq(WorkloadCert, RootCA))
	if err != nil {
		t.Fatal(err)
	}
	got := secrets(t, resp.GetResources())
	checkDefault(t, got[WorkloadCert], ca, serial)
	checkRoot(t, got[RootCA], ca)
}

func TestUpdateRejectsBadIdentityAndKeepsServingThePrevious(t *testing.T) {
	h := start(t)
	ca := newCA(t, "root")
	good, _ := ca.identity(t)
	if err := h.s.Update(good); err != nil {
		t.Fatal(err)
	}
	_, otherKey, _ := ca.issue(t)
	with := func(f func(*Identity)) Identity { id := good; f(&id); return id }
	for _, tc := range []struct {
		name string
		id   Identity
		want string
	}{
		{"no chain", with(func(id *Identity) { id.ChainPEM = nil }), "ChainPEM is empty"},
		{"no key", with(func(id *Identity) { id.KeyPEM = nil }), "KeyPEM is empty"},
		{"garbage chain", with(func(id *Identity) { id.ChainPEM = []byte("not a pem") }), "ChainPEM"},
		{"key of another leaf", with(func(id *Identity) { id.KeyPEM = otherKey }), "KeyPEM does not go with the leaf"},
		{"no roots", with(func(id *Identity) { id.RootsPEM = nil }), "RootsPEM is empty"},
		{"key as roots", with(func(id *Identity) { id.RootsPEM = good.KeyPEM }), "RootsPEM"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := h.s.Update(tc.id)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want one containing %q", err, tc.want)
			}
			if cur, _ := h.s.Current(); !bytes.Equal(cur.ChainPEM, good.ChainPEM) || h.s.snap.Load().gen != 1 {
				t.Fatal("a rejected identity replaced the served one")
			}
		})
	}
}

func TestSocketModeDirectoryAndStaleSocket(t *testing.T) {
	dir := filepath.Join(shortDir(t), "a", "b")
	path := filepath.Join(dir, "socket")

	// A crashed run's socket: bound, never unlinked, nobody listening.
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close()

	s, err := New(Options{SocketPath: path, Log: zerolog.Nop()})
	if err != nil {
		t.Fatalf("New over a stale socket: %v", err)
	}
	defer s.Close()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, want a socket with 0600", fi.Mode())
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Fatalf("socket directory holds %d entries, want the socket only (no temporary left)", len(entries))
	}
	// The new server answers on the replaced path.
	ca := newCA(t, "root")
	id, serial := ca.identity(t)
	if err := s.Update(id); err != nil {
		t.Fatal(err)
	}
	resp, err := dial(t, path).FetchSecrets(streamCtx(t), sotwReq(WorkloadCert))
	if err != nil {
		t.Fatal(err)
	}
	checkDefault(t, secrets(t, resp.GetResources())[WorkloadCert], ca, serial)

	// A live server's socket is not taken over, nor is a regular file.
	if _, err := New(Options{SocketPath: path, Log: zerolog.Nop()}); err == nil || !strings.Contains(err.Error(), "another server") {
		t.Fatalf("New over a live socket: err = %v, want 'another server is listening'", err)
	}
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := New(Options{SocketPath: file, Log: zerolog.Nop()}); err == nil || !strings.Contains(err.Error(), "not a socket") || !strings.Contains(err.Error(), file) {
		t.Fatalf("New over a regular file: err = %v, want one naming the path and 'not a socket'", err)
	}

	// The group mode when asked for.
	gpath := filepath.Join(dir, "group-socket")
	g, err := New(Options{SocketPath: gpath, SocketMode: 0o660, Log: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if fi, err := os.Lstat(gpath); err != nil || fi.Mode().Perm() != 0o660 {
		t.Fatalf("SocketMode 0660: mode %v, err %v", fi.Mode(), err)
	}
}

func TestCloseStopsStreamsAndRemovesSocket(t *testing.T) {
	h := start(t)
	sotw, err := h.client.StreamSecrets(streamCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	delta, err := h.client.DeltaSecrets(streamCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := sotw.Send(sotwReq(WorkloadCert)); err != nil {
		t.Fatal(err)
	}
	if err := delta.Send(&discoveryv3.DeltaDiscoveryRequest{Node: envoyNode, TypeUrl: SecretTypeURL, ResourceNamesSubscribe: []string{WorkloadCert}}); err != nil {
		t.Fatal(err)
	}
	xdstest.Eventually(t, 10*time.Second, "two streams open", func() bool { return h.subscribers(WorkloadCert) == 2 })
	if err := h.s.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := sotw.Recv(); err == nil {
		t.Fatal("SotW stream still open after Close")
	}
	if _, err := delta.Recv(); err == nil {
		t.Fatal("delta stream still open after Close")
	}
	if _, err := os.Lstat(h.path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket after Close: %v, want it removed", err)
	}
	if h.subscribers(WorkloadCert) != 0 {
		t.Fatalf("%d subscriptions left after Close", h.subscribers(WorkloadCert))
	}
	if err := h.s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

// A SotW request carrying an older nonce answers a response the client has
// since been sent a newer one of: it is ignored, names and all.
func TestSotWStaleNonceIgnored(t *testing.T) {
	h := start(t)
	ca := newCA(t, "root")
	id, _ := ca.identity(t)
	if err := h.s.Update(id); err != nil {
		t.Fatal(err)
	}
	st, err := h.client.StreamSecrets(streamCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(sotwReq(WorkloadCert)); err != nil {
		t.Fatal(err)
	}
	r1, err := st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	id2, _ := ca.identity(t)
	if err := h.s.Update(id2); err != nil {
		t.Fatal(err)
	}
	r2, err := st.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(ack(r1, WorkloadCert, RootCA)); err != nil { // stale
		t.Fatal(err)
	}
	if err := st.Send(ack(r2, WorkloadCert)); err != nil {
		t.Fatal(err)
	}
	xdstest.Eventually(t, 10*time.Second, "the current ACK logged", func() bool {
		return strings.Contains(h.log.String(), `"nonce":"`+r2.GetNonce()+`","version":"2","message":"SDS ACK"`)
	})
	if n := h.subscribers(RootCA); n != 0 {
		t.Fatalf("a stale request subscribed %d stream(s) to ROOTCA", n)
	}
	if strings.Contains(h.log.String(), `"nonce":"`+r1.GetNonce()+`","version":"1","message":"SDS ACK"`) {
		t.Fatal("the stale request was taken as an ACK")
	}
}

// A first request naming nothing (or "*") asks for every secret, in both
// protocols; a client closing its side ends the stream cleanly and drops
// its subscriptions.
func TestWildcardAndClientClose(t *testing.T) {
	h := start(t)
	ca := newCA(t, "root")
	id, serial := ca.identity(t)
	if err := h.s.Update(id); err != nil {
		t.Fatal(err)
	}
	for _, req := range [][]string{nil, {"*"}} {
		sotw, err := h.client.StreamSecrets(streamCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		if err := sotw.Send(sotwReq(req...)); err != nil {
			t.Fatal(err)
		}
		resp, err := sotw.Recv()
		if err != nil {
			t.Fatal(err)
		}
		got := secrets(t, resp.GetResources())
		if !slices.Equal(names(got), []string{RootCA, WorkloadCert}) {
			t.Fatalf("SotW wildcard %q got %v", req, names(got))
		}
		checkDefault(t, got[WorkloadCert], ca, serial)

		delta, err := h.client.DeltaSecrets(streamCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		if err := delta.Send(&discoveryv3.DeltaDiscoveryRequest{Node: envoyNode, TypeUrl: SecretTypeURL, ResourceNamesSubscribe: req}); err != nil {
			t.Fatal(err)
		}
		dresp, err := delta.Recv()
		if err != nil {
			t.Fatal(err)
		}
		dgot, _ := deltaSecrets(t, dresp)
		if !slices.Equal(names(dgot), []string{RootCA, WorkloadCert}) {
			t.Fatalf("delta wildcard %q got %v", req, names(dgot))
		}

		for _, cs := range []grpc.ClientStream{sotw, delta} {
			if err := cs.CloseSend(); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := sotw.Recv(); !errors.Is(err, io.EOF) {
			t.Fatalf("SotW Recv after CloseSend: %v, want EOF (the server returned OK)", err)
		}
		if _, err := delta.Recv(); !errors.Is(err, io.EOF) {
			t.Fatalf("delta Recv after CloseSend: %v, want EOF (the server returned OK)", err)
		}
		xdstest.Eventually(t, 10*time.Second, "subscriptions dropped", func() bool {
			return h.subscribers(WorkloadCert) == 0 && h.subscribers(RootCA) == 0
		})
	}
}
