//go:build linux

package integration

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	adminv3 "github.com/envoyproxy/go-control-plane/envoy/admin/v3"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"google.golang.org/protobuf/encoding/protojson"

	_ "github.com/meshtun/meshtun/mesh/admin" // the config types a dump carries
)

// adminDo sends one request to the pod's admin port and returns the
// status code and body, whatever the status.
func adminDo(t *testing.T, topo *topology, method, path string) (int, string) {
	t.Helper()
	c, err := dialTCP(topo.Pod, "127.0.0.1:15000", dialTimeout)
	if err != nil {
		t.Fatalf("admin: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "%s %s HTTP/1.0\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n", method, path)
	resp, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("admin %s %s: %v", method, path, err)
	}
	head, body, _ := strings.Cut(string(resp), "\r\n\r\n")
	status, _, _ := strings.Cut(strings.TrimPrefix(strings.TrimPrefix(head, "HTTP/1.1 "), "HTTP/1.0 "), " ")
	code, _ := strconv.Atoi(status)
	return code, body
}

// hostCounter reads one per-host counter from /clusters' text lines.
func hostCounter(t *testing.T, topo *topology, cluster string, host netip.AddrPort, name string) int {
	t.Helper()
	prefix := fmt.Sprintf("%s::%s::%s::", cluster, host, name)
	sc := bufio.NewScanner(strings.NewReader(adminGet(t, topo, "/clusters")))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), prefix); ok {
			n, err := strconv.Atoi(v)
			if err != nil {
				t.Fatalf("/clusters line %q: %v", sc.Text(), err)
			}
			return n
		}
	}
	t.Fatalf("/clusters has no line %s<N>", prefix)
	return 0
}

