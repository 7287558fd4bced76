package httpconn

import (
	"io"
	"net/http"
	"testing"

	"github.com/meshtun/meshtun/internal/xdstest"
)

func benchRequests(b *testing.B, c *http.Client, url string) {
	b.Helper()
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		resp, err := c.Get(url)
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			b.Fatalf("status %d", resp.StatusCode)
		}
	}
}

// BenchmarkProxyRequest: one keep-alive GET through the proxy over
// loopback (client → Serve → pooled upstream connection → server); compare
// with BenchmarkDirectRequest. Allocations count the client, the proxy and
// the upstream server, all in this process.
func BenchmarkProxyRequest(b *testing.B) {
	for _, tc := range []struct {
		name     string
		down, up bool // h2c downstream, h2c upstream
	}{{"h1-h1", false, false}, {"h2-h2", true, true}} {
		b.Run(tc.name, func(b *testing.B) {
			u := startUpstream(b, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hello") })
			pb := xdstest.StaticCluster("c", u.addr)
			if tc.up {
				pb = withH2(pb)
			}
			env := newEnv(b, pb)
			p := startProxy(b, mustParse(b, hcm(routeConfig(vhost("v", []string{"*"}, prefixRoute("/", "c"))))), env)
			benchRequests(b, client(tc.down), "http://"+p.addr+"/")
		})
	}
}

// BenchmarkDirectRequest: the same GET straight to the upstream server.
func BenchmarkDirectRequest(b *testing.B) {
	for _, tc := range []struct {
		name string
		h2   bool
	}{{"h1", false}, {"h2", true}} {
		b.Run(tc.name, func(b *testing.B) {
			u := startUpstream(b, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hello") })
			benchRequests(b, client(tc.h2), "http://"+u.addr.String()+"/")
		})
	}
}
