package netstack

import (
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/meshtun/meshtun/internal/netnstest"
	"github.com/rs/zerolog"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// inNetns moves the test goroutine (locked to its thread) into a fresh
// network namespace until the test ends (netnstest.Enter).
func inNetns(t *testing.T) { netnstest.Enter(t) }

// TestRawTUNPath runs the stack on a real TUN with the virtio-net header
// and checks the raw descriptor I/O is the one in use, then echoes 8 MiB
// from a kernel socket through it: TSO super-packets and checksum-partial
// packets read, HostGSO segments written, 64 KiB and small packets both
// ways, every byte intact.
func TestRawTUNPath(t *testing.T) {
	for _, mtu := range []int{65535, 1500} {
		t.Run(fmt.Sprint("mtu", mtu), func(t *testing.T) {
			inNetns(t)
			dev := upTUN(t, "mtraw0", mtu, "10.99.0.1/24")
			s, err := New(dev, &echoTCP{}, Config{}, zerolog.Nop())
			if err != nil {
				dev.Close()
				t.Fatal(err)
			}
			t.Cleanup(func() {
				s.Close()
				dev.Close()
			})
			if s.link.raw == nil {
				t.Fatal("the link does not use the raw virtio-net path on a vnet TUN")
			}
			if s.link.SupportedGSO() != stack.HostGSOSupported || s.link.GSOMaxSize() == 0 {
				t.Fatal("raw path without HostGSO")
			}

			c, err := net.DialTimeout("tcp", netip.MustParseAddrPort("10.99.0.2:7").String(), 5*time.Second)
			if err != nil {
				t.Fatalf("dial through the TUN: %v", err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(20 * time.Second))
			payload := make([]byte, 8<<20)
			rand.Read(payload)
			werr := make(chan error, 1)
			go func() {
				// Large writes, then a run of small ones.
				_, err := c.Write(payload[:len(payload)-4096])
				for off := len(payload) - 4096; err == nil && off < len(payload); off += 64 {
					_, err = c.Write(payload[off : off+64])
				}
				if err == nil {
					err = c.(*net.TCPConn).CloseWrite()
				}
				werr <- err
			}()
			got, err := io.ReadAll(c)
			if err != nil {
				t.Fatalf("read: %v", err)
			}
			if err := <-werr; err != nil {
				t.Fatalf("write: %v", err)
			}
			if sha256.Sum256(got) != sha256.Sum256(payload) {
				t.Fatalf("echoed %d bytes, not the %d sent", len(got), len(payload))
			}
			if n := s.link.badChecksum.Load(); n != 0 {
				t.Errorf("%d packets dropped for bad checksums", n)
			}
		})
	}
}
