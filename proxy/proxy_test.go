package proxy

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/rs/zerolog"

	"github.com/meshtun/meshtun/internal/leakcheck"
	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/xdsclient"
)

func TestMain(m *testing.M) { leakcheck.VerifyTestMain(m) }

const wait = 10 * time.Second

type obj = map[string]any

// bootstrapDoc is an istio-agent-shaped bootstrap: node, ADS over the
// xds-grpc static cluster at addr (api "GRPC" or "DELTA_GRPC"), the admin on
// a free loopback port, and extra static listeners.
func bootstrapDoc(node, addr, api string, listeners ...obj) obj {
	ap := netip.MustParseAddrPort(addr)
	doc := obj{
		"node":  obj{"id": node, "cluster": "app.default"},
		"admin": obj{"address": obj{"socket_address": obj{"address": "127.0.0.1", "port_value": 0}}},
		"dynamic_resources": obj{
			"ads_config": obj{"api_type": api, "transport_api_version": "V3", "grpc_services": []obj{{"envoy_grpc": obj{"cluster_name": "xds-grpc"}}}},
			"cds_config": obj{"ads": obj{}, "resource_api_version": "V3"},
			"lds_config": obj{"ads": obj{}, "resource_api_version": "V3"},
		},
		"static_resources": obj{
			"clusters": []obj{{"name": "xds-grpc", "type": "STATIC", "connect_timeout": "1s", "load_assignment": obj{
				"cluster_name": "xds-grpc", "endpoints": []obj{{"lb_endpoints": []obj{{"endpoint": obj{"address": obj{
					"socket_address": obj{"address": ap.Addr().String(), "port_value": ap.Port()}}}}}}}}}},
		},
	}
	if len(listeners) > 0 {
		doc["static_resources"].(obj)["listeners"] = listeners
	}
	return doc
}

// boundListener is a static listener bound to a real socket at addr.
func boundListener(name, addr string) obj {
	ap := netip.MustParseAddrPort(addr)
	return obj{"name": name, "address": obj{"socket_address": obj{"address": ap.Addr().String(), "port_value": ap.Port()}},
		"filter_chains": []obj{{"filters": []obj{{"name": "envoy.filters.network.tcp_proxy", "typed_config": obj{
			"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "stat_prefix": "blackhole", "cluster": "xds-grpc"}}}}}}
}

// writeFile writes doc (a bootstrap as JSON, or any bytes) to path,
// atomically as the agent does.
func writeFile(t *testing.T, path string, doc any) {
	t.Helper()
	b, ok := doc.([]byte)
	if !ok {
		var err error
		if b, err = json.Marshal(doc); err != nil {
			t.Fatal(err)
		}
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// startProxy is the proxy's configuration side as Run starts it (the
// bootstrap applied, the xDS client running, the admin API served), without
// the TUN device and capture, which need root. It stops when the test ends.
func startProxy(t *testing.T, doc obj) (*Proxy, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "bootstrap.json")
	writeFile(t, path, doc)
	p, err := New(Config{
		Bootstrap: path, OutboundPort: 15001, InboundPort: 15006, Capture: CaptureNone, TUNFD: -1,
		ConnectTimeout: time.Second, DrainDuration: time.Second, TerminationDrainDuration: time.Second,
		Version: "test", Log: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.startConfig(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.stopConfig(time.Time{})
		p.closePools(time.Time{})
	})
	return p, path
}

// service is what the control plane serves for one istiod-shaped service
// number i: an EDS cluster, its assignment (three endpoints) and a VIP
// listener (bind_to_port false) whose tcp_proxy goes to the cluster.
func service(t testing.TB, i int, res map[string][]types.Resource) {
	name := fmt.Sprintf("outbound|8080||svc%d.default.svc.cluster.local", i)
	vip := fmt.Sprintf("10.96.%d.%d", i/250, i%250+1)
	var eps []netip.AddrPort
	for e := 0; e < 3; e++ {
		eps = append(eps, netip.MustParseAddrPort(fmt.Sprintf("10.%d.%d.%d:8080", 100+e, i/250, i%250+1)))
	}
	res[resource.ClusterType] = append(res[resource.ClusterType], xdstest.EDSCluster(name))
	res[resource.EndpointType] = append(res[resource.EndpointType], xdstest.Assignment(name, eps...))
	res[resource.ListenerType] = append(res[resource.ListenerType], xdstest.TCPListener(t, vip+"_8080", vip, 8080, name, false))
}

// services is n services, numbered from 0.
func services(t testing.TB, n int) map[string][]types.Resource {
	res := map[string][]types.Resource{}
	for i := range n {
		service(t, i, res)
	}
	return res
}

// admin GETs path from the proxy's admin API.
type adminClient struct {
	base string
	c    *http.Client
}

func newAdminClient(t *testing.T, p *Proxy) *adminClient {
	tr := &http.Transport{}
	t.Cleanup(tr.CloseIdleConnections)
	return &adminClient{base: "http://" + p.adminAddr.String(), c: &http.Client{Transport: tr, Timeout: wait}}
}

func (a *adminClient) get(t *testing.T, path string) (int, string) {
	t.Helper()
	resp, err := a.c.Get(a.base + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	return resp.StatusCode, string(b)
}

// stat reads one counter from /stats.
func (a *adminClient) stat(t *testing.T, name string) uint64 {
	t.Helper()
	_, body := a.get(t, "/stats?filter="+name)
	for _, line := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(line, name+": "); ok {
			n, err := strconv.ParseUint(v, 10, 64)
			if err != nil {
				t.Fatalf("stat %s: %q", name, line)
			}
			return n
		}
	}
	t.Fatalf("/stats has no %s:\n%s", name, body)
	return 0
}

// listeners is the set of listener names /listeners shows.
func (a *adminClient) listeners(t *testing.T) map[string]bool {
	t.Helper()
	_, body := a.get(t, "/listeners")
	out := map[string]bool{}
	for _, line := range strings.Split(strings.TrimSpace(body), "\n") {
		if name, _, ok := strings.Cut(line, "::"); ok {
			out[name] = true
		}
	}
	return out
}

// monotonic samples the proxy's update counters until stopped and
// reports any that went down.
func monotonic(t *testing.T, p *Proxy) (stop func()) {
	names := []string{xdsclient.StatCDSUpdateSuccess, xdsclient.StatLDSUpdateSuccess, xdsclient.StatUpdateAttempt,
		statReloadSuccess, statReloadRejected}
	quit, done := make(chan struct{}), make(chan struct{})
	var mu sync.Mutex
	var back []string
	go func() {
		defer close(done)
		prev := p.Stats()
		for {
			select {
			case <-quit:
				return
			case <-time.After(time.Millisecond):
			}
			cur := p.Stats()
			for _, n := range names {
				if cur[n] < prev[n] {
					mu.Lock()
					back = append(back, fmt.Sprintf("%s %d -> %d", n, prev[n], cur[n]))
					mu.Unlock()
				}
			}
			prev = cur
		}
	}()
	return func() {
		close(quit)
		<-done
		mu.Lock()
		defer mu.Unlock()
		if len(back) > 0 {
			t.Errorf("counters went back: %v", back)
		}
	}
}

// freeAddr is a loopback address nothing listens on (a port just freed).
func freeAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}