// TestAdminLive reads a running proxy's admin API after real flows: per
// host counters and tcp.<stat_prefix> stats move; the Prometheus output
// parses with Prometheus's own parser and carries the cluster_name tag;
// `meshtun request GET /config_dump` parses with protojson into Envoy's
// admin types; /reset_counters zeroes counters.
func TestAdminLive(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	startTCPServer(t, topo.Services, ap(topo.SvcV4, 80), echo)
	startTCPServer(t, topo.Services, ap(topo.Svc2V4, 80), echo)
	v := vip(topo, false, 61)
	cl := "outbound|80||web.default.svc.cluster.local"
	h1, h2 := netip.AddrPortFrom(topo.SvcV4, 80), netip.AddrPortFrom(topo.Svc2V4, 80)
	bs := writeBootstrap(t, []obj{virtualOutbound("PassthroughCluster"), virtualInbound(), serviceListener(v, 80, cl)},
		append(istioClusters(), staticCluster(cl, "ROUND_ROBIN", h1, h2)))
	startProxy(t, topo, "--bootstrap", bs)

	const flows = 4
	for i := 0; i < flows; i++ {
		c, err := dialTCP(topo.Pod, ap(v, 80), dialTimeout)
		if err != nil {
			t.Fatal(err)
		}
		if err := echoRoundTrip(c, randomPayload(1000), echoTimeout); err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	// Counters settle when the flows' splices end.
	deadline := time.Now().Add(5 * time.Second)
	for hostCounter(t, topo, cl, h1, "cx_total")+hostCounter(t, topo, cl, h2, "cx_total") < flows && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if a, b := hostCounter(t, topo, cl, h1, "cx_total"), hostCounter(t, topo, cl, h2, "cx_total"); a != 2 || b != 2 {
		t.Fatalf("per-host cx_total = %d and %d, want 2 and 2 (round robin over 4 flows)", a, b)
	}
	for time.Now().Before(deadline) && !strings.Contains(adminGet(t, topo, "/stats?filter=^tcp\\."), fmt.Sprintf("tcp.%s.downstream_cx_rx_bytes_total: %d\n", cl, flows*1000)) {
		time.Sleep(50 * time.Millisecond)
	}
	stats := adminGet(t, topo, "/stats?filter=^tcp\\.")
	for _, want := range []string{
		fmt.Sprintf("tcp.%s.downstream_cx_total: %d\n", cl, flows),
		fmt.Sprintf("tcp.%s.downstream_cx_rx_bytes_total: %d\n", cl, flows*1000),
		fmt.Sprintf("tcp.%s.downstream_cx_tx_bytes_total: %d\n", cl, flows*1000),
	} {
		if !strings.Contains(stats, want) {
			t.Errorf("/stats lacks %q:\n%s", want, stats)
		}
	}

	prom, err := nsRun(topo.Pod, meshtunBin(t), "request", "GET", "/stats/prometheus")
	if err != nil {
		t.Fatal(err)
	}
	p := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(prom))
	if err != nil {
		t.Fatalf("/stats/prometheus does not parse: %v", err)
	}
	got := -1.0
	for _, m := range fams["envoy_cluster_upstream_cx_total"].GetMetric() {
		if len(m.GetLabel()) == 1 && m.GetLabel()[0].GetName() == "cluster_name" && m.GetLabel()[0].GetValue() == cl {
			got = m.GetCounter().GetValue()
		}
	}
	if got != flows {
		t.Errorf("envoy_cluster_upstream_cx_total{cluster_name=%q} = %v, want %d", cl, got, flows)
	}

	dump, err := nsRun(topo.Pod, meshtunBin(t), "request", "GET", "/config_dump?include_eds")
	if err != nil {
		t.Fatal(err)
	}
	var cd adminv3.ConfigDump
	if err := protojson.Unmarshal([]byte(dump), &cd); err != nil {
		t.Fatalf("config dump does not parse: %v", err)
	}
	var ld adminv3.ListenersConfigDump
	var cld adminv3.ClustersConfigDump
	for _, c := range cd.GetConfigs() {
		switch {
		case c.MessageIs(&ld):
			c.UnmarshalTo(&ld)
		case c.MessageIs(&cld):
			c.UnmarshalTo(&cld)
		}
	}
	if len(ld.GetStaticListeners()) != 3 || len(cld.GetStaticClusters()) != 4 {
		t.Errorf("config dump: %d static listeners (want 3), %d static clusters (want 4)", len(ld.GetStaticListeners()), len(cld.GetStaticClusters()))
	}

	if out, err := nsRun(topo.Pod, meshtunBin(t), "request", "POST", "/reset_counters"); err != nil || out != "OK\n" {
		t.Fatalf("POST /reset_counters: %q %v", out, err)
	}
	if n := hostCounter(t, topo, cl, h1, "cx_total"); n != 2 {
		// Envoy's /reset_counters resets stats, not /clusters' host lines.
		t.Logf("host cx_total after reset: %d", n)
	}
	if s := adminGet(t, topo, "/stats?filter=^cluster\\.outbound.*upstream_cx_total$"); s != fmt.Sprintf("cluster.%s.upstream_cx_total: 0\n", cl) {
		t.Errorf("after /reset_counters: %q", s)
	}
	if _, err := nsRun(topo.Pod, meshtunBin(t), "request", "GET", "/reset_counters"); err == nil || !strings.Contains(err.Error(), "405") {
		t.Errorf("GET /reset_counters: %v, want a 405 failure", err)
	}
	for _, path := range []string{"/stats?filter=(", "/config_dump?resource=nope", "/clusters?format=xml"} {
		if code, body := adminDo(t, topo, "GET", path); code != 400 || body == "" {
			t.Errorf("GET %s = %d %q, want 400 with a reason", path, code, body)
		}
	}
}

// drainPod is the drain tests' pod: an inbound echo server on PodV4:8080,
// an outbound one on SvcV4:80, a passthrough proxy started with extra
// flags, and one inbound flow open through it.
func drainPod(t *testing.T, extra ...string) (*topology, *proxyProc, *net.TCPConn) {
	t.Helper()
	topo := newTopology(t)
	startTCPServer(t, topo.Pod, ap(topo.PodV4, 8080), echo)
	startTCPServer(t, topo.Services, ap(topo.SvcV4, 80), echo)
	bs := writeBootstrap(t, []obj{virtualOutbound("PassthroughCluster"), virtualInbound()}, istioClusters())
	px := startProxy(t, topo, append([]string{"--bootstrap", bs}, extra...)...)
	open, err := dialTCP(topo.Services, ap(topo.PodV4, 8080), dialTimeout)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { open.Close() })
	if err := pingPong(open, []byte("before")); err != nil {
		t.Fatal(err)
	}
	return topo, px, open
}

