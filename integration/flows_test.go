//go:build linux

package integration

// Issue 18 item 8: ten thousand established flows at once through the
// capture, what each costs the proxy and that all of it is given back, and
// the proxy at its file-descriptor limit.

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// flowMsg is the size of each flow's message: a small request, as most
// flows of a pod carry, so the test measures what an established flow
// holds rather than what bulk transfer buffers.
const flowMsg = 64

// smallEcho echoes with a small buffer of its own: io.Copy would splice,
// and a splice blocked in read holds a pipe (two fds) per connection,
// which the test process cannot afford ten thousand times over.
func smallEcho(c *net.TCPConn) {
	buf := make([]byte, 512)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			if err == io.EOF {
				_ = c.CloseWrite()
			}
			return
		}
	}
}

// echoEnv names the service addresses when the test binary is run as the
// echo server of TestTenThousandFlows: a process of its own, because one
// process holding the client and the server end of 10,000 flows would
// need more fds than a container without CAP_SYS_RESOURCE may have.
const echoEnv = "MESHTUN_FLOWS_ECHO"

func init() {
	if addrs := os.Getenv(echoEnv); addrs != "" {
		os.Exit(echoProcess(strings.Split(addrs, ",")))
	}
}

// echoProcess serves smallEcho on addrs until killed; it prints
// "flows echo ready" once every address listens.
func echoProcess(addrs []string) int {
	errc := make(chan error, len(addrs))
	for _, a := range addrs {
		ln, err := net.Listen("tcp", a)
		if err != nil {
			fmt.Fprintln(os.Stderr, "flows echo:", err)
			return 1
		}
		go func() {
			var backoff time.Duration
			for {
				c, err := ln.Accept()
				if err != nil {
					var ne net.Error
					if errors.As(err, &ne) && ne.Temporary() { //nolint:staticcheck // EMFILE is only marked temporary
						backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
						time.Sleep(backoff)
						continue
					}
					errc <- err
					return
				}
				backoff = 0
				go func() {
					defer c.Close()
					smallEcho(c.(*net.TCPConn))
				}()
			}
		}()
	}
	fmt.Fprintln(os.Stderr, "flows echo ready")
	err := <-errc
	fmt.Fprintln(os.Stderr, "flows echo:", err)
	return 1
}

// startEchoProcess runs the test binary as the echo server on svcs in ns.
func startEchoProcess(t *testing.T, ns string, svcs []string) {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatalf("test binary: %v", err)
	}
	env := append(os.Environ(), echoEnv+"="+strings.Join(svcs, ","))
	p := startProc(t, "flows echo", []string{"netns", "exec", ns, self}, env, syscall.SIGKILL)
	if !p.waitLine(func(l string) bool { return l == "flows echo ready" }, 10*time.Second) {
		t.Fatalf("echo server process not ready (exited: %v %v); output:\n%s", p.exited(), p.waitErr, strings.Join(p.logLines(), "\n"))
	}
}

// flowPayload is flow i's message for round r: distinct per flow and
// round, so an echo delivered to the wrong flow is caught.
func flowPayload(i, r int) []byte {
	p := randomPayload(flowMsg)
	copy(p, fmt.Sprintf("flow %05d round %d|", i, r))
	return p
}

// flowEcho sends p on c and reads exactly len(p) bytes back by deadline.
func flowEcho(c *net.TCPConn, p []byte, deadline time.Time) error {
	if err := c.SetDeadline(deadline); err != nil {
		return err
	}
	if _, err := c.Write(p); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	got := make([]byte, len(p))
	if n, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("read echo (%d of %d bytes): %w", n, len(p), err)
	}
	if !bytes.Equal(got, p) {
		return fmt.Errorf("echo differs: sent %q, got %q", p, got)
	}
	return nil
}

// setNoFile sets this process's RLIMIT_NOFILE, soft and hard, to at least
// n (root may raise the hard limit), restoring it at cleanup.
func setNoFile(t *testing.T, n uint64) {
	t.Helper()
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
		t.Fatalf("getrlimit NOFILE: %v", err)
	}
	if old.Cur >= n {
		return
	}
	lim := syscall.Rlimit{Cur: n, Max: max(n, old.Max)}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatalf("setrlimit NOFILE %d: %v", n, err)
	}
	t.Cleanup(func() { _ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old) })
}

// procSample is what /proc says of a process.
type procSample struct {
	RSS     uint64 // VmRSS, bytes
	Threads int
	FDs     int
}

