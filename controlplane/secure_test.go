package controlplane

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/meshtun/meshtun/agent/caclient"
	"github.com/meshtun/meshtun/controlplane/ca"
)

// TestSecurePort: Run serves, on one TLS port, the CA (a token minted with
// MintToken gets a certificate for its identity, verified against the root
// file Run names) and ADS, which wants the token and a node of the token's
// namespace and service account; the root is kept across restarts.
func TestSecurePort(t *testing.T) {
	state := t.TempDir()
	type ready struct {
		addr net.Addr
		root string
	}
	start := func() (ready, func()) {
		rc := make(chan ready, 1)
		ctx, cancel := context.WithCancel(context.Background())
		errc := make(chan error, 1)
		go func() {
			errc <- Run(ctx, Options{XDSAddress: "127.0.0.1:0", APIAddress: "127.0.0.1:0", SecureAddress: "127.0.0.1:0",
				ServingNames: []string{"cp.example"}, StateDir: state, Log: zerolog.Nop(),
				SecureReady: func(a net.Addr, root string) { rc <- ready{a, root} }})
		}()
		select {
		case r := <-rc:
			return r, func() {
				cancel()
				if err := <-errc; err != nil {
					t.Error(err)
				}
			}
		case err := <-errc:
			t.Fatal(err)
		case <-time.After(10 * time.Second):
			t.Fatal("not ready")
		}
		panic("unreachable")
	}
	r, stop := start()
	defer func() { stop() }()
	if r.root != filepath.Join(state, CADirName, ca.RootCertFile) {
		t.Errorf("root file %s", r.root)
	}
	rootPEM, err := os.ReadFile(r.root)
	if err != nil {
		t.Fatal(err)
	}

	tok, err := MintToken(state, "shop", "cart", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	tokFile := filepath.Join(t.TempDir(), "istio-token")
	os.WriteFile(tokFile, []byte(tok), 0o600)
	cl, err := caclient.New(caclient.Options{Addr: r.addr.String(), RootFile: r.root, TokenFile: tokFile,
		Namespace: "shop", ServiceAccount: "other", KeyType: caclient.ECDSA, Log: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	id, err := cl.Fetch(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if id.SPIFFEID != "spiffe://cluster.local/ns/shop/sa/cart" {
		t.Errorf("issued %s, want the token's identity", id.SPIFFEID)
	}
	// The serving certificate carries the extra name too.
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(rootPEM)
	dial := func(serverName string) *grpc.ClientConn {
		conn, err := grpc.NewClient(r.addr.String(), grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: serverName})))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return conn
	}
	conn := dial("cp.example")

	ads := func(token, nodeID string, md map[string]string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if token != "" {
			ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
		}
		st, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
		if err != nil {
			return err
		}
		fields := map[string]*structpb.Value{}
		for k, v := range md {
			fields[k] = structpb.NewStringValue(v)
		}
		if err := st.Send(&discoveryv3.DiscoveryRequest{TypeUrl: resource.ClusterType,
			Node: &corev3.Node{Id: nodeID, Metadata: &structpb.Struct{Fields: fields}}}); err != nil {
			if errors.Is(err, io.EOF) {
				// The server ended the stream first (a stream refused at
				// once): its status comes with Recv, as gRPC documents.
				_, err = st.Recv()
			}
			return err
		}
		resp, err := st.Recv()
		if err != nil {
			return err
		}
		if len(resp.GetResources()) == 0 {
			t.Errorf("ADS over TLS: no clusters")
		}
		return nil
	}
	const node = "sidecar~10.1.0.5~cart-1.shop~shop.svc.cluster.local"
	if err := ads(tok, node, map[string]string{"NAMESPACE": "shop", "SERVICE_ACCOUNT": "cart"}); err != nil {
		t.Fatalf("ADS with a good token: %v", err)
	}
	// Delta ADS, the meshtun agent's default, goes through the same check.
	dctx, dcancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+tok), 10*time.Second)
	defer dcancel()
	dst, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(dctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := dst.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: resource.ClusterType, Node: &corev3.Node{Id: node}}); err != nil {
		t.Fatal(err)
	}
	if resp, err := dst.Recv(); err != nil || len(resp.GetResources()) == 0 {
		t.Fatalf("delta ADS over TLS: %v, %d resources", err, len(resp.GetResources()))
	}
	dcancel()
	if err := ads("", node, nil); status.Code(err) != codes.Unauthenticated {
		t.Errorf("ADS without a token: %v", err)
	}
	for name, c := range map[string]struct {
		node string
		md   map[string]string
		want string
	}{
		"other namespace in the id": {"sidecar~10.1.0.5~x.default~default.svc.cluster.local", nil, `namespace "default"`},
		"metadata NAMESPACE":        {node, map[string]string{"NAMESPACE": "default"}, "NAMESPACE"},
		"metadata SERVICE_ACCOUNT":  {node, map[string]string{"SERVICE_ACCOUNT": "admin"}, `SERVICE_ACCOUNT "admin"`},
	} {
		err := ads(tok, c.node, c.md)
		if st, _ := status.FromError(err); st.Code() != codes.PermissionDenied || !strings.Contains(st.Message(), c.want) {
			t.Errorf("%s: %v", name, err)
		}
	}

	// A restart keeps the root (and the token key: the token still works).
	stop()
	r, stop = start()
	if again, _ := os.ReadFile(r.root); string(again) != string(rootPEM) {
		t.Error("a restart made a new root")
	}
	cl, _ = caclient.New(caclient.Options{Addr: r.addr.String(), RootFile: r.root, TokenFile: tokFile,
		Namespace: "shop", ServiceAccount: "cart", KeyType: caclient.ECDSA, Log: zerolog.Nop()})
	if _, err := cl.Fetch(context.Background()); err != nil {
		t.Errorf("after a restart: %v", err)
	}
}
