package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// The test binary doubles as a fake proxy, chosen by this variable.
const fakeProxyEnv = "MESHTUN_AGENT_FAKE_PROXY"

func TestMain(m *testing.M) {
	if mode := os.Getenv(fakeProxyEnv); mode != "" {
		os.Exit(fakeProxy(mode))
	}
	os.Exit(m.Run())
}

// fakeProxy behaves like `meshtun proxy` as far as the supervisor sees:
// "crash" exits 1 at once; "serve" logs the ready line, reloads on SIGHUP
// and exits 0 on SIGTERM; "slowstart" serves after 300 ms without signal
// handlers; "stubborn" logs ready and ignores SIGTERM.
func fakeProxy(mode string) int {
	if mode == "slowstart" {
		// A proxy still in its initialization: no handlers yet, so a
		// SIGHUP now would kill it.
		time.Sleep(300 * time.Millisecond)
		mode = "serve"
	}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGHUP)
	switch mode {
	case "crash":
		fmt.Fprintln(os.Stderr, `{"level":"error","message":"proxy failed: bootstrap: no such file"}`)
		return 1
	case "serve":
		fmt.Fprintln(os.Stderr, `{"level":"info","message":"proxy ready"}`)
		for sig := range sigs {
			if sig == syscall.SIGHUP {
				fmt.Fprintln(os.Stderr, `{"level":"info","message":"bootstrap reloaded"}`)
				continue
			}
			fmt.Fprintln(os.Stderr, `{"level":"info","message":"SIGTERM: draining"}`)
			return 0
		}
	case "stubborn":
		fmt.Fprintln(os.Stderr, `{"level":"info","message":"proxy ready"}`)
		time.Sleep(time.Minute)
	}
	return 3
}

// fakeBlocker records Block and Unblock calls.
type fakeBlocker struct {
	mu    sync.Mutex
	calls []string
}

func (f *fakeBlocker) Block() error   { f.record("block"); return nil }
func (f *fakeBlocker) Unblock() error { f.record("unblock"); return nil }
func (f *fakeBlocker) record(s string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, s)
}
func (f *fakeBlocker) String() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return strings.Join(f.calls, ",")
}

// syncBuf is a goroutine-safe output collector.
type syncBuf struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}
func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// fakeSupervisor runs the fake proxy in the given modes, one per start
// (the last one repeats).
func fakeSupervisor(t *testing.T, modes ...string) (*supervisor, *fakeBlocker, *syncBuf, *syncBuf) {
	t.Helper()
	var starts, serveStarts atomic.Int64
	var crashing atomic.Bool
	fb, out, logs := &fakeBlocker{}, &syncBuf{}, &syncBuf{}
	s := &supervisor{
		Command: func() (*exec.Cmd, error) {
			i := int(starts.Add(1)) - 1
			mode := modes[min(i, len(modes)-1)]
			crashing.Store(mode == "crash")
			if mode != "crash" {
				serveStarts.Add(1)
			}
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), fakeProxyEnv+"="+mode)
			return cmd, nil
		},
		// Live like the admin /ready: once this child has started serving.
		Live: func(context.Context) error {
			if n := serveStarts.Load(); !crashing.Load() && int64(strings.Count(out.String(), "proxy ready")) >= n {
				return nil
			}
			return errors.New("not serving")
		},
		Capture: fb,
		Backoff: Backoff{Initial: 50 * time.Millisecond, Max: 200 * time.Millisecond, ResetAfter: time.Hour},
		Output:  out,
		Log:     zerolog.New(logs),
	}
	return s, fb, out, logs
}

