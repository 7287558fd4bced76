package agent

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/meshtun/meshtun/agent/sds"
	"github.com/meshtun/meshtun/controlplane/ca"
	"github.com/meshtun/meshtun/internal/xdstest"
)

// TestIdentityMode: the identity is decided as Istio's sidecar would have
// it (a CA on 15012 or CA_ADDR, mounted files with FILE_MOUNTED_CERTS) and
// none for a plaintext 15010 control plane; bad settings stop Load with
// the variable named.
func TestIdentityMode(t *testing.T) {
	base := []string{"POD_NAME=app", "POD_NAMESPACE=ns1", "INSTANCE_IP=10.0.0.2", "SERVICE_ACCOUNT=sa1"}
	root := writeRoot(t)
	for _, tc := range []struct {
		name, addr, mode string
		env              []string
		want, wantErr    string
	}{
		{name: "plaintext 15010", addr: "istiod.istio-system.svc:15010", want: IdentityNone},
		{name: "TLS 15012", addr: "istiod.istio-system.svc:15012", want: IdentityCA},
		{name: "CA_ADDR", addr: "10.0.0.9:15010", env: []string{"CA_ADDR=10.0.0.9:15012"}, want: IdentityCA},
		{name: "FILE_MOUNTED_CERTS", addr: "istiod.istio-system.svc:15012", env: []string{"FILE_MOUNTED_CERTS=true"}, want: IdentityFiles},
		{name: "flag none", addr: "istiod.istio-system.svc:15012", mode: "none", want: IdentityNone},
		{name: "flag ca", addr: "10.0.0.9:15010", mode: "ca", want: IdentityCA},
		{name: "flag bad", addr: "10.0.0.9:15010", mode: "spire", wantErr: `identity mode "spire": want ca, files or none`},
		{name: "bad SECRET_TTL", addr: "istiod.istio-system.svc:15012", env: []string{"SECRET_TTL=1day"}, wantErr: `SECRET_TTL "1day"`},
		{name: "bad ECC", addr: "istiod.istio-system.svc:15012", env: []string{"ECC_SIGNATURE_ALGORITHM=RSA"}, wantErr: "ECC_SIGNATURE_ALGORITHM"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := append(append([]string(nil), base...), tc.env...)
			in, err := Load(Sources{Environ: env, DiscoveryAddress: tc.addr, RootCertFile: root, Identity: IdentityOptions{Mode: tc.mode}})
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Load: %v, want an error with %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if in.IdentityMode != tc.want {
				t.Errorf("identity %q, want %q", in.IdentityMode, tc.want)
			}
		})
	}
	t.Run("no service account", func(t *testing.T) {
		_, err := Load(Sources{Environ: base[:3], DiscoveryAddress: "istiod.istio-system.svc:15012", RootCertFile: root})
		if err == nil || !strings.Contains(err.Error(), "SERVICE_ACCOUNT") {
			t.Errorf("Load without SERVICE_ACCOUNT on 15012: %v, want it named", err)
		}
	})
}

// testCA is the control plane's CA on a loopback TLS gRPC server.
type testCA struct {
	addr, rootFile string
	tokens         *ca.Tokens
	root           []byte
}

