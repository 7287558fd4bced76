//go:build linux

package integration

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"regexp"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const (
	dialTimeout  = 5 * time.Second
	echoTimeout  = 20 * time.Second
	accessWait   = 5 * time.Second // for an access line after its flow ended
	noEntryGrace = 500 * time.Millisecond
)

// tcpEcho dials dst from ns, echoes n random bytes through it and returns
// the client's local address as the access log prints it.
func tcpEcho(ns, dst string, n int) (string, error) {
	c, err := dialTCP(ns, dst, dialTimeout)
	if err != nil {
		return "", err
	}
	defer c.Close()
	local := addrPort(c.LocalAddr()).String()
	if err := echoRoundTrip(c, randomPayload(n), echoTimeout); err != nil {
		return local, fmt.Errorf("echo %d bytes %s -> %s: %w", n, local, dst, err)
	}
	return local, nil
}

// wantAccess is what one flow's access line must say. Transport,
// DownstreamLocal and DownstreamRemote identify the line.
type wantAccess struct {
	Transport        string
	Direction        string
	DownstreamLocal  string // the original destination
	DownstreamRemote string // the original source
	Cluster          string
	Flags            string // "" means "-"
	Received, Sent   int64  // -1: not checked
	AtLeast          bool   // Received and Sent are lower bounds (UDP retries)
}

// expectAccess waits for the flow's access line and checks its fields.
func expectAccess(t *testing.T, px *proxyProc, w wantAccess, timeout time.Duration) (AccessEntry, bool) {
	t.Helper()
	e, ok := px.waitAccess(func(e AccessEntry) bool {
		return e.Transport == w.Transport && e.DownstreamLocal == w.DownstreamLocal && e.DownstreamRemote == w.DownstreamRemote
	}, timeout)
	if !ok {
		t.Errorf("no %s access line with downstream_local_address %q and downstream_remote_address %q within %v; access lines:\n%s",
			w.Transport, w.DownstreamLocal, w.DownstreamRemote, timeout, entriesText(px.accessLogs()))
		return e, false
	}
	flags := w.Flags
	if flags == "" {
		flags = "-"
	}
	var bad []string
	check := func(field, got, want string) {
		if got != want {
			bad = append(bad, fmt.Sprintf("%s = %q, want %q", field, got, want))
		}
	}
	check("direction", e.Direction, w.Direction)
	check("upstream_cluster", e.UpstreamCluster, w.Cluster)
	check("response_flags", e.ResponseFlags, flags)
	if w.Direction == "outbound" {
		check("upstream_host", e.UpstreamHost, w.DownstreamLocal) // passthrough: the original destination
	}
	checkBytes := func(field string, got, want int64) {
		switch {
		case want < 0:
		case w.AtLeast && got < want:
			bad = append(bad, fmt.Sprintf("%s = %d, want >= %d", field, got, want))
		case !w.AtLeast && got != want:
			bad = append(bad, fmt.Sprintf("%s = %d, want %d", field, got, want))
		}
	}
	checkBytes("bytes_received", e.BytesReceived, w.Received)
	checkBytes("bytes_sent", e.BytesSent, w.Sent)
	if len(bad) > 0 {
		t.Errorf("access line for %s -> %s: %s\nline: %s", w.DownstreamRemote, w.DownstreamLocal, strings.Join(bad, "; "), e.Raw)
	}
	return e, len(bad) == 0
}

func entriesText(es []AccessEntry) string {
	if len(es) == 0 {
		return "  (none)"
	}
	var b strings.Builder
	for i, e := range es {
		if i == 50 {
			fmt.Fprintf(&b, "  ... %d more\n", len(es)-50)
			break
		}
		b.WriteString("  " + e.Raw + "\n")
	}
	return b.String()
}

func byDst(dst string) func(AccessEntry) bool {
	return func(e AccessEntry) bool { return e.DownstreamLocal == dst }
}

