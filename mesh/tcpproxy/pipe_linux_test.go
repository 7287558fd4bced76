package tcpproxy

import (
	"bytes"
	"net"
	"sync"
	"sync/atomic"
	"testing"
)

// recordingFlow stands for a netstack flow as pipe's destination: it can
// splice (so the upstream direction reads raw) and records what it is
// written.
type recordingFlow struct {
	directFlow
	mu  sync.Mutex
	got bytes.Buffer
}

func (f *recordingFlow) Write(b []byte) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.got.Write(b)
}

// TestPipeReadsUpstreamRaw: the upstream → flow direction of a splice
// into a netstack flow, from a bare kernel socket (passthrough), reads it
// raw (internal/rawsock) and copies it all, with the socket's EOF; a
// destination that cannot splice keeps the socket's own Read.
func TestPipeReadsUpstreamRaw(t *testing.T) {
	payload := bytes.Repeat([]byte("0123456789abcdef"), 4096)
	for _, raw := range []bool{true, false} {
		c, s := pair(t)
		go func() {
			s.Write(payload)
			s.CloseWrite()
		}()
		var act atomic.Uint64
		var got *bytes.Buffer
		var d direction
		if raw {
			f := &recordingFlow{}
			d = pipe(f, c, &act)
			got = &f.got
		} else {
			w := &recordingWriter{}
			d = pipe(w, c, &act)
			got = &w.got
		}
		if !d.eof || d.err != nil || !bytes.Equal(got.Bytes(), payload) {
			t.Fatalf("raw=%v: eof %v err %v, %d bytes copied; want EOF and all %d", raw, d.eof, d.err, got.Len(), len(payload))
		}
		if act.Load() == 0 {
			t.Errorf("raw=%v: no activity recorded", raw)
		}
	}
}

// recordingWriter is a destination that cannot splice.
type recordingWriter struct {
	net.Conn
	got bytes.Buffer
}

func (w *recordingWriter) Write(b []byte) (int, error) { return w.got.Write(b) }
func (*recordingWriter) CloseWrite() error             { return nil }
