package httpconn

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/meshtun/meshtun/mesh/cluster"
)

// h1Transport is the upstream HTTP/1.1 client. Unlike http.Transport,
// which runs a read and a write goroutine per connection and hands every
// request and response between them, it writes the request and reads the
// response on the calling (stream) goroutine: on a proxy with one or two
// processors those hand-offs were the largest share of added tail latency.
// Connections are kept per host address and reused (keep-alive); a
// connection is returned to the pool when its response body reaches EOF.
// A request without a body is written, and a response head of known
// length that arrived whole is parsed, without net/http's Request.Write
// and ReadResponse (h1fast.go), which remain for everything else.
type h1Transport struct {
	cp *clusterPool

	mu      sync.Mutex
	idle    map[string][]*h1Conn   // by host address, most recent last
	waiters map[string][]*h1Waiter // by host address, oldest first
	closed  bool

	resent atomic.Uint64 // requests resent after a reused connection failed
}

type h1Conn struct {
	pc       *pooledConn
	lim      headLimit // br's source: bounds the bytes read for response heads
	br       *bufio.Reader
	bw       *bufio.Writer
	addr     string
	idleFrom time.Time
	killFn   func() // kill as a func, made once: the cancel callback of every exchange
	clb      clBody // the body of a response the fast path parsed (h1fast.go)

	// The idle check (alive): the socket's RawConn and the peek callback
	// are made once per connection so that a check allocates nothing.
	raw     syscall.RawConn
	peekFn  func(fd uintptr) bool
	peekBuf [1]byte
	peekErr error
}

// idleCheckAfter is how long a pooled connection must have sat idle
// before a bodiless request checks it (alive) at checkout. The check is a
// system call, one per request under load, and what it finds is the
// upstream's close of an idle keep-alive connection, which servers do on
// an idle timeout of seconds (Go's net/http, Node, nginx, Envoy: 5 s to
// 1 h). A connection reused within a couple of milliseconds of its last
// response has almost never met that close; when it has (an upstream
// that closes right after a response without "Connection: close"), the
// request finds the end of stream before any response byte and, having
// no body, is sent again on a new connection (roundTrip), as it is when
// the close races the write anyway. A request with a body is always
// checked: its resend depends on its body still being buffered. (A
// variable for the tests only.)
var idleCheckAfter = 2 * time.Millisecond

// Upstream response heads are bounded as Envoy bounds them (60 KiB and
// 100 headers by default): an upstream that sends an endless head, or an
// endless run of 1xx responses, must not grow the proxy's heap. Beyond,
// the request fails as an upstream protocol error (503, UPE).
const (
	h1ReadBuffer         = 16 << 10
	maxResponseHeadBytes = DefaultMaxHeadersKB << 10
	maxResponseHeaders   = DefaultMaxHeadersCount
	// maxInformational bounds the 1xx responses relayed before the final
	// one (100 Continue, 102 Processing, 103 Early Hints: a handful in
	// real use).
	maxInformational = 16
)

// errUpstreamHead fails an exchange whose response head broke the limits.
var errUpstreamHead = errors.New("httpconn: upstream response head exceeds the limits (60 KiB, 100 headers, 16 informational responses)")

// headLimit is the h1 connection's reader under its bufio.Reader: while
// a response head is read, n bounds the bytes that may still come from
// the socket (the head, and what bufio reads ahead past it); n < 0 is no
// bound (bodies).
type headLimit struct {
	r io.Reader
	n int64
}

func (l *headLimit) Read(p []byte) (int, error) {
	if l.n < 0 {
		return l.r.Read(p)
	}
	if l.n == 0 {
		return 0, errUpstreamHead
	}
	if int64(len(p)) > l.n {
		p = p[:l.n]
	}
	m, err := l.r.Read(p)
	l.n -= int64(m)
	return m, err
}

// tooManyHeaders reports whether h has more than max field lines.
func tooManyHeaders(h http.Header, max int) bool {
	n := 0
	for _, vs := range h {
		if n += len(vs); n > max {
			return true
		}
	}
	return false
}

// errPendingOverflow: max_pending_requests is reached (503 UO, as Envoy's
// upstream_rq_pending_overflow).
var errPendingOverflow = errors.New("httpconn: upstream pending requests overflow (circuit breaker max_pending_requests)")