// checkOutboundTCP: a pod client reaches svc (an echo server) through
// capture with 1 MiB both ways; the service sees the pod's address and the
// access log the original 4-tuple.
func checkOutboundTCP(t *testing.T, topo *topology, px *proxyProc, srv *tcpServer, svc string, podIP netip.Addr) {
	t.Helper()
	const n = 1 << 20
	local, err := tcpEcho(topo.Pod, svc, n)
	if err != nil {
		t.Fatal(err)
	}
	if got := srv.accepted(); len(got) != 1 || got[0].Addr() != podIP {
		t.Errorf("service %s accepted %v, want one connection from the pod IP %v", svc, got, podIP)
	}
	expectAccess(t, px, wantAccess{
		Transport: "tcp", Direction: "outbound", DownstreamLocal: svc, DownstreamRemote: local,
		Cluster: "PassthroughCluster", Received: n, Sent: n,
	}, accessWait)
}

// checkInboundTCP: a client in services reaches the pod's app on dst
// through inbound capture.
func checkInboundTCP(t *testing.T, topo *topology, px *proxyProc, app *tcpServer, dst string) {
	t.Helper()
	const n = 256 << 10
	local, err := tcpEcho(topo.Services, dst, n)
	if err != nil {
		t.Fatal(err)
	}
	if got := app.accepted(); len(got) != 1 {
		t.Errorf("pod app accepted %v, want one connection", got)
	}
	expectAccess(t, px, wantAccess{
		Transport: "tcp", Direction: "inbound", DownstreamLocal: dst, DownstreamRemote: local,
		Cluster: "InboundPassthroughCluster", Received: n, Sent: n,
	}, accessWait)
}

func TestOutboundTCPCaptured(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	svc := ap(topo.SvcV4, 8080)
	srv := startTCPServer(t, topo.Services, svc, echo)
	px := startProxy(t, topo)
	checkOutboundTCP(t, topo, px, srv, svc, topo.PodV4)
}

func TestUDPThroughCapture(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	svc := ap(topo.SvcV4, 5353)
	u := startUDPEcho(t, topo.Services, svc)
	px := startProxy(t, topo, "--udp-idle-timeout", "1s")

	c, err := dialUDP(topo.Pod, svc)
	if err != nil {
		t.Fatal(err)
	}
	local := addrPort(c.LocalAddr()).String()
	var sent int64
	for _, n := range []int{100, 8 << 10} {
		if err := udpRoundTrip(c, randomPayload(n), 5, time.Second); err != nil {
			t.Errorf("UDP %s -> %s, %d-byte datagram: %v", local, svc, n, err)
		}
		sent += int64(n)
	}
	_ = c.Close()
	for src := range u.sources() {
		if src.Addr() != topo.PodV4 {
			t.Errorf("UDP service saw source %v, want the pod IP %v", src, topo.PodV4)
		}
	}
	// The flow's line comes when it idles out (1 s).
	expectAccess(t, px, wantAccess{
		Transport: "udp", Direction: "outbound", DownstreamLocal: svc, DownstreamRemote: local,
		Cluster: "PassthroughCluster", Received: sent, Sent: sent, AtLeast: true,
	}, 10*time.Second)
}

func TestInboundTCPCaptured(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	app := startTCPServer(t, topo.Pod, "0.0.0.0:9090", echo)
	px := startProxy(t, topo)
	checkInboundTCP(t, topo, px, app, ap(topo.PodV4, 9090))
}

func TestIPv6OutboundAndInbound(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	svc := ap(topo.SvcV6, 8080)
	srv := startTCPServer(t, topo.Services, svc, echo)
	app := startTCPServer(t, topo.Pod, "[::]:9090", echo)
	px := startProxy(t, topo)
	t.Run("outbound", func(t *testing.T) { checkOutboundTCP(t, topo, px, srv, svc, topo.PodV6) })
	t.Run("inbound", func(t *testing.T) { checkInboundTCP(t, topo, px, app, ap(topo.PodV6, 9090)) })
}

