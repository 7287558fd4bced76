package mesh

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/rs/zerolog"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/mesh/accesslog"
	"github.com/meshtun/meshtun/mesh/httpconn"
	"github.com/meshtun/meshtun/xdsclient"
)

// drainUpstream is an HTTP/1.1 and h2c server: /hold never answers (its
// handler ends when the proxy gives the request up, which it reports on
// released), /gate answers when gate is closed, anything else at once.
// arrived receives the path of each /hold and /gate request.
func drainUpstream(t *testing.T, gate <-chan struct{}) (addr netip.AddrPort, arrived, released chan string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	arrived, released = make(chan string, 8), make(chan string, 8)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/hold":
			arrived <- r.URL.Path
			<-r.Context().Done()
			released <- r.URL.Path
			return
		case "/gate":
			arrived <- r.URL.Path
			select {
			case <-gate:
			case <-r.Context().Done():
				return
			}
		}
		io.WriteString(w, "ok")
	})}
	srv.Protocols = new(http.Protocols)
	srv.Protocols.SetHTTP1(true)
	srv.Protocols.SetUnencryptedHTTP2(true)
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().(*net.TCPAddr).AddrPort(), arrived, released
}

// closedAt reads c until it is closed by the peer and reports when, on
// the returned channel (the zero time if it was not within 30 s).
func closedAt(c net.Conn) <-chan time.Time {
	ch := make(chan time.Time, 1)
	go func() {
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		_, err := io.Copy(io.Discard, c)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			ch <- time.Time{}
			return
		}
		ch <- time.Now()
	}()
	return ch
}

// h2Watch is a raw h2c client connection that opens one stream on path
// and reports when a GOAWAY arrives (with its error code) and when the
// connection closes.
type h2Watch struct {
	goAway   chan http2.ErrCode
	closedAt chan time.Time
}

func dialH2Hold(t *testing.T, addr, path string) *h2Watch {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	fr := http2.NewFramer(c, c)
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for _, f := range [][2]string{{":method", "GET"}, {":scheme", "http"}, {":authority", "x"}, {":path", path}} {
		enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb.Bytes(), EndStream: true, EndHeaders: true}); err != nil {
		t.Fatal(err)
	}
	w := &h2Watch{goAway: make(chan http2.ErrCode, 1), closedAt: make(chan time.Time, 1)}
	go func() {
		// Only this goroutine writes from here on (acks).
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				if errors.Is(err, os.ErrDeadlineExceeded) {
					w.closedAt <- time.Time{}
				} else {
					w.closedAt <- time.Now()
				}
				return
			}
			switch f := f.(type) {
			case *http2.SettingsFrame:
				if !f.IsAck() {
					fr.WriteSettingsAck()
				}
			case *http2.PingFrame:
				if !f.IsAck() {
					fr.WritePing(true, f.Data)
				}
			case *http2.GoAwayFrame:
				select {
				case w.goAway <- f.ErrCode:
				default:
				}
			}
		}
	}()
	return w
}