// errUpgradeCut: the exchange was cancelled as its 101 arrived.
var errUpgradeCut = errors.New("httpconn: upgrade cancelled as the upstream switched protocols")

func newH1Conn(pc *pooledConn, addr string) *h1Conn {
	c := &h1Conn{pc: pc, addr: addr}
	// A plaintext TCP socket is read and written with raw system calls
	// by the cluster's UpstreamConn (internal/rawsock).
	c.bw = bufio.NewWriterSize(pc, 16<<10)
	c.lim = headLimit{r: pc, n: -1}
	c.br = bufio.NewReaderSize(&c.lim, h1ReadBuffer)
	c.killFn = c.kill
	if tc := pc.TCPConn(); tc != nil && canPeek {
		if raw, err := tc.SyscallConn(); err == nil {
			c.raw = raw
			c.peekFn = c.peek
		}
	}
	return c
}

// kill unblocks the connection's I/O for good (a cancelled exchange).
func (c *h1Conn) kill() { c.pc.SetDeadline(time.Unix(1, 0)) }

// alive reports whether an idle connection can carry a request: the
// upstream has not closed or reset it and sent nothing unasked. It peeks
// at the kernel socket without blocking (MSG_PEEK|MSG_DONTWAIT): no
// goroutine watches idle connections, so this is where a keep-alive
// connection the upstream closed while idle is found and dropped, before
// a request is written into it.
func (c *h1Conn) alive() bool {
	if c.br.Buffered() > 0 {
		return false // bytes after the last response: out of step
	}
	if c.raw == nil {
		return true
	}
	if err := c.raw.Read(c.peekFn); err != nil {
		return false
	}
	return peekIdle(c.peekErr)
}

func newH1Transport(cp *clusterPool) *h1Transport {
	return &h1Transport{cp: cp, idle: map[string][]*h1Conn{}}
}

// get returns an idle connection to addr, or nil. Connections past the
// pool's idle timeout or found dead are closed and skipped; the liveness
// check runs outside the lock. For a bodiless request, a connection idle
// for less than idleCheckAfter is not checked (see there).
func (t *h1Transport) get(addr string, bodiless bool) *h1Conn {
	to := t.cp.opts.IdleTimeout
	for {
		t.mu.Lock()
		cs := t.idle[addr]
		if len(cs) == 0 {
			t.mu.Unlock()
			return nil
		}
		c := cs[len(cs)-1]
		cs[len(cs)-1] = nil
		t.idle[addr] = cs[:len(cs)-1]
		t.mu.Unlock()
		idle := time.Since(c.idleFrom)
		if to > 0 && idle > to {
			c.pc.Close()
			continue
		}
		if bodiless && idle < idleCheckAfter {
			if c.br.Buffered() == 0 {
				return c
			}
		} else if c.alive() {
			return c
		}
		c.pc.Close()
	}
}

func (t *h1Transport) put(c *h1Conn) {
	t.mu.Lock()
	if t.closed || t.cp.closed.Load() {
		t.mu.Unlock()
		c.pc.Close()
		return
	}
	if len(t.waiters) > 0 {
		if ws := t.waiters[c.addr]; len(ws) > 0 {
			// A request waits for a connection (max_connections): it
			// takes this one, oldest first, as Envoy's pending queue.
			w := ws[0]
			copy(ws, ws[1:])
			ws[len(ws)-1] = nil
			if ws = ws[:len(ws)-1]; len(ws) == 0 {
				delete(t.waiters, c.addr)
			} else {
				t.waiters[c.addr] = ws
			}
			t.mu.Unlock()
			w.ch <- c // buffered: never blocks
			return
		}
	}
	c.idleFrom = time.Now()
	t.idle[c.addr] = append(t.idle[c.addr], c)
	t.mu.Unlock()
}

// h1Waiter is a request waiting, as pending, for a connection to its host
// while the cluster's max_connections is reached.
type h1Waiter struct{ ch chan *h1Conn } // buffered 1: put hands over without blocking

