package httpconn

import (
	"bytes"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// h2Client is a raw h2c client connection for tests: frames written by
// hand (so that a stream can be malformed or reset at will), frames read
// by a goroutine and sorted by stream.
type h2Client struct {
	t      *testing.T
	conn   net.Conn
	fr     *http2.Framer
	wmu    sync.Mutex // the reader goroutine writes too (acks, window updates)
	hbuf   bytes.Buffer
	enc    *hpack.Encoder
	events chan h2Event
}

type h2Event struct {
	stream uint32
	kind   string // "headers", "data", "rst", "goaway", "end"
	status string
	data   []byte
	code   http2.ErrCode
}

func dialH2(t *testing.T, addr string) *h2Client {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	c := &h2Client{t: t, conn: conn, fr: http2.NewFramer(conn, conn), events: make(chan h2Event, 64)}
	c.enc = hpack.NewEncoder(&c.hbuf)
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	if _, err := io.WriteString(conn, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	if err := c.fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	go c.read()
	return c
}

// write runs one framer write under wmu.
func (c *h2Client) write(f func(fr *http2.Framer) error) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return f(c.fr)
}

func (c *h2Client) read() {
	defer close(c.events)
	for {
		f, err := c.fr.ReadFrame()
		if err != nil {
			return
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				c.write(func(fr *http2.Framer) error { return fr.WriteSettingsAck() })
			}
		case *http2.PingFrame:
			if !f.IsAck() {
				c.write(func(fr *http2.Framer) error { return fr.WritePing(true, f.Data) })
			}
		case *http2.MetaHeadersFrame:
			c.events <- h2Event{stream: f.StreamID, kind: "headers", status: f.PseudoValue("status")}
			if f.StreamEnded() {
				c.events <- h2Event{stream: f.StreamID, kind: "end"}
			}
		case *http2.DataFrame:
			if n := len(f.Data()); n > 0 {
				// Keep the windows open.
				id := f.StreamID
				c.write(func(fr *http2.Framer) error {
					fr.WriteWindowUpdate(0, uint32(n))
					return fr.WriteWindowUpdate(id, uint32(n))
				})
			}
			c.events <- h2Event{stream: f.StreamID, kind: "data", data: append([]byte(nil), f.Data()...)}
			if f.StreamEnded() {
				c.events <- h2Event{stream: f.StreamID, kind: "end"}
			}
		case *http2.RSTStreamFrame:
			c.events <- h2Event{stream: f.StreamID, kind: "rst", code: f.ErrCode}
		case *http2.GoAwayFrame:
			c.events <- h2Event{stream: f.LastStreamID, kind: "goaway", code: f.ErrCode, data: append([]byte(nil), f.DebugData()...)}
		}
	}
}

// headers opens stream id with a request; extra are more header fields,
// written as given (they may be invalid).
func (c *h2Client) headers(id uint32, method, path string, endStream bool, extra ...string) {
	c.t.Helper()
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.hbuf.Reset()
	fields := append([]string{":method", method, ":scheme", "http", ":authority", "x", ":path", path}, extra...)
	for i := 0; i+1 < len(fields); i += 2 {
		c.enc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
	}
	if err := c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: c.hbuf.Bytes(), EndStream: endStream, EndHeaders: true}); err != nil {
		c.t.Fatal(err)
	}
}

func (c *h2Client) data(id uint32, b string, end bool) {
	c.t.Helper()
	if err := c.write(func(fr *http2.Framer) error { return fr.WriteData(id, end, []byte(b)) }); err != nil {
		c.t.Fatal(err)
	}
}

// response collects stream id's response until it ends or is reset; other
// streams' events go to others.
type h2Result struct {
	status string
	body   string
	rst    bool
	code   http2.ErrCode
}

