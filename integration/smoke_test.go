package integration

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netns"
)

// smokeRequireRoot fails under CI=true and skips elsewhere when the test
// cannot create namespaces and TUN devices.
func smokeRequireRoot(t *testing.T) {
	t.Helper()
	reason := ""
	switch {
	case os.Geteuid() != 0:
		reason = "needs root"
	case os.Getenv("MESHTUN_BIN") == "":
		reason = "MESHTUN_BIN is not set (run `make integration`)"
	}
	if _, err := os.Stat("/dev/net/tun"); reason == "" && err != nil {
		reason = "no /dev/net/tun"
	}
	if reason == "" {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("integration test cannot run: %s", reason)
	}
	t.Skip(reason)
}

func smokeRun(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// smokeInNS runs fn on a thread inside network namespace ns. Sockets fn
// creates stay in that namespace.
func smokeInNS(t *testing.T, ns string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			t.Error(err)
			return
		}
		defer orig.Close()
		h, err := netns.GetFromName(ns)
		if err != nil {
			t.Error(err)
			return
		}
		defer h.Close()
		if err := netns.Set(h); err != nil {
			t.Error(err)
			return
		}
		fn()
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		} // else the thread dies with the goroutine
	}()
	<-done
}

// TestSmokeOutboundInbound is the shortest end-to-end proof: a pod with
// sidecar capture reaches a service, is reached by a client, and the
// proxy's access log shows both flows with their original destinations.
func TestSmokeOutboundInbound(t *testing.T) {
	smokeRequireRoot(t)
	id := fmt.Sprintf("%d", os.Getpid()%10000)
	pod, svc := "smp"+id, "sms"+id
	smokeRun(t, "ip", "netns", "add", pod)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", pod).Run() })
	smokeRun(t, "ip", "netns", "add", svc)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", svc).Run() })
	smokeRun(t, "ip", "link", "add", "eth0", "netns", pod, "type", "veth", "peer", "name", "veth0", "netns", svc)
	for _, c := range [][]string{
		{"-n", pod, "addr", "add", "10.231.0.2/24", "dev", "eth0"},
		{"-n", svc, "addr", "add", "10.231.0.1/24", "dev", "veth0"},
		{"-n", svc, "addr", "add", "10.231.1.10/32", "dev", "lo"},
		{"-n", pod, "link", "set", "lo", "up"}, {"-n", svc, "link", "set", "lo", "up"},
		{"-n", pod, "link", "set", "eth0", "up"}, {"-n", svc, "link", "set", "veth0", "up"},
		{"-n", pod, "route", "add", "default", "via", "10.231.0.1"},
	} {
		smokeRun(t, append([]string{"ip"}, c...)...)
	}

	var svcLn, podLn net.Listener
	smokeInNS(t, svc, func() { svcLn, _ = net.Listen("tcp", "10.231.1.10:8080") })
	smokeInNS(t, pod, func() { podLn, _ = net.Listen("tcp", "0.0.0.0:9090") })
	if svcLn == nil || podLn == nil {
		t.Fatal("listen failed")
	}
	defer svcLn.Close()
	defer podLn.Close()
	seen := make(chan string, 2)
	echo := func(ln net.Listener) {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		seen <- c.RemoteAddr().(*net.TCPAddr).IP.String()
		io.Copy(c, c)
		c.Close()
	}
	go echo(svcLn)
	go echo(podLn)

	cmd := exec.Command("ip", "netns", "exec", pod, os.Getenv("MESHTUN_BIN"), "proxy", "--log-format", "json")
	stderr, _ := cmd.StderrPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var logBuf bytes.Buffer
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		once := sync.Once{}
		for sc.Scan() {
			mu.Lock()
			logBuf.WriteString(sc.Text() + "\n")
			mu.Unlock()
			if strings.Contains(sc.Text(), `"message":"proxy ready"`) {
				once.Do(func() { close(ready) })
			}
		}
	}()
	logs := func() string { mu.Lock(); defer mu.Unlock(); return logBuf.String() }
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		if t.Failed() {
			t.Log(logs())
		}
	}()
	select {
	case <-ready:
	case <-time.After(10 * time.Second):
		t.Fatalf("proxy not ready in 10s:\n%s", logs())
	}

	roundTrip := func(ns, addr string) {
		t.Helper()
		var c net.Conn
		var err error
		smokeInNS(t, ns, func() { c, err = net.DialTimeout("tcp", addr, 5*time.Second) })
		if err != nil {
			t.Fatalf("dial %s from %s: %v", addr, ns, err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		msg := []byte("ping " + addr)
		c.Write(msg)
		c.(*net.TCPConn).CloseWrite()
		got, err := io.ReadAll(c)
		if err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("echo via %s: got %q, %v", addr, got, err)
		}
	}
	roundTrip(pod, "10.231.1.10:8080")
	if src := <-seen; src != "10.231.0.2" {
		t.Errorf("service saw source %s, want the pod IP", src)
	}
	roundTrip(svc, "10.231.0.2:9090")
	<-seen

	deadline := time.Now().Add(5 * time.Second)
	for {
		l := logs()
		out := strings.Contains(l, `"downstream_local_address":"10.231.1.10:8080"`)
		in := strings.Contains(l, `"downstream_local_address":"10.231.0.2:9090"`)
		if out && in {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("access log lacks the flows (outbound %v, inbound %v)", out, in)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