// TestLDSRemovalDrainsHTTP: a listener an LDS update removes drains as
// Envoy's does, for --drain-duration (here 2 s). At once: an idle
// HTTP/1.1 keep-alive connection is closed, the response to a request in
// flight says "Connection: close", an h2c connection gets GOAWAY
// (NO_ERROR). Connections whose request the upstream holds open (route
// timeout 0, Istio's default) stay until the drain ends, and are closed
// then: not before, and within a slack after.
func TestLDSRemovalDrainsHTTP(t *testing.T) {
	const drain = 2 * time.Second
	const slack = 2 * time.Second
	gate := make(chan struct{})
	up, arrived, released := drainUpstream(t, gate)

	probe, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := probe.Addr().(*net.TCPAddr).Port
	probe.Close()
	addr := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port)).String()

	pools := httpconn.NewPools()
	srv := &Server{D: NewDispatcher(DispatcherOptions{Access: accesslog.New(zerolog.Nop())}), Log: zerolog.Nop()}
	opts := buildOpts()
	opts.Pools = pools
	a := &XDSApplier{Server: srv, Options: opts, DrainDuration: drain}
	rc := xdstest.RouteConfig("r", "up")
	rc.VirtualHosts[0].Routes[0].GetRoute().Timeout = durationpb.New(0)
	withListener := &xdsclient.Resources{
		Listeners: map[string]*listenerv3.Listener{"http": xdstest.HTTPListener(t, "http", "127.0.0.1", uint32(port), "r", true)},
		Clusters:  map[string]*clusterv3.Cluster{"up": xdstest.StaticCluster("up", up)},
		Routes:    map[string]*routev3.RouteConfiguration{"r": rc},
	}
	if err := a.Apply(context.Background(), withListener); err != nil {
		t.Fatal(err)
	}
	defer func() {
		srv.Close()
		if s := srv.D.Snapshot(); s != nil {
			s.Retire(nil)
		}
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		pools.Close(ctx)
	}()

	dial := func() net.Conn {
		t.Helper()
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	// HTTP/1.1: an idle keep-alive connection, one waiting for /gate, one
	// holding /hold.
	idle := dial()
	io.WriteString(idle, "GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
	idle.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(idle), nil)
	if err != nil {
		t.Fatal(err)
	}
	io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || resp.Close {
		t.Fatalf("keep-alive exchange: %d close=%v", resp.StatusCode, resp.Close)
	}
	idleClosed := closedAt(idle)
	gated := dial()
	io.WriteString(gated, "GET /gate HTTP/1.1\r\nHost: x\r\n\r\n")
	held := dial()
	io.WriteString(held, "GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
	heldClosed := closedAt(held)
	h2 := dialH2Hold(t, addr, "/hold")
	// Every request has reached the upstream before the update.
	for i := 0; i < 3; i++ {
		select {
		case <-arrived:
		case <-time.After(5 * time.Second):
			t.Fatalf("%d of 3 requests reached the upstream", i)
		}
	}

	start := time.Now()
	if err := a.Apply(context.Background(), &xdsclient.Resources{Clusters: withListener.Clusters}); err != nil {
		t.Fatal(err)
	}
	end := start.Add(drain)

	if at := <-idleClosed; at.IsZero() || !at.Before(end) {
		t.Errorf("idle HTTP/1.1 connection closed %v into the drain, want at once (before its end, %v)", sinceOrNever(at, start), drain)
	}
	select {
	case code := <-h2.goAway:
		if code != http2.ErrCodeNo {
			t.Errorf("GOAWAY %v, want NO_ERROR (graceful)", code)
		}
		if time.Now().After(end) {
			t.Errorf("GOAWAY %v into the drain, want at once", time.Since(start))
		}
	case <-time.After(drain):
		t.Error("no GOAWAY on the h2c connection within the drain")
	}
	close(gate)
	gated.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err = http.ReadResponse(bufio.NewReader(gated), nil)
	if err != nil {
		t.Fatalf("response on a draining HTTP/1.1 connection: %v", err)
	}
	if !resp.Close || time.Now().After(end) {
		t.Errorf("response %v into the drain: close=%v, want Connection: close before the drain ends", time.Since(start), resp.Close)
	}

	for what, ch := range map[string]<-chan time.Time{"HTTP/1.1": heldClosed, "h2c": h2.closedAt} {
		at := <-ch
		switch {
		case at.IsZero():
			t.Errorf("%s connection holding a request: never closed", what)
		case at.Before(end):
			t.Errorf("%s connection holding a request closed %v into a %v drain, before its end", what, at.Sub(start), drain)
		case at.After(end.Add(slack)):
			t.Errorf("%s connection holding a request closed %v into a %v drain, want at its end", what, at.Sub(start), drain)
		}
	}
	// The held requests were given up upstream too.
	for i := 0; i < 2; i++ {
		select {
		case <-released:
		case <-time.After(5 * time.Second):
			t.Fatalf("%d of 2 held requests given up upstream", i)
		}
	}
}

func sinceOrNever(at, start time.Time) any {
	if at.IsZero() {
		return "never"
	}
	return at.Sub(start)
}

// TestProxyDrain: Server.StartDrain (/drain_listeners, SIGTERM) starts the
// drain of the inbound listeners only (traffic_direction INBOUND) or of
// all, and of the listeners later updates add; EndDrain ends their HTTP
// connections but leaves their TCP flows (closed stays open), as Envoy's
// stopped listeners keep their connections.
func TestProxyDrain(t *testing.T) {
	srv := &Server{D: NewDispatcher(DispatcherOptions{Access: accesslog.New(zerolog.Nop())}), Log: zerolog.Nop()}
	defer srv.Close()
	opts := buildOpts()
	opts.Pools = httpconn.NewPools()
	a := &XDSApplier{Server: srv, Options: opts, DrainDuration: time.Minute}
	in := xdstest.TCPListener(t, "in", "10.0.0.1", 80, "PassthroughCluster", false)
	in.TrafficDirection = corev3.TrafficDirection_INBOUND
	out := xdstest.TCPListener(t, "out", "10.0.0.2", 80, "PassthroughCluster", false)
	out.TrafficDirection = corev3.TrafficDirection_OUTBOUND
	res := &xdsclient.Resources{
		Listeners: map[string]*listenerv3.Listener{"in": in, "out": out},
		Clusters:  map[string]*clusterv3.Cluster{},
	}
	for _, c := range passthroughClusters() {
		res.Clusters[c.GetName()] = c
	}
	if err := a.Apply(context.Background(), res); err != nil {
		t.Fatal(err)
	}
	defer func() { srv.D.Snapshot().Retire(nil) }()
	l := func(name string) *listenerDrain { return srv.D.Snapshot().Listener(name).drain }
	done := func(c context.Context) bool { return c.Err() != nil }

	srv.StartDrain(true)
	if !done(l("in").draining()) || done(l("out").draining()) {
		t.Fatalf("inbound-only drain: in draining %v, out draining %v; want true, false", done(l("in").draining()), done(l("out").draining()))
	}
	if done(l("in").drained()) {
		t.Fatal("the drain's start ended it")
	}
	// A listener a later update adds (or changes) drains as well.
	in2 := xdstest.TCPListener(t, "in2", "10.0.0.3", 80, "PassthroughCluster", false)
	in2.TrafficDirection = corev3.TrafficDirection_INBOUND
	res.Listeners["in2"] = in2
	if err := a.Apply(context.Background(), res); err != nil {
		t.Fatal(err)
	}
	if !done(l("in2").draining()) || done(l("out").draining()) {
		t.Fatal("a listener added during an inbound drain does not drain, or an outbound one does")
	}
	srv.EndDrain(true)
	for _, n := range []string{"in", "in2"} {
		if !done(l(n).drained()) || done(l(n).closed()) {
			t.Errorf("%s after EndDrain: drained %v, closed %v; want HTTP ended, TCP going on", n, done(l(n).drained()), done(l(n).closed()))
		}
	}
	if done(l("out").drained()) {
		t.Error("an inbound-only drain ended an outbound listener's")
	}
	srv.StartDrain(false)
	if !done(l("out").draining()) {
		t.Error("a drain of all listeners left the outbound one")
	}
}

// A listener's drain contexts are made by its first flow, not by the
// build; a step taken before then holds for the contexts made after it,
// and a later step reaches contexts already made.
func TestListenerDrainLazyContexts(t *testing.T) {
	ld := newListenerDrain()
	if ld.ctxs.Load() != nil {
		t.Fatal("a new listener drain made its contexts")
	}
	ld.start()
	if ld.ctxs.Load() != nil {
		t.Fatal("starting the drain made the contexts")
	}
	if ld.draining().Err() == nil || ld.drained().Err() != nil || ld.closed().Err() != nil {
		t.Fatalf("started before the contexts were made: draining %v, drained %v, closed %v; want only draining done",
			ld.draining().Err(), ld.drained().Err(), ld.closed().Err())
	}
	ld.end()
	if ld.drained().Err() == nil || ld.closed().Err() != nil {
		t.Fatalf("ended after the contexts were made: drained %v, closed %v; want drained only", ld.drained().Err(), ld.closed().Err())
	}
	ld.start() // never back
	ld.close()
	if ld.closed().Err() == nil || ld.draining().Err() == nil {
		t.Fatal("closed: the contexts are not all done")
	}
	late := newListenerDrain()
	late.close()
	if late.draining().Err() == nil || late.drained().Err() == nil || late.closed().Err() == nil {
		t.Fatal("closed before the contexts were made: they were not born done")
	}
}
