// Package sniff implements Envoy's tls_inspector and http_inspector
// listener filters. A listener whose filter chains match on server_names,
// transport_protocol or application_protocols cannot pick a chain until it
// has seen the connection's first bytes; this package reads those bytes
// ahead without consuming them (PeekConn), learns what Envoy would learn
// from them (Inspect), and hands the connection on with the bytes still to
// be read by the chosen chain.
//
// The parsers, ParseClientHello and DetectHTTP, are pure functions of the
// bytes seen so far: each says whether it has decided, cannot decide yet
// (ErrNeedMore), or will never match (ErrNotTLS, ErrNotHTTP). They decide
// as early as the bytes allow, so a connection that is neither TLS nor HTTP
// is not held back waiting for bytes that cannot change the answer.
package sniff

import "errors"

var (
	// ErrNeedMore means the bytes so far are a prefix of something the
	// inspector could still recognise: read more and ask again.
	ErrNeedMore = errors.New("sniff: need more bytes")
	// ErrNotTLS means the bytes cannot start a TLS ClientHello.
	ErrNotTLS = errors.New("sniff: not TLS")
	// ErrMalformed is wrapped by the errors for bytes that start like a
	// TLS handshake but are not a ClientHello Envoy would accept. Envoy
	// counts these as tls_not_found and goes on with raw_buffer.
	ErrMalformed = errors.New("sniff: malformed ClientHello")
	// ErrNotHTTP means the bytes cannot start an HTTP/1.x request or the
	// HTTP/2 connection preface.
	ErrNotHTTP = errors.New("sniff: not HTTP")
	// ErrTooLarge means an inspector read its whole budget without
	// deciding (a ClientHello beyond max_client_hello_size, a request line
	// beyond 64 KiB). Envoy closes such connections.
	ErrTooLarge = errors.New("sniff: listener filter read limit reached")
	// ErrTimeout means the listener filters' timeout passed before the
	// inspectors decided: a server-first protocol or a slow client. The
	// caller applies continue_on_listener_filters_timeout.
	ErrTimeout = errors.New("sniff: listener filters timeout")
)

const (
	// MaxClientHelloSize is tls_inspector's max_client_hello_size default
	// (and maximum): the bytes it reads before giving up.
	MaxClientHelloSize = 64 << 10
	// MaxRequestLineSize is http_inspector's MAX_INSPECT_SIZE: the bytes
	// it reads looking for the end of the request line.
	MaxRequestLineSize = 64 << 10
)
