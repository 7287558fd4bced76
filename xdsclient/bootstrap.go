package xdsclient

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	grpccredv3 "github.com/envoyproxy/go-control-plane/envoy/config/grpc_credential/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

const (
	tlsTransportSocket = "envoy.transport_sockets.tls"
	upstreamTLSType    = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"

	// FileMetadataKey is where, in the xDS server cluster's
	// metadata.typed_filter_metadata, a bootstrap asks for a header read
	// from a file on every stream (an Envoy FileBasedMetadataConfig, keyed
	// by the name of Envoy's extension for it): istiod's bearer token on
	// port 15012. Envoy carries such call credentials only on google_grpc
	// services; meshtun's ADS client takes envoy_grpc, whose cluster holds
	// the address and TLS, so the credential travels with that cluster. A
	// real Envoy ignores cluster metadata it has no filter for.
	FileMetadataKey = "envoy.grpc_credentials.file_based_metadata"
)

// FromBootstrap derives a Config from an Envoy bootstrap the way Envoy reads it:
// dynamic_resources.ads_config names (through grpc_services[0].envoy_grpc) a static
// cluster that holds the control plane's address and TLS settings; lds_config and
// cds_config must be `ads: {}`. The node is taken from the bootstrap. Errors name the
// offending field. Log is left for the caller to set.
func FromBootstrap(b *bootstrapv3.Bootstrap) (Config, error) {
	var cfg Config
	dr := b.GetDynamicResources()
	if dr == nil {
		return cfg, errors.New("dynamic_resources: missing")
	}
	ads := dr.GetAdsConfig()
	if ads == nil {
		return cfg, errors.New("dynamic_resources.ads_config: missing")
	}
	switch ads.GetApiType() {
	case corev3.ApiConfigSource_GRPC:
	case corev3.ApiConfigSource_DELTA_GRPC:
		cfg.Delta = true
	default:
		return cfg, fmt.Errorf("dynamic_resources.ads_config.api_type: %s is not supported, want GRPC or DELTA_GRPC", ads.GetApiType())
	}
	if v := ads.GetTransportApiVersion(); v != corev3.ApiVersion_V3 && v != corev3.ApiVersion_AUTO {
		return cfg, fmt.Errorf("dynamic_resources.ads_config.transport_api_version: %s is not supported, want V3", v)
	}
	if len(ads.GetGrpcServices()) == 0 {
		return cfg, errors.New("dynamic_resources.ads_config.grpc_services: missing")
	}
	eg := ads.GetGrpcServices()[0].GetEnvoyGrpc()
	if eg == nil {
		return cfg, errors.New("dynamic_resources.ads_config.grpc_services[0].envoy_grpc: missing (google_grpc is not supported)")
	}
	for _, src := range []struct {
		field string
		cs    *corev3.ConfigSource
	}{{"cds_config", dr.GetCdsConfig()}, {"lds_config", dr.GetLdsConfig()}} {
		if src.cs.GetAds() == nil {
			return cfg, fmt.Errorf("dynamic_resources.%s: must be `ads: {}`", src.field)
		}
	}
	cfg.InitialFetchTimeout = EnvoyInitialFetchTimeout
	if d := dr.GetCdsConfig().GetInitialFetchTimeout(); d != nil {
		if err := d.CheckValid(); err != nil {
			return cfg, fmt.Errorf("dynamic_resources.cds_config.initial_fetch_timeout: %w", err)
		}
		if d.AsDuration() < 0 {
			// Caught here, with the field named, not when the client starts.
			return cfg, fmt.Errorf("dynamic_resources.cds_config.initial_fetch_timeout: %v is negative", d.AsDuration())
		}
		cfg.InitialFetchTimeout = d.AsDuration()
	}

	name := eg.GetClusterName()
	idx := -1
	for i, c := range b.GetStaticResources().GetClusters() {
		if c.GetName() == name {
			idx = i
			break
		}
	}
	if idx < 0 {
		return cfg, fmt.Errorf("dynamic_resources.ads_config.grpc_services[0].envoy_grpc.cluster_name: no static_resources.clusters entry named %q", name)
	}
	field := fmt.Sprintf("static_resources.clusters[%d]", idx)
	c := b.GetStaticResources().GetClusters()[idx]
	var err error
	if cfg.Server, err = clusterAddress(field, c); err != nil {
		return cfg, err
	}
	if ts := c.GetTransportSocket(); ts != nil {
		if cfg.TLS, cfg.RootFile, err = upstreamTLS(field+".transport_socket", ts); err != nil {
			return cfg, err
		}
	}
	if a := c.GetMetadata().GetTypedFilterMetadata()[FileMetadataKey]; a != nil {
		mfield := field + ".metadata.typed_filter_metadata[\"" + FileMetadataKey + "\"]"
		if cfg.FileMetadata, err = fileMetadata(mfield, a); err != nil {
			return cfg, err
		}
		if cfg.TLS == nil {
			return cfg, fmt.Errorf("%s: a credential is sent over TLS only; the cluster has no transport_socket", mfield)
		}
	}
	if ka := c.GetUpstreamConnectionOptions().GetTcpKeepalive(); ka != nil && ka.GetKeepaliveTime() != nil {
		cfg.Keepalive = time.Duration(ka.GetKeepaliveTime().GetValue()) * time.Second
	}
	if b.GetNode() != nil {
		cfg.Node = proto.Clone(b.GetNode()).(*corev3.Node)
	}
	return cfg, nil
}

