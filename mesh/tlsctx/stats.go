package tlsctx

import (
	"crypto/tls"
	"sync/atomic"
)

// Stats are Envoy's ssl.* counters of one listener (listener.<addr>.ssl.*)
// or cluster (cluster.<name>.ssl.*). The zero value is ready; counters are
// atomics, a handshake bumps a few and allocates nothing. A context given
// nil Stats counts into a private block.
type Stats struct {
	handshake          atomic.Uint64
	connectionError    atomic.Uint64
	failVerifySAN      atomic.Uint64
	failVerifyError    atomic.Uint64
	failVerifyNoCert   atomic.Uint64
	failVerifyCertHash atomic.Uint64
	noCertificate      atomic.Uint64
	sessionReused      atomic.Uint64

	versions [len(versionNames)]atomic.Uint64
	ciphers  [len(cipherStatNames)]atomic.Uint64
	curves   [len(curveNames)]atomic.Uint64
}

// Stat is one counter, named as Envoy names it under the ssl. prefix.
type Stat struct {
	Name  string
	Value uint64
}

// versionNames are the protocol versions by index (versionIndex), for the
// versions.<v> counters, named as Envoy names them, by SSL_get_version:
// ssl.versions.TLSv1.3 in /stats, envoy_..._ssl_versions_TLSv1_3 in
// Prometheus.
var versionNames = [...]string{"TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"}

func versionIndex(v uint16) int {
	switch v {
	case tls.VersionTLS10:
		return 0
	case tls.VersionTLS11:
		return 1
	case tls.VersionTLS12:
		return 2
	case tls.VersionTLS13:
		return 3
	}
	return -1
}

// curveNames are the key exchanges by index (curveIndex), BoringSSL's
// names as Envoy's curves.<name> counters carry them.
var curveNames = [...]string{"X25519", "P-256", "P-384", "P-521", "X25519MLKEM768", "SecP256r1MLKEM768", "SecP384r1MLKEM1024"}

func curveIndex(c tls.CurveID) int {
	switch c {
	case tls.X25519:
		return 0
	case tls.CurveP256:
		return 1
	case tls.CurveP384:
		return 2
	case tls.CurveP521:
		return 3
	case tls.X25519MLKEM768:
		return 4
	case tls.SecP256r1MLKEM768:
		return 5
	case tls.SecP384r1MLKEM1024:
		return 6
	}
	return -1
}

// List is every fixed counter, then each version, cipher and curve seen at
// least once (Envoy creates those on first use), in a stable order.
func (s *Stats) List() []Stat {
	out := []Stat{
		{"connection_error", s.connectionError.Load()},
		{"fail_verify_cert_hash", s.failVerifyCertHash.Load()},
		{"fail_verify_error", s.failVerifyError.Load()},
		{"fail_verify_no_cert", s.failVerifyNoCert.Load()},
		{"fail_verify_san", s.failVerifySAN.Load()},
		{"handshake", s.handshake.Load()},
		{"no_certificate", s.noCertificate.Load()},
		{"session_reused", s.sessionReused.Load()},
	}
	for i := range s.ciphers {
		if v := s.ciphers[i].Load(); v > 0 {
			out = append(out, Stat{"ciphers." + cipherStatNames[i], v})
		}
	}
	for i := range s.curves {
		if v := s.curves[i].Load(); v > 0 {
			out = append(out, Stat{"curves." + curveNames[i], v})
		}
	}
	for i := range s.versions {
		if v := s.versions[i].Load(); v > 0 {
			out = append(out, Stat{"versions." + versionNames[i], v})
		}
	}
	return out
}

// handshakeDone counts a completed handshake as Envoy's logHandshake does.
func (s *Stats) handshakeDone(cs *tls.ConnectionState) {
	s.handshake.Add(1)
	if cs.DidResume {
		s.sessionReused.Add(1)
	}
	if i := versionIndex(cs.Version); i >= 0 {
		s.versions[i].Add(1)
	}
	if i := cipherIndex(cs.CipherSuite); i >= 0 {
		s.ciphers[i].Add(1)
	}
	if i := curveIndex(cs.CurveID); i >= 0 {
		s.curves[i].Add(1)
	}
}
