//go:build linux

package cluster

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// TestConnectTimeoutFullBacklog times out a real kernel connect: a
// listener with backlog 0 whose accept queue is full makes Linux drop
// further SYNs, so the connect hangs until connect_timeout.
func TestConnectTimeoutFullBacklog(t *testing.T) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := unix.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(sa.(*unix.SockaddrInet4).Port))

	full := false
	for i := 0; i < 8 && !full; i++ {
		c, err := net.DialTimeout("tcp", addr.String(), 200*time.Millisecond)
		if err != nil {
			full = true
			break
		}
		defer c.Close()
	}
	if !full {
		t.Skip("the kernel kept accepting connections on a full backlog")
	}

	pb := xdstest.Cluster("slow", xdstest.WithEndpoints(xdstest.Endpoint{Addr: addr}))
	pb.ConnectTimeout = durationpb.New(150 * time.Millisecond)
	c := newTestCluster(t, pb)
	start := time.Now()
	_, err = c.Connect(context.Background(), netip.AddrPort{}, nil)
	el := time.Since(start)
	var ce *ConnectError
	if !errors.As(err, &ce) || !ce.Timeout {
		t.Fatalf("err = %v after %v, want a connect timeout", err, el)
	}
	if el < 100*time.Millisecond || el > 2*time.Second {
		t.Errorf("timed out after %v, want ≈150ms", el)
	}
	if v := stat(t, c, "upstream_cx_connect_timeout"); v != 1 {
		t.Errorf("upstream_cx_connect_timeout = %d", v)
	}
	if v := hostStat(c.Hosts()[0], "cx_connect_fail"); v != 1 {
		t.Errorf("host cx_connect_fail = %d", v)
	}
}