func TestNoLoop(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	svc := ap(topo.SvcV4, 8080)
	srv := startTCPServer(t, topo.Services, svc, echo)
	px := startProxy(t, topo)

	const n = 20
	for i := 0; i < n; i++ {
		if _, err := tcpEcho(topo.Pod, svc, 4<<10); err != nil {
			t.Fatalf("connection %d: %v", i+1, err)
		}
	}
	got := px.waitAccessN(byDst(svc), n, 10*time.Second)
	if len(got) < n {
		t.Fatalf("%d access lines for %s after 20 connections, want %d:\n%s", len(got), svc, n, entriesText(px.accessLogs()))
	}
	time.Sleep(noEntryGrace) // a looped flow would log after its parent
	if all := px.accessLogs(); len(all) != n {
		t.Errorf("%d access lines, want exactly %d (a capture loop multiplies flows):\n%s", len(all), n, entriesText(all))
	}
	if acc := srv.accepted(); len(acc) != n {
		t.Errorf("service accepted %d connections, want %d", len(acc), n)
	}
}

func TestExclusions(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	captured := ap(topo.SvcV4, 8080)
	exclPort := ap(topo.SvcV4, 8081)
	exclCIDR := ap(topo.Svc2V4, 8080)
	inCaptured := ap(topo.PodV4, 9090)
	inExcluded := ap(topo.PodV4, 9091)
	for _, a := range []string{captured, exclPort, exclCIDR} {
		startTCPServer(t, topo.Services, a, echo)
	}
	startTCPServer(t, topo.Pod, "0.0.0.0:9090", echo)
	startTCPServer(t, topo.Pod, "0.0.0.0:9091", echo)
	px := startProxy(t, topo,
		"--exclude-outbound-ports", "8081",
		"--exclude-outbound-cidrs", topo.Svc2V4.String()+"/32",
		"--exclude-inbound-ports", "9091")

	// Excluded flows first, then captured ones: once the captured flows'
	// lines are in, an excluded flow that was captured would have logged.
	for _, f := range []struct{ name, ns, dst string }{
		{"outbound excluded port", topo.Pod, exclPort},
		{"outbound excluded CIDR", topo.Pod, exclCIDR},
		{"inbound excluded port", topo.Services, inExcluded},
	} {
		if _, err := tcpEcho(f.ns, f.dst, 64<<10); err != nil {
			t.Errorf("%s: %v", f.name, err)
		}
	}
	local, err := tcpEcho(topo.Pod, captured, 64<<10)
	if err != nil {
		t.Errorf("outbound captured: %v", err)
	} else {
		expectAccess(t, px, wantAccess{Transport: "tcp", Direction: "outbound", DownstreamLocal: captured,
			DownstreamRemote: local, Cluster: "PassthroughCluster", Received: 64 << 10, Sent: 64 << 10}, accessWait)
	}
	local, err = tcpEcho(topo.Services, inCaptured, 64<<10)
	if err != nil {
		t.Errorf("inbound captured: %v", err)
	} else {
		expectAccess(t, px, wantAccess{Transport: "tcp", Direction: "inbound", DownstreamLocal: inCaptured,
			DownstreamRemote: local, Cluster: "InboundPassthroughCluster", Received: 64 << 10, Sent: 64 << 10}, accessWait)
	}
	time.Sleep(noEntryGrace)
	for _, dst := range []string{exclPort, exclCIDR, inExcluded} {
		if es := px.accessMatching(byDst(dst)); len(es) > 0 {
			t.Errorf("traffic to excluded %s was captured:\n%s", dst, entriesText(es))
		}
	}
}

// podState is what capture may change in the pod namespace: policy rules,
// routes of every table, and the forwarding/filtering sysctls.
func podState(t *testing.T, ns string) string {
	t.Helper()
	var b strings.Builder
	for _, cmd := range [][]string{
		{"ip", "-4", "rule"}, {"ip", "-6", "rule"},
		{"ip", "-4", "route", "show", "table", "all"}, {"ip", "-6", "route", "show", "table", "all"},
	} {
		out, err := nsRun(ns, cmd...)
		if err != nil {
			t.Fatalf("pod state: %v", err)
		}
		fmt.Fprintf(&b, "## %s\n%s", strings.Join(cmd, " "), out)
	}
	// sysctl -a exits non-zero for a few unreadable keys; its output is what counts.
	out, err := nsRun(ns, "sysctl", "-a")
	if out == "" {
		t.Fatalf("pod state: sysctl -a: %v", err)
	}
	re := regexp.MustCompile(`^(net\.ipv4\.conf\.[^.]+\.(rp_filter|accept_local|forwarding)|net\.ipv6\.conf\.[^.]+\.(forwarding|accept_ra)|net\.ipv4\.ip_forward) = `)
	var keep []string
	for _, l := range strings.Split(out, "\n") {
		if re.MatchString(l) {
			keep = append(keep, l)
		}
	}
	sort.Strings(keep)
	b.WriteString("## sysctl\n" + strings.Join(keep, "\n") + "\n")
	return b.String()
}

