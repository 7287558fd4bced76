package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"
)

// blocker switches capture between refusing flows (no proxy) and sending
// them to the proxy; *tun.Capture is one.
type blocker interface {
	Block() error
	Unblock() error
}

// Backoff bounds the restarts of a proxy that keeps exiting.
type Backoff struct {
	// Initial is the wait before the first restart (default 100ms): short,
	// since the pod's traffic is refused until a proxy serves again.
	Initial time.Duration
	// Max caps the doubling wait (default 10s).
	Max time.Duration
	// ResetAfter: a proxy that served this long before it exited is
	// restarted after Initial again (default 30s).
	ResetAfter time.Duration
}

func (b *Backoff) setDefaults() {
	if b.Initial <= 0 {
		b.Initial = 100 * time.Millisecond
	}
	if b.Max < b.Initial {
		b.Max = max(10*time.Second, b.Initial)
	}
	if b.ResetAfter <= 0 {
		b.ResetAfter = 30 * time.Second
	}
}

// readyMarker is what the proxy logs once it serves.
const readyMarker = "proxy ready"

// supervisor runs the proxy as a child process and restarts it when it
// exits on its own. While no proxy serves, capture is blocked, so the
// pod's flows are refused at once rather than lost in a TUN nobody reads;
// it is unblocked as soon as the new proxy is live.
type supervisor struct {
	// Command returns the child to start; it is called for every start,
	// so each one gets the current bootstrap and settings.
	Command func() (*exec.Cmd, error)
	// Live reports whether the started child serves (its admin /ready).
	Live func(ctx context.Context) error
	// Capture is blocked while no proxy serves; nil without capture.
	Capture blocker
	// CaptureBlocked says Capture is already blocked when Run starts.
	CaptureBlocked bool
	Backoff        Backoff
	// Output receives the child's stdout and stderr, a line at a time.
	Output io.Writer
	Log    zerolog.Logger

	restarts atomic.Int64
	live     atomic.Bool
	blocked  atomic.Bool

	mu       sync.Mutex
	cur      *child // the running child
	last     *child // the latest child started
	stopping bool
	stopCh   chan struct{}
	runDone  chan struct{}
	initOnce sync.Once
}

type child struct {
	cmd      *exec.Cmd
	done     chan struct{} // closed when the process has been waited for
	waitErr  error
	readyCh  chan struct{} // signalled when the child logs readyMarker
	lastLine atomic.Value  // string: the child's last output line
	stopped  atomic.Bool   // it got SIGTERM from Stop

	// Signals for a child that has not written a line yet wait for its
	// first one (or for it to be live): until its main function has
	// installed its handlers (the proxy does so first thing, before any
	// output), a SIGHUP would kill it by the default action, in the Go
	// runtime's and the packages' initialization.
	sigMu   sync.Mutex
	spoke   bool // set under sigMu; spokeFast mirrors it for the per-line check
	pending []os.Signal

	spokeFast atomic.Bool
}

// signal sends sig now, or with the child's first line.
func (c *child) signal(sig os.Signal) error {
	c.sigMu.Lock()
	defer c.sigMu.Unlock()
	if !c.spoke {
		if !slices.Contains(c.pending, sig) {
			c.pending = append(c.pending, sig)
		}
		return nil
	}
	return c.cmd.Process.Signal(sig)
}

// spokeOnce marks the child as handling signals and sends those held.
func (c *child) spokeOnce() {
	if c.spokeFast.Load() {
		return // every line after the first: no lock
	}
	c.sigMu.Lock()
	defer c.sigMu.Unlock()
	if c.spoke {
		return
	}
	c.spoke = true
	c.spokeFast.Store(true)
	for _, sig := range c.pending {
		_ = c.cmd.Process.Signal(sig)
	}
	c.pending = nil
}

func (s *supervisor) init() {
	s.initOnce.Do(func() {
		s.Backoff.setDefaults()
		s.stopCh = make(chan struct{})
		s.runDone = make(chan struct{})
		if s.Output == nil {
			s.Output = io.Discard
		}
	})
}

