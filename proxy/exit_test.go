package proxy

import (
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// TestExitBoundedWithBusyUpstream: at exit, an upstream connection still
// busy (its response held by the upstream) does not hold the process past
// the exit deadline, as the connection pools' own grace (a minute) did
// after terminationDrainDuration: it is cut at the deadline, and the
// request riding it ends with the proxy's reset reply.
func TestExitBoundedWithBusyUpstream(t *testing.T) {
	arrived, release := make(chan struct{}), make(chan struct{})
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		close(arrived)
		<-release
		io.WriteString(w, "late")
	}))
	defer up.Close()
	upAddr := netip.MustParseAddrPort(up.Listener.Addr().String())

	listen := freeAddr(t)
	ln := boundListener("http", listen)
	ln["filter_chains"] = []obj{{"filters": []obj{{"name": "envoy.filters.network.http_connection_manager", "typed_config": obj{
		"@type":       "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
		"stat_prefix": "http",
		"route_config": obj{"name": "all", "virtual_hosts": []obj{{"name": "all", "domains": []string{"*"},
			"routes": []obj{{"match": obj{"prefix": "/"}, "route": obj{"cluster": "upstream"}}}}}},
		"http_filters": []obj{{"name": "envoy.filters.http.router", "typed_config": obj{
			"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}},
	}}}}}
	doc := bootstrapDoc("node", listen, "GRPC", ln)
	delete(doc, "dynamic_resources")
	sr := doc["static_resources"].(obj)
	sr["clusters"] = append(sr["clusters"].([]obj), obj{"name": "upstream", "type": "STATIC", "connect_timeout": "1s",
		"load_assignment": obj{"cluster_name": "upstream", "endpoints": []obj{{"lb_endpoints": []obj{{"endpoint": obj{"address": obj{
			"socket_address": obj{"address": upAddr.Addr().String(), "port_value": upAddr.Port()}}}}}}}}})
	p, _ := startProxy(t, doc)

	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	got := make(chan string, 1)
	go func() {
		resp, err := (&http.Client{Transport: tr, Timeout: wait}).Get("http://" + listen + "/")
		if err != nil {
			got <- err.Error()
			return
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		got <- string(b)
	}()
	select {
	case <-arrived:
	case <-time.After(wait):
		t.Fatal("the request did not reach the upstream")
	}

	start := time.Now()
	exitBy := start.Add(200 * time.Millisecond)
	if p.closePools(exitBy) {
		t.Error("closePools reported every pool closed while a request was in flight")
	}
	if late := time.Since(exitBy); late > time.Second {
		t.Errorf("closePools returned %v past the exit deadline", late)
	}

	if body := <-got; !strings.Contains(body, "reset") {
		t.Errorf("the request in flight got %q, want it cut at the exit deadline", body)
	}
	close(release)
	if !p.closePools(time.Time{}) {
		t.Error("closing the pools again did not report them closed")
	}
}
