//go:build linux

package integration

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"
)

// connDeadline bounds every server-side connection.
const connDeadline = 60 * time.Second

// tcpServer accepts on a listener inside a namespace and serves each
// connection with handle. It records the remote address of every
// connection it accepted.
type tcpServer struct {
	ln *net.TCPListener

	mu      sync.Mutex
	remotes []netip.AddrPort
	conns   map[*net.TCPConn]struct{}
	wg      sync.WaitGroup
}

// startTCPServer listens on addr in ns; t.Cleanup closes the listener and
// every open connection.
func startTCPServer(t *testing.T, ns, addr string, handle func(*net.TCPConn)) *tcpServer {
	t.Helper()
	ln, err := listenTCP(ns, addr)
	if err != nil {
		t.Fatal(err)
	}
	s := &tcpServer{ln: ln, conns: map[*net.TCPConn]struct{}{}}
	s.wg.Add(1)
	go s.serve(handle)
	t.Cleanup(func() {
		_ = ln.Close()
		s.mu.Lock()
		for c := range s.conns {
			_ = c.Close()
		}
		s.mu.Unlock()
		done := make(chan struct{})
		go func() { s.wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Errorf("server %s: handlers still running 5s after close", addr)
		}
	})
	return s
}

func (s *tcpServer) serve(handle func(*net.TCPConn)) {
	defer s.wg.Done()
	for {
		c, err := s.ln.AcceptTCP()
		if err != nil {
			return // closed
		}
		s.mu.Lock()
		s.remotes = append(s.remotes, addrPort(c.RemoteAddr()))
		s.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			_ = c.SetDeadline(time.Now().Add(connDeadline))
			handle(c)
			_ = c.Close()
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
		}()
	}
}

// accepted returns the remote addresses of the connections accepted so far.
func (s *tcpServer) accepted() []netip.AddrPort {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]netip.AddrPort(nil), s.remotes...)
}

// echo copies everything back and half-closes after the client's FIN.
func echo(c *net.TCPConn) {
	if _, err := io.Copy(c, c); err == nil {
		_ = c.CloseWrite()
	}
}

// replyAfterEOF reads the request to EOF, then sends reply and closes.
// The bytes of the request go to got (buffered, may be nil).
func replyAfterEOF(reply []byte, got chan<- []byte) func(*net.TCPConn) {
	return func(c *net.TCPConn) {
		req, err := io.ReadAll(c)
		if got != nil {
			got <- req
		}
		if err != nil {
			return
		}
		_, _ = c.Write(reply)
	}
}

// udpEcho answers every datagram with itself.
type udpEcho struct {
	pc *net.UDPConn

	mu      sync.Mutex
	remotes map[netip.AddrPort]int // datagrams per source
}

func startUDPEcho(t *testing.T, ns, addr string) *udpEcho {
	t.Helper()
	pc, err := listenUDP(ns, addr)
	if err != nil {
		t.Fatal(err)
	}
	u := &udpEcho{pc: pc, remotes: map[netip.AddrPort]int{}}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 64<<10)
		for {
			n, from, err := pc.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			u.mu.Lock()
			u.remotes[netip.AddrPortFrom(from.Addr().Unmap(), from.Port())]++
			u.mu.Unlock()
			_, _ = pc.WriteToUDPAddrPort(buf[:n], from)
		}
	}()
	t.Cleanup(func() {
		_ = pc.Close()
		<-done
	})
	return u
}

func (u *udpEcho) sources() map[netip.AddrPort]int {
	u.mu.Lock()
	defer u.mu.Unlock()
	out := make(map[netip.AddrPort]int, len(u.remotes))
	for k, v := range u.remotes {
		out[k] = v
	}
	return out
}

// randomPayload returns n random bytes.
func randomPayload(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

// echoRoundTrip sends payload on c while reading, half-closes, reads the
// echo to EOF and compares checksums, all within timeout.
func echoRoundTrip(c *net.TCPConn, payload []byte, timeout time.Duration) error {
	if err := c.SetDeadline(time.Now().Add(timeout)); err != nil {
		return err
	}
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		if err == nil {
			err = c.CloseWrite()
		}
		werr <- err
	}()
	got, rerr := io.ReadAll(c)
	if err := <-werr; err != nil {
		return fmt.Errorf("write %d bytes: %w", len(payload), err)
	}
	if rerr != nil {
		return fmt.Errorf("read echo (%d of %d bytes): %w", len(got), len(payload), rerr)
	}
	if sha256.Sum256(got) != sha256.Sum256(payload) {
		return fmt.Errorf("echo differs: got %d bytes sha256 %x, sent %d bytes sha256 %x",
			len(got), sha256.Sum256(got), len(payload), sha256.Sum256(payload))
	}
	return nil
}

// udpRoundTrip sends msg on a connected UDP socket and waits for the same
// bytes back, retrying a lost datagram up to tries times.
func udpRoundTrip(c *net.UDPConn, msg []byte, tries int, wait time.Duration) error {
	buf := make([]byte, 64<<10)
	var last error
	for i := 0; i < tries; i++ {
		if _, err := c.Write(msg); err != nil {
			last = fmt.Errorf("send %d bytes: %w", len(msg), err)
			time.Sleep(wait / 4)
			continue
		}
		_ = c.SetReadDeadline(time.Now().Add(wait))
		for {
			n, err := c.Read(buf)
			if err != nil {
				last = fmt.Errorf("read reply to %d bytes (try %d): %w", len(msg), i+1, err)
				break
			}
			if bytes.Equal(buf[:n], msg) {
				return nil
			}
			// A late reply to an earlier try of another message: skip it.
			last = fmt.Errorf("reply of %d bytes differs from the %d sent", n, len(msg))
		}
	}
	return last
}

// addrPort converts a TCP or UDP address to netip form, IPv4 unmapped.
func addrPort(a net.Addr) netip.AddrPort {
	var ap netip.AddrPort
	switch a := a.(type) {
	case *net.TCPAddr:
		ap = a.AddrPort()
	case *net.UDPAddr:
		ap = a.AddrPort()
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// isTimeout reports whether err is a deadline expiry.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
