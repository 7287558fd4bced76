package sniff

import (
	"context"
	"errors"
	"io"
	"time"
)

// Transport protocols as Envoy's filter-chain match sees them.
const (
	TransportTLS       = "tls"
	TransportRawBuffer = "raw_buffer"
)

// Result is what the listener filters learned about a connection: the
// inputs of Envoy's filter-chain match that the bytes decide.
type Result struct {
	TransportProtocol    string // TransportTLS or TransportRawBuffer
	ServerName           string // SNI, lower-cased; "" without TLS or SNI
	ApplicationProtocols []string
}

// Inspect runs Envoy's tls_inspector (wantTLS) and http_inspector
// (wantHTTP) on the first bytes of pc, reading ahead until both have
// decided, and leaves those bytes for pc's Read.
//
// As in Envoy, where the listener filters run in order, http_inspector
// gives way when tls_inspector found TLS: the result then carries the
// ClientHello's SNI and ALPN; otherwise the transport is raw_buffer and
// the application protocol, if any, is http_inspector's. Both look at the
// same bytes, so neither waits for the other.
//
// Inspection ends early, with what is known so far, when the client ends
// its stream (no error: a half-closed client still gets its chain) or
// when timeout (listener_filters_timeout; 0 waits for ever) passes: then
// the error is ErrTimeout, for the caller to apply
// continue_on_listener_filters_timeout. ErrTooLarge (an inspector read its
// whole budget), ctx's error and read errors are returned as they come;
// Envoy closes the connection in those cases.
func Inspect(ctx context.Context, pc *PeekConn, wantTLS, wantHTTP bool, timeout time.Duration) (Result, error) {
	res := Result{TransportProtocol: TransportRawBuffer}
	if !wantTLS && !wantHTTP {
		return res, nil
	}
	var deadline time.Time
	if timeout > 0 {
		deadline = time.Now().Add(timeout)
	}
	tlsPending, httpPending := wantTLS, wantHTTP
	tlsNeed := 0 // re-parse the ClientHello only once this many bytes are in
	var http httpDetector
	err := pc.Peek(ctx, deadline, func(b []byte) error {
		if tlsPending && len(b) >= tlsNeed {
			ch, need, err := parseClientHello(b)
			switch {
			case err == nil:
				res = Result{TransportProtocol: TransportTLS, ServerName: ch.ServerName, ApplicationProtocols: ch.ALPN.Strings()}
				return nil
			case err == ErrNeedMore:
				tlsNeed = need
			case errors.Is(err, ErrTooLarge):
				return err
			default: // not TLS: Envoy's tls_not_found
				tlsPending = false
			}
		}
		if httpPending {
			r, err := http.detect(b)
			switch {
			case err == nil:
				res.ApplicationProtocols = []string{r.Protocol}
				httpPending = false
			case err == ErrNeedMore:
			case errors.Is(err, ErrTooLarge):
				return err
			default: // Envoy's http_not_found
				httpPending = false
			}
		}
		if tlsPending || httpPending {
			return ErrNeedMore
		}
		return nil
	})
	if errors.Is(err, io.EOF) {
		return res, nil
	}
	return res, err
}
