package httpconn

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"sync"
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
type h1Transport struct {
	cp *clusterPool

	mu     sync.Mutex
	idle   map[string][]*h1Conn // by host address, most recent last
	closed bool
}

type h1Conn struct {
	pc       *pooledConn
	br       *bufio.Reader
	bw       *bufio.Writer
	addr     string
	idleFrom time.Time
}

var errH1Closed = errors.New("httpconn: upstream pool closed")

func newH1Transport(cp *clusterPool) *h1Transport {
	return &h1Transport{cp: cp, idle: map[string][]*h1Conn{}}
}

// get returns an idle connection to addr, or nil.
func (t *h1Transport) get(addr string) *h1Conn {
	t.mu.Lock()
	defer t.mu.Unlock()
	for {
		cs := t.idle[addr]
		if len(cs) == 0 {
			return nil
		}
		c := cs[len(cs)-1]
		t.idle[addr] = cs[:len(cs)-1]
		if to := t.cp.opts.IdleTimeout; to > 0 && time.Since(c.idleFrom) > to {
			c.pc.Close()
			continue
		}
		return c
	}
}

func (t *h1Transport) put(c *h1Conn) {
	t.mu.Lock()
	if t.closed || t.cp.closed.Load() {
		t.mu.Unlock()
		c.pc.Close()
		return
	}
	c.idleFrom = time.Now()
	t.idle[c.addr] = append(t.idle[c.addr], c)
	t.mu.Unlock()
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

// RoundTrip sends req on a pooled connection to req.URL.Host (the host the
// router picked, in the context) and reads the response head. A request on
// a reused connection that fails before any response byte (the upstream
// closed it while idle) is sent once more on a new connection when its
// body can be sent again, as http.Transport does.
func (t *h1Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx := req.Context()
	addr := req.URL.Host
	for try := 0; ; try++ {
		c := t.get(addr)
		reused := c != nil
		if c == nil {
			h, _ := ctx.Value(hostKey{}).(*cluster.Host)
			pc, err := t.cp.dialHost(ctx, addr, h, false, false)
			if err != nil {
				return nil, err
			}
			c = &h1Conn{pc: pc, br: bufio.NewReaderSize(pc, 16<<10), bw: bufio.NewWriterSize(pc, 16<<10), addr: addr}
		}
		if tr := httptrace.ContextClientTrace(ctx); tr != nil && tr.GotConn != nil {
			tr.GotConn(httptrace.GotConnInfo{Conn: c.pc, Reused: reused})
		}
		resp, err, retry := t.exchange(ctx, c, req)
		if err == nil {
			return resp, nil
		}
		c.pc.Close()
		if !reused || !retry || try > 0 || (req.Body != nil && req.GetBody == nil) {
			return nil, err
		}
		if req.GetBody != nil {
			b, gerr := req.GetBody()
			if gerr != nil {
				return nil, err
			}
			req = req.Clone(ctx)
			req.Body = b
		}
	}
}

// exchange writes req and reads the response head on c. retry reports
// that nothing of a response arrived (the request may be resent).
func (t *h1Transport) exchange(ctx context.Context, c *h1Conn, req *http.Request) (*http.Response, error, bool) {
	// Cancellation (per-try timeout, downstream gone) unblocks the I/O.
	stop := context.AfterFunc(ctx, func() { c.pc.SetDeadline(time.Unix(1, 0)) })
	if err := req.Write(c.bw); err != nil {
		stop()
		return nil, ctxErr(ctx, err), ctx.Err() == nil
	}
	if err := c.bw.Flush(); err != nil {
		stop()
		return nil, ctxErr(ctx, err), ctx.Err() == nil
	}
	for {
		resp, err := http.ReadResponse(c.br, req)
		if err != nil {
			stop()
			// Nothing buffered: the connection closed before any byte.
			return nil, ctxErr(ctx, err), ctx.Err() == nil && c.br.Buffered() == 0 && (errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF))
		}
		if resp.StatusCode >= 100 && resp.StatusCode < 200 && resp.StatusCode != http.StatusSwitchingProtocols {
			continue // 1xx informational: the final response follows
		}
		resp.Body = &h1Body{rc: resp.Body, c: c, t: t, stop: stop, keep: !resp.Close && !req.Close, ctx: ctx}
		return resp, nil, false
	}
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
	if !b.stop() || !ok || !b.keep {
		// The cancel callback ran (the deadline is set) or the body did
		// not end cleanly: the connection cannot carry another request.
		b.c.pc.Close()
		return
	}
	b.t.put(b.c)
}

var _ net.Conn = (*pooledConn)(nil)
