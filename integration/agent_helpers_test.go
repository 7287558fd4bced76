//go:build linux

package integration

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// agentEnv is the injector's environment for the test pod: the node id
// is xdsNode, the one startControlPlane's snapshots are for.
func agentEnv(extra ...string) []string {
	return append([]string{"POD_NAME=app", "POD_NAMESPACE=default", "INSTANCE_IP=10.0.0.2", "SERVICE_ACCOUNT=app"}, extra...)
}

// agentRun is a meshtun agent started by startAgent, with its files.
type agentRun struct {
	*proxyProc
	bootstrap string // --bootstrap-out
}

// startAgent runs `meshtun agent` in topo's pod namespace with env (only
// PATH of the test's environment is kept) and extra flags, and waits
// (15 s at most) for its proxy to be live. The agent is killed at cleanup
// if still running (its proxy dies with it); its log, the proxy's
// included, is dumped when the test failed.
func startAgent(t *testing.T, topo *topology, env []string, extra ...string) *agentRun {
	t.Helper()
	a := startAgentNoWait(t, topo, env, extra...)
	if !a.waitLine(func(l string) bool { return logMessage(l) == "proxy live" }, 15*time.Second) {
		if a.exited() {
			t.Fatalf("agent exited before its proxy was live (%v); log:\n%s", a.waitErr, strings.Join(a.logLines(), "\n"))
		}
		t.Fatalf("agent's proxy not live after 15s; log:\n%s", strings.Join(a.logLines(), "\n"))
	}
	return a
}

func startAgentNoWait(t *testing.T, topo *topology, env []string, extra ...string) *agentRun {
	t.Helper()
	bin := meshtunBin(t)
	out := filepath.Join(t.TempDir(), "envoy-rev.json")
	args := append([]string{"netns", "exec", topo.Pod, bin, "agent", "--log-format", "json", "--log-level", "debug",
		"--state-dir", topo.StateDir, "--bootstrap-out", out, "--pod-labels-file", "", "--pod-annotations-file", ""}, extra...)
	p := startProc(t, "meshtun agent "+strings.Join(extra, " "), args, append([]string{"PATH=" + os.Getenv("PATH")}, env...), syscall.SIGKILL)
	return &agentRun{proxyProc: p, bootstrap: out}
}

// logField is a field of a JSON log line (nil if absent).
func logField(line, name string) any {
	var m map[string]any
	if json.Unmarshal([]byte(line), &m) != nil {
		return nil
	}
	return m[name]
}

// proxyPids are the pids of the proxies the agent started, in order.
func (a *agentRun) proxyPids() []int {
	var out []int
	for _, l := range a.logLines() {
		if logMessage(l) == "proxy started" {
			if pid, ok := logField(l, "pid").(float64); ok {
				out = append(out, int(pid))
			}
		}
	}
	return out
}

// waitExit waits up to timeout for the agent to exit and returns its exit
// status (-1 if killed by a signal).
func (a *agentRun) waitExit(timeout time.Duration) (int, bool) {
	select {
	case <-a.done:
	case <-time.After(timeout):
		return 0, false
	}
	if a.waitErr == nil {
		return 0, true
	}
	var ee *exec.ExitError
	if errors.As(a.waitErr, &ee) {
		return ee.ExitCode(), true
	}
	return -1, true
}

// httpGetIn does GET path on addr from inside ns (HTTP/1.0, bounded) and
// returns the status code and body.
func httpGetIn(ns, addr, path string, timeout time.Duration) (int, string, error) {
	c, err := dialTCP(ns, addr, timeout)
	if err != nil {
		return 0, "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	fmt.Fprintf(c, "GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n", path)
	resp, err := io.ReadAll(c)
	if err != nil {
		return 0, "", err
	}
	head, body, _ := strings.Cut(string(resp), "\r\n\r\n")
	f := strings.Fields(head)
	if len(f) < 2 {
		return 0, "", fmt.Errorf("GET %s: malformed response %q", path, head)
	}
	code, err := strconv.Atoi(f[1])
	return code, body, err
}

// readiness is the agent's /healthz/ready status in the pod (0 if the
// port does not answer).
func readiness(topo *topology) (int, string) {
	code, body, err := httpGetIn(topo.Pod, "127.0.0.1:15021", "/healthz/ready", 2*time.Second)
	if err != nil {
		return 0, err.Error()
	}
	return code, strings.TrimSpace(body)
}

// agentMetric reads one untagged sample of the agent's merged
// /stats/prometheus (the agent's or the proxy's).
func agentMetric(t *testing.T, topo *topology, name string) float64 {
	t.Helper()
	code, body, err := httpGetIn(topo.Pod, "127.0.0.1:15020", "/stats/prometheus", 5*time.Second)
	if err != nil || code != 200 {
		t.Fatalf("agent /stats/prometheus: %d %v", code, err)
	}
	for _, l := range strings.Split(body, "\n") {
		v, ok := strings.CutPrefix(l, name+" ")
		if !ok { // the proxy's untagged samples are name{} value
			v, ok = strings.CutPrefix(l, name+"{} ")
		}
		if ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("%s: %v", l, err)
			}
			return f
		}
	}
	t.Fatalf("agent /stats/prometheus has no %s:\n%s", name, body)
	return 0
}

// agentWait runs `meshtun agent wait` in the pod and returns its exit
// status, its stderr and how long it took.
func agentWait(t *testing.T, topo *topology, args ...string) (int, string, time.Duration) {
	t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", topo.Pod, meshtunBin(t), "agent", "wait"}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	err := cmd.Run()
	took := time.Since(start)
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0, stderr.String(), took
	case errors.As(err, &ee):
		return ee.ExitCode(), stderr.String(), took
	}
	t.Fatalf("agent wait: %v", err)
	return 0, "", 0
}

// writeFileAtomic replaces p as Kubernetes updates a mounted file: a
// complete new file renamed over the old.
func writeFileAtomic(t *testing.T, p string, b []byte) {
	t.Helper()
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, p); err != nil {
		t.Fatal(err)
	}
}

// bootstrapExtra renders static listeners and clusters as the agent's
// --bootstrap-extra document.
func bootstrapExtra(t *testing.T, listeners, clusters []obj) []byte {
	t.Helper()
	b, err := json.MarshalIndent(obj{"static_resources": obj{"listeners": listeners, "clusters": clusters}}, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// processGone reports whether pid has exited: no such process, or a
// zombie nobody has reaped yet (an orphan whose reaper is slow).
func processGone(pid int) bool {
	if syscall.Kill(pid, 0) != nil {
		return true
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	// pid (comm) state ...: the state follows the last ')'.
	i := bytes.LastIndexByte(b, ')')
	return i >= 0 && i+2 < len(b) && b[i+2] == 'Z'
}
