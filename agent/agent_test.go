package agent

import (
	"bytes"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/meshtun/meshtun/tun"
)

// TestWatcherStopWaitsForChange: the agent stops watching before it
// drains; stop must return only once a change being handled (a reload,
// which ends in a SIGHUP) is over, and no change may be handled after.
func TestWatcherStopWaitsForChange(t *testing.T) {
	file := filepath.Join(t.TempDir(), "cert.pem")
	if err := os.WriteFile(file, []byte("one"), 0o644); err != nil {
		t.Fatal(err)
	}
	entered, release := make(chan struct{}, 10), make(chan struct{})
	var calls, after int64
	var stopped bool
	var mu sync.Mutex
	w := &watcher{Paths: []string{file}, Interval: 10 * time.Millisecond, OnChange: func([]string) {
		mu.Lock()
		calls++
		if stopped {
			after++
		}
		mu.Unlock()
		entered <- struct{}{}
		<-release
	}}
	stop := w.Start()
	if err := os.WriteFile(file, []byte("two"), 0o644); err != nil {
		t.Fatal(err)
	}
	select {
	case <-entered:
	case <-time.After(5 * time.Second):
		t.Fatal("the change was not reported")
	}
	stopDone := make(chan struct{})
	go func() {
		defer close(stopDone)
		stop()
	}()
	select {
	case <-stopDone:
		t.Fatal("stop returned while a change was still being handled")
	case <-time.After(100 * time.Millisecond):
	}
	close(release)
	select {
	case <-stopDone:
	case <-time.After(5 * time.Second):
		t.Fatal("stop did not return once the change was handled")
	}
	mu.Lock()
	stopped = true
	mu.Unlock()
	if err := os.WriteFile(file, []byte("three"), 0o644); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	mu.Lock()
	defer mu.Unlock()
	if calls != 1 || after != 0 {
		t.Errorf("OnChange called %d times, %d after stop; want once, none after", calls, after)
	}
}

// TestReloadCountsSignals: the agent's reload metric counts the SIGHUPs
// it sent, and only those: with no proxy running nothing is counted
// (the next proxy reads the new bootstrap when it starts).
func TestReloadCountsSignals(t *testing.T) {
	src := goldenSources(t)
	out := filepath.Join(t.TempDir(), "envoy-rev.json")
	in, js, b, err := PrepareBootstrap(src)
	if err != nil {
		t.Fatal(err)
	}
	sup, _, proxyOut, _ := fakeSupervisor(t, "serve")
	a := &agent{cfg: Config{Sources: src, BootstrapOut: out}, log: zerolog.Nop(), in: in, js: js, b: b, sup: sup}
	a.reload([]string{"cert-chain.pem"})
	if n := a.reloadSignals.Load(); n != 0 {
		t.Errorf("reload with no proxy running: %d signals counted, want 0", n)
	}
	if _, err := os.Stat(out); err != nil {
		t.Errorf("the bootstrap was not rewritten: %v", err)
	}
	runDone := make(chan struct{})
	go func() {
		defer close(runDone)
		sup.Run()
	}()
	defer func() {
		if err := sup.Stop(5 * time.Second); err != nil {
			t.Errorf("stop: %v", err)
		}
		<-runDone
	}()
	waitFor(t, "the fake proxy live", 5*time.Second, sup.IsLive)
	a.reload([]string{"cert-chain.pem"})
	if n := a.reloadSignals.Load(); n != 1 {
		t.Errorf("reload with a proxy running: %d signals counted, want 1", n)
	}
	waitFor(t, "the fake proxy's reload", 5*time.Second, func() bool { return strings.Contains(proxyOut.String(), "bootstrap reloaded") })
	var m bytes.Buffer
	a.writeMetrics(&m)
	if !strings.Contains(m.String(), "\nmeshtun_agent_reload_signals_total 1\n") || strings.Contains(m.String(), "meshtun_agent_reloads_total") {
		t.Errorf("agent metrics:\n%s\nwant meshtun_agent_reload_signals_total 1 and no meshtun_agent_reloads_total", m.String())
	}
}

