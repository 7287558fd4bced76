package cluster

import (
	"context"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// samePortServers starts servers on one port on each of the loopback IPs.
func samePortServers(t *testing.T, ips ...string) []*server {
	t.Helper()
	for try := 0; try < 20; try++ {
		first := startServer(t, ips[0], 0, false)
		out := []*server{first}
		ok := true
		for _, ip := range ips[1:] {
			ln, err := net.Listen("tcp", netip.AddrPortFrom(netip.MustParseAddr(ip), first.addr.Port()).String())
			if err != nil {
				ok = false
				break
			}
			ln.Close()
			out = append(out, startServer(t, ip, first.addr.Port(), false))
		}
		if ok {
			return out
		}
	}
	t.Fatal("no common free port")
	return nil
}

func dnsCluster(name, host string, port uint16, refresh time.Duration) *clusterv3.Cluster {
	pb := xdstest.Cluster(name, xdstest.WithType(clusterv3.Cluster_STRICT_DNS), xdstest.WithEndpoints(xdstest.HostPort(host, uint32(port))))
	pb.DnsRefreshRate = durationpb.New(refresh)
	pb.DnsLookupFamily = clusterv3.Cluster_V4_ONLY
	return pb
}

func waitInit(t *testing.T, c *Cluster) {
	t.Helper()
	select {
	case <-c.Initialized():
	case <-time.After(5 * time.Second):
		t.Fatal("cluster not initialized")
	}
}

func addrsOf(hosts []*Host) []string {
	var out []string
	for _, h := range hosts {
		out = append(out, h.Address().Addr().String())
	}
	slices.Sort(out)
	return out
}

func TestStrictDNSRefresh(t *testing.T) {
	srv := samePortServers(t, "127.0.0.1", "127.0.0.2", "127.0.0.3")
	port := srv[0].addr.Port()
	r := &fakeResolver{}
	r.set("ip4", "svc.test", "127.0.0.1", "127.0.0.2")
	c := newTestCluster(t, dnsCluster("dns", "svc.test", port, 20*time.Millisecond), func(o *Options) { o.Resolver = r })
	waitInit(t, c)
	if got := addrsOf(c.Hosts()); !slices.Equal(got, []string{"127.0.0.1", "127.0.0.2"}) {
		t.Fatalf("hosts %v", got)
	}
	if h := c.Hosts()[0]; h.Hostname() != "svc.test" || h.Address().Port() != port {
		t.Errorf("host %s hostname %q", h.Address(), h.Hostname())
	}
	for i := 0; i < 2; i++ {
		mustConnect(t, c).Close()
	}
	var survivor *Host
	for _, h := range c.Hosts() {
		if h.Address().Addr().String() == "127.0.0.2" {
			survivor = h
		}
	}
	if hostStat(survivor, "cx_total") != 1 {
		t.Fatalf("round robin over the two resolved hosts: cx_total %d", hostStat(survivor, "cx_total"))
	}

	r.set("ip4", "svc.test", "127.0.0.2", "127.0.0.3")
	xdstest.Eventually(t, 5*time.Second, "DNS refresh", func() bool {
		return slices.Equal(addrsOf(c.Hosts()), []string{"127.0.0.2", "127.0.0.3"})
	})
	for _, h := range c.Hosts() {
		if h.Address().Addr().String() == "127.0.0.2" {
			if h != survivor || hostStat(h, "cx_total") != 1 {
				t.Fatalf("surviving host lost its identity or stats: same=%v cx_total=%d", h == survivor, hostStat(h, "cx_total"))
			}
		}
	}
	for i := 0; i < 4; i++ {
		mustConnect(t, c).Close()
	}
	xdstest.Eventually(t, 5*time.Second, "accepts", func() bool { return srv[2].accepts.Load() == 2 })
	if v := stat(t, c, "membership_change"); v < 2 {
		t.Errorf("membership_change = %d", v)
	}

	// A failing lookup keeps the previous addresses.
	r.setFail("svc.test", true)
	fails := stat(t, c, "update_failure")
	xdstest.Eventually(t, 5*time.Second, "failed refresh", func() bool { return stat(t, c, "update_failure") > fails+1 })
	if got := addrsOf(c.Hosts()); !slices.Equal(got, []string{"127.0.0.2", "127.0.0.3"}) {
		t.Fatalf("hosts after DNS failure %v", got)
	}
	if stat(t, c, "update_success") == 0 {
		t.Error("update_success not counted")
	}
}

func TestStrictDNSCloseStopsGoroutine(t *testing.T) {
	before := runtime.NumGoroutine()
	r := &fakeResolver{}
	r.set("ip4", "svc.test", "127.0.0.1")
	c := newTestCluster(t, dnsCluster("dns", "svc.test", 80, 5*time.Millisecond), func(o *Options) { o.Resolver = r })
	waitInit(t, c)
	c.Close()
	c.Close()
	n := r.lookups.Load()
	time.Sleep(30 * time.Millisecond)
	if r.lookups.Load() != n {
		t.Fatal("resolver still called after Close")
	}
	xdstest.Eventually(t, 5*time.Second, "goroutines back to baseline", func() bool { return runtime.NumGoroutine() <= before })
}

func TestDNSLookupFamily(t *testing.T) {
	r := &fakeResolver{}
	r.set("ip4", "both", "127.0.0.1")
	r.set("ip6", "both", "::1")
	r.set("ip", "both", "127.0.0.1", "::1", "127.0.0.1")
	r.set("ip4", "v4only", "127.0.0.1")
	r.set("ip6", "v6only", "::1")
	cases := []struct {
		fam  clusterv3.Cluster_DnsLookupFamily
		name string
		want []string
	}{
		{clusterv3.Cluster_V4_ONLY, "both", []string{"127.0.0.1"}},
		{clusterv3.Cluster_V6_ONLY, "both", []string{"::1"}},
		{clusterv3.Cluster_AUTO, "both", []string{"::1"}},
		{clusterv3.Cluster_AUTO, "v4only", []string{"127.0.0.1"}},
		{clusterv3.Cluster_V4_PREFERRED, "both", []string{"127.0.0.1"}},
		{clusterv3.Cluster_V4_PREFERRED, "v6only", []string{"::1"}},
		{clusterv3.Cluster_ALL, "both", []string{"127.0.0.1", "::1"}},
	}
	for _, tc := range cases {
		got, err := lookup(context.Background(), r, tc.fam, tc.name)
		if err != nil {
			t.Errorf("%s %s: %v", tc.fam, tc.name, err)
			continue
		}
		var s []string
		for _, a := range got {
			s = append(s, a.String())
		}
		if !slices.Equal(s, tc.want) {
			t.Errorf("%s %s = %v, want %v", tc.fam, tc.name, s, tc.want)
		}
	}
	if _, err := lookup(context.Background(), r, clusterv3.Cluster_V6_ONLY, "v4only"); err == nil {
		t.Error("V6_ONLY of a v4-only name succeeded")
	}
}
