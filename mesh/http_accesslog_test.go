package mesh

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	filev3 "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/file/v3"
	streamv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/stream/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"github.com/rs/zerolog"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshtun/meshtun/mesh/accesslog"
	"github.com/meshtun/meshtun/netstack"
)

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) { s.mu.Lock(); defer s.mu.Unlock(); return s.b.Write(p) }
func (s *syncBuf) String() string              { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

func anyOf(t testing.TB, m proto.Message) *anypb.Any {
	t.Helper()
	a, err := anypb.New(m)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// TestHTTPAccessLogFollowsHCM: a request is logged only when its
// http_connection_manager has an access_log (Envoy's file logger on
// /dev/stdout as Istio's accessLogFile, or a stream logger); without one
// only the connection's own entry is written, as for a tcp_proxy flow.
func TestHTTPAccessLogFollowsHCM(t *testing.T) {
	for _, tc := range []struct {
		name string
		als  []*accesslogv3.AccessLog
		want bool
	}{
		{"none", nil, false},
		{"file /dev/stdout", []*accesslogv3.AccessLog{{Name: "envoy.access_loggers.file",
			ConfigType: &accesslogv3.AccessLog_TypedConfig{TypedConfig: anyOf(t, &filev3.FileAccessLog{Path: "/dev/stdout"})}}}, true},
		{"stdout stream", []*accesslogv3.AccessLog{{Name: "envoy.access_loggers.stream",
			ConfigType: &accesslogv3.AccessLog_TypedConfig{TypedConfig: anyOf(t, &streamv3.StdoutAccessLog{})}}}, true},
		{"unsupported logger only", []*accesslogv3.AccessLog{{Name: "envoy.access_loggers.http_grpc"}}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rc := &routev3.RouteConfiguration{Name: "inline", VirtualHosts: []*routev3.VirtualHost{{Name: "all", Domains: []string{"*"},
				Routes: []*routev3.Route{{Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
					Action: &routev3.Route_DirectResponse{DirectResponse: &routev3.DirectResponseAction{Status: 204}}}}}}}
			a := anyOf(t, &hcmv3.HttpConnectionManager{
				StatPrefix:     "p",
				RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: rc},
				HttpFilters: []*hcmv3.HttpFilter{{Name: "envoy.filters.http.router",
					ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: anyOf(t, &routerv3.Router{})}}},
				AccessLog: tc.als,
			})
			chain := &listenerv3.FilterChain{Filters: []*listenerv3.Filter{{Name: HCMFilter, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: a}}}}
			f := false
			snap, err := Build("1", []*listenerv3.Listener{listener(t, "0.0.0.0_80", "0.0.0.0", 80, false, &f, chain)}, passthroughClusters(), nil, buildOpts())
			if err != nil {
				t.Fatal(err)
			}
			defer snap.Retire(nil)
			l := snap.Listener("0.0.0.0_80")
			if got := l.Chains[0].HTTP.HasAccessLog(); got != tc.want {
				t.Fatalf("HasAccessLog = %v, want %v", got, tc.want)
			}
			var out syncBuf
			d := NewDispatcher(DispatcherOptions{Access: accesslog.New(zerolog.New(&out).Level(zerolog.InfoLevel))})
			d.Swap(snap)

			cli, srv := net.Pipe()
			fid := netstack.FlowID{Src: netip.MustParseAddrPort("10.0.0.1:40000"), Dst: netip.MustParseAddrPort("10.96.0.1:80")}
			e := accesslog.Entry{Transport: "tcp", Direction: "outbound", Start: time.Now(), DownstreamLocal: fid.Dst, DownstreamPeer: fid.Src}
			done := make(chan struct{})
			go func() {
				defer close(done)
				serveHTTP(d, snap, l, l.Chains[0], srv, fid, "", &e)
				d.o.Access.Log(&e)
			}()
			cli.SetDeadline(time.Now().Add(5 * time.Second))
			io.WriteString(cli, "GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
			resp, err := http.ReadResponse(bufio.NewReader(cli), nil)
			if err != nil || resp.StatusCode != 204 {
				t.Fatalf("response: %v %v", resp, err)
			}
			cli.Close()
			<-done
			lines := strings.Count(out.String(), "\n")
			hasReq := strings.Contains(out.String(), `"method":"GET"`)
			if hasReq != tc.want || (tc.want && lines != 2) || (!tc.want && lines != 1) {
				t.Errorf("access log (want request line: %v):\n%s", tc.want, out.String())
			}
		})
	}
}