// exitsAfterLastFlow closes a draining proxy's last open flow and checks
// that the proxy then exits 0 within 3 s.
func exitsAfterLastFlow(t *testing.T, px *proxyProc, open *net.TCPConn) {
	t.Helper()
	closed := time.Now()
	open.Close()
	select {
	case <-px.done:
	case <-time.After(5 * time.Second):
		t.Fatal("the proxy did not exit once its last flow ended")
	}
	if px.waitErr != nil || time.Since(closed) > 3*time.Second {
		t.Fatalf("exit: %v after %v, want status 0 soon after the last flow", px.waitErr, time.Since(closed))
	}
}

// outboundServes checks that a new outbound flow from the pod echoes (an
// inbound-only drain leaves outbound traffic alone).
func outboundServes(t *testing.T, topo *topology) {
	t.Helper()
	out, err := dialTCP(topo.Pod, ap(topo.SvcV4, 80), dialTimeout)
	if err != nil {
		t.Fatalf("outbound flow after an inbound-only drain: %v", err)
	}
	defer out.Close()
	if err := echoRoundTrip(out, []byte("out"), echoTimeout); err != nil {
		t.Fatal(err)
	}
}

// TestAdminDrainAndQuit: POST /drain_listeners?inboundonly refuses new
// inbound flows while outbound ones and open flows go on; POST
// /quitquitquit makes the proxy exit 0.
func TestAdminDrainAndQuit(t *testing.T) {
	requireRoot(t)
	topo, px, open := drainPod(t)
	if code, body := adminDo(t, topo, "POST", "/drain_listeners?inboundonly"); code != 200 || body != "OK\n" {
		t.Fatalf("drain_listeners = %d %q", code, body)
	}
	start := time.Now()
	c, err := dialTCP(topo.Services, ap(topo.PodV4, 8080), dialTimeout)
	if err == nil {
		c.Close()
		t.Fatal("a new inbound flow was accepted after drain_listeners?inboundonly")
	}
	if !errors.Is(err, syscall.ECONNREFUSED) || time.Since(start) > time.Second {
		t.Fatalf("new inbound flow: %v after %v, want refused at once", err, time.Since(start))
	}
	if err := pingPong(open, []byte("still open")); err != nil {
		t.Fatalf("open inbound flow after drain: %v", err)
	}
	outboundServes(t, topo)

	if code, _ := adminDo(t, topo, "POST", "/quitquitquit"); code != 200 {
		t.Fatalf("quitquitquit = %d", code)
	}
	select {
	case <-px.done:
	case <-time.After(10 * time.Second):
		t.Fatal("the proxy did not exit after /quitquitquit")
	}
	if px.waitErr != nil {
		t.Fatalf("exit after /quitquitquit: %v, want status 0", px.waitErr)
	}
}