// Restarts is how many times the proxy was restarted after exiting on its
// own.
func (s *supervisor) Restarts() int64 { return s.restarts.Load() }

// IsLive reports whether a proxy runs and has been seen serving.
func (s *supervisor) IsLive() bool { return s.live.Load() }

// Blocked reports whether capture is currently blocked.
func (s *supervisor) Blocked() bool { return s.blocked.Load() }

// Pid is the running proxy's process id, 0 if none runs.
func (s *supervisor) Pid() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur == nil || s.cur.cmd.Process == nil {
		return 0
	}
	return s.cur.cmd.Process.Pid
}

// Signal sends sig to the running proxy; it reports whether one runs.
// A proxy that has not written its first line yet gets sig with that
// line: before, it may not handle signals yet.
func (s *supervisor) Signal(sig os.Signal) bool {
	s.mu.Lock()
	c := s.cur
	s.mu.Unlock()
	if c == nil || c.cmd.Process == nil {
		return false
	}
	return c.signal(sig) == nil
}

// Run starts the proxy and keeps one running until Stop; it returns when
// the last child has exited.
func (s *supervisor) Run() {
	s.init()
	defer close(s.runDone)
	s.blocked.Store(s.CaptureBlocked)
	s.block()
	delay := s.Backoff.Initial
	for {
		if s.isStopping() {
			return
		}
		started := time.Now()
		liveFor, err := s.runOnce()
		if s.isStopping() {
			return
		}
		s.live.Store(false)
		s.block()
		if liveFor >= s.Backoff.ResetAfter {
			delay = s.Backoff.Initial
		}
		n := s.restarts.Add(1)
		ev := s.Log.Warn().Err(err).Dur("ran", time.Since(started).Round(time.Millisecond)).
			Dur("restart_in", delay).Int64("restarts", n)
		var ee *exec.ExitError
		if last := s.lastLine(); last != "" && errors.As(err, &ee) && ee.Exited() {
			// It exited on its own: its last words usually say why.
			ev = ev.Str("last_output", last)
		}
		ev.Msg("proxy exited unexpectedly; restarting it")
		select {
		case <-time.After(delay):
		case <-s.stopCh:
			return
		}
		delay = min(2*delay, s.Backoff.Max)
	}
}

func (s *supervisor) lastLine() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.last == nil {
		return ""
	}
	l, _ := s.last.lastLine.Load().(string)
	return l
}

func (s *supervisor) isStopping() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stopping
}

func (s *supervisor) block() {
	if s.Capture == nil || s.blocked.Load() {
		return
	}
	if err := s.Capture.Block(); err != nil {
		s.Log.Error().Err(err).Msg("blocking capture while no proxy runs")
		return
	}
	s.blocked.Store(true)
}

func (s *supervisor) unblock() {
	if s.Capture == nil || !s.blocked.Load() {
		return
	}
	if err := s.Capture.Unblock(); err != nil {
		s.Log.Error().Err(err).Msg("unblocking capture for the new proxy")
		return
	}
	s.blocked.Store(false)
}

