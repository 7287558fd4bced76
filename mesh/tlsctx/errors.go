package tlsctx

import "errors"

// HandshakeError is a failed handshake. Reason is what Envoy puts in
// upstream_transport_failure_reason or the connection's failure details:
// a clear account of the cause ("verify SAN: ...", "certificate secret
// \"default\" not ready (SDS)", or the TLS library's error).
type HandshakeError struct {
	Reason string
	Err    error
}

func (e *HandshakeError) Error() string { return "TLS handshake: " + e.Reason }
func (e *HandshakeError) Unwrap() error { return e.Err }

// reasonError is an error of this package's callbacks (verification,
// secret lookup) carried through crypto/tls to the handshake's caller.
type reasonError struct {
	reason string
	err    error
}

func (e *reasonError) Error() string { return e.reason }
func (e *reasonError) Unwrap() error { return e.err }

// failed counts a failed handshake and names its reason.
func failed(st *Stats, err error) *HandshakeError {
	st.connectionError.Add(1)
	var re *reasonError
	if errors.As(err, &re) {
		return &HandshakeError{Reason: re.reason, Err: err}
	}
	return &HandshakeError{Reason: "TLS error: " + err.Error(), Err: err}
}