// TestProxyReloadOnSIGHUP: the proxy re-reads its bootstrap on SIGHUP. A
// flow opened before keeps its endpoint; new flows follow the new config;
// an invalid file is rejected and the config in force keeps serving.
func TestProxyReloadOnSIGHUP(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	s1 := startTCPServer(t, topo.Services, ap(topo.SvcV4, 80), echo)
	s2 := startTCPServer(t, topo.Services, ap(topo.Svc2V4, 80), echo)
	v := vip(topo, false, 62)
	cl := "outbound|80||web.default.svc.cluster.local"
	listeners := []obj{virtualOutbound("PassthroughCluster"), virtualInbound(), serviceListener(v, 80, cl)}
	bs := writeBootstrap(t, listeners, append(istioClusters(), staticCluster(cl, "ROUND_ROBIN", netip.AddrPortFrom(topo.SvcV4, 80))))
	px := startProxy(t, topo, "--bootstrap", bs)

	old, err := dialTCP(topo.Pod, ap(v, 80), dialTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	if err := pingPong(old, []byte("v1")); err != nil {
		t.Fatal(err)
	}

	replace := func(src string) {
		t.Helper()
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(bs+".tmp", b, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(bs+".tmp", bs); err != nil {
			t.Fatal(err)
		}
		if err := px.cmd.Process.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
	}
	// Invalid: a listener pointing at a missing cluster.
	replace(writeBootstrap(t, []obj{serviceListener(v, 80, "no-such-cluster")}, istioClusters()))
	if !px.waitLine(func(l string) bool {
		return strings.Contains(l, "bootstrap reload rejected") && strings.Contains(l, "no-such-cluster")
	}, 5*time.Second) {
		t.Fatal("an invalid bootstrap on SIGHUP was not reported")
	}
	c, err := dialTCP(topo.Pod, ap(v, 80), dialTimeout)
	if err != nil {
		t.Fatalf("after a rejected reload: %v", err)
	}
	if err := echoRoundTrip(c, []byte("still v1"), echoTimeout); err != nil {
		t.Fatal(err)
	}
	c.Close()
	if n := len(s2.accepted()); n != 0 {
		t.Fatalf("second endpoint got %d flows before the reload", n)
	}

	// Valid: the cluster moves to the second endpoint.
	replace(writeBootstrap(t, listeners, append(istioClusters(), staticCluster(cl, "ROUND_ROBIN", netip.AddrPortFrom(topo.Svc2V4, 80)))))
	if !px.waitLine(func(l string) bool { return logMessage(l) == "bootstrap reloaded" }, 5*time.Second) {
		t.Fatal("no reload after SIGHUP")
	}
	before := len(s1.accepted())
	for i := 0; i < 3; i++ {
		c, err := dialTCP(topo.Pod, ap(v, 80), dialTimeout)
		if err != nil {
			t.Fatal(err)
		}
		if err := echoRoundTrip(c, []byte("v2"), echoTimeout); err != nil {
			t.Fatal(err)
		}
		c.Close()
	}
	if got := len(s2.accepted()); got != 3 || len(s1.accepted()) != before {
		t.Fatalf("after reload: second endpoint %d flows (want 3), first endpoint %d new", got, len(s1.accepted())-before)
	}
	if err := pingPong(old, []byte("flow from before the reload")); err != nil {
		t.Fatalf("flow opened before the reload: %v", err)
	}
}

// TestProxyReloadNewNodeKeepsXDS: a SIGHUP whose bootstrap changes the
// node (as the agent's reload does when the pod's labels change) restarts
// the xDS stream, but the configuration received over xDS keeps serving
// meanwhile: no listener is removed and drained, a flow opened before the
// reload lives on past --drain-duration, the update counters do not go
// back, and the new stream's node is the new one.
func TestProxyReloadNewNodeKeepsXDS(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	cp := startControlPlane(t, topo.Services, ap(topo.GwV4, 15010))
	startTCPServer(t, topo.Services, ap(topo.SvcV4, 9080), echo)
	v := xdsService(t, cp, topo, "1", 63, netip.AddrPortFrom(topo.SvcV4, 9080))
	bs := adsBootstrap(t, topo, "DELTA_GRPC")
	px := startProxy(t, topo, "--bootstrap", bs, "--drain-duration", "1s")
	old := dialUntil(t, topo, ap(v, 9080), 5*time.Second)
	defer old.Close()
	if err := pingPong(old, []byte("before the reload")); err != nil {
		t.Fatal(err)
	}

	b, err := os.ReadFile(bs)
	if err != nil {
		t.Fatal(err)
	}
	var doc obj
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	doc["node"].(map[string]any)["metadata"] = obj{"LABELS": obj{"version": "v2"}}
	next := writeBootstrapObj(t, doc)
	if err := os.Rename(next, bs); err != nil {
		t.Fatal(err)
	}
	if err := px.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if !px.waitLine(func(l string) bool {
		return logMessage(l) == "bootstrap reloaded" && logField(l, "xds_restarted") == true
	}, 5*time.Second) {
		t.Fatal("no reload with a restarted xDS client after SIGHUP")
	}
	// Past the drain duration: a listener dropped and re-added by the
	// reload would have closed the flow by now.
	time.Sleep(1500 * time.Millisecond)
	if err := pingPong(old, []byte("after the reload and the drain duration")); err != nil {
		t.Fatalf("flow opened before the reload: %v", err)
	}
	if _, ok := px.waitAccess(func(e AccessEntry) bool { return strings.Contains(e.Raw, "listener drained") }, 0); ok {
		t.Error("a listener was drained by a reload that only changed the node")
	}
	c, err := dialTCP(topo.Pod, ap(v, 9080), dialTimeout)
	if err != nil {
		t.Fatalf("new flow after the reload: %v", err)
	}
	if err := echoRoundTrip(c, []byte("new"), echoTimeout); err != nil {
		t.Fatal(err)
	}
	c.Close()
	stats := adminGet(t, topo, "/stats?filter=update_success")
	for _, name := range []string{"cluster_manager.cds.update_success", "listener_manager.lds.update_success"} {
		if !regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + `: [2-9]`).MatchString(stats) {
			t.Errorf("%s after a reconnecting reload, want >= 2 (both streams' updates):\n%s", name, stats)
		}
	}
	if md := cp.lastNodeMetadata(); !strings.Contains(md, "v2") {
		t.Errorf("the control plane's last node metadata %q, want the reloaded node's", md)
	}
}

// TestProxySIGTERMDrains: on SIGTERM new inbound flows are refused at
// once, an open flow goes on, and the proxy exits 0 as soon as it ends
// (well before --termination-drain-duration).
func TestProxySIGTERMDrains(t *testing.T) {
	requireRoot(t)
	topo, px, open := drainPod(t, "--termination-drain-duration", "8s")
	if err := px.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if !px.waitLine(func(l string) bool { return logMessage(l) == "SIGTERM: draining" }, 5*time.Second) {
		t.Fatal("no drain after SIGTERM")
	}
	if c, err := dialTCP(topo.Services, ap(topo.PodV4, 8080), dialTimeout); err == nil {
		c.Close()
		t.Fatal("a new inbound flow was accepted while terminating")
	} else if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("new inbound flow while terminating: %v, want refused", err)
	}
	if err := pingPong(open, []byte("during drain")); err != nil {
		t.Fatalf("open flow during the drain: %v", err)
	}
	if px.exited() {
		t.Fatal("the proxy exited with a flow still open")
	}
	exitsAfterLastFlow(t, px, open)
}

