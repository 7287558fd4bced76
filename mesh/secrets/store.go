package secrets

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
)

// Secret is one secret in force, as received.
type Secret struct {
	Name        string
	Version     string
	LastUpdated time.Time
	Msg         *tlsv3.Secret
	// Certs are the certificates of the secret, parsed once: the chain of a
	// tls_certificate (leaf first) or the trusted CAs of a validation context.
	Certs []*x509.Certificate
	// TLS is a tls_certificate's key pair ready for crypto/tls (Leaf
	// set), Pool a validation context's trusted CAs: parsed once per
	// version so a handshake parses nothing.
	TLS  *tls.Certificate
	Pool *x509.CertPool
}

// state is an immutable view of the store, swapped whole.
type state struct {
	active map[string]*Secret
	refs   *Refs
	// since is when each referenced name was first referenced (kept
	// while it stays referenced): a resource waiting for it goes into
	// force without it once its initial_fetch_timeout has passed since.
	since map[string]time.Time
}

// Store holds the secrets the configuration in force references. Readers
// (admin, later the TLS contexts) load one immutable state without
// locking; writers (the SDS client, a configuration change) serialise on
// a mutex and publish a new state.
type Store struct {
	mu  sync.Mutex
	cur atomic.Pointer[state]
	// arrived is signalled (without blocking, coalesced) when a referenced
	// name gets its first secret: what waits for it may go into force.
	arrived chan struct{}
}

// NewStore returns an empty store.
func NewStore() *Store {
	s := &Store{arrived: make(chan struct{}, 1)}
	s.cur.Store(&state{active: map[string]*Secret{}, refs: &Refs{Names: map[string]Source{}}, since: map[string]time.Time{}})
	return s
}

// SetRefs makes refs the references of the configuration (in force and
// warming): secrets no longer referenced are dropped, as Envoy drops a
// secret with its last user.
func (s *Store) SetRefs(refs *Refs) {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.cur.Load()
	now := time.Now()
	next := &state{active: map[string]*Secret{}, refs: refs, since: make(map[string]time.Time, len(refs.Names))}
	for name := range refs.Names {
		if t, ok := old.since[name]; ok {
			next.since[name] = t
		} else {
			next.since[name] = now
		}
		if sec := old.active[name]; sec != nil {
			next.active[name] = sec
		}
	}
	s.cur.Store(next)
}

// Since is when name was first referenced by the configuration (zero if
// it is not referenced).
func (s *Store) Since(name string) time.Time { return s.cur.Load().since[name] }

// Arrived is signalled when a referenced secret that was missing arrives.
// Signals coalesce: a receiver checks what it waits for after each one.
// An update of a secret already present does not signal: new handshakes
// read it from the store, nothing in the configuration changes.
func (s *Store) Arrived() <-chan struct{} { return s.arrived }

// Put validates sec and makes it the secret name's version in force. The
// error names the secret and field; the previous version stays then.
func (s *Store) Put(version string, sec *tlsv3.Secret, at time.Time) error {
	p, err := parse(sec)
	if err != nil {
		return fmt.Errorf("secret %q: %w", sec.GetName(), err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.cur.Load()
	if _, ok := old.refs.Names[sec.GetName()]; !ok {
		return nil // no longer referenced: a late response
	}
	next := &state{active: maps.Clone(old.active), refs: old.refs, since: old.since}
	_, had := old.active[sec.GetName()]
	next.active[sec.GetName()] = &Secret{Name: sec.GetName(), Version: version, LastUpdated: at, Msg: sec, Certs: p.certs, TLS: p.tls, Pool: p.pool}
	s.cur.Store(next)
	if !had {
		select {
		case s.arrived <- struct{}{}:
		default: // a signal is pending already
		}
	}
	return nil
}

// Get is the secret name in force, or nil.
func (s *Store) Get(name string) *Secret { return s.cur.Load().active[name] }

// Active is every secret in force, sorted by name.
func (s *Store) Active() []*Secret {
	st := s.cur.Load()
	out := make([]*Secret, 0, len(st.active))
	for _, n := range slices.Sorted(maps.Keys(st.active)) {
		out = append(out, st.active[n])
	}
	return out
}

// Warming is the referenced secrets not received yet, sorted.
func (s *Store) Warming() []string {
	st := s.cur.Load()
	var out []string
	for n := range st.refs.Names {
		if _, ok := st.active[n]; !ok {
			out = append(out, n)
		}
	}
	slices.Sort(out)
	return out
}

// Refs is the references in force.
func (s *Store) Refs() *Refs { return s.cur.Load().refs }

// parsed is what parse makes of a secret.
type parsed struct {
	certs []*x509.Certificate
	tls   *tls.Certificate
	pool  *x509.CertPool
}

// parse checks a Secret of the two kinds istiod's configuration uses and
// returns its certificates, parsed for the handshakes.
func parse(sec *tlsv3.Secret) (parsed, error) {
	if sec.GetName() == "" {
		return parsed{}, errors.New("name: empty")
	}
	switch {
	case sec.GetTlsCertificate() != nil:
		tc := sec.GetTlsCertificate()
		chain, err := inline(tc.GetCertificateChain(), "tls_certificate.certificate_chain")
		if err != nil {
			return parsed{}, err
		}
		key, err := inline(tc.GetPrivateKey(), "tls_certificate.private_key")
		if err != nil {
			return parsed{}, err
		}
		certs, err := ParseCertificates(chain, "tls_certificate.certificate_chain")
		if err != nil {
			return parsed{}, err
		}
		pair, err := tls.X509KeyPair(chain, key)
		if err != nil {
			return parsed{}, fmt.Errorf("tls_certificate: %w", err)
		}
		return parsed{certs: certs, tls: &pair}, nil
	case sec.GetValidationContext() != nil:
		ca, err := inline(sec.GetValidationContext().GetTrustedCa(), "validation_context.trusted_ca")
		if err != nil {
			return parsed{}, err
		}
		certs, err := ParseCertificates(ca, "validation_context.trusted_ca")
		if err != nil {
			return parsed{}, err
		}
		pool := x509.NewCertPool()
		for _, c := range certs {
			pool.AddCert(c)
		}
		return parsed{certs: certs, pool: pool}, nil
	}
	return parsed{}, errors.New("type: want tls_certificate or validation_context")
}

// inline is the bytes of an inline data source: SDS secrets carry their
// data, files are not read by the proxy.
func inline(ds *corev3.DataSource, field string) ([]byte, error) {
	switch {
	case ds == nil:
		return nil, fmt.Errorf("%s: missing", field)
	case ds.GetInlineBytes() != nil:
		return ds.GetInlineBytes(), nil
	case ds.GetInlineString() != "":
		return []byte(ds.GetInlineString()), nil
	}
	return nil, fmt.Errorf("%s: only inline_bytes or inline_string are supported", field)
}

// ParseCertificates parses the PEM certificates of p (other blocks are
// skipped); none is an error naming field. TLS contexts' inline trust
// bundles use it too.
func ParseCertificates(p []byte, field string) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var b *pem.Block
		b, p = pem.Decode(p)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: certificate %d: %w", field, len(out), err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s: no PEM certificate", field)
	}
	return out, nil
}
