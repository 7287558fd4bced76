//go:build linux

package integration

import (
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestLocalModeCapturesOnlyCIDR is laptop mode (`--capture local
// --capture-cidr`): a destination inside the CIDR goes through the proxy
// (here a service VIP to its cluster); one outside it, and inbound
// traffic, are not touched; the default route is not changed; stopping
// the proxy restores the namespace's rules and routes exactly.
func TestLocalModeCapturesOnlyCIDR(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	startTCPServer(t, topo.Services, ap(topo.SvcV4, 80), echo)
	startTCPServer(t, topo.Services, ap(topo.Svc2V4, 80), echo)
	startTCPServer(t, topo.Pod, ap(topo.PodV4, 8080), echo)
	v := vip(topo, false, 63)
	cidr := netip.PrefixFrom(v, 24).Masked()
	cl := "outbound|80||web.default.svc.cluster.local"
	bs := writeBootstrap(t, []obj{virtualOutbound("PassthroughCluster"), virtualInbound(), serviceListener(v, 80, cl)},
		append(istioClusters(), staticCluster(cl, "ROUND_ROBIN", netip.AddrPortFrom(topo.Svc2V4, 80))))
	before := podState(t, topo.Pod)
	defRoute, err := nsRun(topo.Pod, "ip", "route", "show", "default")
	if err != nil {
		t.Fatal(err)
	}
	px := startProxy(t, topo, "--bootstrap", bs, "--capture", "local", "--capture-cidr", cidr.String())

	if got, _ := nsRun(topo.Pod, "ip", "route", "show", "default"); got != defRoute {
		t.Fatalf("local mode changed the default route: %q → %q", defRoute, got)
	}
	// Inside the CIDR: the VIP reaches its cluster through the proxy.
	c, err := dialTCP(topo.Pod, ap(v, 80), dialTimeout)
	if err != nil {
		t.Fatalf("VIP inside the captured CIDR: %v", err)
	}
	if err := echoRoundTrip(c, []byte("via the proxy"), echoTimeout); err != nil {
		t.Fatal(err)
	}
	c.Close()
	if _, ok := px.waitAccess(func(e AccessEntry) bool { return e.UpstreamCluster == cl }, 5*time.Second); !ok {
		t.Fatal("no access line for the VIP flow")
	}
	// Outside the CIDR and inbound: straight through the kernel.
	c, err = dialTCP(topo.Pod, ap(topo.SvcV4, 80), dialTimeout)
	if err != nil {
		t.Fatal(err)
	}
	if err := echoRoundTrip(c, []byte("direct"), echoTimeout); err != nil {
		t.Fatal(err)
	}
	c.Close()
	c, err = dialTCP(topo.Services, ap(topo.PodV4, 8080), dialTimeout)
	if err != nil {
		t.Fatal(err)
	}
	if err := echoRoundTrip(c, []byte("inbound"), echoTimeout); err != nil {
		t.Fatal(err)
	}
	c.Close()
	time.Sleep(200 * time.Millisecond) // an access line would be written at flow end
	if n := len(px.accessLogs()); n != 1 {
		t.Fatalf("%d access lines, want only the VIP flow's: %v", n, px.accessLogs())
	}
	px.stop()
	if after := podState(t, topo.Pod); after != before {
		t.Fatalf("stopping local mode did not restore the namespace:\n%s", lineDiff(before, after))
	}
	if strings.Contains(before, "15002") {
		t.Fatal("test premise: table 15002 in use before the start")
	}
}

// TestAgentLocalMode is issue 7's laptop mode: `meshtun agent --mode local
// --capture-cidr CIDR --discovery ADDR` takes its configuration from a
// control plane and captures only the CIDR: a service VIP in it reaches
// its endpoint through the proxy (one access line), other traffic —
// outbound outside the CIDR, inbound — does not go through the proxy (no
// access line), the default route is not changed, and SIGTERM restores
// the namespace exactly.
func TestAgentLocalMode(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	cp := startControlPlane(t, topo.Services, ap(topo.GwV4, 15010))
	startTCPServer(t, topo.Services, ap(topo.SvcV4, 80), echo)
	startTCPServer(t, topo.Pod, ap(topo.PodV4, 8080), echo)
	ep := startTCPServer(t, topo.Services, ap(topo.Svc2V4, 80), echo)
	v := vip(topo, false, 64)
	cl := "outbound|80||web.default.svc.cluster.local"
	cp.push(t, "1", []obj{virtualOutbound("PassthroughCluster"), virtualInbound(), serviceListener(v, 80, cl)},
		append(istioClusters(), edsCluster(cl)), map[string][]netip.AddrPort{cl: {netip.AddrPortFrom(topo.Svc2V4, 80)}})
	before := podState(t, topo.Pod)
	defRoute, _ := nsRun(topo.Pod, "ip", "route", "show", "default")

	ag := startAgent(t, topo, agentEnv(), "--mode", "local", "--capture-cidr", netip.PrefixFrom(v, 24).Masked().String(),
		"--discovery", ap(topo.GwV4, 15010))
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := dialTCP(topo.Pod, ap(v, 80), dialTimeout)
		if err == nil {
			err = echoRoundTrip(c, []byte("laptop"), echoTimeout)
			c.Close()
		}
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("VIP in the captured CIDR never served: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(ep.accepted()) == 0 {
		t.Fatal("the VIP flow did not reach the service's endpoint")
	}
	if got, _ := nsRun(topo.Pod, "ip", "route", "show", "default"); got != defRoute {
		t.Fatalf("local mode changed the default route: %q → %q", defRoute, got)
	}
	if rules, _ := nsRun(topo.Pod, "ip", "rule"); strings.Contains(rules, "15001") || strings.Contains(rules, "iif") {
		t.Fatalf("local mode installed sidecar capture rules:\n%s", rules)
	}
	// The access log from here on: the line of the flow that succeeded
	// above (earlier attempts, before the configuration arrived, may have
	// their own) is written, and counted, first.
	if _, ok := ag.waitAccess(func(e AccessEntry) bool { return e.UpstreamCluster == cl }, 5*time.Second); !ok {
		t.Fatal("no access line for the VIP flow")
	}
	seen := len(ag.accessLogs())
	roundTrip := func(ns, addr, msg string) string {
		t.Helper()
		c, err := dialTCP(ns, addr, dialTimeout)
		if err != nil {
			t.Fatalf("%s: %v", msg, err)
		}
		defer c.Close()
		if err := echoRoundTrip(c, []byte(msg), echoTimeout); err != nil {
			t.Fatalf("%s: %v", msg, err)
		}
		return c.LocalAddr().String()
	}
	// Inside the CIDR: through the proxy, one access line for the flow.
	src := roundTrip(topo.Pod, ap(v, 80), "vip")
	if _, ok := ag.waitAccess(func(e AccessEntry) bool {
		return e.DownstreamRemote == src && e.UpstreamCluster == cl
	}, 5*time.Second); !ok {
		t.Fatalf("no access line for the VIP flow from %s", src)
	}
	// Outside the CIDR, and inbound: straight through the kernel.
	roundTrip(topo.Pod, ap(topo.SvcV4, 80), "direct")
	roundTrip(topo.Services, ap(topo.PodV4, 8080), "inbound")
	time.Sleep(200 * time.Millisecond) // an access line would be written at flow end
	if got := ag.accessLogs()[seen:]; len(got) != 1 || got[0].DownstreamRemote != src {
		t.Fatalf("access lines after the VIP flow from %s: %+v; want only that flow's (nothing outside the CIDR, nothing inbound)", src, got)
	}
	if err := ag.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code, ok := ag.waitExit(15 * time.Second); !ok || code != 0 {
		t.Fatalf("agent after SIGTERM: exited %v, status %d; want 0", ok, code)
	}
	if after := podState(t, topo.Pod); after != before {
		t.Fatalf("the namespace differs after laptop mode:\n%s", lineDiff(before, after))
	}
}