func waitFor(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestSupervisorRestartsWithBackoff: a proxy that exits is restarted,
// with a doubling but bounded wait, the reason logged; capture is blocked
// from each exit until the next proxy is live.
func TestSupervisorRestartsWithBackoff(t *testing.T) {
	s, fb, out, logs := fakeSupervisor(t, "crash", "crash", "crash", "crash", "serve")
	done := make(chan struct{})
	start := time.Now()
	go func() { defer close(done); s.Run() }()
	waitFor(t, "the fifth start to be live", 10*time.Second, s.IsLive)
	took := time.Since(start)
	// Waits 50, 100, 200, 200 ms (capped): at least 550 ms in all.
	if took < 500*time.Millisecond || took > 5*time.Second {
		t.Errorf("four restarts took %v, want about 550ms of backoff", took)
	}
	if s.Restarts() != 4 {
		t.Errorf("restarts %d, want 4", s.Restarts())
	}
	if got := fb.String(); got != "block,unblock" {
		// Block once at the start (nothing serves), unblock when live: the
		// crashes in between keep it blocked.
		t.Errorf("capture calls %q, want block,unblock", got)
	}
	l := logs.String()
	if strings.Count(l, "proxy exited unexpectedly") != 4 || !strings.Contains(l, "exit status 1") ||
		!strings.Contains(l, "bootstrap: no such file") || !strings.Contains(l, `"restart_in":200`) {
		t.Errorf("restart log lacks the reason, the last output or the capped backoff:\n%s", l)
	}
	if !strings.Contains(out.String(), `"message":"proxy ready"`) {
		t.Errorf("child output not passed on:\n%s", out.String())
	}
	if !s.Signal(syscall.SIGHUP) {
		t.Error("SIGHUP: no child")
	}
	waitFor(t, "the reload line", 5*time.Second, func() bool { return strings.Contains(out.String(), "bootstrap reloaded") })
	if err := s.Stop(5 * time.Second); err != nil {
		t.Errorf("stop: %v", err)
	}
	<-done
	if s.Pid() != 0 || s.IsLive() {
		t.Error("a child still recorded after Stop")
	}
}

// TestSupervisorBlocksOnCrash: a live proxy that dies blocks capture at
// once, and the restarted one unblocks it.
func TestSupervisorBlocksOnCrash(t *testing.T) {
	s, fb, _, _ := fakeSupervisor(t, "serve", "serve")
	done := make(chan struct{})
	go func() { defer close(done); s.Run() }()
	waitFor(t, "live", 10*time.Second, s.IsLive)
	pid := s.Pid()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a new live proxy", 10*time.Second, func() bool { return s.IsLive() && s.Pid() != pid && s.Pid() != 0 })
	if got := fb.String(); got != "block,unblock,block,unblock" {
		t.Errorf("capture calls %q", got)
	}
	if s.Restarts() != 1 {
		t.Errorf("restarts %d", s.Restarts())
	}
	if err := s.Stop(5 * time.Second); err != nil {
		t.Errorf("stop: %v", err)
	}
	<-done
}

// TestSupervisorStopKillsStubborn: a proxy that ignores SIGTERM is killed
// after the grace period, and Stop says so.
func TestSupervisorStopKillsStubborn(t *testing.T) {
	s, _, _, _ := fakeSupervisor(t, "stubborn")
	done := make(chan struct{})
	go func() { defer close(done); s.Run() }()
	waitFor(t, "live", 10*time.Second, s.IsLive)
	start := time.Now()
	err := s.Stop(300 * time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "killed") {
		t.Errorf("stop: %v, want a kill error", err)
	}
	if d := time.Since(start); d < 300*time.Millisecond || d > 5*time.Second {
		t.Errorf("stop took %v", d)
	}
	<-done
}

// TestSupervisorResetAfterHealthy: after a proxy served ResetAfter, the
// next restart waits Initial again.
func TestSupervisorResetAfterHealthy(t *testing.T) {
	s, _, _, logs := fakeSupervisor(t, "crash", "crash", "serve", "serve")
	s.Backoff = Backoff{Initial: 20 * time.Millisecond, Max: time.Second, ResetAfter: 200 * time.Millisecond}
	done := make(chan struct{})
	go func() { defer close(done); s.Run() }()
	waitFor(t, "live", 10*time.Second, s.IsLive)
	time.Sleep(300 * time.Millisecond) // healthy for longer than ResetAfter
	pid := s.Pid()
	_ = syscall.Kill(pid, syscall.SIGKILL)
	waitFor(t, "restarted", 10*time.Second, func() bool { return s.IsLive() && s.Pid() != pid && s.Pid() != 0 })
	if err := s.Stop(5 * time.Second); err != nil {
		t.Error(err)
	}
	<-done
	var waits []string
	for _, l := range strings.Split(logs.String(), "\n") {
		if i := strings.Index(l, `"restart_in":`); i >= 0 {
			w := l[i+len(`"restart_in":`):]
			waits = append(waits, w[:strings.IndexAny(w, ",}")])
		}
	}
	if strings.Join(waits, " ") != "20 40 20" {
		t.Errorf("restart waits %v ms, want 20 40 20 (reset after a healthy run)", waits)
	}
}

// TestSupervisorStartFailure: a child that cannot start is retried like
// one that exited.
func TestSupervisorStartFailure(t *testing.T) {
	var n atomic.Int64
	s := &supervisor{
		Command: func() (*exec.Cmd, error) {
			if n.Add(1) < 3 {
				return exec.Command("/nonexistent/meshtun"), nil
			}
			return nil, errors.New("no bootstrap")
		},
		Backoff: Backoff{Initial: 10 * time.Millisecond, Max: 20 * time.Millisecond},
		Log:     zerolog.Nop(),
	}
	done := make(chan struct{})
	go func() { defer close(done); s.Run() }()
	waitFor(t, "retries", 5*time.Second, func() bool { return s.Restarts() >= 4 })
	if err := s.Stop(time.Second); err != nil {
		t.Error(err)
	}
	<-done
}

// TestSupervisorSignalWaitsForFirstLine: a reload signal for a proxy that
// has not written anything yet (still initializing, no handlers) is held
// until its first line instead of killing it: no restart, and the reload
// happens.
func TestSupervisorSignalWaitsForFirstLine(t *testing.T) {
	s, _, out, logs := fakeSupervisor(t, "slowstart")
	runDone := make(chan struct{})
	go func() {
		defer close(runDone)
		s.Run()
	}()
	waitFor(t, "the proxy started", 5*time.Second, func() bool { return s.Pid() != 0 })
	if !s.Signal(syscall.SIGHUP) {
		t.Fatal("Signal reports no proxy running")
	}
	waitFor(t, "the held SIGHUP applied", 5*time.Second, func() bool { return strings.Contains(out.String(), "bootstrap reloaded") })
	if err := s.Stop(5 * time.Second); err != nil {
		t.Errorf("stop: %v", err)
	}
	<-runDone
	if n := s.Restarts(); n != 0 {
		t.Errorf("%d restarts: the SIGHUP killed the initializing proxy\n%s", n, logs.String())
	}
}
