package xdsclient

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/meshtun/meshtun/internal/xdstest"
)

const istiodName = "istiod.istio-system.svc"

// tlsADS is go-control-plane's ADS server behind TLS with one certificate,
// as istiod serves :15012, counting the streams opened.
type tlsADS struct {
	addr    string
	gs      *grpc.Server
	streams atomic.Int64
}

func startTLSADS(t *testing.T, addr string, certPEM, keyPEM []byte) *tlsADS {
	t.Helper()
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	var lis net.Listener
	for deadline := time.Now().Add(5 * time.Second); ; { // the previous server's port may still be closing
		if lis, err = net.Listen("tcp", addr); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	s := &tlsADS{addr: lis.Addr().String()}
	s.gs = grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}})))
	cb := serverv3.CallbackFuncs{
		StreamOpenFunc:      func(context.Context, int64, string) error { s.streams.Add(1); return nil },
		DeltaStreamOpenFunc: func(context.Context, int64, string) error { s.streams.Add(1); return nil },
	}
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(s.gs, serverv3.NewServer(context.Background(), cachev3.NewSnapshotCache(false, cachev3.IDHash{}, nil), cb))
	go func() { _ = s.gs.Serve(lis) }()
	t.Cleanup(s.gs.Stop)
	return s
}

// replaceFile swaps path's content whole (rename), as a Kubernetes volume
// does.
func replaceFile(t *testing.T, path string, b []byte) {
	t.Helper()
	tmp := path + ".new"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// TestRotatedRootReachesXDS: istiod's root is rotated under a running
// client. A control plane serving a certificate of the new root is refused
// while the root file still holds the old one (the error names the file);
// once the file is replaced, the next connection verifies against the new
// root and the stream is established, with no restart or reconfiguration.
func TestRotatedRootReachesXDS(t *testing.T) {
	old, oldKey := xdstest.SelfSigned(t, "spiffe://cluster.local/ns/istio-system/sa/istiod", istiodName)
	rotated, rotatedKey := xdstest.SelfSigned(t, "spiffe://cluster.local/ns/istio-system/sa/istiod", istiodName)
	rootFile := filepath.Join(t.TempDir(), "root-cert.pem")
	replaceFile(t, rootFile, old)
	srv := startTLSADS(t, "127.0.0.1:0", old, oldKey)

	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(old)
	c := New(Config{Server: srv.addr, Node: &corev3.Node{Id: testNodeID},
		TLS: &tls.Config{ServerName: istiodName, RootCAs: pool, MinVersion: tls.VersionTLS12}, RootFile: rootFile,
		BackoffBase: 20 * time.Millisecond, BackoffMax: 100 * time.Millisecond,
		Log: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel)}, ApplierFunc(func(context.Context, *Resources) error { return nil }))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	defer func() { cancel(); <-done }()
	xdstest.Eventually(t, wait, "a stream over TLS with the first root", func() bool { return srv.streams.Load() > 0 })

	// istiod restarts with a certificate of the new root; the file still
	// holds the old root.
	srv.gs.Stop()
	srv2 := startTLSADS(t, srv.addr, rotated, rotatedKey)
	xdstest.Eventually(t, wait, "the new certificate refused, naming the root file", func() bool {
		err := c.LastError()
		return err != nil && strings.Contains(err.Error(), "verified against the root file "+rootFile)
	})
	if n := srv2.streams.Load(); n != 0 {
		t.Fatalf("%d streams verified against the old root", n)
	}

	replaceFile(t, rootFile, rotated)
	xdstest.Eventually(t, wait, "a stream verified against the rotated root", func() bool { return srv2.streams.Load() > 0 })
}

// TestRootFileReadOnChange: the pool is read once per version of the file,
// and a file that holds no certificate fails the handshake naming it.
func TestRootFileReadOnChange(t *testing.T) {
	a, _ := xdstest.SelfSigned(t, "spiffe://cluster.local/ns/istio-system/sa/istiod", istiodName)
	b, _ := xdstest.SelfSigned(t, "spiffe://cluster.local/ns/istio-system/sa/istiod", istiodName)
	file := filepath.Join(t.TempDir(), "root-cert.pem")
	replaceFile(t, file, a)
	r := newRootCreds(&tls.Config{ServerName: istiodName}, file)
	p1, err := r.roots()
	if err != nil {
		t.Fatal(err)
	}
	if p2, _ := r.roots(); p2 != p1 {
		t.Error("an unchanged root file was read again")
	}
	replaceFile(t, file, b)
	p3, err := r.roots()
	if err != nil || p3 == p1 {
		t.Fatalf("replaced root file not re-read: %v", err)
	}
	replaceFile(t, file, []byte("garbage"))
	if _, err := r.roots(); err == nil || err.Error() != "xDS root file "+file+": no PEM certificate" {
		t.Errorf("garbage root: %v", err)
	}
	if err := os.Remove(file); err != nil {
		t.Fatal(err)
	}
	if _, err := r.roots(); !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), file) {
		t.Errorf("missing root: %v", err)
	}
}