func sampleProc(t *testing.T, pid int) procSample {
	t.Helper()
	var s procSample
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatalf("proxy pid %d: %v", pid, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, _ := strings.Cut(sc.Text(), ":")
		fs := strings.Fields(v)
		if len(fs) == 0 {
			continue
		}
		switch k {
		case "VmRSS":
			kb, _ := strconv.ParseUint(fs[0], 10, 64)
			s.RSS = kb << 10
		case "Threads":
			s.Threads, _ = strconv.Atoi(fs[0])
		}
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatalf("proxy pid %d: %v", pid, err)
	}
	s.FDs = len(fds)
	return s
}

// serverStats reads the proxy's server.* gauges from /stats.
func serverStats(t *testing.T, topo *topology) map[string]uint64 {
	t.Helper()
	body := adminGet(t, topo, "/stats?filter="+url.QueryEscape(`^server\.(goroutines|total_connections|memory_allocated)$`))
	out := map[string]uint64{}
	for _, l := range strings.Split(strings.TrimSpace(body), "\n") {
		k, v, ok := strings.Cut(l, ": ")
		if !ok {
			continue
		}
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("/stats line %q: %v", l, err)
		}
		out[k] = n
	}
	for _, k := range []string{"server.goroutines", "server.total_connections", "server.memory_allocated"} {
		if _, ok := out[k]; !ok {
			t.Fatalf("/stats has no %s:\n%s", k, body)
		}
	}
	return out
}

// openFlows dials n flows from ns, flow i to dsts[i%len(dsts)], with
// workers dialling at once, and echoes each flow's round-1 message. A flow
// whose dial or echo failed is nil, its error in errs.
func openFlows(ns string, dsts []string, n, workers int, deadline time.Time) ([]*net.TCPConn, []error) {
	conns := make([]*net.TCPConn, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := nsDo(ns, func() error {
				for i := w; i < n; i += workers {
					d := net.Dialer{Deadline: deadline, KeepAlive: -1}
					c, err := d.Dial("tcp", dsts[i%len(dsts)])
					if err != nil {
						errs[i] = err
						continue
					}
					tc := c.(*net.TCPConn)
					if err := flowEcho(tc, flowPayload(i, 1), deadline); err != nil {
						errs[i] = fmt.Errorf("%v -> %s: %w", tc.LocalAddr(), dsts[i%len(dsts)], err)
						_ = tc.Close()
						continue
					}
					conns[i] = tc
				}
				return nil
			})
			if err != nil {
				for i := w; i < n; i += workers {
					errs[i] = err
				}
			}
		}()
	}
	wg.Wait()
	return conns, errs
}

// echoAll echoes round r's message on every open flow, workers at once.
func echoAll(conns []*net.TCPConn, r, workers int, deadline time.Time) []error {
	errs := make([]error, len(conns))
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < len(conns); i += workers {
				if conns[i] != nil {
					errs[i] = flowEcho(conns[i], flowPayload(i, r), deadline)
				}
			}
		}()
	}
	wg.Wait()
	return errs
}

func closeAll(conns []*net.TCPConn) {
	for _, c := range conns {
		if c != nil {
			_ = c.Close()
		}
	}
}

// sidecarBootstrap is Istio's sidecar shape: the virtual listeners with
// their passthrough clusters, and the admin API on 127.0.0.1:15000. As
// Istio does, the passthrough clusters' circuit breakers are opened wide
// (Envoy's default max_connections is 1,024).
func sidecarBootstrap(t *testing.T) string {
	clusters := istioClusters()
	for _, c := range clusters {
		if strings.Contains(c["name"].(string), "Passthrough") {
			c["circuit_breakers"] = obj{"thresholds": []obj{{"max_connections": uint32(math.MaxUint32),
				"max_pending_requests": uint32(math.MaxUint32), "max_requests": uint32(math.MaxUint32)}}}
		}
	}
	return writeBootstrap(t, []obj{virtualOutbound("PassthroughCluster"), virtualInbound()}, clusters)
}