// clusterAddress returns the gRPC target of a STATIC or STRICT_DNS cluster with
// exactly one endpoint.
func clusterAddress(field string, c *clusterv3.Cluster) (string, error) {
	t := c.GetType()
	if c.GetClusterType() != nil || (t != clusterv3.Cluster_STATIC && t != clusterv3.Cluster_STRICT_DNS) {
		return "", fmt.Errorf("%s.type: %s is not supported for the xDS server, want STATIC or STRICT_DNS", field, t)
	}
	var addrs []*corev3.Address
	for _, lle := range c.GetLoadAssignment().GetEndpoints() {
		for _, le := range lle.GetLbEndpoints() {
			addrs = append(addrs, le.GetEndpoint().GetAddress())
		}
	}
	if len(addrs) != 1 {
		return "", fmt.Errorf("%s.load_assignment: has %d endpoints, want exactly one", field, len(addrs))
	}
	addrField := field + ".load_assignment.endpoints[0].lb_endpoints[0].endpoint.address"
	switch a := addrs[0]; {
	case a.GetSocketAddress() != nil:
		sa := a.GetSocketAddress()
		if sa.GetProtocol() != corev3.SocketAddress_TCP {
			return "", fmt.Errorf("%s.socket_address.protocol: want TCP", addrField)
		}
		port, ok := sa.GetPortSpecifier().(*corev3.SocketAddress_PortValue)
		if !ok || port.PortValue == 0 || port.PortValue > 65535 {
			return "", fmt.Errorf("%s.socket_address.port_value: missing or out of range", addrField)
		}
		host := sa.GetAddress()
		if host == "" {
			return "", fmt.Errorf("%s.socket_address.address: empty", addrField)
		}
		if t == clusterv3.Cluster_STATIC {
			if _, err := netip.ParseAddr(host); err != nil {
				return "", fmt.Errorf("%s.socket_address.address: a STATIC cluster needs an IP address: %w", addrField, err)
			}
		}
		return net.JoinHostPort(host, strconv.Itoa(int(port.PortValue))), nil
	case a.GetPipe() != nil:
		p := a.GetPipe().GetPath()
		switch {
		case p == "":
			return "", fmt.Errorf("%s.pipe.path: empty", addrField)
		case strings.HasPrefix(p, "@"):
			return "unix-abstract:" + p[1:], nil
		case filepath.IsAbs(p):
			return "unix://" + p, nil
		default:
			return "unix:" + p, nil
		}
	default:
		return "", fmt.Errorf("%s: want socket_address or pipe", addrField)
	}
}