// runOnce starts one child and waits for it to exit. It returns how long
// the child was live and why it ended.
func (s *supervisor) runOnce() (time.Duration, error) {
	cmd, err := s.Command()
	if err != nil {
		return 0, fmt.Errorf("preparing the proxy: %w", err)
	}
	c := &child{cmd: cmd, done: make(chan struct{}), readyCh: make(chan struct{}, 1)}
	c.lastLine.Store("")
	lw := &lineWriter{out: s.Output, c: c}
	cmd.Stdout, cmd.Stderr = lw, lw
	cmd.WaitDelay = 2 * time.Second
	// The proxy must not outlive the agent: it would hold the TUN with
	// nobody to restart it.
	dieWithParent(cmd)

	// Pdeathsig fires when the thread that forked exits, not the process:
	// start and wait on one locked thread that lives as long as the child.
	startErr := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			startErr <- err
			return
		}
		s.mu.Lock()
		s.cur, s.last = c, c
		stopping := s.stopping
		s.mu.Unlock()
		if stopping { // Stop came while it was starting
			c.stopped.Store(true)
			_ = cmd.Process.Signal(syscall.SIGTERM)
		}
		startErr <- nil
		c.waitErr = cmd.Wait()
		s.live.Store(false)
		s.mu.Lock()
		s.cur = nil
		s.mu.Unlock()
		close(c.done)
	}()
	if err := <-startErr; err != nil {
		return 0, fmt.Errorf("starting the proxy: %w", err)
	}
	s.Log.Info().Int("pid", cmd.Process.Pid).Str("command", strings.Join(cmd.Args, " ")).Msg("proxy started")

	var liveAt time.Time
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	check := func() {
		if !liveAt.IsZero() || s.Live == nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		err := s.Live(ctx)
		cancel()
		if err != nil {
			return
		}
		liveAt = time.Now()
		c.spokeOnce() // serving (even with its log off): it handles signals
		s.live.Store(true)
		s.unblock()
		s.Log.Info().Int("pid", cmd.Process.Pid).Msg("proxy live")
	}
	for {
		select {
		case <-c.done:
			s.live.Store(false)
			var liveFor time.Duration
			if !liveAt.IsZero() {
				liveFor = time.Since(liveAt)
			}
			err := c.waitErr
			if err == nil {
				err = errors.New("exit status 0")
			}
			return liveFor, err
		case <-c.readyCh:
			check()
		case <-tick.C:
			check()
		}
	}
}

// Stop ends supervision: the running proxy gets SIGTERM and grace to
// exit (it drains its flows meanwhile), then SIGKILL. It waits for Run to
// return (Run must have been called) and returns nil if the proxy exited
// with status 0 or none was running.
func (s *supervisor) Stop(grace time.Duration) error {
	s.init()
	s.mu.Lock()
	if !s.stopping {
		s.stopping = true
		close(s.stopCh)
	}
	c := s.cur
	s.mu.Unlock()
	s.live.Store(false)
	if c != nil {
		c.stopped.Store(true)
		_ = c.cmd.Process.Signal(syscall.SIGTERM)
	}
	select {
	case <-s.runDone:
	case <-time.After(grace):
		s.Log.Error().Dur("grace", grace).Msg("the proxy did not exit in time after SIGTERM; killing it")
		s.Kill()
		<-s.runDone
		return fmt.Errorf("the proxy was killed %v after SIGTERM", grace)
	}
	s.mu.Lock()
	last := s.last
	s.mu.Unlock()
	if last != nil && last.stopped.Load() {
		return last.waitErr
	}
	return nil
}

// Kill ends the running proxy at once (a second SIGTERM).
func (s *supervisor) Kill() {
	s.mu.Lock()
	c := s.cur
	s.mu.Unlock()
	if c != nil {
		_ = c.cmd.Process.Kill()
	}
}

// lineWriter passes the child's output on a line at a time (so it does not
// interleave with the agent's own log) and notices the ready line.
type lineWriter struct {
	out     io.Writer
	c       *child
	partial []byte
}

func (w *lineWriter) Write(b []byte) (int, error) {
	w.partial = append(w.partial, b...)
	for {
		i := bytes.IndexByte(w.partial, '\n')
		if i < 0 {
			break
		}
		line := w.partial[:i+1]
		_, _ = w.out.Write(line)
		w.c.spokeOnce()
		text := string(bytes.TrimSpace(line))
		if text != "" {
			w.c.lastLine.Store(text)
		}
		if strings.Contains(text, readyMarker) {
			select {
			case w.c.readyCh <- struct{}{}:
			default:
			}
		}
		w.partial = w.partial[i+1:]
	}
	if len(w.partial) > 64<<10 { // a runaway line: pass it on as it is
		_, _ = w.out.Write(w.partial)
		w.partial = w.partial[:0]
	}
	return len(b), nil
}

// LockedWriter serializes whole writes to W, so the agent's log lines and
// the proxy's, written from different goroutines, never interleave.
type LockedWriter struct {
	mu sync.Mutex
	W  io.Writer
}

func (l *LockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.W.Write(b)
}
