//go:build linux

package integration

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"runtime"
	"strings"
	"time"

	"github.com/vishvananda/netns"
)

// nsDo runs fn on an OS thread switched into the named network namespace.
// Sockets fn creates belong to that namespace for their whole life and can
// be used from any goroutine afterwards. fn must not start goroutines that
// expect to be in the namespace: they are not.
func nsDo(ns string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netns %s: current namespace: %w", ns, err)
			return
		}
		defer orig.Close()
		target, err := netns.GetFromName(ns)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netns %s: %w", ns, err)
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netns %s: enter: %w", ns, err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			// The thread is in the wrong namespace: leave it locked, so
			// it exits with this goroutine instead of serving others.
			errc <- errors.Join(ferr, fmt.Errorf("netns %s: restoring the thread's namespace: %w", ns, err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// listenTCP listens on addr ("ip:port") inside ns.
func listenTCP(ns, addr string) (*net.TCPListener, error) {
	var ln net.Listener
	err := nsDo(ns, func() (err error) {
		ln, err = net.Listen("tcp", addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen tcp %s in %s: %w", addr, ns, err)
	}
	return ln.(*net.TCPListener), nil
}

// dialTCP connects to addr from inside ns.
func dialTCP(ns, addr string, timeout time.Duration) (*net.TCPConn, error) {
	var c net.Conn
	err := nsDo(ns, func() (err error) {
		d := net.Dialer{Timeout: timeout, KeepAlive: -1}
		c, err = d.Dial("tcp", addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("dial tcp %s from %s: %w", addr, ns, err)
	}
	return c.(*net.TCPConn), nil
}

// listenUDP binds addr inside ns.
func listenUDP(ns, addr string) (*net.UDPConn, error) {
	var pc net.PacketConn
	err := nsDo(ns, func() (err error) {
		pc, err = net.ListenPacket("udp", addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen udp %s in %s: %w", addr, ns, err)
	}
	return pc.(*net.UDPConn), nil
}

// dialUDP returns a UDP socket in ns connected to addr.
func dialUDP(ns, addr string) (*net.UDPConn, error) {
	var c net.Conn
	err := nsDo(ns, func() (err error) {
		c, err = net.Dial("udp", addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("dial udp %s from %s: %w", addr, ns, err)
	}
	return c.(*net.UDPConn), nil
}

// cmdTimeout bounds every helper command (ip, sysctl).
const cmdTimeout = 10 * time.Second

// run runs a command with a bounded time and returns its stdout; the error
// carries the command line and its stderr.
func run(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

// nsRun runs a command inside ns (ip netns exec).
func nsRun(ns string, args ...string) (string, error) {
	return run("ip", append([]string{"netns", "exec", ns}, args...)...)
}
