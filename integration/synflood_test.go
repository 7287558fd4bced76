//go:build linux

package integration

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Issue 18 item 7: capture under a spoofed SYN flood.
const (
	floodRate     = 1000             // SYN/s
	floodFor      = 10 * time.Second // bounded
	floodTries    = 200              // legitimate flows per direction
	spoofedPrefix = "198.18.0.0/16"  // RFC 2544 benchmarking range
)

// TestSynFlood: while 1,000 spoofed SYNs a second hit the pod's app port
// for 10 s (random sources in 198.18.0.0/16, routed to a black hole in the
// services namespace, so no RST ever comes back and every spoofed flow
// stays half-open), the pod's new outbound flows and new inbound flows
// from a real client succeed (≥ 99% of 200 each), and the app gets no
// connection on behalf of a spoofed SYN, from the flood's first SYN to
// its last: an inbound flow is never dialed before its handshake
// completes. Before the flood, an inbound connect to a port nothing in
// the pod listens on, or to one the app listens on only at 127.0.0.1, is
// refused (the probe of the pod's listening sockets answers before any
// handshake). During it, such a connect is refused or, once the inbound
// budget is spent and a SYN cookie completed the handshake, reset with
// no byte; an outbound one is still refused (its budget is untouched:
// dialed first).
// The Dispatcher (a bootstrap) and Passthrough (none) take
// flows by different code, so both are run. With the bootstrap, the admin
// /stats shows the SYN cookies and the inbound budget in use.
func TestSynFlood(t *testing.T) {
	requireRoot(t)
	for _, mode := range []string{"bootstrap", "passthrough"} {
		t.Run(mode, func(t *testing.T) { synFlood(t, mode == "bootstrap") })
	}
}