func startTestCA(t *testing.T) *testCA {
	t.Helper()
	dir := t.TempDir()
	auth, err := ca.LoadOrCreate(dir, "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	tokens, err := ca.LoadTokens(dir)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := auth.ServingCertificate(ca.DNSNames, []net.IP{net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(grpc.Creds(ca.ServerCredentials(cert, auth)))
	(&ca.Server{CA: auth, Tokens: tokens, TrustDomain: "cluster.local", Log: zerolog.Nop()}).Register(gs)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go gs.Serve(ln)
	t.Cleanup(gs.Stop)
	rootFile := filepath.Join(dir, ca.RootCertFile)
	return &testCA{addr: ln.Addr().String(), rootFile: rootFile, tokens: tokens, root: auth.RootPEM()}
}

// fetchSecret asks the SDS socket for one secret, as a proxy would.
func fetchSecret(t *testing.T, socket, name string) *tlsv3.Secret {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := secretv3.NewSecretDiscoveryServiceClient(conn).FetchSecrets(ctx,
		&discoveryv3.DiscoveryRequest{TypeUrl: sds.SecretTypeURL, ResourceNames: []string{name}})
	if err != nil {
		t.Fatalf("SDS %s: %v", name, err)
	}
	if len(resp.GetResources()) != 1 {
		t.Fatalf("SDS %s: %d resources", name, len(resp.GetResources()))
	}
	var s tlsv3.Secret
	if err := resp.GetResources()[0].UnmarshalTo(&s); err != nil {
		t.Fatal(err)
	}
	return &s
}

// TestIdentityFromCA: the agent's identity gets a certificate from the
// CA with the token's SPIFFE ID as its only SAN and serves it over SDS,
// ROOTCA being the CA's root plus ProxyConfig's caCertificatesPem;
// readiness holds until then. With a token the CA refuses, readiness
// says so and names the token file.
func TestIdentityFromCA(t *testing.T) {
	c := startTestCA(t)
	extraRoot, err := os.ReadFile(writeRoot(t))
	if err != nil {
		t.Fatal(err)
	}
	pcJSON := `PROXY_CONFIG={"caCertificatesPem":["` + strings.ReplaceAll(strings.ReplaceAll(string(extraRoot), "\n", `\n`), `"`, `\"`) + `"]}`
	env := []string{"POD_NAME=app", "POD_NAMESPACE=ns1", "INSTANCE_IP=10.0.0.2", "SERVICE_ACCOUNT=sa1",
		"CA_ADDR=" + c.addr, "ECC_SIGNATURE_ALGORITHM=ECDSA", pcJSON}
	start := func(t *testing.T, token string) (*identity, string, string) {
		dir := t.TempDir()
		tokenFile, socket := filepath.Join(dir, "istio-token"), filepath.Join(dir, "sds", "socket")
		if err := os.WriteFile(tokenFile, []byte(token), 0o600); err != nil {
			t.Fatal(err)
		}
		in, err := Load(Sources{Environ: env, DiscoveryAddress: "127.0.0.1:15010", RootCertFile: c.rootFile, TokenFile: tokenFile,
			Identity: IdentityOptions{SocketPath: socket}})
		if err != nil {
			t.Fatal(err)
		}
		if in.IdentityMode != IdentityCA {
			t.Fatalf("identity %q with CA_ADDR set", in.IdentityMode)
		}
		id, err := startIdentity(in.identity, nil, zerolog.Nop())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { id.stop() })
		return id, tokenFile, socket
	}

	t.Run("issued", func(t *testing.T) {
		tok, err := c.tokens.Mint(ca.Identity{Namespace: "ns1", ServiceAccount: "sa1"}, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		id, _, socket := start(t, tok)
		xdstest.Eventually(t, 10*time.Second, "the certificate served", func() bool { return id.notReady() == nil })
		if err := id.notReady(); err != nil {
			t.Fatal(err)
		}

		chain := fetchSecret(t, socket, sds.WorkloadCert).GetTlsCertificate().GetCertificateChain().GetInlineBytes()
		blk, _ := pem.Decode(chain)
		if blk == nil {
			t.Fatalf("default: no PEM chain: %q", chain)
		}
		leaf, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		if len(leaf.URIs) != 1 || leaf.URIs[0].String() != "spiffe://cluster.local/ns/ns1/sa/sa1" || len(leaf.DNSNames) != 0 || len(leaf.IPAddresses) != 0 {
			t.Errorf("leaf SANs: URIs %v DNS %v IPs %v; want only spiffe://cluster.local/ns/ns1/sa/sa1", leaf.URIs, leaf.DNSNames, leaf.IPAddresses)
		}
		roots := fetchSecret(t, socket, sds.RootCA).GetValidationContext().GetTrustedCa().GetInlineBytes()
		want, err := sds.TrustBundle(c.root, extraRoot)
		if err != nil {
			t.Fatal(err)
		}
		if string(roots) != string(want) || !strings.Contains(string(roots), string(extraRoot)) {
			t.Errorf("ROOTCA:\n%s\nwant the CA's root then caCertificatesPem:\n%s", roots, want)
		}
	})

	t.Run("token rejected", func(t *testing.T) {
		id, tokenFile, _ := start(t, "not-a-token")
		xdstest.Eventually(t, 10*time.Second, "the CA's refusal", func() bool { return id.src.Err() != nil })
		err := id.notReady()
		if err == nil || !strings.HasPrefix(err.Error(), "secret default not issued yet: CA rejected the token (file "+tokenFile) {
			t.Errorf("readiness: %v; want the missing secret, the CA's refusal and the token file", err)
		}
	})
}

// TestIdentityFromFiles: with FILE_MOUNTED_CERTS=true the mounted
// cert-chain.pem, key.pem and root-cert.pem are served over SDS (ROOTCA =
// root-cert.pem); missing files keep the pod not ready, naming the secret
// and the file.
func TestIdentityFromFiles(t *testing.T) {
	dir := t.TempDir()
	auth, err := ca.LoadOrCreate(dir, "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := auth.Sign(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csr}), "spiffe://cluster.local/ns/ns1/sa/sa1", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certs := filepath.Join(t.TempDir(), "certs")
	env := []string{"POD_NAME=app", "POD_NAMESPACE=ns1", "INSTANCE_IP=10.0.0.2", "SERVICE_ACCOUNT=sa1", "FILE_MOUNTED_CERTS=true"}
	start := func(t *testing.T) (*identity, string) {
		socket := filepath.Join(t.TempDir(), "socket")
		in, err := Load(Sources{Environ: env, DiscoveryAddress: "10.0.0.9:15010", Identity: IdentityOptions{CertDir: certs, SocketPath: socket}})
		if err != nil {
			t.Fatal(err)
		}
		if in.IdentityMode != IdentityFiles {
			t.Fatalf("identity %q with FILE_MOUNTED_CERTS=true", in.IdentityMode)
		}
		id, err := startIdentity(in.identity, nil, zerolog.Nop())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { id.stop() })
		return id, socket
	}

	t.Run("missing", func(t *testing.T) {
		id, _ := start(t)
		xdstest.Eventually(t, 10*time.Second, "the load error", func() bool { return id.src.Err() != nil })
		err := id.notReady()
		if err == nil || !strings.HasPrefix(err.Error(), "secret default not loaded yet:") || !strings.Contains(err.Error(), filepath.Join(certs, "cert-chain.pem")) {
			t.Errorf("readiness: %v; want the secret and the missing file named", err)
		}
	})

	t.Run("served", func(t *testing.T) {
		if err := os.MkdirAll(certs, 0o755); err != nil {
			t.Fatal(err)
		}
		for name, b := range map[string][]byte{
			"cert-chain.pem": []byte(strings.Join(chain, "")),
			"key.pem":        pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}),
			"root-cert.pem":  auth.RootPEM(),
		} {
			if err := os.WriteFile(filepath.Join(certs, name), b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		id, socket := start(t)
		xdstest.Eventually(t, 10*time.Second, "the certificate served", func() bool { return id.notReady() == nil })
		if got := fetchSecret(t, socket, sds.WorkloadCert).GetTlsCertificate().GetCertificateChain().GetInlineBytes(); string(got) != strings.Join(chain, "") {
			t.Errorf("default chain:\n%s\nwant cert-chain.pem", got)
		}
		want, err := sds.TrustBundle(auth.RootPEM())
		if err != nil {
			t.Fatal(err)
		}
		if got := fetchSecret(t, socket, sds.RootCA).GetValidationContext().GetTrustedCa().GetInlineBytes(); string(got) != string(want) {
			t.Errorf("ROOTCA:\n%s\nwant root-cert.pem:\n%s", got, want)
		}
	})
}
