//go:build linux && scale

package integration

import (
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
)

// TestXDSScale measures a 10,000-service push end to end: time from the
// push to the proxy's LDS ACK, and the proxy's RSS. It is a measurement,
// not a pass/fail test of speed: run it with MESHTUN_SCALE=10000 (make
// bench does); it only checks that the configuration is served. The time
// is split at the ACKs the control plane sees: CDS (the clusters and
// their endpoints in force), then LDS. MESHTUN_ARGS adds `meshtun proxy`
// flags (word-split), e.g. "--cpu-profile /tmp/scale.prof".
func TestXDSScale(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("MESHTUN_SCALE"))
	if n <= 0 {
		n = 10000
	}
	requireRoot(t)
	topo := newTopology(t)
	cp := startControlPlane(t, topo.Services, ap(topo.GwV4, 15010))
	for _, ip := range []netip.Addr{topo.SvcV4, topo.Svc2V4, topo.GwV4} {
		startTCPServer(t, topo.Services, ap(ip, 8080), echo)
	}
	listeners := []obj{virtualOutbound("PassthroughCluster"), virtualInbound()}
	clusters := istioClusters()
	eps := map[string][]netip.AddrPort{}
	for i := 0; i < n; i++ {
		v := netip.AddrFrom4([4]byte{10, 96, byte(i / 250), byte(i%250 + 1)})
		cl := fmt.Sprintf("outbound|8080||svc%d.default.svc.cluster.local", i)
		listeners = append(listeners, serviceListener(v, 8080, cl))
		clusters = append(clusters, edsCluster(cl))
		eps[cl] = []netip.AddrPort{netip.AddrPortFrom(topo.SvcV4, 8080), netip.AddrPortFrom(topo.Svc2V4, 8080), netip.AddrPortFrom(topo.GwV4, 8080)}
	}
	cp.push(t, "0", []obj{virtualOutbound("PassthroughCluster"), virtualInbound()}, istioClusters(), nil)
	bs := adsBootstrap(t, topo, "DELTA_GRPC")
	px := startProxy(t, topo, append([]string{"--bootstrap", bs, "--log-level", "warn", "--termination-drain-duration", "0s"}, strings.Fields(os.Getenv("MESHTUN_ARGS"))...)...)
	deadline := time.Now().Add(20 * time.Second)
	for cp.ackCount(resource.ListenerType) == 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	rss := func(key string) string {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", px.cmd.Process.Pid))
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, key+":") {
				return strings.TrimSpace(strings.TrimPrefix(l, key+":"))
			}
		}
		return "?"
	}
	t.Logf("before: VmRSS %s", rss("VmRSS"))
	// CPU time of the proxy (utime+stime, clock ticks of 10 ms): what the
	// update costs, which a loaded machine's wall clock hides.
	cpu := func() time.Duration {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", px.cmd.Process.Pid))
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
		if len(f) < 13 {
			return 0
		}
		u, _ := strconv.ParseInt(f[11], 10, 64)
		s, _ := strconv.ParseInt(f[12], 10, 64)
		return time.Duration(u+s) * 10 * time.Millisecond
	}
	acks, cdsACKs := cp.ackCount(resource.ListenerType), cp.ackCount(resource.ClusterType)
	cpu0 := cpu()
	start := time.Now()
	cp.push(t, "1", listeners, clusters, eps)
	built := time.Since(start)
	set := time.Now()
	var clustersIn time.Duration
	for cp.ackCount(resource.ListenerType) == acks {
		if time.Since(start) > 2*time.Minute {
			t.Fatal("no LDS ACK within 2 minutes")
		}
		if clustersIn == 0 && cp.ackCount(resource.ClusterType) != cdsACKs {
			clustersIn = time.Since(set)
		}
		time.Sleep(2 * time.Millisecond)
	}
	applied := time.Since(set)
	if clustersIn == 0 {
		clustersIn = applied
	}
	cpuApply := cpu() - cpu0
	atACK := rss("VmRSS")
	// And once the runtime has had time to hand back what it will by
	// itself: what the proxy keeps, as opposed to its peak.
	time.Sleep(2 * time.Second)
	t.Logf("%d services: control plane built its snapshot in %v; the proxy received, applied and ACKed it %v later (CDS ACK at %v, LDS %v after it), using %v of CPU; VmRSS %s at the ACK, %s 2 s later, VmHWM %s",
		n, built.Round(time.Millisecond), applied.Round(time.Millisecond), clustersIn.Round(time.Millisecond),
		(applied - clustersIn).Round(time.Millisecond), cpuApply, atACK, rss("VmRSS"), rss("VmHWM"))
	if _, err := tcpEcho(topo.Pod, ap(netip.AddrFrom4([4]byte{10, 96, byte((n - 1) / 250), byte((n-1)%250 + 1)}), 8080), 64); err != nil {
		t.Fatalf("the last service does not serve: %v", err)
	}
	// A clean exit, so that a --cpu-profile in MESHTUN_ARGS is written.
	if err := px.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-px.done:
	case <-time.After(20 * time.Second):
		t.Fatal("the proxy did not exit within 20 s of SIGTERM")
	}
}