func synFlood(t *testing.T, withBootstrap bool) {
	topo := newTopology(t)
	if _, err := run("ip", "-n", topo.Services, "route", "add", "blackhole", spoofedPrefix); err != nil {
		t.Fatal(err)
	}
	svc := ap(topo.SvcV4, 8080)
	startTCPServer(t, topo.Services, svc, echo)
	app := &appRecorder{}
	appAddr := netip.AddrPortFrom(topo.PodV4, 9090)
	appSrv := startTCPServer(t, topo.Pod, "0.0.0.0:9090", app.handle)
	loopOnly := &appRecorder{}
	loopSrv := startTCPServer(t, topo.Pod, "127.0.0.1:9092", loopOnly.handle)
	var args []string
	if withBootstrap {
		args = []string{"--bootstrap", writeBootstrap(t, []obj{virtualOutbound("PassthroughCluster"), virtualInbound()}, istioClusters())}
	}
	startProxy(t, topo, args...)
	// Both directions work before the flood.
	if err := legitFlow(topo.Pod, svc, "warm-out"); err != nil {
		t.Fatalf("outbound before the flood: %v", err)
	}
	if err := legitFlow(topo.Services, appAddr.String(), "legit-warm"); err != nil {
		t.Fatalf("inbound before the flood: %v", err)
	}
	// Nothing listens on pod-IP:9091, nor on pod-IP:9092 (only on
	// 127.0.0.1:9092): refused without a handshake, as without a sidecar.
	for _, port := range []uint16{9091, 9092} {
		if err := refused(topo.Services, ap(topo.PodV4, port)); err != nil {
			t.Errorf("inbound to pod-IP:%d before the flood: %v", port, err)
		}
	}

	fl, err := newFlooder(topo.Services, appAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer fl.close()
	floodDone := make(chan struct{})
	go func() {
		defer close(floodDone)
		fl.run(floodRate, floodFor)
	}()
	// The flood is under way once its first dialFirstMax SYNs are in,
	// 20 ms at this rate; a second is ample on a loaded machine.
	onsetAt := time.Now().Add(time.Second)

	// 200 tries each way, spread over the flood's first 8 s.
	var inOK, outOK atomic.Int32
	var wg sync.WaitGroup
	var errMu sync.Mutex
	var errs []string
	try := func(ns, dst, tag string, ok *atomic.Int32) {
		defer wg.Done()
		tick := time.NewTicker(40 * time.Millisecond)
		defer tick.Stop()
		for i := range floodTries {
			<-tick.C
			if err := legitFlow(ns, dst, fmt.Sprintf("%s-%d", tag, i)); err != nil {
				errMu.Lock()
				errs = append(errs, fmt.Sprintf("%s %d: %v", tag, i, err))
				errMu.Unlock()
				continue
			}
			ok.Add(1)
		}
	}
	time.Sleep(200 * time.Millisecond) // past the onset's first SYNs

	// A port the app does not listen on is refused while the inbound
	// budget has room (the probe), and once a SYN cookie answers it is
	// accepted, then reset; it is never served. Outbound connects keep
	// their own budget and are still dialed first: a closed port is
	// refused.
	time.Sleep(time.Until(onsetAt))
	if how, err := refusedOrReset(topo.Services, ap(topo.PodV4, 9091)); err != nil {
		t.Errorf("inbound to a closed port during the flood: %v", err)
	} else {
		t.Logf("inbound to a closed port during the flood: %s", how)
	}
	if c, err := dialTCP(topo.Pod, ap(topo.SvcV4, 8081), 3*time.Second); err == nil || !errors.Is(err, syscall.ECONNREFUSED) {
		if c != nil {
			c.Close()
		}
		t.Errorf("outbound to a closed port during the flood: %v, want refused (dialed first)", err)
	}
	wg.Add(2)
	go try(topo.Pod, svc, "out", &outOK)
	go try(topo.Services, appAddr.String(), "legit", &inOK)
	wg.Wait()
	<-floodDone
	sent := fl.sent.Load()
	t.Logf("flood: %d spoofed SYNs in %v; outbound %d/%d, inbound %d/%d succeeded", sent, floodFor, outOK.Load(), floodTries, inOK.Load(), floodTries)
	if sent < floodRate*int64(floodFor/time.Second)*9/10 {
		t.Fatalf("only %d spoofed SYNs sent, want about %d: the flood was not a flood", sent, floodRate*int64(floodFor/time.Second))
	}
	if len(errs) > 0 {
		t.Logf("failed tries: %s", strings.Join(errs, "; "))
	}
	const need = floodTries * 99 / 100
	if outOK.Load() < need {
		t.Errorf("outbound: %d of %d flows succeeded during the flood, want ≥ %d", outOK.Load(), floodTries, need)
	}
	if inOK.Load() < need {
		t.Errorf("inbound: %d of %d flows succeeded during the flood, want ≥ %d", inOK.Load(), floodTries, need)
	}

	// Connections the app accepted that no legitimate client made: none,
	// neither in the flood's first second nor later.
	legit, onset, later := app.count(onsetAt)
	t.Logf("app: %d legitimate connections; %d for spoofed SYNs in the flood's first second, %d later; %d accepted in all",
		legit, onset, later, len(appSrv.accepted()))
	if legit < 1+int(inOK.Load()) {
		t.Errorf("the app served %d legitimate connections, want at least %d", legit, 1+inOK.Load())
	}
	if onset != 0 || later != 0 {
		t.Errorf("the app got %d connections for spoofed SYNs in the flood's first second and %d later, want none", onset, later)
	}
	if n := len(loopSrv.accepted()); n != 0 {
		t.Errorf("the app listening on 127.0.0.1:9092 got %d connections sent to pod-IP:9092", n)
	}

	if withBootstrap {
		st := statsMatching(t, topo, "^netstack\\.tcp\\.")
		t.Logf("netstack stats after the flood:\n%s", formatStats(st))
		if n := st["netstack.tcp.syncookies_sent"]; n < uint64(sent)/2 {
			t.Errorf("syncookies_sent = %d for %d spoofed SYNs: the budget did not overflow to cookies", n, sent)
		}
		if n := st["netstack.tcp.syncookies_recv"]; n < uint64(inOK.Load())/2 {
			t.Errorf("syncookies_recv = %d: the inbound clients did not come through cookies", n)
		}
		if st["netstack.tcp.half_open_inbound_active"] == 0 {
			t.Errorf("half_open_inbound_active = 0 right after the flood, want the flood's half-open flows")
		}
	}
}

// refused dials dst from ns and expects the connect refused (a RST to
// the SYN).
func refused(ns, dst string) error {
	c, err := dialTCP(ns, dst, 3*time.Second)
	if err == nil {
		c.Close()
		return errors.New("connected, want refused")
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("connect: %w, want refused", err)
	}
	return nil
}

// refusedOrReset dials dst from ns and expects the connect refused, or
// accepted and then reset with no byte; it says which.
func refusedOrReset(ns, dst string) (string, error) {
	c, err := dialTCP(ns, dst, 3*time.Second)
	if err != nil {
		if errors.Is(err, syscall.ECONNREFUSED) {
			return "refused", nil
		}
		return "", fmt.Errorf("connect: %w, want refused, or accepted then reset", err)
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := c.Read(make([]byte, 1))
	if !errors.Is(err, syscall.ECONNRESET) {
		return "", fmt.Errorf("accepted, then read: %d bytes, %v; want a reset", n, err)
	}
	return "accepted, then reset", nil
}

// legitFlow dials dst from ns, sends one line naming the try and expects
// it echoed.
func legitFlow(ns, dst, tag string) error {
	c, err := dialTCP(ns, dst, 3*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(c, "%s\n", tag); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return fmt.Errorf("echo: %w", err)
	}
	if line != tag+"\n" {
		return fmt.Errorf("echo %q, want %q", line, tag)
	}
	return nil
}

// appRecorder is the pod's app: it echoes one line, and records when each
// connection was accepted and whether it brought a legitimate client's
// line. One that did not was made for a client that never was.
type appRecorder struct {
	mu    sync.Mutex
	conns []*appConn
}

type appConn struct {
	at    time.Time
	legit atomic.Bool
}

func (a *appRecorder) handle(c *net.TCPConn) {
	ac := &appConn{at: time.Now()}
	a.mu.Lock()
	a.conns = append(a.conns, ac)
	a.mu.Unlock()
	_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "legit-") {
		return
	}
	ac.legit.Store(true)
	_, _ = c.Write([]byte(line))
}

// count returns the connections accepted so far that brought a
// legitimate line, and those that did not, accepted before and after
// since. Called when no legitimate client is in flight.
func (a *appRecorder) count(since time.Time) (legit, spuriousBefore, spuriousAfter int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, c := range a.conns {
		switch {
		case c.legit.Load():
			legit++
		case c.at.Before(since):
			spuriousBefore++
		default:
			spuriousAfter++
		}
	}
	return legit, spuriousBefore, spuriousAfter
}

// flooder sends spoofed TCP SYNs from a raw socket in a namespace.
type flooder struct {
	fd   int
	dst  netip.AddrPort
	sent atomic.Int64
}

func newFlooder(ns string, dst netip.AddrPort) (*flooder, error) {
	f := &flooder{fd: -1, dst: dst}
	err := nsDo(ns, func() error {
		fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW, syscall.IPPROTO_RAW)
		if err != nil {
			return fmt.Errorf("raw socket: %w", err)
		}
		f.fd = fd
		return nil
	})
	return f, err
}

