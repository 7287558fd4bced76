//go:build linux

package integration

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
)

// xdsService pushes the Istio-shaped configuration of one service VIP,
// with EDS endpoints, and returns the VIP.
func xdsService(t *testing.T, cp *controlPlane, topo *topology, version string, last byte, eps ...netip.AddrPort) netip.Addr {
	t.Helper()
	v := vip(topo, false, last)
	cl := "outbound|9080||reviews.default.svc.cluster.local"
	cp.push(t, version, []obj{virtualOutbound("PassthroughCluster"), virtualInbound(), serviceListener(v, 9080, cl)},
		append(istioClusters(), edsCluster(cl)), map[string][]netip.AddrPort{cl: eps})
	return v
}

// flowResult is one short flow of the load generator.
type flowResult struct {
	start, end time.Time
	err        error
}

// TestAgentRestartsProxyUnderLoad is agent test 2: under a steady load of
// short flows to a service VIP, the proxy is killed with SIGKILL. The agent
// restarts it and traffic resumes within 2 s; meanwhile readiness reports
// not ready and new flows fail fast (capture is blocked, not left pointing
// at a TUN nobody reads); the restart is counted in the agent's metrics.
func TestAgentRestartsProxyUnderLoad(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	cp := startControlPlane(t, topo.Services, ap(topo.GwV4, 15010))
	startTCPServer(t, topo.Services, ap(topo.SvcV4, 9080), echo)
	startTCPServer(t, topo.Services, ap(topo.Svc2V4, 9080), echo)
	v := xdsService(t, cp, topo, "1", 70, netip.AddrPortFrom(topo.SvcV4, 9080), netip.AddrPortFrom(topo.Svc2V4, 9080))
	ag := startAgent(t, topo, agentEnv(), "--discovery-address", ap(topo.GwV4, 15010))
	if code, stderr, _ := agentWait(t, topo, "--timeout", "20s", "--period", "100ms"); code != 0 {
		t.Fatalf("agent wait: exit %d: %s", code, stderr)
	}

	// Load: 8 clients, each opening short echo flows back to back.
	var mu sync.Mutex
	var results []flowResult
	var ready []struct {
		at   time.Time
		code int
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; n < 100000; n++ {
				select {
				case <-stop:
					return
				default:
				}
				start := time.Now()
				c, err := dialTCP(topo.Pod, ap(v, 9080), 3*time.Second)
				if err == nil {
					err = echoRoundTrip(c, randomPayload(1024), 3*time.Second)
					c.Close()
				}
				mu.Lock()
				results = append(results, flowResult{start, time.Now(), err})
				mu.Unlock()
				if err != nil {
					time.Sleep(20 * time.Millisecond)
				}
			}
		}()
	}
	// Fresh flows every 50 ms, each on its own: when traffic resumes does
	// not depend on the load clients' flows that the kill cut.
	var fresh []flowResult
	wg.Add(1)
	go func() {
		defer wg.Done()
		var fwg sync.WaitGroup
		defer fwg.Wait()
		for n := 0; n < 100000; n++ {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			fwg.Add(1)
			go func() {
				defer fwg.Done()
				start := time.Now()
				c, err := dialTCP(topo.Pod, ap(v, 9080), 3*time.Second)
				if err == nil {
					err = echoRoundTrip(c, randomPayload(64), 3*time.Second)
					c.Close()
				}
				mu.Lock()
				fresh = append(fresh, flowResult{start, time.Now(), err})
				mu.Unlock()
			}()
		}
	}()
	wg.Add(1)
	go func() { // readiness, as the kubelet sees it, every 20 ms
		defer wg.Done()
		for n := 0; n < 100000; n++ {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			code, _ := readiness(topo)
			mu.Lock()
			ready = append(ready, struct {
				at   time.Time
				code int
			}{time.Now(), code})
			mu.Unlock()
		}
	}()
	defer func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		wg.Wait()
	}()

	time.Sleep(time.Second)
	pids := ag.proxyPids()
	if len(pids) != 1 {
		t.Fatalf("proxy pids %v before the kill, want one", pids)
	}
	killedAt := time.Now()
	if err := syscall.Kill(pids[0], syscall.SIGKILL); err != nil {
		t.Fatalf("kill -9 %d: %v", pids[0], err)
	}
	// The new proxy comes up...
	if !ag.waitLine(func(l string) bool {
		pid, _ := logField(l, "pid").(float64)
		return logMessage(l) == "proxy live" && int(pid) != pids[0]
	}, 5*time.Second) {
		t.Fatal("no new live proxy 5s after kill -9")
	}
	// ...and the pod is ready again once it has its configuration.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if code, _ := readiness(topo); code == 200 {
			break
		}
		if time.Now().After(deadline) {
			code, body := readiness(topo)
			t.Fatalf("not ready 10s after the restart: %d %s", code, body)
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(time.Second)
	close(stop)
	wg.Wait()

	var before, after, failedAfter int
	var resumed time.Time
	var slowFailures []string
	for _, r := range fresh {
		if r.start.After(killedAt) && r.err == nil && (resumed.IsZero() || r.end.Before(resumed)) {
			resumed = r.end
		}
	}
	for _, r := range append(results, fresh...) {
		if r.start.Before(killedAt) {
			if r.err == nil {
				before++
			}
			continue
		}
		if r.err != nil {
			failedAfter++
			// A flow started while no proxy runs is refused at once.
			if d := r.end.Sub(r.start); d > 1500*time.Millisecond {
				slowFailures = append(slowFailures, fmt.Sprintf("%v after %v", r.err, d.Round(time.Millisecond)))
			}
			continue
		}
		after++
	}
	t.Logf("flows: %d ok before the kill; after it %d failed, %d ok; the first new flow done %v after the kill",
		before, failedAfter, after, resumed.Sub(killedAt).Round(time.Millisecond))
	if before == 0 {
		t.Fatal("no flow succeeded before the kill")
	}
	if resumed.IsZero() || resumed.Sub(killedAt) > 2*time.Second {
		t.Errorf("traffic did not resume within 2s of kill -9 (first flow done %v after)", resumed.Sub(killedAt))
	}
	if len(slowFailures) > 0 {
		t.Errorf("%d flows started while the proxy was down hung instead of failing fast: %s", len(slowFailures), strings.Join(slowFailures[:min(5, len(slowFailures))], "; "))
	}
	var notReady, readyAfter bool
	for _, r := range ready {
		if r.at.After(killedAt) && r.code != 200 && !readyAfter {
			notReady = true
		}
		if r.at.After(killedAt) && r.code == 200 && notReady {
			readyAfter = true
		}
	}
	if !notReady || !readyAfter {
		t.Errorf("readiness after the kill: went not-ready %v, ready again %v; want both", notReady, readyAfter)
	}
	if n := agentMetric(t, topo, "meshtun_agent_proxy_restarts_total"); n != 1 {
		t.Errorf("meshtun_agent_proxy_restarts_total %v, want 1", n)
	}
	if !ag.waitLine(func(l string) bool {
		return logMessage(l) == "proxy exited unexpectedly; restarting it" && strings.Contains(l, "signal: killed")
	}, time.Second) {
		t.Error("the agent did not log why the proxy was restarted (signal: killed)")
	}
	if err := ag.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code, ok := ag.waitExit(15 * time.Second); !ok || code != 0 {
		t.Fatalf("agent after SIGTERM: exited %v, status %d; want 0", ok, code)
	}
}