// TestTenThousandFlows holds 10,000 flows open at once through the
// capture (Istio's sidecar bootstrap, passthrough), each echoing a message
// of its own twice; reports what a flow costs the proxy (RSS, heap,
// goroutines, fds); and requires that, once they are closed, the proxy's
// fds, goroutines and open connections return to where they were.
func TestTenThousandFlows(t *testing.T) {
	requireRoot(t)
	const (
		flows   = 10000
		workers = 32
	)
	start := time.Now()
	deadline := start.Add(90 * time.Second)
	// This process holds the client socket of every flow; the servers
	// run in a process of their own.
	setNoFile(t, flows+1024)
	topo := newTopology(t)
	// Several service ports: the test's sockets and the proxy's upstream
	// sockets share the pod's ephemeral port range.
	var svcs []string
	for port := uint16(8101); port <= 8104; port++ {
		svcs = append(svcs, ap(topo.SvcV4, port))
	}
	startEchoProcess(t, topo.Services, svcs)
	px := startProxy(t, topo, "--bootstrap", sidecarBootstrap(t), "--log-level", "info")
	pid := px.cmd.Process.Pid
	toSvc := func(e AccessEntry) bool {
		for _, s := range svcs {
			if e.DownstreamLocal == s {
				return true
			}
		}
		return false
	}

	// Warm up (pools, lazily built state), then take the baseline.
	const warm = 20
	wconns, werrs := openFlows(topo.Pod, svcs, warm, 4, deadline)
	closeAll(wconns)
	if failed := firstErrors(werrs); failed != "" {
		t.Fatalf("warm-up flows: %s", failed)
	}
	if got := px.waitAccessN(toSvc, warm, 10*time.Second); len(got) != warm {
		t.Fatalf("%d access lines for the %d warm-up flows", len(got), warm)
	}
	baseStats, baseProc := settle(t, topo, pid, nil, 0, 10*time.Second)

	conns, errs := openFlows(topo.Pod, svcs, flows, workers, deadline)
	t.Cleanup(func() { closeAll(conns) })
	if failed := firstErrors(errs); failed != "" {
		t.Fatalf("opening %d flows: %s", flows, failed)
	}
	opened := time.Since(start)
	peakStats, peakProc := serverStats(t, topo), sampleProc(t, pid)
	if got := peakStats["server.total_connections"]; got != flows {
		t.Errorf("server.total_connections = %d with %d flows open, want %d", got, flows, flows)
	}
	// Every flow still echoes, all of them open at once.
	if failed := firstErrors(echoAll(conns, 2, workers, deadline)); failed != "" {
		t.Errorf("second echo over %d open flows: %s", flows, failed)
	}
	afterStats, afterProc := serverStats(t, topo), sampleProc(t, pid)
	peakProc.RSS = max(peakProc.RSS, afterProc.RSS)
	peakStats["server.memory_allocated"] = max(peakStats["server.memory_allocated"], afterStats["server.memory_allocated"])

	per := func(hi, lo uint64) float64 { return (float64(hi) - float64(lo)) / flows }
	t.Logf("%d flows open after %v; per flow: RSS %.1f KiB, Go heap %.1f KiB, goroutines %.2f, fds %.2f, threads %d -> %d",
		flows, opened.Round(time.Millisecond),
		per(peakProc.RSS, baseProc.RSS)/1024, per(peakStats["server.memory_allocated"], baseStats["server.memory_allocated"])/1024,
		per(peakStats["server.goroutines"], baseStats["server.goroutines"]), per(uint64(peakProc.FDs), uint64(baseProc.FDs)),
		baseProc.Threads, peakProc.Threads)
	t.Logf("proxy before: RSS %.1f MiB, heap %.1f MiB, %d goroutines, %d fds; with %d flows: RSS %.1f MiB, heap %.1f MiB, %d goroutines, %d fds",
		mib(baseProc.RSS), mib(baseStats["server.memory_allocated"]), baseStats["server.goroutines"], baseProc.FDs,
		flows, mib(peakProc.RSS), mib(peakStats["server.memory_allocated"]), peakStats["server.goroutines"], peakProc.FDs)
	if peakProc.FDs < baseProc.FDs+flows {
		t.Errorf("the proxy has %d fds with %d flows open, %d before: want one upstream socket per flow", peakProc.FDs, flows, baseProc.FDs)
	}

	echoed := time.Since(start)
	closeAll(conns)
	got := px.waitAccessN(toSvc, warm+flows, max(time.Until(deadline), 10*time.Second))
	logged := time.Since(start)
	if len(got) != warm+flows {
		t.Errorf("%d access lines for %d flows", len(got), warm+flows)
	}
	var bad []AccessEntry
	for _, e := range got[min(warm, len(got)):] {
		if e.BytesReceived != 2*flowMsg || e.BytesSent != 2*flowMsg || e.ResponseFlags != "-" {
			bad = append(bad, e)
		}
	}
	if len(bad) > 0 {
		t.Errorf("%d access lines with wrong byte counts or flags (want %d both ways, \"-\"):\n%s", len(bad), 2*flowMsg, entriesText(bad))
	}
	endStats, endProc := settle(t, topo, pid, &baseProc, baseStats["server.goroutines"], max(time.Until(deadline), 10*time.Second))
	t.Logf("proxy after closing: RSS %.1f MiB, heap %.1f MiB, %d goroutines, %d fds, %d threads (at %v: second echo done at %v, every access line at %v)",
		mib(endProc.RSS), mib(endStats["server.memory_allocated"]), endStats["server.goroutines"], endProc.FDs, endProc.Threads,
		time.Since(start).Round(time.Millisecond), echoed.Round(time.Millisecond), logged.Round(time.Millisecond))
	if endProc.FDs > baseProc.FDs {
		t.Errorf("the proxy holds %d fds after every flow closed, %d before", endProc.FDs, baseProc.FDs)
	}
	if endStats["server.goroutines"] > baseStats["server.goroutines"] {
		t.Errorf("the proxy runs %d goroutines after every flow closed, %d before", endStats["server.goroutines"], baseStats["server.goroutines"])
	}
	if n := endStats["server.total_connections"]; n != 0 {
		t.Errorf("server.total_connections = %d after every flow closed", n)
	}
}

