package xdsclient

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

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	"google.golang.org/protobuf/encoding/protojson"

	// The UpstreamTlsContext in the TLS case is an Any; protojson resolves it
	// through the registry.
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
)

// TestFileCredsRereadEachStream: the token is read when each stream
// starts, so a token rotated on disk is what the next stream sends; a
// missing file fails the stream with an error naming it.
func TestFileCredsRereadEachStream(t *testing.T) {
	p := filepath.Join(t.TempDir(), "istio-token")
	c := fileCreds{FileMetadata{File: p, Prefix: "Bearer "}}
	if _, err := c.GetRequestMetadata(t.Context()); err == nil || !strings.Contains(err.Error(), p) {
		t.Errorf("missing token file: err = %v, want it named", err)
	}
	for _, tok := range []string{"first", "second"} {
		if err := os.WriteFile(p, []byte(tok+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		md, err := c.GetRequestMetadata(t.Context())
		if err != nil || len(md) != 1 || md["authorization"] != "Bearer "+tok {
			t.Errorf("metadata = %v, %v; want authorization: Bearer %s", md, err, tok)
		}
	}
	if !c.RequireTransportSecurity() {
		t.Error("a bearer token must not go over plaintext")
	}
}

// istioBootstrap is the xDS part of the bootstrap istio-agent writes for a sidecar
// that talks to istiod directly (envoy-rev.json), with the fields FromBootstrap reads.
const istioBootstrap = `{
  "node": {
    "id": "sidecar~10.1.0.7~app-7d9f.default~default.svc.cluster.local",
    "cluster": "app.default",
    "metadata": {"ISTIO_VERSION": "1.27.0", "CLUSTER_ID": "Kubernetes"}
  },
  "dynamic_resources": {
    "lds_config": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"},
    "cds_config": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"},
    "ads_config": {
      "api_type": "DELTA_GRPC",
      "set_node_on_first_message_only": true,
      "transport_api_version": "V3",
      "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]
    }
  },
  "static_resources": {
    "clusters": [
      {
        "name": "prometheus_stats",
        "type": "STATIC",
        "connect_timeout": "0.250s",
        "load_assignment": {"cluster_name": "prometheus_stats", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 15000}}}}]}]}
      },
      {
        "name": "xds-grpc",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "xds-grpc", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 15010}}}}]}]},
        "upstream_connection_options": {"tcp_keepalive": {"keepalive_time": 300}},
        "typed_extension_protocol_options": {}
      }
    ]
  }
}`

func parseBootstrap(t *testing.T, js string) *bootstrapv3.Bootstrap {
	t.Helper()
	var b bootstrapv3.Bootstrap
	if err := protojson.Unmarshal([]byte(js), &b); err != nil {
		t.Fatalf("bootstrap: %v", err)
	}
	return &b
}

func TestFromBootstrap(t *testing.T) {
	cfg, err := FromBootstrap(parseBootstrap(t, istioBootstrap))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Server != "127.0.0.1:15010" || !cfg.Delta || cfg.TLS != nil || cfg.InitialFetchTimeout != 0 ||
		cfg.Keepalive != 300*time.Second || cfg.Node.GetId() != testNodeID || cfg.Node.GetCluster() != "app.default" {
		t.Errorf("FromBootstrap = %+v", cfg)
	}

	errCases := []struct {
		name, from, to, field string
	}{
		{"api_type REST", `"api_type": "DELTA_GRPC"`, `"api_type": "REST"`, "dynamic_resources.ads_config.api_type"},
		{"missing cluster", `{"cluster_name": "xds-grpc"}`, `{"cluster_name": "xds-grpc-missing"}`, "cluster_name"},
		{"lds_config not ads", `"lds_config": {"ads": {}`, `"lds_config": {"path_config_source": {"path": "/etc/lds.yaml"}`, "dynamic_resources.lds_config"},
		{"cds_config missing", `"cds_config": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"},`, ``, "dynamic_resources.cds_config"},
		{"negative initial fetch timeout", `"cds_config": {"ads": {}, "initial_fetch_timeout": "0s"`, `"cds_config": {"ads": {}, "initial_fetch_timeout": "-1s"`, "dynamic_resources.cds_config.initial_fetch_timeout"},
		{"v2 transport", `"transport_api_version": "V3"`, `"transport_api_version": "V2"`, "dynamic_resources.ads_config.transport_api_version"},
		{"logical dns", `"name": "xds-grpc",
        "type": "STATIC"`, `"name": "xds-grpc",
        "type": "ORIGINAL_DST"`, "static_resources.clusters[1].type"},
	}
	for _, tc := range errCases {
		t.Run(tc.name, func(t *testing.T) {
			js := strings.Replace(istioBootstrap, tc.from, tc.to, 1)
			if js == istioBootstrap {
				t.Fatalf("test case does not change the bootstrap")
			}
			_, err := FromBootstrap(parseBootstrap(t, js))
			if err == nil || !strings.Contains(err.Error(), tc.field) {
				t.Errorf("err = %v, want one naming %s", err, tc.field)
			}
		})
	}

	t.Run("sotw over a unix socket", func(t *testing.T) {
		js := strings.Replace(istioBootstrap, `"DELTA_GRPC"`, `"GRPC"`, 1)
		js = strings.Replace(js, `{"socket_address": {"address": "127.0.0.1", "port_value": 15010}}`, `{"pipe": {"path": "/etc/istio/proxy/XDS"}}`, 1)
		cfg, err := FromBootstrap(parseBootstrap(t, js))
		if err != nil || cfg.Delta || cfg.Server != "unix:///etc/istio/proxy/XDS" {
			t.Errorf("FromBootstrap = %+v, %v", cfg, err)
		}
	})

	t.Run("tls", func(t *testing.T) {
		ca := filepath.Join(t.TempDir(), "root-cert.pem")
		if err := os.WriteFile(ca, testCAPEM(t), 0o600); err != nil {
			t.Fatal(err)
		}
		tlsSocket := `"transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
          "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
          "sni": "istiod.istio-system.svc",
          "common_tls_context": {"alpn_protocols": ["h2"], "validation_context": {"trusted_ca": {"filename": "` + ca + `"}}}}},
        "typed_extension_protocol_options": {}`
		js := strings.Replace(istioBootstrap, `"typed_extension_protocol_options": {}`, tlsSocket, 1)
		cfg, err := FromBootstrap(parseBootstrap(t, js))
		if err != nil {
			t.Fatal(err)
		}
		if cfg.TLS == nil || cfg.TLS.ServerName != "istiod.istio-system.svc" || cfg.TLS.RootCAs == nil {
			t.Errorf("TLS = %+v", cfg.TLS)
		}
		if cfg.RootFile != ca {
			t.Errorf("RootFile = %q, want %q: a rotated root would not be re-read", cfg.RootFile, ca)
		}

		if cfg.FileMetadata != nil {
			t.Errorf("FileMetadata = %+v without metadata", cfg.FileMetadata)
		}

		// istiod's token, as the agent renders it for port 15012.
		token := `"metadata": {"typed_filter_metadata": {"envoy.grpc_credentials.file_based_metadata": {
          "@type": "type.googleapis.com/envoy.config.grpc_credential.v3.FileBasedMetadataConfig",
          "secret_data": {"filename": "./var/run/secrets/tokens/istio-token"}, "header_key": "authorization", "header_prefix": "Bearer "}}},
        "typed_extension_protocol_options": {}`
		withToken := strings.Replace(js, `"typed_extension_protocol_options": {}`, token, 1)
		cfg, err = FromBootstrap(parseBootstrap(t, withToken))
		if err != nil {
			t.Fatal(err)
		}
		if want := (FileMetadata{File: "./var/run/secrets/tokens/istio-token", Key: "authorization", Prefix: "Bearer "}); cfg.FileMetadata == nil || *cfg.FileMetadata != want {
			t.Errorf("FileMetadata = %+v, want %+v", cfg.FileMetadata, want)
		}
		noFile := strings.Replace(withToken, `"secret_data": {"filename": "./var/run/secrets/tokens/istio-token"}, `, "", 1)
		if _, err := FromBootstrap(parseBootstrap(t, noFile)); err == nil || !strings.Contains(err.Error(), `metadata.typed_filter_metadata["envoy.grpc_credentials.file_based_metadata"].secret_data.filename: missing`) {
			t.Errorf("token without a file: err = %v", err)
		}
		plaintext := strings.Replace(istioBootstrap, `"typed_extension_protocol_options": {}`, token, 1)
		if _, err := FromBootstrap(parseBootstrap(t, plaintext)); err == nil || !strings.Contains(err.Error(), "sent over TLS only") {
			t.Errorf("token over plaintext: err = %v", err)
		}

		js = strings.Replace(js, ca, ca+".missing", 1)
		_, err = FromBootstrap(parseBootstrap(t, js))
		if err == nil || !strings.Contains(err.Error(), "validation_context.trusted_ca.filename") {
			t.Errorf("missing CA file: err = %v", err)
		}
	})
}

func testCAPEM(t *testing.T) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{Organization: []string{"cluster.local"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}
