package tlsctx

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"slices"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/proto"

	"github.com/meshtun/meshtun/mesh/secrets"
)

const (
	tlsSocketName = "envoy.transport_sockets.tls"
	rawSocketName = "envoy.transport_sockets.raw_buffer"
	upstreamType  = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
	downType      = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
	rawType       = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"

	// peerExchange is Istio's TCP metadata-exchange ALPN: a peer that
	// negotiates it frames the stream with a header meshtun does not
	// write or strip, so meshtun never offers or selects it (istio#38990).
	peerExchange = "istio-peer-exchange"
)

// isRaw reports whether ts is plaintext (raw_buffer), by name or type.
func isRaw(ts *corev3.TransportSocket) bool {
	if ts.GetTypedConfig() != nil {
		return ts.GetTypedConfig().GetTypeUrl() == rawType
	}
	return ts.GetName() == rawSocketName
}

// common is a compiled CommonTlsContext.
type common struct {
	params params
	alpn   []string // alpn_protocols without istio-peer-exchange
	certs  certSource
	val    *validationSource // nil: no validation context, peers are not verified
}

func parseCommon(field string, c *tlsv3.CommonTlsContext, store *secrets.Store, server bool) (*common, error) {
	field += ".common_tls_context"
	if c == nil {
		c = &tlsv3.CommonTlsContext{}
	}
	switch {
	case c.GetTlsCertificateProviderInstance() != nil:
		return nil, fmt.Errorf("%s.tls_certificate_provider_instance: certificate providers are not supported", field)
	case c.GetCustomTlsCertificateSelector() != nil:
		return nil, fmt.Errorf("%s.custom_tls_certificate_selector: not supported", field)
	case c.GetTlsCertificateCertificateProvider() != nil:
		return nil, fmt.Errorf("%s.tls_certificate_certificate_provider: certificate providers are not supported", field)
	case c.GetTlsCertificateCertificateProviderInstance() != nil:
		return nil, fmt.Errorf("%s.tls_certificate_certificate_provider_instance: certificate providers are not supported", field)
	case c.GetValidationContextCertificateProvider() != nil:
		return nil, fmt.Errorf("%s.validation_context_certificate_provider: certificate providers are not supported", field)
	case c.GetValidationContextCertificateProviderInstance() != nil:
		return nil, fmt.Errorf("%s.validation_context_certificate_provider_instance: certificate providers are not supported", field)
	case c.GetCustomHandshaker() != nil:
		return nil, fmt.Errorf("%s.custom_handshaker: not supported", field)
	case c.GetKeyLog() != nil:
		return nil, fmt.Errorf("%s.key_log: not supported (meshtun does not write session keys)", field)
	}
	out := &common{certs: certSource{store: store}}
	var err error
	if out.params, err = parseParams(field+".tls_params", c.GetTlsParams(), server); err != nil {
		return nil, err
	}
	for _, p := range c.GetAlpnProtocols() {
		if p != peerExchange {
			out.alpn = append(out.alpn, p)
		}
	}
	for i, tc := range c.GetTlsCertificates() {
		cert, err := parseTLSCertificate(fmt.Sprintf("%s.tls_certificates[%d]", field, i), tc)
		if err != nil {
			return nil, err
		}
		out.certs.static = append(out.certs.static, cert)
	}
	for i, sc := range c.GetTlsCertificateSdsSecretConfigs() {
		if sc.GetName() == "" {
			return nil, fmt.Errorf("%s.tls_certificate_sds_secret_configs[%d].name: empty", field, i)
		}
		if sc.GetSdsConfig() == nil {
			return nil, fmt.Errorf("%s.tls_certificate_sds_secret_configs[%d] (%s).sds_config: missing (static secrets are not supported)", field, i, sc.GetName())
		}
		out.certs.sds = append(out.certs.sds, sc.GetName())
	}
	if len(out.certs.static) > 0 && len(out.certs.sds) > 0 {
		return nil, fmt.Errorf("%s: tls_certificates and tls_certificate_sds_secret_configs are exclusive", field)
	}
	if out.val, err = parseValidationSource(field, c, store); err != nil {
		return nil, err
	}
	if store == nil && (len(out.certs.sds) > 0 || (out.val != nil && out.val.sds != "")) {
		return nil, fmt.Errorf("%s: references SDS secrets but no secret store is configured", field)
	}
	return out, nil
}

