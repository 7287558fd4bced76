//go:build linux

package integration

import (
	"bytes"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// sharedDir is a folder every user may enter (t.TempDir's are 0700): the
// unprivileged sidecar reads the binary and writes its files there.
func sharedDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "meshtun-lp-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(d, 0o777); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// copyExec copies the meshtun binary into dir, executable by anyone.
func copyExec(t *testing.T, dir string) string {
	t.Helper()
	src, err := os.Open(meshtunBin(t))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst := filepath.Join(dir, "meshtun")
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, src); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
	return dst
}

// unprivileged is setpriv's argv for uid:gid with no capability at all:
// empty inheritable, ambient and bounding sets, no supplementary groups
// (what a Kubernetes container with runAsUser and capabilities.drop [ALL]
// gets).
func unprivileged(uid int) []string {
	u := strconv.Itoa(uid)
	return []string{"setpriv", "--reuid", u, "--regid", u, "--clear-groups", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs"}
}

// procStatus reads fields of /proc/<pid>/status.
func procStatus(t *testing.T, pid int, keys ...string) map[string]string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		for _, want := range keys {
			if k == want {
				out[k] = strings.Join(strings.Fields(v), " ")
			}
		}
	}
	return out
}

// TestLeastPrivilegeSplit is issue 16's least-privilege split end to end:
// the init step (root, CAP_NET_ADMIN) creates a persistent TUN owned by
// uid 1337 and installs capture; the sidecar's agent then runs as uid 1337
// with no capability at all, attaches to the device, and its proxy (same
// user, no capability) carries the pod's captured traffic. An agent
// running as another uid is refused by the kernel, and says so.
func TestLeastPrivilegeSplit(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	cp := startControlPlane(t, topo.Services, ap(topo.GwV4, 15010))
	startTCPServer(t, topo.Services, ap(topo.SvcV4, 9080), echo)
	dir := sharedDir(t)
	bin := copyExec(t, dir)
	node := filepath.Join(dir, "tun") // the emptyDir the two containers share
	env := append(agentEnv(), "PATH="+os.Getenv("PATH"))

	// The init container.
	out, err := exec.Command("ip", "netns", "exec", topo.Pod, bin, "agent", "--capture-only", "--tun-owner", "1337", "--tun-group", "1337",
		"--tun-node", node, "--state-dir", topo.StateDir, "--pod-labels-file", "", "--pod-annotations-file", "").CombinedOutput()
	if err != nil {
		t.Fatalf("agent --capture-only --tun-owner 1337: %v\n%s", err, out)
	}
	// Nothing reads the device yet: captured flows go nowhere (fail
	// closed), they do not leave uncaptured.
	if _, err := tcpEcho(topo.Pod, ap(topo.SvcV4, 9080), 64); err == nil {
		t.Fatalf("a flow got through while no sidecar holds the TUN: capture must fail closed")
	}

	sidecar := func(uid int) []string {
		home := filepath.Join(dir, "uid"+strconv.Itoa(uid))
		if err := os.MkdirAll(home, 0o777); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(home, 0o777); err != nil {
			t.Fatal(err)
		}
		args := append([]string{"netns", "exec", topo.Pod}, unprivileged(uid)...)
		return append(args, bin, "agent", "--capture", "attach", "--tun-node", node, "--log-format", "json",
			"--state-dir", filepath.Join(home, "state"), "--bootstrap-out", filepath.Join(home, "envoy-rev.json"),
			"--sds-socket", filepath.Join(home, "sds.sock"),
			"--pod-labels-file", "", "--pod-annotations-file", "", "--discovery-address", ap(topo.GwV4, 15010))
	}

	// Another user: the kernel refuses the attach, and the error says why.
	cmd := exec.Command("ip", sidecar(4242)...)
	cmd.Env = env
	var stderr bytes.Buffer
	cmd.Stderr, cmd.Stdout = &stderr, &stderr
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(stderr.String(), "operation not permitted") || !strings.Contains(stderr.String(), "owner uid 1337") {
			t.Fatalf("agent as uid 4242: %v, want refused with EPERM naming the owner:\n%s", err, stderr.String())
		}
	case <-time.After(15 * time.Second):
		cmd.Process.Kill()
		t.Fatalf("agent as uid 4242 did not exit:\n%s", stderr.String())
	}

	// The sidecar's user, no capability.
	ag := startProc(t, "meshtun agent (uid 1337)", sidecar(1337), env, syscall.SIGKILL)
	if !ag.waitLine(func(l string) bool { return logMessage(l) == "proxy started" }, 20*time.Second) {
		t.Fatalf("unprivileged agent did not start its proxy; log:\n%s", strings.Join(ag.logLines(), "\n"))
	}
	vipAddr := xdsService(t, cp, topo, "1", 72, netip.AddrPortFrom(topo.SvcV4, 9080))
	if !ag.waitLine(func(l string) bool { return logMessage(l) == "proxy live" }, 20*time.Second) {
		t.Fatalf("unprivileged agent's proxy not live; log:\n%s", strings.Join(ag.logLines(), "\n"))
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err = tcpEcho(topo.Pod, ap(vipAddr, 9080), 4096); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no traffic through the unprivileged sidecar: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := tcpEcho(topo.Pod, ap(topo.SvcV4, 9080), 4096); err != nil {
		t.Fatalf("passthrough through the unprivileged sidecar: %v", err)
	}
	// Agent and proxy: uid 1337, no capability in any set.
	pids := []int{ag.cmd.Process.Pid}
	for _, l := range ag.logLines() {
		if logMessage(l) == "proxy started" {
			if pid, ok := logField(l, "pid").(float64); ok {
				pids = append(pids, int(pid))
			}
		}
	}
	if len(pids) < 2 {
		t.Fatalf("no proxy pid in the agent's log")
	}
	for _, pid := range pids[1:] {
		st := procStatus(t, pid, "Uid", "CapEff", "CapPrm", "CapBnd", "CapAmb")
		if !strings.HasPrefix(st["Uid"], "1337 1337") || st["CapEff"] != "0000000000000000" || st["CapPrm"] != "0000000000000000" ||
			st["CapBnd"] != "0000000000000000" || st["CapAmb"] != "0000000000000000" {
			t.Fatalf("proxy %d runs with %v, want uid 1337 and no capability", pid, st)
		}
	}
}