// TestAdminUnixSocketIPv6 runs the proxy with its admin API on a Unix
// socket (bootstrap admin.address.pipe) and an IPv6 service listener:
// `meshtun request --bootstrap FILE` finds the socket in the bootstrap and
// `--admin-address unix:PATH` names it; /listeners prints Envoy's lines
// (IPv6 in brackets), /help lists the endpoints, nothing listens on
// 127.0.0.1:15000; after one IPv6 flow the listener's stats are under
// Envoy's scope listener.[<addr with ':'→'_'>]_80 and Prometheus carries
// it as listener_address (Istio's regex), the tcp_proxy's as tcp_prefix.
func TestAdminUnixSocketIPv6(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	startTCPServer(t, topo.Services, ap(topo.SvcV6, 80), echo)
	v6 := vip(topo, true, 62)
	cl := "outbound|80||web6.default.svc.cluster.local"
	sock := t.TempDir() + "/admin.sock"
	svc := serviceListener(v6, 80, cl)
	bs := writeBootstrapObj(t, obj{
		"node":  obj{"id": "sidecar~10.0.0.2~test.default~default.svc.cluster.local", "cluster": "test.default"},
		"admin": obj{"address": obj{"pipe": obj{"path": sock}}},
		"static_resources": obj{
			"listeners": []obj{virtualOutbound("PassthroughCluster"), virtualInbound(), svc},
			"clusters":  append(istioClusters(), staticCluster(cl, "ROUND_ROBIN", netip.AddrPortFrom(topo.SvcV6, 80))),
		},
	})
	startProxy(t, topo, "--bootstrap", bs)

	request := func(args ...string) string {
		t.Helper()
		out, err := nsRun(topo.Pod, append([]string{meshtunBin(t), "request"}, args...)...)
		if err != nil {
			t.Fatalf("meshtun request %v: %v", args, err)
		}
		return out
	}
	wantListeners := fmt.Sprintf("virtualOutbound::0.0.0.0:15001\nvirtualInbound::0.0.0.0:15006\n%s::%s\n", svc["name"], netip.AddrPortFrom(v6, 80))
	if got := request("--bootstrap", bs, "GET", "/listeners"); got != wantListeners {
		t.Errorf("request --bootstrap GET /listeners = %q, want %q", got, wantListeners)
	}
	if got := request("--admin-address", "unix:"+sock, "GET", "/listeners"); got != wantListeners {
		t.Errorf("request --admin-address unix: GET /listeners = %q, want %q", got, wantListeners)
	}
	if help := request("--bootstrap", bs, "GET", "/help"); !strings.HasPrefix(help, "admin commands are:\n") ||
		!strings.Contains(help, "\n  /listeners: ") || !strings.Contains(help, "\n  /stats/prometheus: ") {
		t.Errorf("/help = %q", help)
	}
	if c, err := dialTCP(topo.Pod, "127.0.0.1:15000", time.Second); err == nil {
		c.Close()
		t.Error("the admin also listens on 127.0.0.1:15000 with a pipe admin address")
	}

	c, err := dialTCP(topo.Pod, ap(v6, 80), dialTimeout)
	if err != nil {
		t.Fatal(err)
	}
	if err := echoRoundTrip(c, randomPayload(100), echoTimeout); err != nil {
		t.Fatal(err)
	}
	c.Close()
	scope := strings.ReplaceAll(netip.AddrPortFrom(v6, 80).String(), ":", "_") // "[fd00_…]_80"
	want := fmt.Sprintf("listener.%s.downstream_cx_total: 1\n", scope)
	filter := "/stats?filter=" + regexp.QuoteMeta("listener."+scope+".downstream_cx_total")
	var got string
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if got = request("--admin-address", "unix:"+sock, "GET", filter); got == want {
			break
		}
	}
	if got != want {
		t.Fatalf("/stats %s = %q, want %q", filter, got, want)
	}
	prom := request("--bootstrap", bs, "GET", "/stats/prometheus")
	p := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(prom))
	if err != nil {
		t.Fatalf("/stats/prometheus does not parse: %v", err)
	}
	found := false
	for _, m := range fams["envoy_listener_downstream_cx_total"].GetMetric() {
		if len(m.GetLabel()) == 1 && m.GetLabel()[0].GetName() == "listener_address" && m.GetLabel()[0].GetValue() == scope {
			found = m.GetCounter().GetValue() == 1
		}
	}
	if !found {
		t.Errorf("no envoy_listener_downstream_cx_total{listener_address=%q} 1 in:\n%s", scope, prom)
	}
	if !strings.Contains(prom, fmt.Sprintf("\nenvoy_tcp_downstream_cx_total{tcp_prefix=%q} 1\n", cl)) {
		t.Errorf("no envoy_tcp_downstream_cx_total{tcp_prefix=%q} 1", cl)
	}
}

