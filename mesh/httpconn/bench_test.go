package httpconn

import (
	"bufio"
	"io"
	"net/http"
	"testing"
	"time"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"

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

// BenchmarkH1Downstream: keep-alive GETs on one raw loopback connection
// (no HTTP client library on the client side, so the figures are mostly
// the proxy's downstream serving loop): a direct response, and a request
// proxied to a minimal upstream that answers every head with a fixed
// response. Compare before and after a change to the serving loop.
func BenchmarkH1Downstream(b *testing.B) {
	direct := &routev3.Route{
		Match:  &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
		Action: &routev3.Route_DirectResponse{DirectResponse: &routev3.DirectResponseAction{Status: 204}},
	}
	up := scriptedUpstream(b, func(w io.Writer) {
		io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello")
	})
	for _, tc := range []struct {
		name  string
		route *routev3.Route
	}{{"direct", direct}, {"proxied", prefixRoute("/", "c")}} {
		b.Run(tc.name, func(b *testing.B) {
			env := newEnv(b, xdstest.StaticCluster("c", up))
			p := startProxy(b, mustParse(b, hcm(routeConfig(vhost("v", []string{"*"}, tc.route)))), env)
			c := rawConnTo(b, p.addr)
			req := []byte("GET /x HTTP/1.1\r\nHost: svc\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n")
			br := bufio.NewReaderSize(c, 64<<10)
			// The first response gives the size of every other one (the
			// date and the upstream service time keep their lengths).
			c.Write(req)
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				b.Fatal(err)
			}
			io.Copy(io.Discard, resp.Body)
			c.Write(req)
			if _, err := br.Peek(1); err != nil {
				b.Fatal(err)
			}
			time.Sleep(10 * time.Millisecond)
			size := br.Buffered()
			br.Discard(size)
			buf := make([]byte, size)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				_ = c.SetDeadline(time.Now().Add(10 * time.Second))
				if _, err := c.Write(req); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(br, buf); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
