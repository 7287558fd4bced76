package httpconn

import (
	"context"
	"net/http"
	"net/netip"
	"net/url"
	"sync"
	"time"

	"github.com/meshtun/meshtun/mesh/cluster"
)

// streamPool recycles streams with their timers (idle, route timeout),
// the h1 upstream request, URL and response body wrapper, and the tried
// hosts slice, so that a keep-alive request allocates none of them.
//
// What may still be used after a stream ends stays with that request and
// is not pooled: the idle watch when the request had a body (the body,
// which an h2 transport's writer can still read, touches it), and the
// request copy and body wrapper of the h2 path (never taken from here).
var streamPool = sync.Pool{New: func() any { return new(stream) }}

// streamReuse is what a pooled stream keeps across requests (embedded in
// stream); everything else is zeroed by init.
type streamReuse struct {
	idle  *idleWatch     // armed by stream_idle_timeout or the route's idle_timeout
	rto   *deadlineTimer // the route timeout; nil until a route has one
	msd   *deadlineTimer // the max stream duration; nil until one is set
	tried []*cluster.Host
	h1s   *h1Scratch // nil until an h1 attempt
}

// h1Scratch is the upstream request of one h1 attempt. The h1 transport
// is synchronous (the request is written and the response head read on
// the stream goroutine, the body closed before the next attempt), so one
// per stream serves all its attempts.
type h1Scratch struct {
	req  http.Request
	url  url.URL
	body h1Body
	// resp is the response the fast path parses into (h1fast.go); its
	// header map is kept and cleared by the next.
	resp http.Response

	// The last upstream address and its string (the request URL's host).
	addr    netip.AddrPort
	addrStr string
}

func (sc *h1Scratch) hostString(a netip.AddrPort) string {
	if sc.addrStr == "" || sc.addr != a {
		sc.addr, sc.addrStr = a, a.String()
	}
	return sc.addrStr
}

// release returns s to streamPool, its per-request state dropped. Called
// last, on the stream goroutine.
func (s *stream) release() {
	keep := s.streamReuse
	if s.body != nil {
		keep.idle = nil // the body may still touch it
	}
	if cap(keep.tried) <= 16 {
		clear(keep.tried[:cap(keep.tried)])
		keep.tried = keep.tried[:0]
	} else {
		keep.tried = nil
	}
	if h := keep.h1s; h != nil {
		h.req = http.Request{}
		h.url = url.URL{}
		h.body = h1Body{}
		hdr := h.resp.Header
		clear(hdr)
		h.resp = http.Response{Header: hdr}
	}
	*s = stream{streamReuse: keep}
	streamPool.Put(s)
}

// deadlineTimer is a reusable one-shot timeout that cancels a context with
// a cause: the route timeout and the max stream duration cancel the
// stream's context without a timer per request. Like
// idleWatch, a fire left from an earlier use checks the current deadline
// under mu, so it can neither cancel a later use early nor late.
type deadlineTimer struct {
	mu       sync.Mutex
	t        *time.Timer
	deadline int64 // nanotime; 0: disarmed
	cancel   context.CancelCauseFunc
	cause    error
}

// startCause arms the timer to call cancel(cause) after d.
func (dt *deadlineTimer) startCause(d time.Duration, cancel context.CancelCauseFunc, cause error) {
	dt.mu.Lock()
	dt.deadline = nanotime() + int64(d)
	dt.cancel, dt.cause = cancel, cause
	if dt.t == nil {
		dt.t = time.AfterFunc(d, dt.fire)
	} else {
		dt.t.Reset(d)
	}
	dt.mu.Unlock()
}

// stop disarms the timer.
func (dt *deadlineTimer) stop() {
	dt.mu.Lock()
	dt.deadline, dt.cancel = 0, nil
	if dt.t != nil {
		dt.t.Stop()
	}
	dt.mu.Unlock()
}

func (dt *deadlineTimer) fire() {
	dt.mu.Lock()
	if dt.deadline == 0 {
		dt.mu.Unlock()
		return
	}
	if rem := dt.deadline - nanotime(); rem > 0 {
		dt.t.Reset(time.Duration(rem))
		dt.mu.Unlock()
		return
	}
	cancel, cause := dt.cancel, dt.cause
	dt.deadline, dt.cancel = 0, nil
	dt.mu.Unlock()
	cancel(cause)
}
