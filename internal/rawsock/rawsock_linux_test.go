//go:build linux

package rawsock

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"syscall"
	"testing"
	"time"
)

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t *testing.T) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	acc := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		acc <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s := <-acc
	if s == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// TestReadWrite: a write larger than the socket buffers completes
// whole (the raw write waits for the poller on EAGAIN) and a reader with a
// small buffer gets every byte in order, then EOF.
func TestReadWrite(t *testing.T) {
	c, s := tcpPair(t)
	c.SetWriteBuffer(16 << 10)
	w := New(c)
	payload := make([]byte, 8<<20)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	done := make(chan error, 1)
	go func() {
		n, err := w.Write(payload)
		if err == nil && n != len(payload) {
			err = io.ErrShortWrite
		}
		c.CloseWrite()
		done <- err
	}()
	r := New(s)
	s.SetReadDeadline(time.Now().Add(20 * time.Second))
	var got bytes.Buffer
	buf := make([]byte, 3000)
	for {
		n, err := r.Read(buf)
		got.Write(buf[:n])
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("read after %d bytes: %v", got.Len(), err)
		}
	}
	if err := <-done; err != nil {
		t.Fatalf("write: %v", err)
	}
	if !bytes.Equal(got.Bytes(), payload) {
		t.Fatalf("read %d bytes, want the %d written, in order", got.Len(), len(payload))
	}
}

// TestErrors: the errors are net.TCPConn's: an *net.OpError with
// Op "read" or "write" around a deadline (Timeout), a reset (ECONNRESET
// or EPIPE) or a closed socket (net.ErrClosed).
func TestErrors(t *testing.T) {
	opErr := func(t *testing.T, err error, op string) *net.OpError {
		t.Helper()
		var oe *net.OpError
		if !errors.As(err, &oe) || oe.Op != op {
			t.Fatalf("error %v (%T), want an *net.OpError with Op %q", err, err, op)
		}
		return oe
	}
	t.Run("deadline", func(t *testing.T) {
		c, _ := tcpPair(t)
		c.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
		_, err := New(c).Read(make([]byte, 8))
		if oe := opErr(t, err, "read"); !oe.Timeout() {
			t.Fatalf("read past the deadline: %v, want a timeout", err)
		}
	})
	t.Run("reset", func(t *testing.T) {
		c, s := tcpPair(t)
		s.SetLinger(0)
		s.Close()
		r := New(c)
		c.SetDeadline(time.Now().Add(5 * time.Second))
		_, err := r.Read(make([]byte, 8))
		opErr(t, err, "read")
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("read after the peer's reset: %v, want ECONNRESET", err)
		}
		_, err = r.Write([]byte("after"))
		opErr(t, err, "write")
		if !errors.Is(err, syscall.EPIPE) && !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("write after the peer's reset: %v, want EPIPE or ECONNRESET", err)
		}
	})
	t.Run("closed", func(t *testing.T) {
		c, _ := tcpPair(t)
		r := New(c)
		done := make(chan error, 1)
		go func() {
			_, err := r.Read(make([]byte, 8))
			done <- err
		}()
		time.Sleep(20 * time.Millisecond)
		c.Close()
		select {
		case err := <-done:
			opErr(t, err, "read")
			if !errors.Is(err, net.ErrClosed) {
				t.Fatalf("read on a closed socket: %v, want net.ErrClosed", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("closing the socket did not end the waiting read")
		}
	})
	t.Run("eof", func(t *testing.T) {
		c, s := tcpPair(t)
		s.Write([]byte("x"))
		s.CloseWrite()
		r := New(c)
		c.SetDeadline(time.Now().Add(5 * time.Second))
		buf := make([]byte, 8)
		if n, err := r.Read(buf); n != 1 || err != nil {
			t.Fatalf("read: %d, %v; want 1 byte", n, err)
		}
		if n, err := r.Read(buf); n != 0 || err != io.EOF {
			t.Fatalf("read after the FIN: %d, %v; want io.EOF", n, err)
		}
	})
}

// TestReadDeliversAll: messages written with and without pauses (so reads
// find the socket empty and wait for the poller, or find bytes already
// there), some larger than the read buffer, reach the reader whole and in
// order, then EOF.
func TestReadDeliversAll(t *testing.T) {
	c, s := tcpPair(t)
	r := New(c)
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
}

// TestReadFINWithLastBytes: the FIN rides on the last segment, so one
// read returns the bytes and consumes the FIN, and no further poller edge
// comes; the next Read must still see EOF rather than wait.
func TestReadFINWithLastBytes(t *testing.T) {
	c, s := tcpPair(t)
	r := New(c)
	buf := make([]byte, 64)
	for i := range 50 {
		if _, err := s.Write([]byte("last")); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := r.Read(buf); n != 4 || err != nil {
			t.Fatalf("round %d: read %d, %v; want 4 bytes", i, n, err)
		}
	}
	s.Write([]byte("end"))
	s.CloseWrite()
	time.Sleep(20 * time.Millisecond) // bytes and FIN queued before the read
	if n, err := r.Read(buf); n != 3 || err != nil {
		t.Fatalf("read %d, %v; want the last 3 bytes", n, err)
	}
	if n, err := r.Read(buf); n != 0 || err != io.EOF {
		t.Fatalf("read after the last bytes: %d, %v; want EOF", n, err)
	}
}