// upstreamTLS builds the client TLS configuration from an
// envoy.transport_sockets.tls UpstreamTlsContext: trusted CA, optional client
// certificate, SNI. rootFile is the trusted CA's file when it is one: it is
// re-read when it changes (a rotated root).
func upstreamTLS(field string, ts *corev3.TransportSocket) (cfg *tls.Config, rootFile string, err error) {
	tc := ts.GetTypedConfig()
	if ts.GetName() != tlsTransportSocket && tc.GetTypeUrl() != upstreamTLSType {
		return nil, "", fmt.Errorf("%s.name: %q is not supported, want %s", field, ts.GetName(), tlsTransportSocket)
	}
	if tc.GetTypeUrl() != upstreamTLSType {
		return nil, "", fmt.Errorf("%s.typed_config: type %q, want UpstreamTlsContext", field, tc.GetTypeUrl())
	}
	var utc tlsv3.UpstreamTlsContext
	if err := tc.UnmarshalTo(&utc); err != nil {
		return nil, "", fmt.Errorf("%s.typed_config: %w", field, err)
	}
	ctxField := field + ".typed_config.common_tls_context"
	ctc := utc.GetCommonTlsContext()
	vc := ctc.GetValidationContext()
	vcField := ctxField + ".validation_context"
	if cvc := ctc.GetCombinedValidationContext(); cvc != nil {
		vc, vcField = cvc.GetDefaultValidationContext(), ctxField+".combined_validation_context.default_validation_context"
	}
	if vc == nil {
		return nil, "", fmt.Errorf("%s.validation_context: missing (only validation_context.trusted_ca is supported)", ctxField)
	}
	if len(vc.GetMatchTypedSubjectAltNames()) > 0 || len(vc.GetMatchSubjectAltNames()) > 0 {
		return nil, "", fmt.Errorf("%s.match_typed_subject_alt_names: not supported", vcField)
	}
	ca, err := readDataSource(vcField+".trusted_ca", vc.GetTrustedCa())
	if err != nil {
		return nil, "", err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return nil, "", fmt.Errorf("%s.trusted_ca: no PEM certificate found", vcField)
	}
	cfg = &tls.Config{RootCAs: pool, ServerName: utc.GetSni(), MinVersion: tls.VersionTLS12}
	if len(ctc.GetTlsCertificateSdsSecretConfigs()) > 0 {
		return nil, "", fmt.Errorf("%s.tls_certificate_sds_secret_configs: SDS is not supported for the xDS server connection", ctxField)
	}
	for i, tcert := range ctc.GetTlsCertificates() {
		cf := fmt.Sprintf("%s.tls_certificates[%d]", ctxField, i)
		chain, err := readDataSource(cf+".certificate_chain", tcert.GetCertificateChain())
		if err != nil {
			return nil, "", err
		}
		key, err := readDataSource(cf+".private_key", tcert.GetPrivateKey())
		if err != nil {
			return nil, "", err
		}
		pair, err := tls.X509KeyPair(chain, key)
		if err != nil {
			return nil, "", fmt.Errorf("%s: %w", cf, err)
		}
		cfg.Certificates = append(cfg.Certificates, pair)
	}
	return cfg, vc.GetTrustedCa().GetFilename(), nil
}

// fileMetadata reads a FileBasedMetadataConfig whose secret_data is a file.
func fileMetadata(field string, a *anypb.Any) (*FileMetadata, error) {
	var fc grpccredv3.FileBasedMetadataConfig
	if err := a.UnmarshalTo(&fc); err != nil {
		return nil, fmt.Errorf("%s: want a FileBasedMetadataConfig: %w", field, err)
	}
	f := fc.GetSecretData().GetFilename()
	if f == "" {
		return nil, fmt.Errorf("%s.secret_data.filename: missing (the credential is re-read from its file)", field)
	}
	return &FileMetadata{File: f, Key: fc.GetHeaderKey(), Prefix: fc.GetHeaderPrefix()}, nil
}

func readDataSource(field string, ds *corev3.DataSource) ([]byte, error) {
	switch s := ds.GetSpecifier().(type) {
	case *corev3.DataSource_Filename:
		b, err := os.ReadFile(s.Filename)
		if err != nil {
			return nil, fmt.Errorf("%s.filename: %w", field, err)
		}
		return b, nil
	case *corev3.DataSource_InlineBytes:
		return s.InlineBytes, nil
	case *corev3.DataSource_InlineString:
		return []byte(s.InlineString), nil
	case nil:
		return nil, fmt.Errorf("%s: missing", field)
	default:
		return nil, fmt.Errorf("%s: only filename, inline_bytes and inline_string are supported", field)
	}
}