func (c *h2Client) collect(ids ...uint32) map[uint32]*h2Result {
	c.t.Helper()
	res := map[uint32]*h2Result{}
	open := map[uint32]bool{}
	for _, id := range ids {
		res[id] = &h2Result{}
		open[id] = true
	}
	timeout := time.After(5 * time.Second)
	for len(open) > 0 {
		select {
		case ev, ok := <-c.events:
			if !ok {
				c.t.Fatalf("connection closed with streams %v open", open)
			}
			r := res[ev.stream]
			if ev.kind == "goaway" {
				c.t.Fatalf("GOAWAY %v (last stream %d, %q): the connection was torn down", ev.code, ev.stream, ev.data)
			}
			if r == nil {
				continue
			}
			switch ev.kind {
			case "headers":
				if r.status == "" {
					r.status = ev.status
				}
			case "data":
				r.body += string(ev.data)
			case "rst":
				r.rst, r.code = true, ev.code
				delete(open, ev.stream)
			case "end":
				delete(open, ev.stream)
			}
		case <-timeout:
			c.t.Fatalf("streams %v did not end", open)
		}
	}
	return res
}

// TestH2CStreamIsolation: on one h2c downstream connection, a stream with
// an invalid header and a stream the client resets mid-body end alone
// (RST_STREAM / a 4xx for the one stream, the reset one's upstream
// request cancelled); a concurrent stream whose body is still arriving
// completes intact, and the connection carries new streams after.
func TestH2CStreamIsolation(t *testing.T) {
	cancelled := make(chan string, 4)
	u := startUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		b, err := io.ReadAll(r.Body)
		if err != nil {
			cancelled <- r.URL.Path
			return
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(b)))
		w.Write(b)
	})
	env := newEnv(t, xdstest.StaticCluster("c", u.addr))
	cfg := mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c")))))
	p := startProxy(t, cfg, env)
	c := dialH2(t, p.addr)

	// Stream 1: a POST whose body arrives in parts around the others.
	c.headers(1, "POST", "/long", false, "content-length", "10")
	c.data(1, "hello", false)

	// Stream 3: a connection-specific header, invalid in HTTP/2
	// (RFC 9113 8.2.2): this stream is malformed, not the connection.
	c.headers(3, "GET", "/bad", true, "connection", "keep-alive")
	// Stream 5: an uppercase field name, malformed too.
	c.headers(5, "GET", "/bad2", true, "X-Upper", "v")

	// Stream 7: a body the client resets half way.
	c.headers(7, "POST", "/reset", false, "content-length", "10")
	c.data(7, "abc", false)
	time.Sleep(100 * time.Millisecond) // the proxy forwards it upstream
	if err := c.write(func(fr *http2.Framer) error { return fr.WriteRSTStream(7, http2.ErrCodeCancel) }); err != nil {
		t.Fatal(err)
	}
	select {
	case path := <-cancelled:
		if path != "/reset" {
			t.Errorf("upstream cancelled %s, want /reset", path)
		}
	case <-time.After(3 * time.Second):
		t.Error("the reset stream's upstream request was not cancelled")
	}

	// Stream 11: more body than its content-length (RFC 9113 8.1.1:
	// malformed, a stream error).
	c.headers(11, "POST", "/long-body", false, "content-length", "2")
	c.data(11, "too long", true)

	// Stream 1 goes on.
	c.data(1, "world", true)
	res := c.collect(1, 3, 5, 11)
	if r := res[1]; r.status != "200" || r.body != "helloworld" || r.rst {
		t.Errorf("stream 1: %+v, want 200 \"helloworld\"", *r)
	}
	for _, id := range []uint32{3, 5, 11} {
		if r := res[id]; !r.rst && (r.status == "" || r.status[0] != '4') {
			t.Errorf("stream %d (malformed): %+v, want RST_STREAM or 4xx", id, *r)
		}
	}

	// The connection still serves.
	c.headers(13, "POST", "/after", false, "content-length", "2")
	c.data(13, "ok", true)
	if r := c.collect(13)[13]; r.status != "200" || r.body != "ok" {
		t.Errorf("stream 13 after the resets: %+v, want 200 \"ok\"", *r)
	}
	// The reset stream is logged as the downstream's doing.
	found := false
	for _, e := range p.waitEntries(t, 3) {
		if e.Path == "/reset" {
			found = true
			if !e.ResponseFlags.Has(FlagDC) {
				t.Errorf("reset stream: flags %s, want DC", e.ResponseFlags)
			}
		}
	}
	if !found {
		xdstest.Eventually(t, 2*time.Second, "the reset stream's entry", func() bool {
			for _, e := range p.entries() {
				if e.Path == "/reset" {
					return e.ResponseFlags.Has(FlagDC)
				}
			}
			return false
		})
	}
}
