package cluster

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"

	"github.com/meshtun/meshtun/internal/xdstest"
)

func TestEDSUpdate(t *testing.T) {
	a := startServer(t, "127.0.0.1", 0, false)
	b := startServer(t, "127.0.0.1", 0, false)
	c := newTestCluster(t, xdstest.EDSCluster("eds", xdstest.WithEndpoints(xdstest.Endpoint{Addr: a.addr})))
	select {
	case <-c.Initialized():
		t.Fatal("EDS cluster initialized before its first update")
	default:
	}
	if u := mustConnect(t, c); u.Host().Address() != a.addr {
		t.Fatalf("inline endpoint not used before EDS: %s", u.Host().Address())
	} else {
		u.Close()
	}
	hostA := c.Hosts()[0]

	if err := c.UpdateEndpoints(xdstest.AssignmentOf("eds", xdstest.Endpoint{Addr: a.addr, Weight: 2}, xdstest.Endpoint{Addr: b.addr, Zone: "z1"})); err != nil {
		t.Fatal(err)
	}
	<-c.Initialized()
	hosts := c.Hosts()
	if len(hosts) != 2 || hosts[0] != hostA || hostA.Weight() != 2 || hostStat(hostA, "cx_total") != 1 || hosts[1].Zone() != "z1" {
		t.Fatalf("after update: %d hosts, same A %v, weight %d", len(hosts), hosts[0] == hostA, hostA.Weight())
	}

	// The same assignment again changes nothing (update_no_rebuild).
	snap := c.hosts.Load()
	if err := c.UpdateEndpoints(xdstest.AssignmentOf("eds", xdstest.Endpoint{Addr: a.addr, Weight: 2}, xdstest.Endpoint{Addr: b.addr, Zone: "z1"})); err != nil {
		t.Fatal(err)
	}
	if c.hosts.Load() != snap || stat(t, c, "update_no_rebuild") != 1 {
		t.Fatal("identical update rebuilt the host set")
	}

	// A bad assignment is rejected whole; the previous hosts stay.
	err := c.UpdateEndpoints(xdstest.AssignmentOf("eds", xdstest.Endpoint{Addr: b.addr}, xdstest.HostPort("svc.example", 80)))
	if err == nil || !strings.Contains(err.Error(), `cluster_load_assignment.endpoints[0].lb_endpoints[1].endpoint.address.socket_address.address: "svc.example" is not an IP address`) {
		t.Fatalf("bad update: %v", err)
	}
	if len(c.Hosts()) != 2 {
		t.Fatal("rejected update changed the hosts")
	}
	if err := c.UpdateEndpoints(xdstest.AssignmentOf("eds")); err != nil {
		t.Fatal(err)
	}
	_, err = c.Connect(context.Background(), netip.AddrPort{}, nil)
	if !errors.Is(err, ErrNoHealthyUpstream) || err.Error() != `cluster "eds": `+ErrNoHealthyUpstream.Error() {
		t.Fatalf("empty EDS: %v, want the cluster named and %v wrapped", err, ErrNoHealthyUpstream)
	}
	if allocs := testing.AllocsPerRun(10, func() { _, _ = c.Connect(context.Background(), netip.AddrPort{}, nil) }); allocs != 0 {
		t.Errorf("a refusal for no healthy host allocates %v times", allocs)
	}
	for name, want := range map[string]uint64{"update_success": 3, "update_rejected": 1, "update_empty": 1, "update_attempt": 4, "membership_total": 0} {
		if v := stat(t, c, name); v != want {
			t.Errorf("%s = %d, want %d", name, v, want)
		}
	}
	static := newTestCluster(t, xdstest.Cluster("s"))
	if err := static.UpdateEndpoints(xdstest.AssignmentOf("s")); err == nil {
		t.Error("UpdateEndpoints accepted on a STATIC cluster")
	}
}

// TestEDSConcurrentUpdates swaps host sets while connections are opened
// and closed; run with -race.
func TestEDSConcurrentUpdates(t *testing.T) {
	srv := []*server{
		startServer(t, "127.0.0.1", 0, false),
		startServer(t, "127.0.0.1", 0, false),
		startServer(t, "127.0.0.1", 0, false),
		startServer(t, "127.0.0.1", 0, false),
	}
	c := newTestCluster(t, xdstest.EDSCluster("eds"))
	sets := [][]xdstest.Endpoint{
		{{Addr: srv[0].addr}, {Addr: srv[1].addr}},
		{{Addr: srv[1].addr, Weight: 3}, {Addr: srv[2].addr}},
		{{Addr: srv[2].addr, Health: corev3.HealthStatus_UNHEALTHY}, {Addr: srv[3].addr, Priority: 1}},
		{},
	}
	if err := c.UpdateEndpoints(xdstest.AssignmentOf("eds", sets[0]...)); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var ok, noHealthy atomic.Int64
	errs := make(chan error, 8)
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				u, err := c.Connect(context.Background(), netip.AddrPort{}, nil)
				switch {
				case err == nil:
					ok.Add(1)
					u.Write([]byte("x"))
					u.Close()
				case errors.Is(err, ErrNoHealthyUpstream):
					noHealthy.Add(1)
					time.Sleep(50 * time.Microsecond)
				default:
					errs <- err
					return
				}
			}
		}()
	}
	deadline := time.Now().Add(300 * time.Millisecond)
	for i := 0; time.Now().Before(deadline); i++ {
		if err := c.UpdateEndpoints(xdstest.AssignmentOf("eds", sets[i%len(sets)]...)); err != nil {
			t.Fatal(err)
		}
		_ = c.Hosts()
		_ = c.Stats()
		time.Sleep(time.Millisecond)
	}
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("connect: %v", err)
	}
	if ok.Load() == 0 {
		t.Fatal("no connection succeeded")
	}
	if v := stat(t, c, "upstream_cx_active"); v != 0 {
		t.Errorf("upstream_cx_active = %d", v)
	}
	if tot, des := stat(t, c, "upstream_cx_total"), stat(t, c, "upstream_cx_destroy"); tot != des || tot != uint64(ok.Load()) {
		t.Errorf("upstream_cx_total %d, destroy %d, successful connects %d", tot, des, ok.Load())
	}
	if v := stat(t, c, "upstream_cx_none_healthy"); v != uint64(noHealthy.Load()) {
		t.Errorf("upstream_cx_none_healthy %d, observed %d", v, noHealthy.Load())
	}
	t.Logf("%d connects, %d with no healthy host", ok.Load(), noHealthy.Load())
}
