//go:build linux

package integration

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// meshtunBin is the binary under test, from $MESHTUN_BIN.
func meshtunBin(t *testing.T) string {
	t.Helper()
	bin := os.Getenv("MESHTUN_BIN")
	if bin == "" {
		t.Fatal("MESHTUN_BIN is not set: run `make integration`, or build the binary with " +
			"`go build -o /tmp/meshtun ./cmd/meshtun` and run with MESHTUN_BIN=/tmp/meshtun")
	}
	abs, err := filepath.Abs(bin)
	if err != nil {
		t.Fatalf("MESHTUN_BIN=%s: %v", bin, err)
	}
	if fi, err := os.Stat(abs); err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
		t.Fatalf("MESHTUN_BIN=%s is not an executable file (%v)", bin, err)
	}
	return abs
}

// AccessEntry is one parsed access-log line of the proxy.
type AccessEntry struct {
	Transport        string  `json:"transport"`
	Direction        string  `json:"direction"`
	DownstreamRemote string  `json:"downstream_remote_address"`
	DownstreamLocal  string  `json:"downstream_local_address"`
	UpstreamHost     string  `json:"upstream_host"`
	UpstreamLocal    string  `json:"upstream_local_address"`
	BytesReceived    int64   `json:"bytes_received"`
	BytesSent        int64   `json:"bytes_sent"`
	Duration         float64 `json:"duration"`
	ResponseFlags    string  `json:"response_flags"`
	UpstreamCluster  string  `json:"upstream_cluster"`
	// Peer identities and the TLS failure, Istio's field names (issue 14).
	DownstreamPeerURISAN           string `json:"downstream_peer_uri_san"`
	UpstreamPeerURISAN             string `json:"upstream_peer_uri_san"`
	UpstreamTransportFailureReason string `json:"upstream_transport_failure_reason"`

	Raw string `json:"-"` // the line as logged
}

// proxyProc is a running `meshtun proxy` in the pod namespace.
type proxyProc struct {
	t    *testing.T
	name string
	cmd  *exec.Cmd

	mu      sync.Mutex
	lines   []string
	partial []byte
	changed chan struct{} // closed and replaced whenever a line arrives

	done    chan struct{} // closed when the process has exited
	waitErr error
}

// Write collects the proxy's output line by line (cmd.Stderr).
func (p *proxyProc) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.partial = append(p.partial, b...)
	added := false
	for {
		i := bytes.IndexByte(p.partial, '\n')
		if i < 0 {
			break
		}
		p.lines = append(p.lines, string(p.partial[:i]))
		p.partial = p.partial[i+1:]
		added = true
	}
	if added {
		close(p.changed)
		p.changed = make(chan struct{})
	}
	return len(b), nil
}

// logLines returns the proxy's output so far, one entry per line.
func (p *proxyProc) logLines() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.lines...)
}

// startProc runs `ip args...` (an `ip netns exec NS BIN ...`, which execs
// the binary, so the pid is the binary's) with env (nil: the test's own),
// collecting its output line by line. At cleanup a process still running
// gets stop, then SIGKILL 5 s later; its log is dumped when the test failed.
func startProc(t *testing.T, name string, args, env []string, stop syscall.Signal) *proxyProc {
	t.Helper()
	p := &proxyProc{t: t, name: name, changed: make(chan struct{}), done: make(chan struct{})}
	p.cmd = exec.Command("ip", args...)
	p.cmd.Env = env
	p.cmd.Stdout, p.cmd.Stderr = p, p
	p.cmd.WaitDelay = 2 * time.Second
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", p.name, err)
	}
	go func() {
		p.waitErr = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		if !p.exited() {
			_ = p.cmd.Process.Signal(stop)
			exited := false
			if stop != syscall.SIGKILL {
				select {
				case <-p.done:
					exited = true
				case <-time.After(5 * time.Second):
					_ = p.cmd.Process.Kill()
				}
			}
			if !exited {
				select {
				case <-p.done:
				case <-time.After(5 * time.Second):
					t.Errorf("%s: pid %d did not exit 5s after SIGKILL", p.name, p.cmd.Process.Pid)
				}
			}
		}
		if t.Failed() {
			p.dumpLog()
		}
	})
	return p
}

// startProxy runs `meshtun proxy` in topo's pod namespace with JSON debug
// logs and extra flags, and waits (10 s at most) for "proxy ready". The
// process is killed at cleanup if still running; its log is dumped when
// the test failed.
func startProxy(t *testing.T, topo *topology, extra ...string) *proxyProc {
	t.Helper()
	bin := meshtunBin(t)
	args := append([]string{"netns", "exec", topo.Pod, bin, "proxy", "--log-format", "json", "--log-level", "debug", "--state-dir", topo.StateDir}, extra...)
	p := startProc(t, "meshtun proxy "+strings.Join(extra, " "), args, nil, syscall.SIGKILL)
	if !p.waitLine(func(l string) bool { return logMessage(l) == "proxy ready" }, 10*time.Second) {
		if p.exited() {
			t.Fatalf("%s exited before it was ready (%v); log:\n%s", p.name, p.waitErr, strings.Join(p.logLines(), "\n"))
		}
		t.Fatalf("%s not ready after 10s; log:\n%s", p.name, strings.Join(p.logLines(), "\n"))
	}
	return p
}