// takeOrWait returns an idle connection to addr, or, when there is none,
// registers w to be handed the next one put back (both under t.mu, so a
// connection put in between is not missed). The idle connection is not
// checked here; the caller does it.
func (t *h1Transport) takeOrWait(addr string, w *h1Waiter) *h1Conn {
	t.mu.Lock()
	defer t.mu.Unlock()
	if cs := t.idle[addr]; len(cs) > 0 {
		c := cs[len(cs)-1]
		cs[len(cs)-1] = nil
		t.idle[addr] = cs[:len(cs)-1]
		return c
	}
	if t.waiters == nil {
		t.waiters = map[string][]*h1Waiter{}
	}
	t.waiters[addr] = append(t.waiters[addr], w)
	return nil
}

// cancelWait unregisters w; if put already chose it, the connection it
// was handed is returned.
func (t *h1Transport) cancelWait(addr string, w *h1Waiter) *h1Conn {
	t.mu.Lock()
	ws := t.waiters[addr]
	for i, x := range ws {
		if x == w {
			copy(ws[i:], ws[i+1:])
			ws[len(ws)-1] = nil
			if ws = ws[:len(ws)-1]; len(ws) == 0 {
				delete(t.waiters, addr)
			} else {
				t.waiters[addr] = ws
			}
			t.mu.Unlock()
			return nil
		}
	}
	t.mu.Unlock()
	return <-w.ch // put removed w and is handing it a connection
}

// connect returns a new connection to addr (host h) for a pending
// request. While the cluster's max_connections is reached (ConnectHost
// fails with ErrOverflow, counting upstream_cx_overflow) the request does
// not fail, as in Envoy's pool: it waits, still pending, for whichever
// comes first: a connection to its host released to the pool (handed over
// by put), a connection slot freed anywhere in the cluster (then it dials
// again), or the end of ctx (route timeout, downstream gone). handed
// reports a connection that carried requests before.
func (t *h1Transport) connect(ctx context.Context, addr string, h *cluster.Host) (c *h1Conn, handed bool, err error) {
	cl := t.cp.c
	res := cl.Resources(cluster.PriorityDefault)
	var freed <-chan struct{}
	var w *h1Waiter
	for {
		if freed == nil && res.Connections() >= int64(res.Thresholds().MaxConnections) {
			// Armed before the dial that may overflow, so that a release
			// in between wakes us.
			freed = cl.ConnectionReleased()
		}
		pc, err := t.cp.dialHost(ctx, addr, h, false, false)
		if err == nil {
			return newH1Conn(pc, addr), false, nil
		}
		if !errors.Is(err, cluster.ErrOverflow) {
			return nil, false, err
		}
		if freed == nil {
			// The breaker filled up since the check: arm, try again.
			freed = cl.ConnectionReleased()
			continue
		}
		if w == nil {
			w = &h1Waiter{ch: make(chan *h1Conn, 1)}
		}
		if c := t.takeOrWait(addr, w); c != nil {
			if c.alive() {
				return c, true, nil
			}
			c.pc.Close() // frees a slot: dial again
			continue
		}
		select {
		case c := <-w.ch:
			return c, true, nil
		case <-freed:
			freed = nil
			if c := t.cancelWait(addr, w); c != nil {
				return c, true, nil
			}
		case <-ctx.Done():
			if c := t.cancelWait(addr, w); c != nil {
				t.put(c) // to the next waiter, or idle
			}
			return nil, false, ctx.Err()
		}
	}
}

// CloseIdleConnections closes the connections no request uses.
func (t *h1Transport) CloseIdleConnections() {
	t.mu.Lock()
	idle := t.idle
	t.idle = map[string][]*h1Conn{}
	t.mu.Unlock()
	for _, cs := range idle {
		for _, c := range cs {
			c.pc.Close()
		}
	}
}

// closeIdleExcept closes the idle connections to addresses keep rejects
// (hosts no longer in the cluster) and those idle past the pool's idle
// timeout, and drops the addresses left without any: run by the pool's
// sweep (clusterPool.sweep), since get, which otherwise finds them, is
// never called again for an address that left the cluster.
func (t *h1Transport) closeIdleExcept(keep func(addr string) bool) {
	to := t.cp.opts.IdleTimeout
	now := time.Now()
	var closing []*h1Conn
	t.mu.Lock()
	for addr, cs := range t.idle {
		kept := cs[:0]
		for _, c := range cs {
			if !keep(addr) || (to > 0 && now.Sub(c.idleFrom) > to) {
				closing = append(closing, c)
			} else {
				kept = append(kept, c)
			}
		}
		clear(cs[len(kept):])
		if len(kept) == 0 {
			delete(t.idle, addr)
		} else {
			t.idle[addr] = kept
		}
	}
	t.mu.Unlock()
	for _, c := range closing {
		c.pc.Close()
	}
}

