package tcpproxy

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
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

// TestRawSocketReaderDeliversAll: messages written with and without
// pauses (so reads find the socket empty and wait for the poller, or find
// bytes already there), some larger than the read buffer, reach the
// reader whole and in order, then EOF; the cluster's received counter
// gets every byte.
func TestRawSocketReaderDeliversAll(t *testing.T) {
	c, s := pair(t)
	up := &countingUpstream{Conn: c, tc: c}
	r := newRawSocketReader(up)
	if r == nil {
		t.Fatal("no raw reader for a plaintext cluster upstream")
	}
	rng := rand.New(rand.NewPCG(1, 2))
	var want bytes.Buffer
	var msgs [][]byte
	for i := range 300 {
		m := make([]byte, 1+rng.IntN(6000))
		for j := range m {
			m[j] = byte(i + j)
		}
		msgs = append(msgs, m)
		want.Write(m)
	}
	go func() {
		for i, m := range msgs {
			if _, err := s.Write(m); err != nil {
				return
			}
			if i%3 == 0 {
				time.Sleep(time.Duration(rng.IntN(300)) * time.Microsecond)
			}
		}
		s.CloseWrite()
	}()
	var got bytes.Buffer
	buf := make([]byte, 2048)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		n, err := r.Read(buf)
		got.Write(buf[:n])
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("after %d bytes: %v", got.Len(), err)
		}
	}
	if !bytes.Equal(got.Bytes(), want.Bytes()) {
		t.Fatalf("read %d bytes, want the %d written, in order", got.Len(), want.Len())
	}
	if up.received != want.Len() || up.sent != 0 {
		t.Errorf("cluster counters: received %d sent %d, want %d and 0", up.received, up.sent, want.Len())
	}
}

// TestRawSocketReaderErrors: a reset arriving while the reader waits is
// ECONNRESET, a FIN that came with the last bytes is EOF, and closing the socket under a waiting
// reader ends the wait with net.ErrClosed.
func TestRawSocketReaderErrors(t *testing.T) {
	t.Run("reset", func(t *testing.T) {
		c, s := pair(t)
		r := newRawSocketReader(c)
		if _, err := s.Write([]byte("hello")); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 64)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := r.Read(buf); n != 5 || err != nil {
			t.Fatalf("first read: %d, %v; want 5 bytes", n, err)
		}
		go func() {
			time.Sleep(20 * time.Millisecond)
			s.SetLinger(0)
			s.Close()
		}()
		n, err := r.Read(buf)
		if n != 0 || !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("read after the peer's reset: %d, %v; want ECONNRESET", n, err)
		}
	})
	t.Run("finWithLastBytes", func(t *testing.T) {
		// The FIN rides on the last segment: one read returns the bytes
		// and consumes the FIN, and no further edge comes; the next Read
		// must still see EOF.
		c, s := pair(t)
		r := newRawSocketReader(c)
		for i := range 50 {
			if _, err := s.Write([]byte("last")); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 64)
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if n, err := r.Read(buf); n != 4 || err != nil {
				t.Fatalf("round %d: read %d, %v; want 4 bytes", i, n, err)
			}
		}
		s.Write([]byte("end"))
		s.CloseWrite()
		time.Sleep(20 * time.Millisecond) // bytes and FIN queued before the read
		buf := make([]byte, 64)
		n, err := r.Read(buf)
		if n != 3 || err != nil {
			t.Fatalf("read %d, %v; want the last 3 bytes", n, err)
		}
		if n, err := r.Read(buf); n != 0 || err != io.EOF {
			t.Fatalf("read after the last bytes: %d, %v; want EOF", n, err)
		}
	})
	t.Run("closed", func(t *testing.T) {
		c, _ := pair(t)
		r := newRawSocketReader(c)
		done := make(chan error, 1)
		go func() {
			_, err := r.Read(make([]byte, 64))
			done <- err
		}()
		time.Sleep(20 * time.Millisecond)
		c.Close()
		select {
		case err := <-done:
			if !errors.Is(err, net.ErrClosed) {
				t.Fatalf("read on a closed socket: %v, want net.ErrClosed", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("closing the socket did not end the waiting read")
		}
	})
	t.Run("notASocket", func(t *testing.T) {
		if r := newRawSocketReader(&countingUpstream{}); r != nil {
			t.Fatal("a raw reader for an upstream without a plaintext socket (TLS)")
		}
	})
}

// TestPipeReadsUpstreamRaw: the upstream → flow direction of a splice
// into a netstack flow reads the socket raw (the cluster's received
// counter, which only Moved feeds here, counts every byte) and copies
// it all; a flow that cannot splice keeps the socket's own Read.
func TestPipeReadsUpstreamRaw(t *testing.T) {
	payload := bytes.Repeat([]byte("0123456789abcdef"), 4096)
	for _, raw := range []bool{true, false} {
		c, s := pair(t)
		up := &countingUpstream{Conn: c, tc: c}
		go func() {
			s.Write(payload)
			s.CloseWrite()
		}()
		var act atomic.Uint64
		var got *bytes.Buffer
		var d direction
		if raw {
			f := &recordingFlow{}
			d = pipe(f, up, &act)
			got = &f.got
		} else {
			w := &recordingWriter{}
			d = pipe(w, up, &act)
			got = &w.got
		}
		if !d.eof || d.err != nil || !bytes.Equal(got.Bytes(), payload) {
			t.Fatalf("raw=%v: eof %v err %v, %d bytes copied; want EOF and all %d", raw, d.eof, d.err, got.Len(), len(payload))
		}
		wantCounted := 0
		if raw {
			wantCounted = len(payload)
		}
		if up.received != wantCounted {
			t.Errorf("raw=%v: received counter %d, want %d", raw, up.received, wantCounted)
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