// parseTLSCertificate loads a static tls_certificates entry.
func parseTLSCertificate(field string, tc *tlsv3.TlsCertificate) (*tls.Certificate, error) {
	switch {
	case tc.GetPrivateKeyProvider() != nil:
		return nil, fmt.Errorf("%s.private_key_provider: not supported", field)
	case tc.GetPkcs12() != nil:
		return nil, fmt.Errorf("%s.pkcs12: not supported (use certificate_chain and private_key)", field)
	case tc.GetPassword() != nil:
		return nil, fmt.Errorf("%s.password: encrypted private keys are not supported", field)
	case tc.GetWatchedDirectory() != nil:
		return nil, fmt.Errorf("%s.watched_directory: not supported", field)
	case tc.GetOcspStaple() != nil:
		return nil, fmt.Errorf("%s.ocsp_staple: not supported", field)
	case len(tc.GetSignedCertificateTimestamp()) > 0:
		return nil, fmt.Errorf("%s.signed_certificate_timestamp: not supported", field)
	case tc.GetTlsParams() != nil:
		return nil, fmt.Errorf("%s.tls_params: per-certificate parameters are not supported", field)
	}
	chain, err := dataSource(field+".certificate_chain", tc.GetCertificateChain())
	if err != nil {
		return nil, err
	}
	key, err := dataSource(field+".private_key", tc.GetPrivateKey())
	if err != nil {
		return nil, err
	}
	cert, err := tls.X509KeyPair(chain, key)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", field, err)
	}
	return &cert, nil
}

// dataSource reads a DataSource: inline, a file (read once, at parse) or
// an environment variable.
func dataSource(field string, ds *corev3.DataSource) ([]byte, error) {
	switch s := ds.GetSpecifier().(type) {
	case nil:
		return nil, fmt.Errorf("%s: missing", field)
	case *corev3.DataSource_InlineBytes:
		return s.InlineBytes, nil
	case *corev3.DataSource_InlineString:
		return []byte(s.InlineString), nil
	case *corev3.DataSource_Filename:
		b, err := os.ReadFile(s.Filename)
		if err != nil {
			return nil, fmt.Errorf("%s.filename: %w", field, err)
		}
		return b, nil
	case *corev3.DataSource_EnvironmentVariable:
		v, ok := os.LookupEnv(s.EnvironmentVariable)
		if !ok {
			return nil, fmt.Errorf("%s.environment_variable: %s is not set", field, s.EnvironmentVariable)
		}
		return []byte(v), nil
	default:
		return nil, fmt.Errorf("%s: %T not supported", field, s)
	}
}

// certPool parses PEM certificates into a pool; none is an error.
func certPool(field string, p []byte) (*x509.CertPool, error) {
	certs, err := secrets.ParseCertificates(p, field)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	for _, c := range certs {
		pool.AddCert(c)
	}
	return pool, nil
}

// certSource is the context's own certificate: static, or SDS secrets
// looked up at every handshake so that a rotation reaches the next
// connection without touching open ones.
type certSource struct {
	static []*tls.Certificate
	sds    []string
	store  *secrets.Store
}

func (c *certSource) empty() bool { return len(c.static) == 0 && len(c.sds) == 0 }

// pick returns the first certificate supports accepts (or the first one
// if none does, so that the peer reports the mismatch); a missing SDS
// secret is an error naming it.
func (c *certSource) pick(supports func(*tls.Certificate) bool) (*tls.Certificate, error) {
	var first *tls.Certificate
	for _, cert := range c.static {
		if first == nil {
			first = cert
		}
		if supports(cert) {
			return cert, nil
		}
	}
	for _, name := range c.sds {
		sec := c.store.Get(name)
		if sec == nil {
			return nil, &reasonError{reason: fmt.Sprintf("certificate secret %q not ready (SDS)", name)}
		}
		if sec.TLS == nil {
			return nil, &reasonError{reason: fmt.Sprintf("secret %q is not a tls_certificate", name)}
		}
		if first == nil {
			first = sec.TLS
		}
		if supports(sec.TLS) {
			return sec.TLS, nil
		}
	}
	return first, nil
}

// stripPeerExchange returns list without istio-peer-exchange.
func stripPeerExchange(list []string) []string {
	return slices.DeleteFunc(slices.Clone(list), func(p string) bool { return p == peerExchange })
}

// unpack decodes ts's typed_config into m, whose type URL must be want.
func unpack(field string, ts *corev3.TransportSocket, want string, m proto.Message) error {
	a := ts.GetTypedConfig()
	switch {
	case a == nil:
		return fmt.Errorf("%s (%s).typed_config: missing", field, ts.GetName())
	case a.GetTypeUrl() != want:
		return fmt.Errorf("%s (%s).typed_config: type %s not supported here (want %s or raw_buffer)", field, ts.GetName(), a.GetTypeUrl(), want)
	}
	if err := a.UnmarshalTo(m); err != nil {
		return fmt.Errorf("%s.typed_config: %w", field, err)
	}
	return nil
}