// TestAdminConfigDumpWarmingLive: on a live proxy, a listener whose RDS
// route configuration has not arrived is dumped with a warming_state and no
// active_state, and /ready says INITIALIZING; once the route arrives it is
// active and nothing warms.
func TestAdminConfigDumpWarmingLive(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	cp := startControlPlane(t, topo.Services, ap(topo.GwV4, 15010))
	listeners := []obj{virtualOutbound("PassthroughCluster"), virtualInbound(), istioHTTPListener(80)}
	cp.pushHTTP(t, "1", listeners, istioClusters(), nil, nil) // route "80" missing
	startProxy(t, topo, "--bootstrap", adsBootstrap(t, topo, "DELTA_GRPC"))

	state := func() (*adminv3.ListenersConfigDump_DynamicListener, bool) {
		cd := &adminv3.ConfigDump{}
		if err := protojson.Unmarshal([]byte(adminGet(t, topo, "/config_dump?resource=dynamic_listeners&name_regex=^0\\.0\\.0\\.0_80$")), cd); err != nil {
			t.Fatal(err)
		}
		for _, c := range cd.GetConfigs() {
			dl := &adminv3.ListenersConfigDump_DynamicListener{}
			if c.UnmarshalTo(dl) == nil && dl.GetName() == "0.0.0.0_80" {
				return dl, true
			}
		}
		return nil, false
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		dl, ok := state()
		if ok && dl.GetWarmingState() != nil {
			if dl.GetActiveState() != nil || dl.GetWarmingState().GetVersionInfo() != "1" {
				t.Fatalf("warming 0.0.0.0_80: %v, want only a warming state of version 1", dl)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("0.0.0.0_80 never dumped as warming: %v", dl)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// meshtun request exits non-zero on the 503, naming the status and body.
	if _, err := nsRun(topo.Pod, meshtunBin(t), "request", "--admin-address", "127.0.0.1:15000", "GET", "/ready"); err == nil ||
		!strings.Contains(err.Error(), "status code 503") || !strings.Contains(err.Error(), "INITIALIZING") {
		t.Errorf("/ready while the first listeners warm: %v, want 503 INITIALIZING", err)
	}

	route := obj{"name": "80", "virtual_hosts": []obj{{"name": "allow_any", "domains": []string{"*"},
		"routes": []obj{routeTo("/", obj{"cluster": "PassthroughCluster"})}}}}
	cp.pushHTTP(t, "2", listeners, istioClusters(), nil, []obj{route})
	deadline = time.Now().Add(5 * time.Second)
	for {
		dl, ok := state()
		if ok && dl.GetActiveState() != nil && dl.GetWarmingState() == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("0.0.0.0_80 not active once its route arrived: %v", dl)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if out, _ := nsRun(topo.Pod, meshtunBin(t), "request", "--admin-address", "127.0.0.1:15000", "GET", "/ready"); strings.TrimSpace(out) != "LIVE" {
		t.Errorf("/ready once the listeners are in force: %q, want LIVE", out)
	}
}

// TestAdminGracefulDrain: POST /drain_listeners?inboundonly&graceful (what
// pilot-agent sends on SIGTERM) keeps inbound listeners accepting for the
// drain duration, then refuses new inbound flows; open flows go on and
// outbound flows are never refused.
func TestAdminGracefulDrain(t *testing.T) {
	requireRoot(t)
	topo, _, open := drainPod(t, "--drain-duration", "1500ms")
	if code, body := adminDo(t, topo, "POST", "/drain_listeners?inboundonly&graceful"); code != 200 || body != "OK\n" {
		t.Fatalf("drain_listeners?graceful = %d %q", code, body)
	}
	start := time.Now()
	// Within the drain duration, inbound flows are still taken.
	c, err := dialTCP(topo.Services, ap(topo.PodV4, 8080), dialTimeout)
	if err != nil {
		t.Fatalf("inbound flow %v into a graceful drain: %v, want accepted", time.Since(start), err)
	}
	if err := echoRoundTrip(c, []byte("during"), echoTimeout); err != nil {
		t.Fatal(err)
	}
	c.Close()
	for {
		c, err := dialTCP(topo.Services, ap(topo.PodV4, 8080), 250*time.Millisecond)
		took := time.Since(start)
		if err != nil {
			if !errors.Is(err, syscall.ECONNREFUSED) {
				t.Fatalf("inbound flow %v after a graceful drain: %v, want refused", took, err)
			}
			if took < 1200*time.Millisecond {
				t.Fatalf("inbound flows refused %v into a 1.5s graceful drain", took)
			}
			break
		}
		c.Close()
		if took > 4*time.Second {
			t.Fatalf("inbound flows still accepted %v after a 1.5s graceful drain", took)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := pingPong(open, []byte("still open")); err != nil {
		t.Fatalf("open inbound flow after the drain: %v", err)
	}
	outboundServes(t, topo)
}

// TestAdminLoggingLive: POST /logging changes levels of the running proxy:
// ?access=warning silences the access log of new flows, another logger's
// change does not turn it back on, ?access=info restores it.
func TestAdminLoggingLive(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	startTCPServer(t, topo.Services, ap(topo.SvcV4, 80), echo)
	bs := writeBootstrap(t, []obj{virtualOutbound("PassthroughCluster"), virtualInbound()}, istioClusters())
	px := startProxy(t, topo, "--bootstrap", bs)

	flow := func() string {
		t.Helper()
		c, err := dialTCP(topo.Pod, ap(topo.SvcV4, 80), dialTimeout)
		if err != nil {
			t.Fatal(err)
		}
		if err := echoRoundTrip(c, []byte("log me?"), echoTimeout); err != nil {
			t.Fatal(err)
		}
		local := c.LocalAddr().String()
		c.Close()
		return local
	}
	logged := func(src string, d time.Duration) bool {
		_, ok := px.waitAccess(func(e AccessEntry) bool { return e.DownstreamRemote == src }, d)
		return ok
	}
	if !logged(flow(), accessWait) {
		t.Fatal("no access line at --log-level debug")
	}
	for _, q := range []string{"/logging?access=warning", "/logging?upstream=trace"} {
		if code, body := adminDo(t, topo, "POST", q); code != 200 || !strings.Contains(body, "access: warning") {
			t.Fatalf("POST %s = %d %q", q, code, body)
		}
	}
	if src := flow(); logged(src, 500*time.Millisecond) {
		t.Fatal("an access line was written with the access logger at warning")
	}
	if code, body := adminDo(t, topo, "POST", "/logging?access=info"); code != 200 || !strings.Contains(body, "access: info") {
		t.Fatalf("POST /logging?access=info = %d %q", code, body)
	}
	if !logged(flow(), accessWait) {
		t.Fatal("no access line after /logging?access=info")
	}
	if code, body := adminDo(t, topo, "POST", "/logging?acces=info"); code != 400 || !strings.Contains(body, `unknown logger "acces"`) {
		t.Errorf("POST /logging?acces=info = %d %q, want 400 naming the logger", code, body)
	}
}
