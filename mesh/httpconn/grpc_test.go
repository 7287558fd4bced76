package httpconn

import (
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshtun/meshtun/internal/xdstest"
)

func TestGRPCTimeoutHeader(t *testing.T) {
	for _, tc := range []struct {
		v   string
		d   time.Duration
		has bool
	}{
		{"100m", 100 * time.Millisecond, true},
		{"10S", 10 * time.Second, true},
		{"2M", 2 * time.Minute, true},
		{"1H", time.Hour, true},
		{"5u", 5 * time.Microsecond, true},
		{"7n", 7, true},
		{"99999999m", 99999999 * time.Millisecond, true},
		{"123456789m", 0, false}, // more than 8 digits
		{"m", 0, false},
		{"10", 0, false},
		{"10x", 0, false},
		{"-1S", 0, false},
	} {
		d, has := grpcTimeout(http.Header{"Grpc-Timeout": {tc.v}})
		if d != tc.d || has != tc.has {
			t.Errorf("grpc-timeout %q: %v %v, want %v %v", tc.v, d, has, tc.d, tc.has)
		}
	}
	for d, want := range map[time.Duration]string{
		250 * time.Millisecond: "250m",
		time.Microsecond:       "1m",
		27 * time.Hour:         "97200000m",
		30 * time.Hour:         "108000S", // 9 digits of milliseconds

	} {
		if got := formatGRPCTimeout(d); got != want {
			t.Errorf("format %v: %q, want %q", d, got, want)
		}
	}
}

// grpcPOST sends a gRPC-shaped request (h2c, application/grpc) with the
// given grpc-timeout ("" for none) and returns the response, its body
// read.
func grpcPOST(t *testing.T, p *proxy, timeout string) (*http.Response, error) {
	t.Helper()
	req, _ := http.NewRequest("POST", "http://"+p.addr+"/pkg.Svc/Call", strings.NewReader("\x00\x00\x00\x00\x00"))
	req.Header.Set("Content-Type", "application/grpc")
	req.Header.Set("Te", "trailers")
	if timeout != "" {
		req.Header.Set("Grpc-Timeout", timeout)
	}
	p.sent.Add(1)
	resp, err := client(true).Do(req)
	if err != nil {
		return nil, err
	}
	_, err = io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, err
}

// holdUpstream answers nothing until its request ends, and reports the
// grpc-timeout each request carried.
func holdUpstream(t *testing.T, seen chan<- string) *upstreamServer {
	return startUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		select {
		case seen <- r.Header.Get("Grpc-Timeout"):
		default:
		}
		<-r.Context().Done()
	})
}

func grpcStatusOf(resp *http.Response) (string, string) {
	st, msg := resp.Header.Get("Grpc-Status"), resp.Header.Get("Grpc-Message")
	if st == "" {
		st, msg = resp.Trailer.Get("Grpc-Status"), resp.Trailer.Get("Grpc-Message")
	}
	return st, msg
}

// TestGRPCTimeoutRoutes: max_grpc_timeout makes the call's grpc-timeout
// the router's timeout (the route's 0 "none" notwithstanding, as Istio
// sets both), capped by a non-zero maximum, and sends the upstream the
// timeout it gets; without it the router ignores grpc-timeout and passes
// it unchanged. The timeout answers as Envoy: trailers-only UNAVAILABLE
// "upstream request timeout", flag UT. Before, the grpc-timeout was not
// read: the first two requests waited for the client to give up.
func TestGRPCTimeoutRoutes(t *testing.T) {
	seen := make(chan string, 1)
	u := holdUpstream(t, seen)
	capped := prefixRoute("/capped", "c")
	routeAction(capped).MaxGrpcTimeout = durationpb.New(150 * time.Millisecond)
	uncapped := prefixRoute("/", "c")
	routeAction(uncapped).MaxGrpcTimeout = durationpb.New(0)
	routeAction(uncapped).Timeout = durationpb.New(0)
	plain := prefixRoute("/plain", "c")
	routeAction(plain).Timeout = durationpb.New(200 * time.Millisecond)
	rc := routeConfig(vhost("v", []string{"*"}, capped, plain, uncapped))
	p := startProxy(t, mustParse(t, hcm(rc)), newEnv(t, withH2(xdstest.StaticCluster("c", u.addr))))

	for _, tc := range []struct {
		path, timeout, upstreamSees string
	}{
		{"/pkg.Svc/Call", "100m", "100m"},
		{"/capped/Call", "10S", "150m"},
		{"/plain/Call", "10S", "10S"}, // the route's 200 ms applies; grpc-timeout passes as sent
	} {
		req, _ := http.NewRequest("POST", "http://"+p.addr+tc.path, strings.NewReader("\x00\x00\x00\x00\x00"))
		req.Header.Set("Content-Type", "application/grpc")
		req.Header.Set("Grpc-Timeout", tc.timeout)
		p.sent.Add(1)
		var resp *http.Response
		within(t, 5*time.Second, tc.path+" ended by its timeout", func() (err error) {
			if resp, err = client(true).Do(req); err == nil {
				io.ReadAll(resp.Body)
				resp.Body.Close()
			}
			return err
		})
		if got := <-seen; got != tc.upstreamSees {
			t.Errorf("%s: upstream saw grpc-timeout %q, want %q", tc.path, got, tc.upstreamSees)
		}
		if st, msg := grpcStatusOf(resp); resp.StatusCode != 200 || st != "14" || msg != "upstream request timeout" {
			t.Errorf("%s: %d grpc-status %q %q, want 200 14 \"upstream request timeout\"", tc.path, resp.StatusCode, st, msg)
		}
		if e := p.lastEntry(t); !e.ResponseFlags.Has(FlagUT) {
			t.Errorf("%s: flags %v, want UT", tc.path, e.ResponseFlags)
		}
	}
}

