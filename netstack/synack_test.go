package netstack

import (
	"context"
	"io"
	"net/netip"
	"testing"
	"time"

	"github.com/rs/zerolog"
	wgtun "golang.zx2c4.com/wireguard/tun"
	wgnetstack "golang.zx2c4.com/wireguard/tun/netstack"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

// synAckGate is a device whose writes of a SYN-ACK wait until open is
// closed; started gets one value per such write.
type synAckGate struct {
	wgtun.Device
	started chan struct{}
	open    chan struct{}
}

func (g *synAckGate) Write(bufs [][]byte, offset int) (int, error) {
	for _, b := range bufs {
		if p := b[offset:]; len(p) > 0 && header.IPVersion(p) == header.IPv4Version {
			ip := header.IPv4(p)
			if ip.TransportProtocol() == header.TCPProtocolNumber {
				if f := header.TCP(ip.Payload()).Flags(); f&(header.TCPFlagSyn|header.TCPFlagAck) == header.TCPFlagSyn|header.TCPFlagAck {
					g.started <- struct{}{}
					<-g.open
				}
			}
		}
	}
	return g.Device.Write(bufs, offset)
}

// TestSynAckWrittenWithoutEndpointLock: while a captured flow's SYN-ACK
// is being written to the device, its endpoint's lock is free. gVisor
// sends the SYN-ACK holding that lock; a TCP processor that meets it
// spins, and with one Go processor the owner, back from the device
// write, waited up to 10 ms for the spinner to be preempted (synack.go).
// The device write is held open here: the endpoint's own accessors
// (GetRemoteAddress takes the lock) must still answer.
func TestSynAckWrittenWithoutEndpointLock(t *testing.T) {
	dev, tnet, err := wgnetstack.CreateNetTUN([]netip.Addr{clientV4}, nil, 1500)
	if err != nil {
		t.Fatal(err)
	}
	gate := &synAckGate{Device: dev, started: make(chan struct{}, 4), open: make(chan struct{})}
	opened := false
	openGate := func() {
		if !opened {
			opened = true
			close(gate.open)
		}
	}
	h := &echoTCP{}
	s, err := New(gate, h, Config{}, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		openGate()
		s.Close()
		dev.Close()
	})

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	type dialed struct {
		c   interface{ Close() error }
		err error
	}
	dc := make(chan dialed, 1)
	go func() {
		c, err := tnet.DialContext(ctx, "tcp", "192.0.2.10:8080")
		dc <- dialed{c, err}
	}()
	select {
	case <-gate.started:
	case <-ctx.Done():
		t.Fatal("no SYN-ACK written within 10 s")
	}

	var ep *tcp.Endpoint
	for _, e := range s.ipstack.RegisteredEndpoints() {
		if te, ok := e.(*tcp.Endpoint); ok && te.EndpointState() == tcp.StateSynRecv {
			ep = te
		}
	}
	if ep == nil {
		t.Fatal("no endpoint in SYN-RCVD while its SYN-ACK is written")
	}
	locked := make(chan struct{})
	go func() {
		ep.GetRemoteAddress() // takes and releases the endpoint's lock
		close(locked)
	}()
	select {
	case <-locked:
	case <-time.After(5 * time.Second):
		openGate()
		t.Fatal("the endpoint's lock is held while its SYN-ACK is written to the device")
	}

	openGate()
	d := <-dc
	if d.err != nil {
		t.Fatalf("dial once the SYN-ACK went out: %v", d.err)
	}
	c := d.c.(interface {
		io.ReadWriter
		Close() error
	})
	defer c.Close()
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4)
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "ping" {
		t.Fatalf("echo %q, %v; want ping", got, err)
	}
}
