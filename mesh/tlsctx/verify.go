package tlsctx

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"strings"
	"sync/atomic"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/proto"

	"github.com/meshtun/meshtun/mesh/secrets"
)

// validation is a compiled CertificateValidationContext.
type validation struct {
	roots           *x509.CertPool // nil: the chain is not verified (no trusted_ca)
	acceptUntrusted bool           // trust_chain_verification ACCEPT_UNTRUSTED
	maxDepth        int            // max_verify_depth; -1 unset
	sans            []sanMatcher
	hashes          [][sha256.Size]byte // verify_certificate_hash
	spkis           [][sha256.Size]byte // verify_certificate_spki
}

// compileValidation compiles vc. roots, if not nil, is its trusted_ca
// already parsed (an SDS secret's). final says vc is the context a
// handshake uses (not the default half of a combined one whose trust
// bundle comes later), where Envoy's "no SAN check without a CA" applies.
func compileValidation(field string, vc *tlsv3.CertificateValidationContext, roots *x509.CertPool, final bool) (*validation, error) {
	switch {
	case vc.GetCaCertificateProviderInstance() != nil:
		return nil, fmt.Errorf("%s.ca_certificate_provider_instance: certificate providers are not supported", field)
	case vc.GetWatchedDirectory() != nil:
		return nil, fmt.Errorf("%s.watched_directory: not supported", field)
	case vc.GetRequireSignedCertificateTimestamp().GetValue():
		return nil, fmt.Errorf("%s.require_signed_certificate_timestamp: not supported", field)
	case vc.GetCrl() != nil:
		return nil, fmt.Errorf("%s.crl: certificate revocation lists are not supported", field)
	case vc.GetOnlyVerifyLeafCertCrl():
		return nil, fmt.Errorf("%s.only_verify_leaf_cert_crl: certificate revocation lists are not supported", field)
	case vc.GetAllowExpiredCertificate():
		return nil, fmt.Errorf("%s.allow_expired_certificate: not supported", field)
	case vc.GetCustomValidatorConfig() != nil:
		return nil, fmt.Errorf("%s.custom_validator_config (%s): custom certificate validators are not supported", field, vc.GetCustomValidatorConfig().GetName())
	}
	v := &validation{roots: roots, maxDepth: -1}
	switch vc.GetTrustChainVerification() {
	case tlsv3.CertificateValidationContext_VERIFY_TRUST_CHAIN:
	case tlsv3.CertificateValidationContext_ACCEPT_UNTRUSTED:
		v.acceptUntrusted = true
	default:
		return nil, fmt.Errorf("%s.trust_chain_verification: %v unknown", field, vc.GetTrustChainVerification())
	}
	if d := vc.GetMaxVerifyDepth(); d != nil {
		v.maxDepth = int(d.GetValue())
	}
	if v.roots == nil && vc.GetTrustedCa() != nil {
		p, err := dataSource(field+".trusted_ca", vc.GetTrustedCa())
		if err != nil {
			return nil, err
		}
		if v.roots, err = certPool(field+".trusted_ca", p); err != nil {
			return nil, err
		}
	}
	if vc.GetSystemRootCerts() != nil {
		if v.roots != nil {
			return nil, fmt.Errorf("%s.system_root_certs: exclusive with trusted_ca", field)
		}
		sys, err := x509.SystemCertPool()
		if err != nil {
			return nil, fmt.Errorf("%s.system_root_certs: %w", field, err)
		}
		v.roots = sys
	}
	var err error
	if v.sans, err = compileSANs(field, vc); err != nil {
		return nil, err
	}
	for i, h := range vc.GetVerifyCertificateHash() {
		b, err := hex.DecodeString(strings.ReplaceAll(h, ":", ""))
		if err != nil || len(b) != sha256.Size {
			return nil, fmt.Errorf("%s.verify_certificate_hash[%d]: want a hex SHA-256 digest", field, i)
		}
		v.hashes = append(v.hashes, [sha256.Size]byte(b))
	}
	for i, h := range vc.GetVerifyCertificateSpki() {
		b, err := base64.StdEncoding.DecodeString(h)
		if err != nil || len(b) != sha256.Size {
			return nil, fmt.Errorf("%s.verify_certificate_spki[%d]: want a base64 SHA-256 digest", field, i)
		}
		v.spkis = append(v.spkis, [sha256.Size]byte(b))
	}
	if final && len(v.sans) > 0 && v.roots == nil {
		return nil, fmt.Errorf("%s: subject-alt-name checks without a trusted CA are insecure (Envoy refuses them)", field)
	}
	return v, nil
}

// verify checks the peer's chain (leaf first) as Envoy's default
// validator does: the trust chain, then the SANs, then the pinned hashes.
// A failure bumps its fail_verify_* counter and names the reason.
func (v *validation) verify(st *Stats, certs []*x509.Certificate) error {
	leaf := certs[0]
	if v.roots != nil && !v.acceptUntrusted {
		opts := x509.VerifyOptions{Roots: v.roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}
		if len(certs) > 1 {
			opts.Intermediates = x509.NewCertPool()
			for _, c := range certs[1:] {
				opts.Intermediates.AddCert(c)
			}
		}
		chains, err := leaf.Verify(opts)
		if err != nil {
			st.failVerifyError.Add(1)
			return &reasonError{reason: "verify chain: " + err.Error(), err: err}
		}
		if v.maxDepth >= 0 {
			ok := false
			for _, ch := range chains {
				ok = ok || len(ch)-1 <= v.maxDepth
			}
			if !ok {
				st.failVerifyError.Add(1)
				return &reasonError{reason: fmt.Sprintf("verify chain: longer than max_verify_depth %d", v.maxDepth)}
			}
		}
	}
	if len(v.sans) > 0 && !matchSANs(v.sans, leaf) {
		st.failVerifySAN.Add(1)
		return &reasonError{reason: fmt.Sprintf("verify SAN: peer SANs (%s) match none of the subject_alt_names matchers", sanList(leaf))}
	}
	if len(v.hashes)+len(v.spkis) > 0 {
		ok := false
		if len(v.hashes) > 0 {
			h := sha256.Sum256(leaf.Raw)
			for i := range v.hashes {
				ok = ok || v.hashes[i] == h
			}
		}
		if !ok && len(v.spkis) > 0 {
			h := sha256.Sum256(leaf.RawSubjectPublicKeyInfo)
			for i := range v.spkis {
				ok = ok || v.spkis[i] == h
			}
		}
		if !ok {
			st.failVerifyCertHash.Add(1)
			return &reasonError{reason: "verify certificate hash: peer matches no verify_certificate_hash/verify_certificate_spki"}
		}
	}
	return nil
}

