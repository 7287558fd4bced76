package httpconn

import (
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"time"
)

// resendBuffer bounds the copy of a request body kept without a retry
// policy: enough for the common API POST to be resent transparently when a
// reused upstream connection turns out dead (see h1Transport.RoundTrip),
// small enough that uploads do not all pay for a copy.
const resendBuffer = 64 << 10

// maxRetryBuffer is how much of a request body is kept to replay it on a
// retry (Envoy's per-connection buffer limit, 1 MiB); a larger body is
// streamed and not retried.
const maxRetryBuffer = 1 << 20

var (
	// errRetryBufferOverflow fails an attempt that needs body bytes that
	// were not kept (Envoy's "retry buffer overflow").
	errRetryBufferOverflow = errors.New("httpconn: request body exceeded the retry buffer limit; it cannot be sent again")
	// errStaleAttempt ends the body of an attempt that a later attempt
	// replaced (an HTTP/2 transport may still be reading it).
	errStaleAttempt = errors.New("httpconn: request body read by a superseded attempt")
)

// retryBody is the downstream request body as the router's attempts see it,
// Envoy's retry buffering: bytes go upstream as they arrive (a streaming
// gRPC call or upload is never held back) while a copy is kept, up to
// limit bytes, so that a retry can replay them and continue with the rest
// of the stream. When more than limit bytes have arrived the copy is
// dropped and the request is no longer replayable; the attempt in flight
// goes on.
//
// Attempts read through attemptBody. Only the newest attempt may read; an
// older one (an h2 transport's writer goroutine can outlive its attempt)
// gets errStaleAttempt. Reads of the downstream body are serialized by
// readMu, which is held across the blocking read but never while mu is
// wanted by another reader for long: mu only guards the bookkeeping.
type retryBody struct {
	src       io.Reader
	limit     int
	abandoned *atomic.Uint64 // retry_or_shadow_abandoned, counted on overflow; may be nil

	readMu sync.Mutex // held while reading src

	mu       sync.Mutex
	buf      []byte // bytes 0..total of the body, while !overflow
	total    int64  // bytes read from src
	gen      uint32 // the attempt allowed to read
	eof      bool
	err      error // src's error other than io.EOF, sticky
	overflow bool
}

// attemptBody is one attempt's view of a retryBody.
type attemptBody struct {
	b   *retryBody
	gen uint32
	off int64
}

func newRetryBody(src io.Reader, limit int, abandoned *atomic.Uint64) *retryBody {
	return &retryBody{src: src, limit: limit, abandoned: abandoned}
}

// attempt returns a reader from the body's first byte for a new attempt,
// which supersedes the previous one; ok is false once the body cannot be
// replayed (its copy overflowed, or the downstream body failed).
func (b *retryBody) attempt() (a *attemptBody, ok bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.gen > 0 && (b.overflow || b.err != nil) {
		return nil, false
	}
	b.gen++
	return &attemptBody{b: b, gen: b.gen}, true
}

// replayable reports whether another attempt can send the body again.
func (b *retryBody) replayable() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return !b.overflow && b.err == nil
}

// getBody is http.Request.GetBody: a new attempt over the kept bytes.
func (b *retryBody) getBody() (io.ReadCloser, error) {
	a, ok := b.attempt()
	if !ok {
		return nil, errRetryBufferOverflow
	}
	return a, nil
}

func (a *attemptBody) Read(p []byte) (int, error) {
	b := a.b
	for {
		b.mu.Lock()
		switch {
		case a.gen != b.gen:
			b.mu.Unlock()
			return 0, errStaleAttempt
		case a.off < b.total:
			if b.overflow {
				// A superseded reader took bytes past the limit.
				b.mu.Unlock()
				return 0, errRetryBufferOverflow
			}
			n := copy(p, b.buf[a.off:])
			a.off += int64(n)
			b.mu.Unlock()
			return n, nil
		case b.eof:
			b.mu.Unlock()
			return 0, io.EOF
		case b.err != nil:
			err := b.err
			b.mu.Unlock()
			return 0, err
		case len(p) == 0:
			b.mu.Unlock()
			return 0, nil
		}
		b.mu.Unlock()

		b.readMu.Lock()
		b.mu.Lock()
		if a.gen != b.gen || a.off < b.total || b.eof || b.err != nil {
			// Another reader moved the body on while we waited.
			b.mu.Unlock()
			b.readMu.Unlock()
			continue
		}
		b.mu.Unlock()
		n, err := b.src.Read(p)
		b.mu.Lock()
		if n > 0 {
			if !b.overflow {
				if len(b.buf)+n <= b.limit {
					b.buf = append(b.buf, p[:n]...)
				} else {
					b.overflow, b.buf = true, nil
					if b.abandoned != nil {
						b.abandoned.Add(1)
					}
				}
			}
			b.total += int64(n)
		}
		switch {
		case err == io.EOF:
			b.eof = true
		case err != nil:
			b.err = err
		}
		current := a.gen == b.gen
		if current {
			a.off += int64(n)
		}
		b.mu.Unlock()
		b.readMu.Unlock()
		if !current {
			return 0, errStaleAttempt
		}
		if n == 0 && err == nil {
			continue
		}
		return n, err
	}
}

// Close ends this attempt's use of the body; the downstream body stays
// open for a retry (net/http closes it when the handler returns).
func (a *attemptBody) Close() error { return nil }

// countingBody is the downstream request body: it counts bytes, touches
// the idle timer, stops request_timeout at its end, and remembers a read
// error (a malformed body is the client's fault: 400).
type countingBody struct {
	rc   io.ReadCloser
	n    atomic.Int64
	idle *idleWatch
	done *time.Timer
	err  error
	mu   sync.Mutex

	// ended is set once a read returned an error (io.EOF included): the
	// idle watch then no longer needs to unblock a read.
	ended atomic.Bool
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.rc.Read(p)
	b.n.Add(int64(n))
	b.idle.touch()
	if err != nil {
		b.ended.Store(true)
		if err == io.EOF {
			if b.done != nil {
				b.done.Stop()
			}
		} else {
			b.mu.Lock()
			b.err = err
			b.mu.Unlock()
		}
	}
	return n, err
}

func (b *countingBody) Close() error { return b.rc.Close() }

func (b *countingBody) readErr() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.err
}