func (p *proxyProc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// logMessage is the "message" field of a JSON log line ("" if none).
func logMessage(line string) string {
	var m struct {
		Message string `json:"message"`
	}
	if json.Unmarshal([]byte(line), &m) != nil {
		return ""
	}
	return m.Message
}

// waitLine waits until some line satisfies match, the process exits, or
// timeout passes; it reports whether a line matched.
func (p *proxyProc) waitLine(match func(string) bool, timeout time.Duration) bool {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	seen := 0
	for {
		p.mu.Lock()
		lines, changed := p.lines[seen:], p.changed
		seen = len(p.lines)
		p.mu.Unlock()
		for _, l := range lines {
			if match(l) {
				return true
			}
		}
		select {
		case <-changed:
		case <-p.done:
			// Output is complete once Wait returned; one last look.
			p.mu.Lock()
			lines = p.lines[seen:]
			p.mu.Unlock()
			for _, l := range lines {
				if match(l) {
					return true
				}
			}
			return false
		case <-deadline.C:
			return false
		}
	}
}

// accessLogs returns the access entries logged so far.
func (p *proxyProc) accessLogs() []AccessEntry {
	var out []AccessEntry
	for _, l := range p.logLines() {
		if e, ok := parseAccess(l); ok {
			out = append(out, e)
		}
	}
	return out
}

func parseAccess(line string) (AccessEntry, bool) {
	var head struct {
		Logger  string `json:"logger"`
		Message string `json:"message"`
	}
	if json.Unmarshal([]byte(line), &head) != nil || head.Logger != "access" || head.Message != "access" {
		return AccessEntry{}, false
	}
	var e AccessEntry
	if json.Unmarshal([]byte(line), &e) != nil {
		return AccessEntry{}, false
	}
	e.Raw = line
	return e, true
}

// accessMatching returns the access entries logged so far that satisfy pred.
func (p *proxyProc) accessMatching(pred func(AccessEntry) bool) []AccessEntry {
	var out []AccessEntry
	for _, e := range p.accessLogs() {
		if pred(e) {
			out = append(out, e)
		}
	}
	return out
}

// waitAccess waits up to timeout for an access entry satisfying pred.
func (p *proxyProc) waitAccess(pred func(AccessEntry) bool, timeout time.Duration) (AccessEntry, bool) {
	var found AccessEntry
	ok := p.waitLine(func(l string) bool {
		e, isAccess := parseAccess(l)
		if isAccess && pred(e) {
			found = e
			return true
		}
		return false
	}, timeout)
	return found, ok
}

// waitAccessN waits up to timeout until n access entries satisfy pred and
// returns those seen (fewer than n on timeout).
func (p *proxyProc) waitAccessN(pred func(AccessEntry) bool, n int, timeout time.Duration) []AccessEntry {
	var got []AccessEntry
	p.waitLine(func(l string) bool {
		if e, ok := parseAccess(l); ok && pred(e) {
			got = append(got, e)
		}
		return len(got) >= n
	}, timeout)
	return got
}

// stop sends SIGTERM and requires a clean exit (status 0) within 10 s.
func (p *proxyProc) stop() {
	p.t.Helper()
	if p.exited() {
		p.t.Fatalf("%s had already exited (%v) before SIGTERM", p.name, p.waitErr)
	}
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		p.t.Fatalf("%s: SIGTERM: %v", p.name, err)
	}
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		p.t.Fatalf("%s did not exit within 10s of SIGTERM", p.name)
	}
	if p.waitErr != nil {
		var ee *exec.ExitError
		if errors.As(p.waitErr, &ee) {
			p.t.Fatalf("%s exited with %v after SIGTERM, want status 0", p.name, ee.ProcessState)
		}
		p.t.Fatalf("%s: wait: %v", p.name, p.waitErr)
	}
}

// kill9 kills the proxy with SIGKILL, leaving whatever it had set up.
func (p *proxyProc) kill9() {
	p.t.Helper()
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		p.t.Fatalf("%s did not exit within 5s of SIGKILL", p.name)
	}
}

// dumpLog writes the proxy's log to the test log (its head and tail when
// long) and the whole of it to a file whose name is logged.
func (p *proxyProc) dumpLog() {
	lines := p.logLines()
	const head, tail = 100, 400
	f, err := os.CreateTemp("", "meshtun-"+strings.ReplaceAll(p.t.Name(), "/", "_")+"-*.log")
	where := ""
	if err == nil {
		_, _ = f.WriteString(strings.Join(lines, "\n") + "\n")
		_ = f.Close()
		where = " (full log in " + f.Name() + ")"
	}
	if len(lines) <= head+tail {
		p.t.Logf("%s log, %d lines%s:\n%s", p.name, len(lines), where, strings.Join(lines, "\n"))
		return
	}
	p.t.Logf("%s log, %d lines%s; first %d:\n%s\n... %d lines omitted ...\nlast %d:\n%s",
		p.name, len(lines), where, head, strings.Join(lines[:head], "\n"),
		len(lines)-head-tail, tail, strings.Join(lines[len(lines)-tail:], "\n"))
}

// String describes an access entry for failure messages.
func (e AccessEntry) String() string {
	if e.Raw != "" {
		return e.Raw
	}
	type plain AccessEntry // without this String method
	return fmt.Sprintf("%+v", plain(e))
}