// validationSource is where a context's validation comes from at a
// handshake: fixed (validation_context), or an SDS secret merged into
// the default context (combined_validation_context; plain
// validation_context_sds_secret_config merges into nothing).
type validationSource struct {
	field  string
	static *validation

	sds   string // secret name; "" when static
	def   *tlsv3.CertificateValidationContext
	store *secrets.Store
	// merged caches the compiled context for one version of the secret,
	// so a handshake reads a pointer instead of re-compiling.
	merged atomic.Pointer[mergedValidation]
}

type mergedValidation struct {
	sec *secrets.Secret
	v   *validation
	err error
}

func parseValidationSource(field string, c *tlsv3.CommonTlsContext, store *secrets.Store) (*validationSource, error) {
	switch t := c.GetValidationContextType().(type) {
	case nil:
		return nil, nil
	case *tlsv3.CommonTlsContext_ValidationContext:
		f := field + ".validation_context"
		v, err := compileValidation(f, t.ValidationContext, nil, true)
		if err != nil {
			return nil, err
		}
		return &validationSource{field: f, static: v}, nil
	case *tlsv3.CommonTlsContext_ValidationContextSdsSecretConfig:
		f := field + ".validation_context_sds_secret_config"
		if err := checkSDS(f, t.ValidationContextSdsSecretConfig); err != nil {
			return nil, err
		}
		return &validationSource{field: f, sds: t.ValidationContextSdsSecretConfig.GetName(), store: store}, nil
	case *tlsv3.CommonTlsContext_CombinedValidationContext:
		f := field + ".combined_validation_context"
		cv := t.CombinedValidationContext
		switch {
		case cv.GetValidationContextCertificateProvider() != nil:
			return nil, fmt.Errorf("%s.validation_context_certificate_provider: certificate providers are not supported", f)
		case cv.GetValidationContextCertificateProviderInstance() != nil:
			return nil, fmt.Errorf("%s.validation_context_certificate_provider_instance: certificate providers are not supported", f)
		case cv.GetDefaultValidationContext() == nil:
			return nil, fmt.Errorf("%s.default_validation_context: missing", f)
		}
		if err := checkSDS(f+".validation_context_sds_secret_config", cv.GetValidationContextSdsSecretConfig()); err != nil {
			return nil, err
		}
		// The default half alone must compile: its errors are the
		// configuration's, reported now rather than at every handshake.
		if _, err := compileValidation(f+".default_validation_context", cv.GetDefaultValidationContext(), nil, false); err != nil {
			return nil, err
		}
		return &validationSource{field: f, sds: cv.GetValidationContextSdsSecretConfig().GetName(),
			def: cv.GetDefaultValidationContext(), store: store}, nil
	default:
		return nil, fmt.Errorf("%s: validation context %T not supported", field, t)
	}
}

func checkSDS(field string, sc *tlsv3.SdsSecretConfig) error {
	switch {
	case sc == nil:
		return fmt.Errorf("%s: missing", field)
	case sc.GetName() == "":
		return fmt.Errorf("%s.name: empty", field)
	case sc.GetSdsConfig() == nil:
		return fmt.Errorf("%s (%s).sds_config: missing (static secrets are not supported)", field, sc.GetName())
	}
	return nil
}

// current is the validation a handshake applies now.
func (s *validationSource) current() (*validation, error) {
	if s.sds == "" {
		return s.static, nil
	}
	sec := s.store.Get(s.sds)
	if sec == nil {
		return nil, &reasonError{reason: fmt.Sprintf("validation secret %q not ready (SDS)", s.sds)}
	}
	if m := s.merged.Load(); m != nil && m.sec == sec {
		return m.v, m.err
	}
	m := &mergedValidation{sec: sec}
	m.v, m.err = s.merge(sec)
	s.merged.Store(m)
	return m.v, m.err
}

// merge is Envoy's combined context: the default context MergeFrom the
// SDS one, so the secret's singular fields win and repeated ones append.
func (s *validationSource) merge(sec *secrets.Secret) (*validation, error) {
	svc := sec.Msg.GetValidationContext()
	if svc == nil {
		return nil, &reasonError{reason: fmt.Sprintf("secret %q is not a validation_context", s.sds)}
	}
	vc := &tlsv3.CertificateValidationContext{}
	if s.def != nil {
		proto.Merge(vc, s.def)
	}
	proto.Merge(vc, svc)
	var roots *x509.CertPool
	if svc.GetTrustedCa() != nil {
		roots = sec.Pool
	}
	v, err := compileValidation(fmt.Sprintf("%s (secret %q)", s.field, s.sds), vc, roots, true)
	if err != nil {
		return nil, &reasonError{reason: err.Error(), err: err}
	}
	return v, nil
}