// withoutIface drops the lines that name iface (a device that is gone).
func withoutIface(state, iface string) string {
	re := regexp.MustCompile(`(^|[ .])` + regexp.QuoteMeta(iface) + `([ .]|$)`)
	var keep []string
	for _, l := range strings.Split(state, "\n") {
		if !re.MatchString(l) {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

// tunLinkLocal hides the TUN device's IPv6 link-local address, which the
// kernel picks anew for each device.
func tunLinkLocal(state string) string {
	re := regexp.MustCompile(`fe80::[0-9a-f:]+`)
	lines := strings.Split(state, "\n")
	for i, l := range lines {
		if strings.Contains(l, "meshtun0") {
			lines[i] = re.ReplaceAllString(l, "fe80::(tun)")
		}
	}
	return strings.Join(lines, "\n")
}

// lineDiff lists the lines only in a ("-") and only in b ("+").
func lineDiff(a, b string) string {
	count := map[string]int{}
	for _, l := range strings.Split(a, "\n") {
		count[l]++
	}
	for _, l := range strings.Split(b, "\n") {
		count[l]--
	}
	var out []string
	for _, l := range strings.Split(a, "\n") {
		if count[l] > 0 {
			out = append(out, "- "+l)
			count[l]--
		}
	}
	for _, l := range strings.Split(b, "\n") {
		if count[l] < 0 {
			out = append(out, "+ "+l)
			count[l]++
		}
	}
	return strings.Join(out, "\n")
}

// compareRestored requires the pod state to equal before, ignoring the
// TUN device's lines when the device is gone.
func compareRestored(t *testing.T, topo *topology, what, before string) {
	t.Helper()
	after := podState(t, topo.Pod)
	if _, err := run("ip", "-n", topo.Pod, "link", "show", "meshtun0"); err != nil {
		before, after = withoutIface(before, "meshtun0"), withoutIface(after, "meshtun0")
	}
	if before != after {
		t.Errorf("%s: pod state not restored (- before, + after):\n%s", what, lineDiff(before, after))
	}
}

func TestTeardownRestores(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	svc := ap(topo.SvcV4, 8080)
	startTCPServer(t, topo.Services, svc, echo)
	before := podState(t, topo.Pod)

	px := startProxy(t, topo)
	installed := podState(t, topo.Pod)
	if installed == before {
		t.Fatalf("pod state unchanged with the proxy running: no capture installed?\n%s", before)
	}
	px.stop()
	compareRestored(t, topo, "after SIGTERM", before)

	// A crashed proxy leaves capture behind; the next one must clean it up
	// and install exactly one set of rules.
	crashed := startProxy(t, topo)
	crashed.kill9()
	if left := lineDiff(withoutIface(before, "meshtun0"), withoutIface(podState(t, topo.Pod), "meshtun0")); left != "" {
		t.Logf("left behind by kill -9 (- before, + now):\n%s", left)
	} else {
		t.Log("kill -9 left nothing behind")
	}
	px = startProxy(t, topo)
	// Compared as sets: the local table sorts routes by address.
	if diff := lineDiff(tunLinkLocal(installed), tunLinkLocal(podState(t, topo.Pod))); diff != "" {
		t.Errorf("capture after a crash and restart differs from a clean start (- clean, + after restart):\n%s", diff)
	}
	local, err := tcpEcho(topo.Pod, svc, 64<<10)
	if err != nil {
		t.Errorf("after restart: %v", err)
	} else {
		expectAccess(t, px, wantAccess{Transport: "tcp", Direction: "outbound", DownstreamLocal: svc,
			DownstreamRemote: local, Cluster: "PassthroughCluster", Received: 64 << 10, Sent: 64 << 10}, accessWait)
	}
	px.stop()
	compareRestored(t, topo, "after kill -9, restart and SIGTERM", before)
}

func TestHalfCloseAndReset(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	px := startProxy(t, topo)

	t.Run("half-close", func(t *testing.T) {
		dst := ap(topo.SvcV4, 8100)
		reply := randomPayload(256 << 10)
		gotReq := make(chan []byte, 1)
		startTCPServer(t, topo.Services, dst, replyAfterEOF(reply, gotReq))
		c, err := dialTCP(topo.Pod, dst, dialTimeout)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		req := randomPayload(1000)
		if _, err := c.Write(req); err != nil {
			t.Fatal(err)
		}
		if err := c.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		resp, err := io.ReadAll(c) // nil error: the reply ended in EOF
		if err != nil {
			t.Fatalf("reading the reply after CloseWrite: %d of %d bytes, then %v", len(resp), len(reply), err)
		}
		if !bytes.Equal(resp, reply) {
			t.Errorf("reply: got %d bytes, want the %d sent (or they differ)", len(resp), len(reply))
		}
		select {
		case r := <-gotReq:
			if !bytes.Equal(r, req) {
				t.Errorf("server read a %d-byte request, want the %d sent", len(r), len(req))
			}
		case <-time.After(2 * time.Second):
			t.Error("server never finished reading the request")
		}
	})

	t.Run("upstream-reset", func(t *testing.T) {
		dst := ap(topo.SvcV4, 8101)
		reset := make(chan struct{}, 1)
		startTCPServer(t, topo.Services, dst, func(c *net.TCPConn) {
			buf := make([]byte, 5)
			if _, err := io.ReadFull(c, buf); err != nil {
				return
			}
			_ = c.SetLinger(0)
			_ = c.Close()
			reset <- struct{}{}
		})
		c, err := dialTCP(topo.Pod, dst, dialTimeout)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		local := addrPort(c.LocalAddr()).String()
		if _, err := c.Write([]byte("hello")); err != nil {
			t.Fatal(err)
		}
		select {
		case <-reset:
		case <-time.After(5 * time.Second):
			t.Fatal("server never got the request")
		}
		start := time.Now()
		_ = c.SetReadDeadline(start.Add(2 * time.Second))
		n, err := c.Read(make([]byte, 100))
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("client Read after the server reset: n=%d err=%v after %v; want ECONNRESET within 2s (the reset must reach the client as a reset, not a FIN)",
				n, err, time.Since(start).Round(time.Millisecond))
		}
		expectAccess(t, px, wantAccess{Transport: "tcp", Direction: "outbound", DownstreamLocal: dst,
			DownstreamRemote: local, Cluster: "PassthroughCluster", Flags: "UR", Received: 5, Sent: 0}, accessWait)
	})

	t.Run("downstream-reset", func(t *testing.T) {
		dst := ap(topo.SvcV4, 8102)
		gotReq := make(chan struct{}, 1)
		type result struct {
			err     error
			elapsed time.Duration
		}
		after := make(chan result, 1)
		startTCPServer(t, topo.Services, dst, func(c *net.TCPConn) {
			buf := make([]byte, 5)
			if _, err := io.ReadFull(c, buf); err != nil {
				return
			}
			gotReq <- struct{}{}
			start := time.Now()
			_ = c.SetReadDeadline(start.Add(2 * time.Second))
			_, err := c.Read(buf)
			after <- result{err, time.Since(start)}
		})
		c, err := dialTCP(topo.Pod, dst, dialTimeout)
		if err != nil {
			t.Fatal(err)
		}
		local := addrPort(c.LocalAddr()).String()
		if _, err := c.Write([]byte("hello")); err != nil {
			t.Fatal(err)
		}
		select {
		case <-gotReq:
		case <-time.After(5 * time.Second):
			t.Fatal("server never got the request")
		}
		_ = c.SetLinger(0)
		_ = c.Close() // RST
		select {
		case r := <-after:
			switch {
			case errors.Is(r.err, syscall.ECONNRESET), errors.Is(r.err, io.EOF):
				t.Logf("server saw %v after %v", r.err, r.elapsed.Round(time.Millisecond))
			case isTimeout(r.err):
				t.Errorf("server saw nothing within 2s of the client's reset")
			default:
				t.Errorf("server Read after the client reset: %v, want ECONNRESET or EOF", r.err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("server read did not return")
		}
		expectAccess(t, px, wantAccess{Transport: "tcp", Direction: "outbound", DownstreamLocal: dst,
			DownstreamRemote: local, Cluster: "PassthroughCluster", Flags: "DR", Received: 5, Sent: 0}, accessWait)
	})
}

// raiseNoFile makes sure the soft RLIMIT_NOFILE is at least want (for this
// process and the proxy it starts), restoring it at cleanup.
func raiseNoFile(t *testing.T, want uint64) {
	t.Helper()
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
		t.Fatalf("getrlimit: %v", err)
	}
	if old.Cur >= want {
		return
	}
	lim := old
	lim.Cur = min(want, old.Max)
	if lim.Cur < want {
		t.Logf("RLIMIT_NOFILE hard limit %d is below %d", old.Max, want)
	}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatalf("setrlimit NOFILE %d: %v", lim.Cur, err)
	}
	t.Cleanup(func() { _ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old) })
}

func TestManyConcurrentFlows(t *testing.T) {
	requireRoot(t)
	const (
		flows   = 1000
		size    = 16 << 10
		dialers = 8
	)
	raiseNoFile(t, 4*flows+1024)
	topo := newTopology(t)
	svc := ap(topo.SvcV4, 8080)
	srv := startTCPServer(t, topo.Services, svc, echo)
	px := startProxy(t, topo)
	deadline := time.Now().Add(60 * time.Second)

	// Open all flows first, so that all 1000 are up at once.
	conns := make([]*net.TCPConn, flows)
	dialErrs := make([]error, flows)
	var wg sync.WaitGroup
	for w := 0; w < dialers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := nsDo(topo.Pod, func() error {
				d := net.Dialer{Timeout: 15 * time.Second, KeepAlive: -1}
				for i := w; i < flows; i += dialers {
					c, err := d.Dial("tcp", svc)
					if err != nil {
						dialErrs[i] = err
						continue
					}
					conns[i] = c.(*net.TCPConn)
				}
				return nil
			})
			if err != nil {
				for i := w; i < flows; i += dialers {
					dialErrs[i] = err
				}
			}
		}()
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, c := range conns {
			if c != nil {
				_ = c.Close()
			}
		}
	})
	if failed := firstErrors(dialErrs); failed != "" {
		t.Fatalf("dialing %d flows: %s", flows, failed)
	}
	t.Logf("%d flows open after %v", flows, (60*time.Second - time.Until(deadline)).Round(time.Millisecond))

	errs := make([]error, flows)
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = echoRoundTrip(c, randomPayload(size), time.Until(deadline))
			_ = c.Close()
		}()
	}
	wg.Wait()
	if failed := firstErrors(errs); failed != "" {
		t.Errorf("echo over %d concurrent flows: %s", flows, failed)
	}
	t.Logf("%d echoes done after %v", flows, (60*time.Second - time.Until(deadline)).Round(time.Millisecond))
	if acc := srv.accepted(); len(acc) != flows {
		t.Errorf("service accepted %d connections, want %d", len(acc), flows)
	}
	got := px.waitAccessN(byDst(svc), flows, max(time.Until(deadline), 5*time.Second))
	if len(got) != flows {
		t.Errorf("%d access lines for %s, want %d", len(got), svc, flows)
	}
	var bad []AccessEntry
	for _, e := range got {
		if e.BytesReceived != size || e.BytesSent != size || e.ResponseFlags != "-" {
			bad = append(bad, e)
		}
	}
	if len(bad) > 0 {
		t.Errorf("%d access lines with wrong byte counts or flags (want %d both ways, \"-\"):\n%s", len(bad), size, entriesText(bad))
	}
}

// firstErrors summarises the non-nil errors ("" if none).
func firstErrors(errs []error) string {
	var n int
	var first []string
	for i, err := range errs {
		if err == nil {
			continue
		}
		n++
		if len(first) < 5 {
			first = append(first, fmt.Sprintf("flow %d: %v", i, err))
		}
	}
	if n == 0 {
		return ""
	}
	return fmt.Sprintf("%d failed; first: %s", n, strings.Join(first, "; "))
}