// RoundTrip is http.RoundTripper for callers that carry the picked host
// in the request's context (hostKey); the router calls roundTrip.
func (t *h1Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	h, _ := req.Context().Value(hostKey{}).(*cluster.Host)
	return t.roundTrip(req.Context(), req, h, nil)
}

// roundTrip sends req under ctx (req's own context is not used: the
// router saves the request copy WithContext would make) on a pooled
// connection to req.URL.Host, the address of h, and reads the response
// head.
//
// Only a request that needs a new connection is pending: it holds a
// max_pending_requests slot while it dials, or while it waits for a
// connection because max_connections is reached (connect), as in Envoy,
// where a request that finds a ready connection is never queued.
//
// A request on a reused connection that fails before the upstream can
// have processed any of it (the write failed, or the connection closed
// before a response byte: the upstream had closed it while idle and the
// idle check at checkout lost the race with its FIN) is sent once more on
// a new connection, when its body can be sent again (GetBody: empty, or
// still within its retry/resend buffer).
//
// sc, if not nil, is where the response and its body wrapper are made
// (the stream's, reused across its attempts); they must not be in use.
func (t *h1Transport) roundTrip(ctx context.Context, req *http.Request, h *cluster.Host, sc *h1Scratch) (*http.Response, error) {
	addr := req.URL.Host
	for try := 0; ; try++ {
		var c *h1Conn
		if try == 0 {
			c = t.get(addr, req.Body == nil)
		}
		reused := c != nil
		if c == nil {
			relPending, ok := t.cp.c.TryAcquirePending()
			if !ok {
				return nil, errPendingOverflow
			}
			nc, handed, err := t.connect(ctx, addr, h)
			relPending()
			if err != nil {
				return nil, err
			}
			c, reused = nc, handed
		}
		resp, err, retry := t.exchange(ctx, c, req, sc)
		if err == nil {
			return resp, nil
		}
		c.pc.Close()
		if !reused || try > 0 || !retry || (req.Body != nil && req.GetBody == nil) {
			return nil, err
		}
		if req.GetBody != nil {
			b, gerr := req.GetBody()
			if gerr != nil {
				return nil, err
			}
			r2 := *req
			r2.Body = b
			req = &r2
		}
		t.resent.Add(1)
	}
}