// TestMaxStreamDuration: a route's max_stream_duration with
// grpc_timeout_header_max (Istio's inbound routes: 0, no cap) bounds a
// gRPC call by its grpc-timeout: DEADLINE_EXCEEDED "downstream duration
// timeout", flag DT, downstream_rq_max_duration_reached; the connection
// manager's max_stream_duration bounds other requests (504, the request
// being complete), and a route's explicit 0 turns it off. A stream whose
// response has begun is reset.
func TestMaxStreamDuration(t *testing.T) {
	u := startUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/started" {
			w.WriteHeader(200)
			http.NewResponseController(w).Flush()
		}
		select {
		case <-r.Context().Done():
		case <-time.After(700 * time.Millisecond):
			io.WriteString(w, "late")
		}
	})
	grpcRoute := prefixRoute("/pkg.Svc", "c")
	routeAction(grpcRoute).MaxStreamDuration = &routev3.RouteAction_MaxStreamDuration{MaxStreamDuration: durationpb.New(0), GrpcTimeoutHeaderMax: durationpb.New(0)}
	off := prefixRoute("/off", "c")
	routeAction(off).MaxStreamDuration = &routev3.RouteAction_MaxStreamDuration{MaxStreamDuration: durationpb.New(0)}
	h := hcm(routeConfig(vhost("v", []string{"*"}, grpcRoute, off, prefixRoute("/", "c"))))
	h.CommonHttpProtocolOptions = &corev3.HttpProtocolOptions{MaxStreamDuration: durationpb.New(150 * time.Millisecond)}
	cfg := mustParse(t, h)
	p := startProxy(t, cfg, newEnv(t, withH2(xdstest.StaticCluster("c", u.addr))))

	var resp *http.Response
	within(t, 5*time.Second, "gRPC call bounded by its grpc-timeout", func() (err error) {
		resp, err = grpcPOST(t, p, "100m")
		return err
	})
	if st, msg := grpcStatusOf(resp); st != "4" || msg != "downstream duration timeout" {
		t.Errorf("gRPC: grpc-status %q %q, want 4 \"downstream duration timeout\"", st, msg)
	}
	if e := p.lastEntry(t); !e.ResponseFlags.Has(FlagDT) || e.ResponseCodeDetails != "max_duration_timeout" {
		t.Errorf("gRPC: flags %v details %q", e.ResponseFlags, e.ResponseCodeDetails)
	}

	c := client(true)
	if r, body := get(t, c, p, "x", "/any"); r.StatusCode != 504 || body != "downstream duration timeout" {
		t.Errorf("HCM max_stream_duration: %d %q, want 504", r.StatusCode, body)
	}
	if r, body := get(t, c, p, "x", "/off"); r.StatusCode != 200 || body != "late" {
		t.Errorf("route max_stream_duration 0: %d %q, want the upstream's late answer", r.StatusCode, body)
	}
	req, _ := http.NewRequest("GET", "http://"+p.addr+"/started", nil)
	p.sent.Add(1)
	r, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadAll(r.Body); err == nil || r.StatusCode != 200 {
		t.Errorf("started response: %d, body error %v, want a reset", r.StatusCode, err)
	}
	r.Body.Close()
	if e := p.lastEntry(t); !e.ResponseFlags.Has(FlagDT) {
		t.Errorf("started response: flags %v, want DT", e.ResponseFlags)
	}
	if n := cfg.Stats().DownstreamRqMaxDurationReached.Load(); n != 3 {
		t.Errorf("downstream_rq_max_duration_reached %d, want 3", n)
	}
}