func mib(b uint64) float64 { return float64(b) / (1 << 20) }

// settle waits until the proxy has no open connection and, when base is
// given, no more fds than base and goroutines than baseG (flows wind down after
// their clients close), for at most wait; it returns the last samples.
func settle(t *testing.T, topo *topology, pid int, base *procSample, baseG uint64, wait time.Duration) (map[string]uint64, procSample) {
	t.Helper()
	end := time.Now().Add(wait)
	for {
		st, ps := serverStats(t, topo), sampleProc(t, pid)
		done := st["server.total_connections"] == 0
		if base != nil {
			done = done && ps.FDs <= base.FDs && st["server.goroutines"] <= baseG
		}
		if done || time.Now().After(end) {
			return st, ps
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestFlowsAtFdLimit runs the proxy with RLIMIT_NOFILE 1024 and opens more
// flows than it has fds for: those past the limit are refused at once
// (the client sees a RST) with an access line naming EMFILE; the flows
// already open keep echoing; the proxy does not crash; an admin request
// made at the limit is answered once fds are free again; and after some
// flows close, new flows succeed.
func TestFlowsAtFdLimit(t *testing.T) {
	requireRoot(t)
	const (
		limit = 1024
		// Few dialers at once, so that the stack offers every flow
		// DialFirst (few half-open) and a refused one sees a RST.
		workers = 8
	)
	deadline := time.Now().Add(90 * time.Second)
	setNoFile(t, 4*limit+1024)
	topo := newTopology(t)
	svc := ap(topo.SvcV4, 8200)
	startTCPServer(t, topo.Services, svc, smallEcho)
	px := startProxy(t, topo, "--bootstrap", sidecarBootstrap(t), "--log-level", "info")
	pid := px.cmd.Process.Pid
	if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: limit, Max: limit}, nil); err != nil {
		t.Fatalf("prlimit NOFILE %d on the proxy (pid %d): %v", limit, pid, err)
	}
	base := sampleProc(t, pid)

	// A hundred flows more than the proxy has fds left.
	attempts := limit - base.FDs + 100
	conns, errs := openFlows(topo.Pod, []string{svc}, attempts, workers, deadline)
	t.Cleanup(func() { closeAll(conns) })
	var open, refused int
	var other []error
	for i, err := range errs {
		switch {
		case err == nil:
			open++
		case errors.Is(err, syscall.ECONNREFUSED):
			refused++
		default:
			other = append(other, fmt.Errorf("flow %d: %w", i, err))
		}
	}
	atLimit := sampleProc(t, pid)
	t.Logf("RLIMIT_NOFILE %d, %d fds before: of %d flows %d open, %d refused, %d failed otherwise; the proxy then has %d fds",
		limit, base.FDs, attempts, open, refused, len(other), atLimit.FDs)
	if len(other) > 0 {
		t.Errorf("%d flows failed other than by a refused connect (want a RST past the limit): %v", len(other), errors.Join(other[:min(5, len(other))]...))
	}
	if refused == 0 {
		t.Fatalf("no flow refused with %d attempts at RLIMIT_NOFILE %d (%d fds before)", attempts, limit, base.FDs)
	}
	if want := (limit - base.FDs) * 9 / 10; open < want {
		t.Errorf("only %d flows open at RLIMIT_NOFILE %d with %d fds in use before, want at least %d", open, limit, base.FDs, want)
	}
	emfile := func(e AccessEntry) bool {
		return e.DownstreamLocal == svc && e.ResponseFlags == "UF" && strings.Contains(e.Raw, "too many open files") &&
			strings.Contains(e.Raw, fmt.Sprintf("RLIMIT_NOFILE %d", limit))
	}
	if got := px.waitAccessN(emfile, refused, 10*time.Second); len(got) != refused {
		t.Errorf("%d access lines with UF naming \"too many open files\" and RLIMIT_NOFILE %d for %d refused flows; lines:\n%s",
			len(got), limit, refused, entriesText(px.accessMatching(func(e AccessEntry) bool { return e.ResponseFlags != "-" })))
	}
	// The proxy's own log says it too (the access log is often off): one
	// warning for the burst, not one per flow.
	var warns []string
	for _, l := range px.logLines() {
		var m struct{ Level, Logger, Error, Message string }
		if json.Unmarshal([]byte(l), &m) == nil && m.Logger == "upstream" && strings.Contains(m.Message, "no file descriptor left") {
			warns = append(warns, l)
			if m.Level != "warn" || !strings.Contains(m.Error, fmt.Sprintf("RLIMIT_NOFILE %d", limit)) {
				t.Errorf("fd-limit log line %s: want level warn and the error naming RLIMIT_NOFILE %d", l, limit)
			}
		}
	}
	if len(warns) == 0 || len(warns) > refused/10 {
		t.Errorf("%d fd-limit warnings in the proxy's log for %d refused flows, want at least one and far fewer than flows:\n%s",
			len(warns), refused, strings.Join(warns, "\n"))
	}
	if px.exited() {
		t.Fatalf("the proxy exited at its fd limit: %v", px.waitErr)
	}

	// The flows open at the limit are unaffected.
	if failed := firstErrors(echoAll(conns, 2, workers, deadline)); failed != "" {
		t.Errorf("second echo over the %d flows open at the limit: %s", open, failed)
	}

	// An admin request made at the limit: the kernel queues it, the
	// proxy's accept fails with EMFILE until fds are free again, and the
	// accept loop must survive that.
	admin := make(chan error, 1)
	go func() { admin <- adminAtLimit(topo, deadline) }()
	time.Sleep(300 * time.Millisecond) // let the accept meet EMFILE
	freed := 0
	for i, c := range conns {
		if c != nil && freed < 100 {
			_ = c.Close()
			conns[i] = nil
			freed++
		}
	}
	select {
	case err := <-admin:
		if err != nil {
			t.Errorf("admin request made at the fd limit: %v", err)
		}
	case <-time.After(time.Until(deadline)):
		t.Fatal("admin request made at the fd limit not answered by the deadline")
	}

	// The admin's accept met EMFILE and said so in the proxy's format.
	adminWarned := px.waitLine(func(l string) bool {
		var m struct{ Level, Logger, Message string }
		return json.Unmarshal([]byte(l), &m) == nil && m.Logger == "admin" && m.Level == "warn" &&
			strings.Contains(m.Message, "too many open files")
	}, time.Second)
	if !adminWarned {
		t.Error("no admin warning naming \"too many open files\" after an admin request made at the fd limit")
	}

	// With fds free again (once the closed flows are torn down on the
	// upstream side too), new flows succeed.
	const again = 50
	for sampleProc(t, pid).FDs > limit-again-10 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if n := sampleProc(t, pid).FDs; n > limit-again-10 {
		t.Fatalf("the proxy still has %d fds after %d of its flows closed", n, freed)
	}
	newConns, newErrs := openFlows(topo.Pod, []string{svc}, again, workers, deadline)
	conns = append(conns, newConns...)
	if failed := firstErrors(newErrs); failed != "" {
		t.Errorf("new flows after %d flows closed: %s", freed, failed)
	}
	if px.exited() {
		t.Fatalf("the proxy exited: %v", px.waitErr)
	}
}

// adminAtLimit sends GET /stats to the admin port and waits for a 200.
func adminAtLimit(topo *topology, deadline time.Time) error {
	c, err := dialTCP(topo.Pod, "127.0.0.1:15000", dialTimeout)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(deadline)
	if _, err := fmt.Fprintf(c, "GET /stats?filter=server.live HTTP/1.0\r\nHost: localhost\r\n\r\n"); err != nil {
		return err
	}
	resp, err := io.ReadAll(c)
	if err != nil {
		return fmt.Errorf("read: %w (got %q)", err, resp)
	}
	if !bytes.HasPrefix(resp, []byte("HTTP/1.0 200")) && !bytes.HasPrefix(resp, []byte("HTTP/1.1 200")) {
		return fmt.Errorf("response %q", resp)
	}
	return nil
}
