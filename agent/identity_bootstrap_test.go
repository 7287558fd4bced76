package agent

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshtun/meshtun/mesh/bootstrap"
	"github.com/meshtun/meshtun/xdsclient"
)

// writeRoot writes a self-signed CA certificate to a temp file.
func writeRoot(t *testing.T) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "root"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "root-cert.pem")
	if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestSecureXDSBootstrap: a discovery address on istiod's TLS port gives
// an xds-grpc cluster the proxy's xDS client reads as TLS verified against
// the root file, SNI = the host (or ISTIOD_SAN), and the bearer token
// re-read from the token file; the node carries NAMESPACE and
// SERVICE_ACCOUNT, which istiod checks against the token. Port 15010
// stays plaintext with no token.
func TestSecureXDSBootstrap(t *testing.T) {
	root := writeRoot(t)
	token := filepath.Join(t.TempDir(), "istio-token")
	env := []string{"POD_NAME=app", "POD_NAMESPACE=ns1", "INSTANCE_IP=10.0.0.2", "SERVICE_ACCOUNT=sa1"}
	for _, tc := range []struct {
		name, addr, san, wantSNI string
	}{
		{"host", "istiod.istio-system.svc:15012", "", "istiod.istio-system.svc"},
		{"localhost", "localhost:15012", "", "istiod.istio-system.svc"},
		{"ISTIOD_SAN", "10.1.2.3:15012", "istiod-canary.istio-system.svc", "istiod-canary.istio-system.svc"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := env
			if tc.san != "" {
				e = append(append([]string(nil), env...), "ISTIOD_SAN="+tc.san)
			}
			in, err := Load(Sources{Environ: e, DiscoveryAddress: tc.addr, RootCertFile: root, TokenFile: token})
			if err != nil {
				t.Fatal(err)
			}
			js, _, err := in.render()
			if err != nil {
				t.Fatalf("render: %v", err)
			}
			// What the proxy does with the written file.
			b, err := bootstrap.Parse(js, "generated", false)
			if err != nil {
				t.Fatal(err)
			}
			cfg, err := xdsclient.FromBootstrap(b)
			if err != nil {
				t.Fatal(err)
			}
			if cfg.Server != tc.addr || cfg.TLS == nil || cfg.TLS.ServerName != tc.wantSNI || cfg.TLS.RootCAs == nil {
				t.Errorf("server %s, TLS %+v; want %s over TLS with SNI %s", cfg.Server, cfg.TLS, tc.addr, tc.wantSNI)
			}
			if want := (xdsclient.FileMetadata{File: token, Key: "authorization", Prefix: "Bearer "}); cfg.FileMetadata == nil || *cfg.FileMetadata != want {
				t.Errorf("token = %+v, want %+v", cfg.FileMetadata, want)
			}
			md := cfg.Node.GetMetadata().GetFields()
			if md["NAMESPACE"].GetStringValue() != "ns1" || md["SERVICE_ACCOUNT"].GetStringValue() != "sa1" {
				t.Errorf("node metadata NAMESPACE %v SERVICE_ACCOUNT %v, want ns1 and sa1", md["NAMESPACE"], md["SERVICE_ACCOUNT"])
			}
		})
	}

	t.Run("plaintext 15010", func(t *testing.T) {
		in, err := Load(Sources{Environ: env, DiscoveryAddress: "istiod.istio-system.svc:15010", RootCertFile: root, TokenFile: token})
		if err != nil {
			t.Fatal(err)
		}
		_, b, err := in.render()
		if err != nil {
			t.Fatal(err)
		}
		cfg, err := xdsclient.FromBootstrap(b)
		if err != nil || cfg.TLS != nil || cfg.FileMetadata != nil {
			t.Errorf("15010: TLS %v token %v (%v); want plaintext, no token", cfg.TLS, cfg.FileMetadata, err)
		}
	})

	t.Run("root file missing", func(t *testing.T) {
		in, err := Load(Sources{Environ: env, DiscoveryAddress: "istiod.istio-system.svc:15012", RootCertFile: root + ".missing", TokenFile: token})
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := in.render(); err == nil || !strings.Contains(err.Error(), root+".missing") {
			t.Errorf("render with no root file: %v, want an error naming it", err)
		}
	})
}

// TestSDSClusterInBootstrap: with a workload identity the bootstrap has
// Istio's sds-grpc cluster, HTTP/2 to the agent's SDS socket (a pipe the
// proxy dials), so TLS contexts that name it reach the agent; without
// one there is no such cluster; an extra bootstrap may not redefine it.
func TestSDSClusterInBootstrap(t *testing.T) {
	env := []string{"POD_NAME=app", "POD_NAMESPACE=ns1", "INSTANCE_IP=10.0.0.2", "SERVICE_ACCOUNT=sa1"}
	sdsOf := func(t *testing.T, src Sources) (pipe string, found bool) {
		t.Helper()
		in, err := Load(src)
		if err != nil {
			t.Fatal(err)
		}
		js, _, err := in.render() // render validates it as the proxy would
		if err != nil {
			t.Fatalf("render: %v", err)
		}
		b, err := bootstrap.Parse(js, "generated", false)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range b.GetStaticResources().GetClusters() {
			if c.GetName() == "sds-grpc" {
				eps := c.GetLoadAssignment().GetEndpoints()
				if len(eps) != 1 || len(eps[0].GetLbEndpoints()) != 1 {
					t.Fatalf("sds-grpc endpoints: %v", eps)
				}
				if c.GetTypedExtensionProtocolOptions()["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"] == nil {
					t.Error("sds-grpc: no HTTP/2 protocol options")
				}
				return eps[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetPipe().GetPath(), true
			}
		}
		return "", false
	}
	socket := filepath.Join(t.TempDir(), "socket")
	ca := Sources{Environ: env, DiscoveryAddress: "istiod.istio-system.svc:15012", RootCertFile: writeRoot(t),
		TokenFile: filepath.Join(t.TempDir(), "istio-token"), Identity: IdentityOptions{SocketPath: socket}}
	if pipe, ok := sdsOf(t, ca); !ok || pipe != socket {
		t.Errorf("identity from the CA: sds-grpc pipe %q (found %v), want %q", pipe, ok, socket)
	}
	if pipe, ok := sdsOf(t, Sources{Environ: env, DiscoveryAddress: "127.0.0.1:15010"}); ok {
		t.Errorf("no identity: sds-grpc cluster to %q, want none", pipe)
	}

	extra := filepath.Join(t.TempDir(), "extra.json")
	if err := os.WriteFile(extra, []byte(`{"static_resources":{"clusters":[{"name":"sds-grpc","type":"STATIC","connect_timeout":"1s"}]}}`), 0o644); err != nil {
		t.Fatal(err)
	}
	ca.ExtraBootstrap = extra
	in, err := Load(ca)
	if err == nil {
		_, _, err = in.render()
	}
	if err == nil || !strings.Contains(err.Error(), `"sds-grpc" is generated from the SDS socket`) {
		t.Errorf("extra bootstrap redefining sds-grpc: %v", err)
	}
}
