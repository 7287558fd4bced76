package httpconn

import (
	"testing"
	"time"

	"github.com/meshtun/meshtun/internal/xdstest"
)

// TestPoolForgetsRemovedHosts: once EDS removes a host, the pool closes
// its idle connections and drops its per-host entry (and, for h1, its
// idle list), on the cluster's next request; the remaining host's
// keep-alive connection stays.
func TestPoolForgetsRemovedHosts(t *testing.T) {
	for _, h2 := range []bool{false, true} {
		a, b := startUpstream(t, named("a")), startUpstream(t, named("b"))
		pb := xdstest.EDSCluster("c")
		if h2 {
			pb = withH2(pb)
		}
		env := newEnv(t, pb)
		cl := env.clusters["c"]
		if err := cl.UpdateEndpoints(xdstest.Assignment("c", a.addr, b.addr)); err != nil {
			t.Fatal(err)
		}
		p := startProxy(t, mustParse(t, hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))), env)
		c := client(false)
		seen := map[string]bool{}
		for i := 0; i < 4; i++ {
			resp, body := get(t, c, p, "x", "/")
			if resp.StatusCode != 200 {
				t.Fatalf("h2=%v: %d", h2, resp.StatusCode)
			}
			seen[body] = true
		}
		if !seen["a"] || !seen["b"] {
			t.Fatalf("h2=%v: requests reached %v, want both hosts", h2, seen)
		}
		xdstest.Eventually(t, 2*time.Second, "two pooled connections", func() bool { return env.pools.Conns("c") == 2 })
		v, _ := env.pools.m.Load("c")
		cp := v.(*clusterPool)
		hostEntries := func() int {
			n := 0
			cp.hosts.Range(func(any, any) bool { n++; return true })
			return n
		}
		if n := hostEntries(); n != 2 {
			t.Fatalf("h2=%v: %d host entries, want 2", h2, n)
		}

		if err := cl.UpdateEndpoints(xdstest.Assignment("c", a.addr)); err != nil {
			t.Fatal(err)
		}
		if resp, body := get(t, c, p, "x", "/"); resp.StatusCode != 200 || body != "a" {
			t.Fatalf("h2=%v: after the update: %d %q", h2, resp.StatusCode, body)
		}
		xdstest.Eventually(t, 2*time.Second, "the removed host's connection closed", func() bool { return env.pools.Conns("c") == 1 })
		if n := hostEntries(); n != 1 {
			t.Errorf("h2=%v: %d host entries after the removal, want 1", h2, n)
		}
		if cp.h1 != nil {
			cp.h1.mu.Lock()
			_, stale := cp.h1.idle[b.addr.String()]
			cp.h1.mu.Unlock()
			if stale {
				t.Errorf("h1 idle list still holds the removed host %s", b.addr)
			}
		}
		before := a.accepts.Load()
		if resp, body := get(t, c, p, "x", "/"); resp.StatusCode != 200 || body != "a" || a.accepts.Load() != before {
			t.Errorf("h2=%v: the remaining host's keep-alive connection was not reused (%d %q, %d new)", h2, resp.StatusCode, body, a.accepts.Load()-before)
		}
		c.CloseIdleConnections()
	}
}