// TestCaptureConfigExcludesAgentPorts: a statusPort, proxyAdminPort or
// readiness port moved by PROXY_CONFIG (or the flag) is left out of
// inbound capture like Istio's defaults; the defaults add nothing.
func TestCaptureConfigExcludesAgentPorts(t *testing.T) {
	pc := defaultProxyConfig()
	if got := agentPorts(pc, 15021); len(got) != 0 {
		t.Errorf("default ports: extra exclusions %v, want none (tun.AlwaysExcludedInboundPorts() has them)", got)
	}
	src := Sources{Environ: append(slices.Clone(injectorEnv), `PROXY_CONFIG={"statusPort":15030,"proxyAdminPort":15555}`), ReadinessPort: 15041}
	in, err := Load(src)
	if err != nil {
		t.Fatal(err)
	}
	co := CaptureOptions{Mark: 0x539, Inbound: true, ExcludeInboundPorts: []tun.PortRange{{Start: 8081, End: 8081}}}
	cfg := captureConfig(co, "meshtun0", in.Exclusions, agentPorts(in.ProxyConfig, in.ReadinessPort))
	for _, p := range []uint16{15030, 15555, 15041, 8081} {
		if !slices.ContainsFunc(cfg.ExcludeInboundPorts, func(r tun.PortRange) bool { return r.Start <= p && p <= r.End }) {
			t.Errorf("inbound port %d is captured: ExcludeInboundPorts %v", p, cfg.ExcludeInboundPorts)
		}
	}
	if !cfg.Inbound || cfg.TunName != "meshtun0" || cfg.Mark != 0x539 {
		t.Errorf("capture config %+v", cfg)
	}
	// The init container reads the same PROXY_CONFIG.
	if pc, _, err = loadProxyConfig(src, environ(src)); err != nil {
		t.Fatal(err)
	}
	if got := agentPorts(pc, 15021); !slices.Equal(got, []tun.PortRange{{Start: 15555, End: 15555}, {Start: 15030, End: 15030}}) {
		t.Errorf("capture-only's agent ports %v, want 15555 and 15030", got)
	}
}

// TestCaptureOnlyInterceptionNone: with interception mode NONE the init
// container captures nothing and succeeds (istio-init is not even
// injected then); the TUN name given cannot be opened, so any attempt to
// install capture would fail the call.
func TestCaptureOnlyInterceptionNone(t *testing.T) {
	co := CaptureOptions{TunName: "no/such/tun-device-name", StateDir: t.TempDir()}
	var logs bytes.Buffer
	log := zerolog.New(&logs)
	env := []string{"ISTIO_META_INTERCEPTION_MODE=NONE"}
	if err := CaptureOnly(co, Sources{Environ: env}, log); err != nil {
		t.Errorf("ISTIO_META_INTERCEPTION_MODE=NONE: %v, want a no-op", err)
	}
	none := co
	none.Mode = "none"
	if err := CaptureOnly(none, Sources{Environ: []string{"ISTIO_META_INTERCEPTION_MODE=REDIRECT"}}, log); err != nil {
		t.Errorf("--capture none: %v, want a no-op", err)
	}
	if n := strings.Count(logs.String(), "no capture installed"); n != 2 {
		t.Errorf("%d no-op lines logged, want 2:\n%s", n, logs.String())
	}
	local := co
	local.Mode, local.CIDRs = "local", []netip.Prefix{netip.MustParsePrefix("10.96.0.0/12")}
	if err := CaptureOnly(local, Sources{}, log); err == nil || !strings.Contains(err.Error(), "laptop mode") {
		t.Errorf("--capture local: %v, want an error naming laptop mode", err)
	}
	if err := CaptureOnly(co, Sources{Environ: []string{"ISTIO_META_INTERCEPTION_MODE=EBPF"}}, log); err == nil || !strings.Contains(err.Error(), "ISTIO_META_INTERCEPTION_MODE") {
		t.Errorf("a bad interception mode: %v, want an error naming the variable", err)
	}
	// Sidecar capture is attempted (and fails on the bad TUN name).
	if err := CaptureOnly(co, Sources{Environ: []string{"ISTIO_META_INTERCEPTION_MODE=REDIRECT"}}, log); err == nil {
		t.Error("REDIRECT with an impossible TUN name succeeded: capture was not attempted")
	}
}

func TestWithGODEBUG(t *testing.T) {
	for _, tc := range []struct{ in, want []string }{
		{[]string{"A=1"}, []string{"A=1", "GODEBUG=http2xconnect=1"}},
		{[]string{"GODEBUG=madvdontneed=1"}, []string{"GODEBUG=madvdontneed=1,http2xconnect=1"}},
		{[]string{"GODEBUG=http2xconnect=0"}, []string{"GODEBUG=http2xconnect=0"}},
		{[]string{"GODEBUG="}, []string{"GODEBUG=http2xconnect=1"}},
	} {
		if got := withGODEBUG(tc.in, "http2xconnect=1"); !slices.Equal(got, tc.want) {
			t.Errorf("withGODEBUG(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}