// exchange writes req and reads the response head on c. retry reports
// that no byte of a response arrived (the request may be resent).
func (t *h1Transport) exchange(ctx context.Context, c *h1Conn, req *http.Request, sc *h1Scratch) (*http.Response, error, bool) {
	// Cancellation (per-try timeout, downstream gone) unblocks the I/O.
	stop := context.AfterFunc(ctx, c.killFn)
	var wdone chan error
	if req.ContentLength < 0 && req.Body != nil {
		// A body of unknown length (chunked: a stream, such as a
		// bidirectional call) is written while the response is read, as
		// Envoy relays both directions at once: the upstream may answer
		// (and stream its answer) before the request ends. Each chunk is
		// flushed as it is written (net/http does, writing a request into
		// a bufio.Writer). A request of known length stays on this
		// goroutine: no hand-off. The writer has its own copy of the
		// request (the router's is reused by its next attempt or request)
		// and may outlive the exchange while it waits for the downstream
		// body: closing the connection ends its writes, the end of the
		// downstream request its reads.
		wreq, wurl := *req, *req.URL
		wreq.URL = &wurl
		wdone = make(chan error, 1)
		go func() {
			err := wreq.Write(c.bw)
			if err == nil {
				err = c.bw.Flush()
			}
			if err != nil {
				// A failed body (the client's malformed chunk, say)
				// leaves the upstream waiting for the rest: closing ends
				// the response read too, and the router sees the body's
				// error.
				c.pc.Close()
			}
			wdone <- err
		}()
	} else {
		if !writeH1Request(c.bw, req) {
			if err := req.Write(c.bw); err != nil {
				stop()
				return nil, ctxErr(ctx, err), ctx.Err() == nil
			}
		}
		if err := c.bw.Flush(); err != nil {
			stop()
			return nil, ctxErr(ctx, err), ctx.Err() == nil
		}
	}
	// The first response byte tells a dead connection (EOF, reset, EPIPE
	// with nothing received) from a failed response.
	c.lim.n = maxResponseHeadBytes + h1ReadBuffer - int64(c.br.Buffered())
	if _, err := c.br.Peek(1); err != nil {
		stop()
		c.lim.n = -1
		if wdone != nil {
			c.pc.Close() // ends the writer's writes
			return nil, ctxErr(ctx, err), false
		}
		return nil, ctxErr(ctx, err), ctx.Err() == nil
	}
	for informational := 0; ; informational++ {
		var resp *http.Response
		var err error
		if sc != nil && informational == 0 {
			if ok, tooMany := fastResponse(c.br, req, &sc.resp, &c.clb); ok {
				resp = &sc.resp
			} else if tooMany {
				err = errUpstreamHead
			}
		}
		if resp == nil && err == nil {
			resp, err = http.ReadResponse(c.br, req)
			if err == nil && (informational > maxInformational || tooManyHeaders(resp.Header, maxResponseHeaders)) {
				err = errUpstreamHead
			}
		}
		if err != nil {
			stop()
			c.lim.n = -1
			if wdone != nil {
				c.pc.Close()
			}
			if errors.Is(err, errUpstreamHead) {
				return nil, err, false
			}
			return nil, ctxErr(ctx, err), false
		}
		if resp.StatusCode >= 100 && resp.StatusCode < 200 && resp.StatusCode != http.StatusSwitchingProtocols {
			continue // 1xx informational: the final response follows
		}
		c.lim.n = -1
		if isTunnel(req, resp) && wdone == nil {
			// The connection is the tunnel's now (tunnel.go): the
			// exchange's timeouts (route, per-try) end here; the tunnel
			// has its own.
			if !stop() {
				c.pc.Close()
				return nil, ctxErr(ctx, errUpgradeCut), false
			}
			resp.Body = &upgradedConn{c: c}
			return resp, nil, false
		}
		var body *h1Body
		if sc != nil {
			body = &sc.body
		} else {
			body = new(h1Body)
		}
		*body = h1Body{rc: resp.Body, c: c, t: t, stop: stop, keep: !resp.Close && !req.Close, ctx: ctx, wdone: wdone}
		resp.Body = body
		return resp, nil, false
	}
}

// isTunnel reports a response after which the connection carries a
// tunnel's bytes: a 101 to an upgrade, a 2xx to a CONNECT (RFC 9110
// §9.3.6: the connection is the tunnel from the end of the head).
func isTunnel(req *http.Request, resp *http.Response) bool {
	if resp.StatusCode == http.StatusSwitchingProtocols {
		return true
	}
	return req.Method == http.MethodConnect && resp.StatusCode >= 200 && resp.StatusCode < 300
}

func ctxErr(ctx context.Context, err error) error {
	if cerr := ctx.Err(); cerr != nil {
		return cerr
	}
	return err
}

// h1Body returns its connection to the pool at EOF, or closes it when the
// body is abandoned early (the rest of the response would be in the way).
type h1Body struct {
	rc   io.ReadCloser
	c    *h1Conn
	t    *h1Transport
	stop func() bool
	keep bool
	ctx  context.Context
	done bool
	// wdone, for a request body written while the response is read,
	// reports the writer's end: the connection is reused only when the
	// request was written whole before the response ended.
	wdone chan error
}

func (b *h1Body) Read(p []byte) (int, error) {
	if b.done {
		return 0, io.EOF
	}
	n, err := b.rc.Read(p)
	if err == io.EOF {
		b.finish(true)
	} else if err != nil {
		err = ctxErr(b.ctx, err)
		b.finish(false)
	}
	return n, err
}

func (b *h1Body) Close() error {
	if !b.done {
		b.finish(false)
	}
	return nil
}

func (b *h1Body) finish(ok bool) {
	b.done = true
	if b.wdone != nil {
		select {
		case err := <-b.wdone:
			ok = ok && err == nil
		default:
			ok = false // still writing: the connection is closed, which ends the writer
		}
	}
	if !b.stop() || !ok || !b.keep {
		// The cancel callback ran (the deadline is set) or the body did
		// not end cleanly: the connection cannot carry another request.
		b.c.pc.Close()
		return
	}
	b.t.put(b.c)
}

var _ net.Conn = (*pooledConn)(nil)
