package httpconn

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// heldUpstream answers /hold never (until the proxy gives up the request,
// which it reports on released) and anything else at once.
func heldUpstream(t *testing.T) (u *upstreamServer, held, released chan string) {
	held, released = make(chan string, 8), make(chan string, 8)
	u = startUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/hold" {
			held <- r.Proto
			<-r.Context().Done()
			released <- r.Proto
			return
		}
		io.WriteString(w, "ok")
	})
	return u, held, released
}

func waitFor(t *testing.T, ch <-chan string, what string) string {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: not within 5s", what)
		return ""
	}
}

// readClosed reports whether c is closed by the peer (EOF or reset) within
// d, reading and discarding whatever comes before.
func readClosed(c net.Conn, d time.Duration) (closed bool, got string) {
	c.SetReadDeadline(time.Now().Add(d))
	b, err := io.ReadAll(c)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return false, string(b)
	}
	return true, string(b)
}

// TestDrainStartAndEnd: Serve's two drain signals. At the drain's start
// (ConnInfo.Draining) an idle HTTP/1.1 keep-alive connection is closed, an
// h2c connection gets a GOAWAY (NO_ERROR) at once, and connections with a
// request the upstream holds (route timeout 0, as Istio's default) stay
// open. At its end (Serve's context) those are closed, the held requests
// given up upstream, and Serve returns.
func TestDrainStartAndEnd(t *testing.T) {
	u, held, released := heldUpstream(t)
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	r := prefixRoute("/", "c")
	routeAction(r).Timeout = durationpb.New(0)
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, r)))), env)

	// HTTP/1.1: one connection holds a request, one is idle after a
	// keep-alive exchange.
	h1Held, err := net.Dial("tcp", p.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer h1Held.Close()
	io.WriteString(h1Held, "GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
	waitFor(t, held, "the HTTP/1.1 request reaching the upstream")
	h1Idle, err := net.Dial("tcp", p.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer h1Idle.Close()
	io.WriteString(h1Idle, "GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
	h1Idle.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(h1Idle), nil)
	if err != nil {
		t.Fatal(err)
	}
	io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || resp.Close {
		t.Fatalf("keep-alive exchange before the drain: %d close=%v", resp.StatusCode, resp.Close)
	}
	// h2c: a stream the upstream holds.
	h2 := dialH2(t, p.addr)
	h2.headers(1, "GET", "/hold", true)
	waitFor(t, held, "the h2c request reaching the upstream")

	p.drain()
	if closed, got := readClosed(h1Idle, 5*time.Second); !closed || got != "" {
		t.Errorf("idle HTTP/1.1 keep-alive connection at the drain's start: closed %v, read %q; want closed", closed, got)
	}
	if ev := h2Next(t, h2, "goaway"); ev.code != http2.ErrCodeNo || ev.stream != 1 {
		t.Errorf("h2c GOAWAY at the drain's start: code %v last stream %d, want NO_ERROR, 1 (the held stream may finish)", ev.code, ev.stream)
	}
	// The held requests are not cut by the start.
	if closed, got := readClosed(h1Held, 300*time.Millisecond); closed || got != "" {
		t.Errorf("HTTP/1.1 connection holding a request, after the drain's start: closed %v, read %q; want open", closed, got)
	}
	select {
	case proto := <-released:
		t.Fatalf("the %s request was given up at the drain's start", proto)
	default:
	}

	// Only the proxy ends the h2c connection now (dialH2 set a deadline).
	h2.conn.SetDeadline(time.Now().Add(time.Minute))
	p.cancel() // the drain's end
	h2Closed(t, h2)
	if closed, got := readClosed(h1Held, 5*time.Second); !closed || got != "" {
		t.Errorf("HTTP/1.1 connection holding a request, at the drain's end: closed %v, read %q; want closed without a response", closed, got)
	}
	waitFor(t, released, "a held request given up upstream")
	waitFor(t, released, "the other held request given up upstream")
}

// h2Next returns the next event of kind, failing on a closed connection.
func h2Next(t *testing.T, c *h2Client, kind string) h2Event {
	t.Helper()
	timeout := time.After(5 * time.Second)
	for {
		select {
		case ev, ok := <-c.events:
			if !ok {
				t.Fatalf("h2c connection closed before a %s", kind)
			}
			if ev.kind == kind {
				return ev
			}
		case <-timeout:
			t.Fatalf("no h2c %s within 5s", kind)
		}
	}
}

// h2Closed waits for the connection to close, whatever comes before.
func h2Closed(t *testing.T, c *h2Client) {
	t.Helper()
	timeout := time.After(5 * time.Second)
	for {
		select {
		case _, ok := <-c.events:
			if !ok {
				return
			}
		case <-timeout:
			t.Fatal("h2c connection holding a stream not closed at the drain's end")
		}
	}
}

// TestDrainNewH2Connection: an h2c connection that arrives while its
// listener drains is served, and its first stream brings the GOAWAY at
// once, while the stream is still held upstream (net/http could not send
// it before it served the connection).
func TestDrainNewH2Connection(t *testing.T) {
	u, held, _ := heldUpstream(t)
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	r := prefixRoute("/", "c")
	routeAction(r).Timeout = durationpb.New(0)
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, r)))), env)
	p.drain()
	h2 := dialH2(t, p.addr)
	h2.headers(1, "GET", "/hold", true)
	waitFor(t, held, "the request on a new connection while draining reaching the upstream")
	if ev := h2Next(t, h2, "goaway"); ev.code != http2.ErrCodeNo || ev.stream != 1 {
		t.Errorf("GOAWAY on a new connection while draining: code %v last stream %d, want NO_ERROR, 1", ev.code, ev.stream)
	}
}

// TestPoolsCloseBoundedByContext: Pools.Close waits for a busy upstream
// connection (its request may finish) until the caller's context is done,
// then closes it and returns; the request is given up upstream.
func TestPoolsCloseBoundedByContext(t *testing.T) {
	u, held, released := heldUpstream(t)
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	r := prefixRoute("/", "c")
	routeAction(r).Timeout = durationpb.New(0)
	p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, r)))), env)
	c, err := net.Dial("tcp", p.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
	waitFor(t, held, "the request reaching the upstream")

	ctx, cancel := context.WithCancel(context.Background())
	closed := make(chan struct{})
	var finished bool
	go func() {
		finished = env.pools.Close(ctx)
		close(closed)
	}()
	select {
	case <-closed:
		t.Fatal("Close returned with a busy connection before its context was done")
	case <-time.After(300 * time.Millisecond):
	}
	cancel()
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not return once its context was done")
	}
	if finished {
		t.Error("Close reported every connection finished, though it cut a busy one")
	}
	if !env.pools.Close(context.Background()) {
		t.Error("a second Close, with nothing busy, reported a cut")
	}
	// Its upstream connection was closed under it.
	waitFor(t, released, "the held request given up upstream")
}