// TestAgentReloadOnWatchedFile is agent test 3: when the bootstrap's extra
// file changes, the agent rewrites the bootstrap and the proxy reloads it
// in process: new flows follow the new configuration, a flow opened before
// the change finishes intact on the old one. A broken file changes
// nothing; a watched certificate directory's change reloads too.
func TestAgentReloadOnWatchedFile(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	ep1 := startTCPServer(t, topo.Services, ap(topo.SvcV4, 9080), echo)
	ep2 := startTCPServer(t, topo.Services, ap(topo.Svc2V4, 9080), echo)
	v := vip(topo, false, 71)
	dir := t.TempDir()
	extra := filepath.Join(dir, "extra.json")
	config := func(cluster string, ep netip.Addr) []byte {
		return bootstrapExtra(t, []obj{virtualOutbound("PassthroughCluster"), virtualInbound(), serviceListener(v, 9080, cluster)},
			append(istioClusters(), staticCluster(cluster, "ROUND_ROBIN", netip.AddrPortFrom(ep, 9080))))
	}
	writeFileAtomic(t, extra, config("reviews-v1", topo.SvcV4))
	certs := filepath.Join(dir, "certs")
	if err := os.Mkdir(certs, 0o755); err != nil {
		t.Fatal(err)
	}
	writeFileAtomic(t, filepath.Join(certs, "cert-chain.pem"), []byte("one"))
	ag := startAgent(t, topo, agentEnv(), "--no-xds", "--bootstrap-extra", extra, "--watch", certs, "--watch-interval", "100ms")
	if code, stderr, _ := agentWait(t, topo, "--timeout", "10s", "--period", "100ms"); code != 0 {
		t.Fatalf("agent wait: exit %d: %s", code, stderr)
	}

	// `agent request` finds the admin through the agent's bootstrap.
	out, err := nsRun(topo.Pod, meshtunBin(t), "agent", "request", "--bootstrap-out", ag.bootstrap, "GET", "/listeners")
	if err != nil || !strings.Contains(out, "virtualOutbound::0.0.0.0:15001\n") || !strings.Contains(out, v.String()+"_9080::") {
		t.Fatalf("meshtun agent request GET /listeners = %q, %v", out, err)
	}

	old, err := dialTCP(topo.Pod, ap(v, 9080), dialTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	if err := pingPong(old, []byte("before the change")); err != nil {
		t.Fatal(err)
	}
	if n := len(ep1.accepted()); n != 1 {
		t.Fatalf("v1 endpoint accepted %d, want the old flow", n)
	}

	reloadedAt := len(ag.logLines())
	writeFileAtomic(t, extra, config("reviews-v2", topo.Svc2V4))
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := tcpEcho(topo.Pod, ap(v, 9080), 512); err == nil && len(ep2.accepted()) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("new flows do not reach the v2 endpoint 10s after the change (v1 %d, v2 %d)", len(ep1.accepted()), len(ep2.accepted()))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !ag.waitLine(func(l string) bool { return logMessage(l) == "bootstrap rewritten; proxy reloading" }, time.Second) {
		t.Error("the agent did not log the reload")
	}
	// From now on every new flow goes to v2...
	n1, n2 := len(ep1.accepted()), len(ep2.accepted())
	for i := 0; i < 4; i++ {
		if _, err := tcpEcho(topo.Pod, ap(v, 9080), 512); err != nil {
			t.Fatal(err)
		}
	}
	if a, b := len(ep1.accepted()), len(ep2.accepted()); a != n1 || b != n2+4 {
		t.Errorf("after the reload v1 accepted %d more and v2 %d more flows, want 0 and 4", a-n1, b-n2)
	}
	// ...while the flow opened before the change goes on, intact, on v1.
	if err := pingPong(old, []byte("after the change")); err != nil {
		t.Fatalf("flow opened before the reload: %v", err)
	}
	if err := echoRoundTrip(old, randomPayload(256<<10), echoTimeout); err != nil {
		t.Fatalf("flow opened before the reload did not finish intact: %v", err)
	}
	// The proxy reloaded: it says so, and counts it; the agent counts the
	// signal it sent.
	if n := reloadLines(ag, reloadedAt); n != 1 {
		t.Errorf("the proxy logged %d \"bootstrap reloaded\" after the change, want 1", n)
	}
	if n := agentMetric(t, topo, "meshtun_agent_reload_signals_total"); n != 1 {
		t.Errorf("reload signals %v, want 1", n)
	}
	if n := agentMetric(t, topo, "envoy_server_bootstrap_reload_update_success"); n != 1 {
		t.Errorf("reloads the proxy applied %v, want 1", n)
	}
	// The scrape merges the proxy's metrics into the agent's.
	if code, body, err := httpGetIn(topo.Pod, "127.0.0.1:15020", "/stats/prometheus", 5*time.Second); err != nil || code != 200 ||
		!strings.Contains(body, "\nenvoy_") || !strings.Contains(body, "meshtun_agent_proxy_live 1\n") {
		t.Errorf("merged /stats/prometheus: %d %v\n%.2000s", code, err, body)
	}

	// A broken file: the agent refuses it, the proxy keeps serving v2.
	writeFileAtomic(t, extra, bootstrapExtra(t, []obj{serviceListener(v, 9080, "no-such-cluster")}, istioClusters()))
	if !ag.waitLine(func(l string) bool {
		return logMessage(l) == "reload: the new inputs are invalid; the proxy keeps its configuration" && strings.Contains(l, "no-such-cluster")
	}, 10*time.Second) {
		t.Fatal("a broken extra bootstrap was not refused with its reason")
	}
	before := len(ep2.accepted())
	if _, err := tcpEcho(topo.Pod, ap(v, 9080), 512); err != nil || len(ep2.accepted()) != before+1 {
		t.Fatalf("after a refused reload the configuration in force stopped serving: %v", err)
	}
	if n := agentMetric(t, topo, "meshtun_agent_reload_errors_total"); n != 1 {
		t.Errorf("reload errors %v, want 1", n)
	}

	// The extra file repaired: a reload (the proxy's second).
	mark := len(ag.logLines())
	writeFileAtomic(t, extra, config("reviews-v2", topo.Svc2V4))
	if !ag.waitLine(func(string) bool { return reloadLines(ag, mark) > 0 }, 10*time.Second) {
		t.Fatal("the repaired extra file did not reload the proxy")
	}
	if n := agentMetric(t, topo, "envoy_server_bootstrap_reload_update_success"); n != 2 {
		t.Errorf("reloads the proxy applied %v, want 2", n)
	}

	// A renewed certificate in a watched directory, alone, reloads the
	// proxy: its log says so after the change, the bootstrap in force is
	// a newly loaded one (config_dump's last_updated), and the proxy
	// counts the reload it applied.
	loadedBefore := bootstrapLoadedAt(t, topo)
	mark = len(ag.logLines())
	writeFileAtomic(t, filepath.Join(certs, "cert-chain.pem"), []byte("two"))
	if !ag.waitLine(func(string) bool { return reloadLines(ag, mark) > 0 }, 10*time.Second) {
		t.Fatal("the certificate change did not reload the proxy (no \"bootstrap reloaded\" after it)")
	}
	named := false
	for _, l := range ag.logLines()[mark:] {
		named = named || logMessage(l) == "bootstrap rewritten; proxy reloading" && strings.Contains(l, certs)
	}
	if !named {
		t.Error("the agent's reload does not name the changed certificate directory")
	}
	if loaded := bootstrapLoadedAt(t, topo); loaded == loadedBefore {
		t.Errorf("config_dump's bootstrap last_updated %s unchanged by the certificate reload", loaded)
	}
	if n := agentMetric(t, topo, "envoy_server_bootstrap_reload_update_success"); n != 3 {
		t.Errorf("reloads the proxy applied %v, want 3", n)
	}
	if n := agentMetric(t, topo, "envoy_server_bootstrap_reload_update_rejected"); n != 0 {
		t.Errorf("reloads the proxy rejected %v, want 0", n)
	}
	if n := agentMetric(t, topo, "meshtun_agent_reload_signals_total"); n != 3 {
		t.Errorf("reload signals %v, want 3", n)
	}
	if _, err := tcpEcho(topo.Pod, ap(v, 9080), 512); err != nil {
		t.Fatalf("after the certificate reload: %v", err)
	}
}

// reloadLines counts the proxy's "bootstrap reloaded" lines from line
// from on.
func reloadLines(ag *agentRun, from int) int {
	n := 0
	lines := ag.logLines()
	for _, l := range lines[min(from, len(lines)):] {
		if logMessage(l) == "bootstrap reloaded" {
			n++
		}
	}
	return n
}

// bootstrapLoadedAt is the last_updated of the proxy's bootstrap in its
// config_dump: when the bootstrap in force was loaded.
func bootstrapLoadedAt(t *testing.T, topo *topology) string {
	t.Helper()
	out, err := nsRun(topo.Pod, meshtunBin(t), "request", "GET", "/config_dump")
	if err != nil {
		t.Fatalf("config_dump: %v", err)
	}
	var d struct {
		Configs []struct {
			Type        string `json:"@type"`
			LastUpdated string `json:"last_updated"`
		} `json:"configs"`
	}
	if err := json.Unmarshal([]byte(out), &d); err != nil {
		t.Fatalf("config_dump: %v", err)
	}
	for _, c := range d.Configs {
		if strings.HasSuffix(c.Type, ".BootstrapConfigDump") && c.LastUpdated != "" {
			return c.LastUpdated
		}
	}
	t.Fatalf("config_dump has no bootstrap last_updated:\n%.2000s", out)
	return ""
}

// TestAgentDrainOnSIGTERM is agent test 4: on SIGTERM with 20 active
// inbound flows, the pod turns not ready and new inbound flows are
// refused at once, while the 20 go on and complete intact; the agent
// exits 0 as soon as they are done (well inside terminationDrainDuration)
// and leaves the namespace as it found it.
func TestAgentDrainOnSIGTERM(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	app := startTCPServer(t, topo.Pod, "0.0.0.0:9090", echo)
	extra := filepath.Join(t.TempDir(), "extra.json")
	writeFileAtomic(t, extra, bootstrapExtra(t, []obj{virtualOutbound("PassthroughCluster"), virtualInbound()}, istioClusters()))
	before := podState(t, topo.Pod)
	const drain = 8 * time.Second
	ag := startAgent(t, topo, agentEnv(`PROXY_CONFIG={"terminationDrainDuration":"8s"}`), "--no-xds", "--bootstrap-extra", extra)
	if code, stderr, _ := agentWait(t, topo, "--timeout", "10s", "--period", "100ms"); code != 0 {
		t.Fatalf("agent wait: exit %d: %s", code, stderr)
	}

	const flows = 20
	conns := make([]*net.TCPConn, flows)
	for i := range conns {
		c, err := dialTCP(topo.Services, ap(topo.PodV4, 9090), dialTimeout)
		if err != nil {
			t.Fatalf("flow %d: %v", i, err)
		}
		defer c.Close()
		if err := pingPong(c, []byte(fmt.Sprintf("flow %d before", i))); err != nil {
			t.Fatalf("flow %d: %v", i, err)
		}
		conns[i] = c
	}
	if n := len(app.accepted()); n != flows {
		t.Fatalf("app accepted %d, want %d", n, flows)
	}

	termAt := time.Now()
	if err := ag.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// Not ready at once.
	deadline := time.Now().Add(time.Second)
	for {
		code, _ := readiness(topo)
		if code == 503 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("readiness %d 1s after SIGTERM, want 503", code)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// New inbound flows are refused (a RST from the proxy), at once.
	deadline = time.Now().Add(2 * time.Second)
	for {
		start := time.Now()
		c, err := dialTCP(topo.Services, ap(topo.PodV4, 9090), 2*time.Second)
		if err == nil {
			c.Close()
			if time.Now().After(deadline) {
				t.Fatal("new inbound flows still accepted 2s after SIGTERM")
			}
			time.Sleep(50 * time.Millisecond)
			continue
		}
		if !errors.Is(err, syscall.ECONNREFUSED) || time.Since(start) > 500*time.Millisecond {
			t.Fatalf("new inbound flow during the drain: %v after %v, want refused at once", err, time.Since(start))
		}
		break
	}
	// From then on every new inbound flow is refused and none reaches the app.
	accepted := len(app.accepted())
	for i := 0; i < 3; i++ {
		start := time.Now()
		c, err := dialTCP(topo.Services, ap(topo.PodV4, 9090), 2*time.Second)
		if err == nil {
			c.Close()
			t.Fatal("a new inbound flow was accepted after one had been refused")
		}
		if !errors.Is(err, syscall.ECONNREFUSED) || time.Since(start) > 500*time.Millisecond {
			t.Fatalf("new inbound flow during the drain: %v after %v, want refused at once", err, time.Since(start))
		}
	}
	if n := len(app.accepted()); n != accepted {
		t.Errorf("the app accepted %d connections while new flows were refused", n-accepted)
	}
	// The active flows go on and finish intact.
	var wg sync.WaitGroup
	errs := make(chan error, flows)
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := pingPong(c, []byte(fmt.Sprintf("flow %d draining", i))); err != nil {
				errs <- fmt.Errorf("flow %d during the drain: %w", i, err)
				return
			}
			if err := echoRoundTrip(c, randomPayload(64<<10), echoTimeout); err != nil {
				errs <- fmt.Errorf("flow %d did not complete intact: %w", i, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	doneAt := time.Now()
	code, ok := ag.waitExit(drain + 5*time.Second)
	if !ok {
		t.Fatalf("agent still running %v after SIGTERM", time.Since(termAt))
	}
	exitAt := time.Now()
	t.Logf("flows done %v after SIGTERM, agent exited %v later", doneAt.Sub(termAt).Round(time.Millisecond), exitAt.Sub(doneAt).Round(time.Millisecond))
	if code != 0 {
		t.Errorf("agent exit status %d after SIGTERM, want 0", code)
	}
	if exitAt.Sub(doneAt) > 2*time.Second {
		t.Errorf("agent exited %v after the last flow ended; want it to stop waiting once no flow is left", exitAt.Sub(doneAt))
	}
	compareRestored(t, topo, "after the agent's exit", before)
}

// TestAgentWait is agent test 5: `meshtun agent wait` fails after its
// timeout while the proxy has no xDS configuration (it runs, INITIALIZING
// as Envoy is before its first CDS/LDS; the pod is not ready), and returns
// 0 once the control plane has pushed it.
func TestAgentWait(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	cp := startControlPlane(t, topo.Services, ap(topo.GwV4, 15010))
	startTCPServer(t, topo.Services, ap(topo.SvcV4, 9080), echo)
	ag := startAgentNoWait(t, topo, agentEnv(), "--discovery-address", ap(topo.GwV4, 15010))
	if !ag.waitLine(func(l string) bool { return logMessage(l) == "proxy started" }, 15*time.Second) {
		t.Fatalf("the agent did not start its proxy within 15s")
	}
	// The proxy's admin answers, but not LIVE: no configuration yet.
	deadline := time.Now().Add(10 * time.Second)
	for {
		out, err := nsRun(topo.Pod, meshtunBin(t), "request", "--admin-address", "127.0.0.1:15000", "GET", "/stats?filter=^server\\.state$")
		if err == nil {
			if !strings.Contains(out, "server.state: 3") {
				t.Fatalf("proxy without its first xDS configuration: %q, want server.state: 3 (INITIALIZING)", out)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the proxy's admin never answered: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}

	code, stderr, took := agentWait(t, topo, "--timeout", "1s", "--period", "100ms")
	if code == 0 || took < time.Second || took > 5*time.Second {
		t.Fatalf("agent wait without configuration: exit %d after %v, want non-zero after about 1s; %s", code, took, stderr)
	}
	if !strings.Contains(stderr, "config not received") {
		t.Errorf("agent wait's error does not say why: %s", stderr)
	}
	if code, body := readiness(topo); code != 503 {
		t.Errorf("readiness without configuration: %d %s", code, body)
	}

	xdsService(t, cp, topo, "1", 72, netip.AddrPortFrom(topo.SvcV4, 9080))
	code, stderr, took = agentWait(t, topo, "--timeout", "20s", "--period", "100ms")
	if code != 0 {
		t.Fatalf("agent wait after the push: exit %d after %v: %s", code, took, stderr)
	}
	for _, typ := range []string{resource.ClusterType, resource.ListenerType} {
		if cp.ackCount(typ) == 0 {
			t.Errorf("ready without an ACK of %s", typ)
		}
	}
	// Ready means serving: the VIP works.
	if _, err := tcpEcho(topo.Pod, ap(vip(topo, false, 72), 9080), 1024); err != nil {
		t.Fatalf("ready but the service does not work: %v", err)
	}
}

// TestAgentBadEnvironment is agent test 6 on the binary: each bad value
// exits non-zero naming it, and nothing in the pod changes.
func TestAgentBadEnvironment(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	before := podState(t, topo.Pod)
	for _, tc := range []struct {
		env  []string
		want string
	}{
		{agentEnv("INSTANCE_IP=10.0.0.999"), `INSTANCE_IP: "10.0.0.999" is not an IP address`},
		{[]string{"POD_NAMESPACE=default", "INSTANCE_IP=10.0.0.2"}, "POD_NAME: required"},
		{agentEnv(`PROXY_CONFIG={"terminationDrainDurationn":"5s"}`), "PROXY_CONFIG: terminationDrainDurationn: not a ProxyConfig field"},
		{agentEnv(`PROXY_CONFIG={"imageTyp": "x"}`), "PROXY_CONFIG: imageTyp: not a ProxyConfig field"},
		{agentEnv(`PROXY_CONFIG=terminationDrainDuration: soon`), `PROXY_CONFIG: terminationDrainDuration: invalid google.protobuf.Duration value "soon"`},
		{agentEnv(`ISTIO_META_POD_PORTS=8080`), "ISTIO_META_POD_PORTS: want a JSON list"},
		{agentEnv(`ISTIO_METAJSON_ANNOTATIONS={"traffic.sidecar.istio.io/excludeOutboundPorts":"mysql"}`),
			`annotation traffic.sidecar.istio.io/excludeOutboundPorts (ISTIO_METAJSON_ANNOTATIONS): port "mysql"`},
	} {
		a := startAgentNoWait(t, topo, tc.env)
		code, ok := a.waitExit(10 * time.Second)
		if !ok || code == 0 {
			t.Errorf("%s: exited %v with %d, want a failure", tc.want, ok, code)
			continue
		}
		if log := strings.Join(a.logLines(), "\n"); !strings.Contains(log, tc.want) {
			t.Errorf("the error does not name the problem %q:\n%s", tc.want, log)
		}
	}
	compareRestored(t, topo, "after failed starts", before)
}

// TestAgentCaptureOnlyThenAgent: `agent --capture-only` (the init
// container) leaves capture installed and blocked: the pod's outbound
// flows are refused, not sent uncaptured. The sidecar's agent then takes
// over, traffic flows through its proxy, and its exit restores the pod.
func TestAgentCaptureOnlyThenAgent(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	ext := startTCPServer(t, topo.Services, ap(topo.SvcV4, 7000), echo)
	before := podState(t, topo.Pod)
	out, err := nsRun(topo.Pod, meshtunBin(t), "agent", "--capture-only", "--state-dir", topo.StateDir, "--log-format", "json",
		"--pod-annotations-file", "", "--exclude-outbound-ports", "7001")
	if err != nil {
		t.Fatalf("capture-only: %v\n%s", err, out)
	}
	start := time.Now()
	if c, err := dialTCP(topo.Pod, ap(topo.SvcV4, 7000), 3*time.Second); err == nil {
		c.Close()
		t.Fatal("with capture installed by the init container and no proxy, a flow got through")
	} else if !errors.Is(err, syscall.EHOSTUNREACH) || time.Since(start) > time.Second {
		t.Fatalf("blocked flow: %v after %v, want EHOSTUNREACH at once", err, time.Since(start))
	}
	if n := len(ext.accepted()); n != 0 {
		t.Fatalf("server accepted %d connections while capture was blocked", n)
	}
	extra := filepath.Join(t.TempDir(), "extra.json")
	writeFileAtomic(t, extra, bootstrapExtra(t, []obj{virtualOutbound("PassthroughCluster"), virtualInbound()}, istioClusters()))
	ag := startAgent(t, topo, agentEnv(), "--no-xds", "--bootstrap-extra", extra)
	if _, err := tcpEcho(topo.Pod, ap(topo.SvcV4, 7000), 4096); err != nil {
		t.Fatalf("after the agent took over: %v", err)
	}
	if err := ag.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code, ok := ag.waitExit(15 * time.Second); !ok || code != 0 {
		t.Fatalf("agent exit %v %d", ok, code)
	}
	compareRestored(t, topo, "after the agent's exit", before)
}

// TestAgentCrashFailsClosed: when the agent itself is killed (its proxy
// dies with it and the kernel removes the TUN with its routes), the pod's
// captured flows are refused, not sent out uncaptured; a new agent takes
// over and its exit restores the pod.
func TestAgentCrashFailsClosed(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	ext := startTCPServer(t, topo.Services, ap(topo.SvcV4, 7000), echo)
	extra := filepath.Join(t.TempDir(), "extra.json")
	writeFileAtomic(t, extra, bootstrapExtra(t, []obj{virtualOutbound("PassthroughCluster"), virtualInbound()}, istioClusters()))
	before := podState(t, topo.Pod)
	ag := startAgent(t, topo, agentEnv(), "--no-xds", "--bootstrap-extra", extra)
	if _, err := tcpEcho(topo.Pod, ap(topo.SvcV4, 7000), 1024); err != nil {
		t.Fatal(err)
	}
	pids := ag.proxyPids()
	ag.kill9()
	// The proxy dies with the agent (parent-death signal).
	deadline := time.Now().Add(5 * time.Second)
	for !processGone(pids[0]) {
		if time.Now().After(deadline) {
			t.Fatalf("proxy %d still alive 5s after its agent was killed", pids[0])
		}
		time.Sleep(20 * time.Millisecond)
	}
	// ...and the kernel removes the TUN with its routes.
	for {
		if _, err := run("ip", "-n", topo.Pod, "link", "show", "meshtun0"); err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the TUN still exists 5s after the agent and its proxy died")
		}
		time.Sleep(20 * time.Millisecond)
	}
	accepted := len(ext.accepted())
	start := time.Now()
	if c, err := dialTCP(topo.Pod, ap(topo.SvcV4, 7000), 3*time.Second); err == nil {
		c.Close()
		t.Fatal("with the agent and its proxy dead, a captured flow got out uncaptured")
	} else if !errors.Is(err, syscall.EHOSTUNREACH) || time.Since(start) > time.Second {
		t.Fatalf("flow with the agent dead: %v after %v, want EHOSTUNREACH at once", err, time.Since(start))
	}
	if n := len(ext.accepted()); n != accepted {
		t.Fatalf("the server accepted %d connections with the agent dead", n-accepted)
	}
	ag2 := startAgent(t, topo, agentEnv(), "--no-xds", "--bootstrap-extra", extra)
	if _, err := tcpEcho(topo.Pod, ap(topo.SvcV4, 7000), 1024); err != nil {
		t.Fatalf("after a new agent took over: %v", err)
	}
	if err := ag2.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code, ok := ag2.waitExit(15 * time.Second); !ok || code != 0 {
		t.Fatalf("agent exit %v %d", ok, code)
	}
	compareRestored(t, topo, "after the second agent's exit", before)
}

// TestProxySIGHUPDuringStartup: a SIGHUP the agent sends while the proxy
// is still starting (a watched file changed) queues a reload, applied
// once the configuration is in force; it does not kill the proxy (the
// default action), which the agent would count as a crash and back off.
// The signal goes out as soon as the proxy's first line is logged, before
// it opens the TUN and installs capture.
func TestProxySIGHUPDuringStartup(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	bs := writeBootstrap(t, []obj{virtualOutbound("PassthroughCluster"), virtualInbound()}, istioClusters())
	args := []string{"netns", "exec", topo.Pod, meshtunBin(t), "proxy", "--log-format", "json", "--log-level", "debug",
		"--state-dir", topo.StateDir, "--bootstrap", bs}
	px := startProc(t, "meshtun proxy (SIGHUP at start)", args, nil, syscall.SIGKILL)
	if !px.waitLine(func(l string) bool { return logMessage(l) != "" }, 10*time.Second) {
		t.Fatalf("the proxy logged nothing (%v)", px.waitErr)
	}
	if err := px.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	var readyAt int
	if !px.waitLine(func(l string) bool { return logMessage(l) == "proxy ready" }, 10*time.Second) {
		t.Fatalf("the proxy did not become ready after a SIGHUP during its startup (exited: %v, %v)", px.exited(), px.waitErr)
	}
	for i, l := range px.logLines() {
		if logMessage(l) == "proxy ready" {
			readyAt = i
		}
	}
	if !px.waitLine(func(l string) bool { return logMessage(l) == "bootstrap reloaded" }, 5*time.Second) {
		t.Fatal("the SIGHUP received during startup was not applied as a reload")
	}
	for i, l := range px.logLines() {
		if logMessage(l) == "bootstrap reloaded" && i < readyAt {
			t.Errorf("the reload ran before the proxy was ready (line %d, ready at %d)", i, readyAt)
		}
	}
	if out, err := nsRun(topo.Pod, meshtunBin(t), "request", "GET", "/stats?filter=^server\\.bootstrap_reload\\."); err != nil ||
		!strings.Contains(out, "server.bootstrap_reload.update_success: 1\n") {
		t.Errorf("reload stats %q (%v), want one success", out, err)
	}
	if px.exited() {
		t.Fatalf("the proxy exited: %v", px.waitErr)
	}
}

// TestProxySIGHUPDuringDrain: a SIGHUP that reaches a draining proxy (a
// reload racing the pod's termination) is not the "second signal" that
// ends the drain: the open flow goes on, and the proxy exits when it ends.
func TestProxySIGHUPDuringDrain(t *testing.T) {
	requireRoot(t)
	_, px, open := drainPod(t, "--termination-drain-duration", "20s")
	if err := px.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if !px.waitLine(func(l string) bool { return logMessage(l) == "SIGTERM: draining" }, 5*time.Second) {
		t.Fatal("no drain after SIGTERM")
	}
	if err := px.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if !px.waitLine(func(l string) bool { return logMessage(l) == "SIGHUP while draining: ignored" }, 5*time.Second) {
		t.Fatalf("the proxy did not ignore a SIGHUP while draining (exited: %v)", px.exited())
	}
	time.Sleep(200 * time.Millisecond)
	if px.exited() {
		t.Fatalf("a SIGHUP ended the drain: the proxy exited (%v) with a flow open", px.waitErr)
	}
	if err := pingPong(open, []byte("during the drain, after the SIGHUP")); err != nil {
		t.Fatalf("open flow after a SIGHUP during the drain: %v", err)
	}
	exitsAfterLastFlow(t, px, open)
}

// TestAgentTerminationDrainDeadline: a flow still open when
// terminationDrainDuration (2 s here) is over does not keep the pod: the
// proxy exits at the deadline, closing the flow, and the agent exits 0
// within about 2 s of it.
func TestAgentTerminationDrainDeadline(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	startTCPServer(t, topo.Pod, "0.0.0.0:9090", echo)
	extra := filepath.Join(t.TempDir(), "extra.json")
	writeFileAtomic(t, extra, bootstrapExtra(t, []obj{virtualOutbound("PassthroughCluster"), virtualInbound()}, istioClusters()))
	const drain = 2 * time.Second
	ag := startAgent(t, topo, agentEnv(`PROXY_CONFIG={"terminationDrainDuration":"2s"}`), "--no-xds", "--bootstrap-extra", extra)
	if code, stderr, _ := agentWait(t, topo, "--timeout", "10s", "--period", "100ms"); code != 0 {
		t.Fatalf("agent wait: exit %d: %s", code, stderr)
	}
	open, err := dialTCP(topo.Services, ap(topo.PodV4, 9090), dialTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close()
	if err := pingPong(open, []byte("before")); err != nil {
		t.Fatal(err)
	}
	termAt := time.Now()
	if err := ag.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// Within the drain the flow still works...
	time.Sleep(drain / 2)
	if err := pingPong(open, []byte("during the drain")); err != nil {
		t.Fatalf("open flow %v into the drain: %v", time.Since(termAt).Round(time.Millisecond), err)
	}
	// ...and the flow, never closed by the client, does not keep the agent.
	code, ok := ag.waitExit(drain + 2*time.Second - time.Since(termAt))
	took := time.Since(termAt)
	if !ok {
		t.Fatalf("agent still running %v after SIGTERM with terminationDrainDuration %v", took.Round(time.Millisecond), drain)
	}
	t.Logf("agent exited %v after SIGTERM", took.Round(time.Millisecond))
	if code != 0 {
		t.Errorf("agent exit status %d, want 0", code)
	}
	if took < drain-200*time.Millisecond {
		t.Errorf("agent exited %v after SIGTERM, before the drain deadline %v, with a flow open", took, drain)
	}
	if !ag.waitLine(func(l string) bool {
		return logMessage(l) == "drained, shutting down" && logField(l, "all_flows_ended") == false
	}, time.Second) {
		t.Error("the proxy did not report ending its drain at the deadline with a flow still open")
	}
	// The flow ended with the proxy.
	_ = open.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := open.Write([]byte("after")); err == nil {
		buf := make([]byte, 16)
		if _, err := open.Read(buf); err == nil {
			t.Error("the flow still echoes after the proxy exited")
		} else if isTimeout(err) {
			t.Errorf("the flow hangs after the proxy exited instead of being closed: %v", err)
		}
	}
}

// TestAgentExclusionsFromAnnotations: the downward-API annotations file
// (traffic.sidecar.istio.io/excludeOutboundPorts and
// excludeOutboundIPRanges) makes the agent's capture leave those flows
// alone: the proxy logs no access line for them and the server sees the
// application's own socket (the pod's IP and the client's port), while a
// flow not excluded is captured (an access line; the server sees the
// proxy's upstream socket).
func TestAgentExclusionsFromAnnotations(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	captured := ap(topo.SvcV4, 8080)
	exclPort := ap(topo.SvcV4, 8081)
	exclCIDR := ap(topo.Svc2V4, 8080)
	servers := map[string]*tcpServer{}
	for _, a := range []string{captured, exclPort, exclCIDR} {
		servers[a] = startTCPServer(t, topo.Services, a, echo)
	}
	dir := t.TempDir()
	annots := filepath.Join(dir, "annotations")
	writeFileAtomic(t, annots, []byte(fmt.Sprintf("traffic.sidecar.istio.io/excludeOutboundPorts=\"8081\"\n"+
		"traffic.sidecar.istio.io/excludeOutboundIPRanges=\"%s/32\"\n", topo.Svc2V4)))
	extra := filepath.Join(dir, "extra.json")
	writeFileAtomic(t, extra, bootstrapExtra(t, []obj{virtualOutbound("PassthroughCluster"), virtualInbound()}, istioClusters()))
	ag := startAgent(t, topo, agentEnv(), "--no-xds", "--bootstrap-extra", extra, "--pod-annotations-file", annots)

	// Excluded flows first, then the captured one: once its line is in,
	// an excluded flow that was captured would have logged.
	for _, f := range []struct{ name, dst string }{{"excluded port", exclPort}, {"excluded CIDR", exclCIDR}} {
		local, err := tcpEcho(topo.Pod, f.dst, 64<<10)
		if err != nil {
			t.Errorf("%s: %v", f.name, err)
			continue
		}
		if acc := servers[f.dst].accepted(); len(acc) != 1 || acc[0].String() != local {
			t.Errorf("%s: the server saw %v, want the application's socket %s (uncaptured)", f.name, acc, local)
		}
	}
	local, err := tcpEcho(topo.Pod, captured, 64<<10)
	if err != nil {
		t.Fatalf("captured flow: %v", err)
	}
	expectAccess(t, ag.proxyProc, wantAccess{Transport: "tcp", Direction: "outbound", DownstreamLocal: captured,
		DownstreamRemote: local, Cluster: "PassthroughCluster", Received: 64 << 10, Sent: 64 << 10}, accessWait)
	if acc := servers[captured].accepted(); len(acc) != 1 || acc[0].String() == local {
		t.Errorf("captured flow: the server saw %v, want the proxy's upstream socket, not the application's %s", acc, local)
	}
	time.Sleep(noEntryGrace)
	for _, dst := range []string{exclPort, exclCIDR} {
		if es := ag.accessMatching(byDst(dst)); len(es) > 0 {
			t.Errorf("traffic to excluded %s was captured:\n%s", dst, entriesText(es))
		}
	}
}