func (f *flooder) close() {
	if f.fd >= 0 {
		syscall.Close(f.fd)
	}
}

// run sends rate SYNs a second for d, in bursts every 10 ms; a burst
// catches up with the schedule when the machine is late.
func (f *flooder) run(rate int, d time.Duration) {
	prefix := netip.MustParsePrefix(spoofedPrefix).Addr().As4()
	to := &syscall.SockaddrInet4{Addr: f.dst.Addr().As4()}
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	start := time.Now()
	var due int64
	for now := range tick.C {
		elapsed := min(now.Sub(start), d)
		for target := int64(elapsed) * int64(rate) / int64(time.Second); due < target; due++ {
			src := prefix
			src[2], src[3] = byte(rand.IntN(256)), byte(rand.IntN(254)+1)
			pkt := synPacket(netip.AddrPortFrom(netip.AddrFrom4(src), uint16(1024+rand.IntN(60000))), f.dst, rand.Uint32())
			if syscall.Sendto(f.fd, pkt, 0, to) == nil {
				f.sent.Add(1)
			}
		}
		if elapsed >= d {
			return
		}
	}
}

// synPacket is an IPv4 TCP SYN (with an MSS option) from src to dst.
func synPacket(src, dst netip.AddrPort, seq uint32) []byte {
	const ipLen, tcpLen = 20, 24
	b := make([]byte, ipLen+tcpLen)
	s4, d4 := src.Addr().As4(), dst.Addr().As4()
	b[0], b[8], b[9] = 0x45, 64, syscall.IPPROTO_TCP
	binary.BigEndian.PutUint16(b[2:], ipLen+tcpLen)
	binary.BigEndian.PutUint16(b[4:], uint16(rand.Uint32()))
	copy(b[12:], s4[:])
	copy(b[16:], d4[:])
	binary.BigEndian.PutUint16(b[10:], ^onesSum(b[:ipLen], 0))
	tcp := b[ipLen:]
	binary.BigEndian.PutUint16(tcp[0:], src.Port())
	binary.BigEndian.PutUint16(tcp[2:], dst.Port())
	binary.BigEndian.PutUint32(tcp[4:], seq)
	tcp[12], tcp[13] = (tcpLen/4)<<4, 0x02 // SYN
	binary.BigEndian.PutUint16(tcp[14:], 64240)
	copy(tcp[20:], []byte{2, 4, 0x05, 0xb4})
	pseudo := make([]byte, 12)
	copy(pseudo, s4[:])
	copy(pseudo[4:], d4[:])
	pseudo[9] = syscall.IPPROTO_TCP
	binary.BigEndian.PutUint16(pseudo[10:], tcpLen)
	binary.BigEndian.PutUint16(tcp[16:], ^onesSum(tcp, onesSum(pseudo, 0)))
	return b
}

// onesSum is the Internet checksum's one's-complement sum of b added to
// initial.
func onesSum(b []byte, initial uint16) uint16 {
	sum := uint32(initial)
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return uint16(sum)
}

// TestInboundAcceptBeforeDial: with no flood at all, an inbound flow is
// accepted before its upstream is dialed. A chain whose tcp_proxy goes to
// an ordinary cluster (an inbound|port|| cluster with its endpoint at
// 127.0.0.1) behaves as Envoy: accepted, then reset when the endpoint
// refuses, and served when it listens. A flow to InboundPassthroughCluster
// (ORIGINAL_DST) is refused without a handshake when nothing in the pod
// listens on its destination, and served when something does.
func TestInboundAcceptBeforeDial(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	startTCPServer(t, topo.Pod, "127.0.0.1:9302", echo)
	startTCPServer(t, topo.Pod, "0.0.0.0:9303", echo)
	chain := func(port uint16, cluster string) obj {
		return obj{"name": fmt.Sprintf("inbound-%d", port), "filter_chain_match": obj{"destination_port": port},
			"filters": []obj{tcpProxy(cluster)}}
	}
	in := virtualInbound()
	in["filter_chains"] = append([]obj{chain(9300, "inbound|9300||"), chain(9302, "inbound|9302||")}, in["filter_chains"].([]obj)...)
	clusters := append(istioClusters(),
		staticCluster("inbound|9300||", "ROUND_ROBIN", netip.MustParseAddrPort("127.0.0.1:9300")),
		staticCluster("inbound|9302||", "ROUND_ROBIN", netip.MustParseAddrPort("127.0.0.1:9302")))
	startProxy(t, topo, "--bootstrap", writeBootstrap(t, []obj{virtualOutbound("PassthroughCluster"), in}, clusters))

	if how, err := refusedOrReset(topo.Services, ap(topo.PodV4, 9300)); err != nil || how != "accepted, then reset" {
		t.Errorf("inbound to a cluster whose endpoint refuses: %q, %v; want accepted, then reset", how, err)
	}
	if err := refused(topo.Services, ap(topo.PodV4, 9301)); err != nil {
		t.Errorf("inbound passthrough to a port nothing listens on: %v", err)
	}
	if err := legitFlow(topo.Services, ap(topo.PodV4, 9302), "legit-cluster"); err != nil {
		t.Errorf("inbound to a cluster whose endpoint listens: %v", err)
	}
	if err := legitFlow(topo.Services, ap(topo.PodV4, 9303), "legit-passthrough"); err != nil {
		t.Errorf("inbound passthrough to a listening port: %v", err)
	}
}
