//go:build linux

package integration

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// streamService is one HTTP service behind Istio's 0.0.0.0_80 listener
// (RDS route "80"), for the streaming, WebSocket and gRPC cases: its
// VIP:80 in the pod is captured and routed to the one endpoint.
type streamService struct {
	topo *topology
	px   *proxyProc
	url  string // http://VIP:80
	addr string // VIP:80
	host string // the virtual host's domain
}

// startStreamService serves handler (HTTP/1.1 and h2c) in the services
// namespace behind cluster name, and Istio's outbound listener for port
// 80 as istiod writes it (upgrade_configs websocket on the connection
// manager) with hcmExtra merged in, routes whose route action gets
// routeExtra, and an h2c upstream when h2 is set (Istio's gRPC ports).
func startStreamService(t *testing.T, handler http.Handler, h2 bool, hcmExtra, routeExtra obj) *streamService {
	t.Helper()
	return startStreamServer(t, func(ln net.Listener) func() {
		srv := &http.Server{Handler: handler, ReadHeaderTimeout: 5 * time.Second, Protocols: new(http.Protocols)}
		srv.Protocols.SetHTTP1(true)
		srv.Protocols.SetUnencryptedHTTP2(true)
		go srv.Serve(ln)
		return func() { srv.Close() }
	}, h2, hcmExtra, routeExtra)
}

// startStreamServer is startStreamService with a server of the caller's
// (a gRPC server): serve starts it on the endpoint's listener and returns
// its stop.
func startStreamServer(t *testing.T, serve func(net.Listener) func(), h2 bool, hcmExtra, routeExtra obj) *streamService {
	t.Helper()
	topo := newTopology(t)
	cp := startControlPlane(t, topo.Services, ap(topo.GwV4, 15010))
	ep := netip.AddrPortFrom(topo.SvcV4, 9090)
	ln, err := listenTCP(topo.Services, ep.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(serve(ln))

	const name = "outbound|80||stream.default.svc.cluster.local"
	v := vip(topo, false, 80)
	action := obj{"cluster": name, "timeout": "0s", "max_grpc_timeout": "0s"}
	for k, x := range routeExtra {
		action[k] = x
	}
	route := obj{"name": "80", "validate_clusters": false, "virtual_hosts": []obj{
		{"name": "stream.default.svc.cluster.local:80", "domains": []string{"stream", v.String()},
			"routes": []obj{{"name": "default", "match": obj{"prefix": "/"}, "route": action}}},
	}}
	c := edsCluster(name)
	if h2 {
		c["typed_extension_protocol_options"] = obj{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": obj{
			"@type":                "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
			"explicit_http_config": obj{"http2_protocol_options": obj{}}}}
	}
	l := istioHTTPListener(80)
	hcm := l["filter_chains"].([]obj)[0]["filters"].([]obj)[0]["typed_config"].(obj)
	hcm["upgrade_configs"] = []obj{{"upgrade_type": "websocket"}}
	hcm["stream_idle_timeout"] = "0s" // Istio's
	for k, x := range hcmExtra {
		hcm[k] = x
	}
	cp.pushHTTP(t, "1", []obj{virtualOutbound("BlackHoleCluster"), virtualInbound(), l},
		append(istioClusters(), c), map[string][]netip.AddrPort{name: {ep}}, []obj{route})
	s := &streamService{topo: topo, px: startHTTPProxy(t, topo), addr: ap(v, 80), host: "stream"}
	s.url = "http://" + s.addr
	// The route arrives with (or just after) the listener.
	pc := podClient(topo, false, 1)
	defer pc.CloseIdleConnections()
	deadline := time.Now().Add(10 * time.Second)
	for {
		req, _ := http.NewRequest("GET", s.url+"/ready", nil)
		req.Host = s.host
		if resp, err := pc.Do(req); err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusNotFound && resp.StatusCode != http.StatusServiceUnavailable {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("the stream service never routed")
		}
		time.Sleep(50 * time.Millisecond)
	}
	return s
}

// dialPod opens a TCP connection from the pod to the service: captured.
func (s *streamService) dialPod(ctx context.Context, _, _ string) (net.Conn, error) {
	return dialTCP(s.topo.Pod, s.addr, dialTimeout)
}

// lineReader hands over a process's output line by line, so that a test
// can wait for each line with a bound.
func lineReader(r io.Reader) <-chan string {
	ch := make(chan string, 64)
	go func() {
		defer close(ch)
		br := bufio.NewReader(r)
		for {
			l, err := br.ReadString('\n')
			if l != "" {
				ch <- strings.TrimRight(l, "\r\n")
			}
			if err != nil {
				return
			}
		}
	}()
	return ch
}

// nextLine waits (5 s at most) for the next line that is not empty.
func nextLine(t *testing.T, lines <-chan string, what string) string {
	t.Helper()
	timeout := time.After(5 * time.Second)
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("%s: output ended", what)
			}
			if l != "" {
				return l
			}
		case <-timeout:
			t.Fatalf("%s: nothing after 5s", what)
		}
	}
}

// TestServerSentEventsThroughSidecar (issue #15 defect 9): curl -N in the
// pod reads a server-sent-events stream through capture and Istio's
// outbound listener event by event, over HTTP/1.1 and h2c. The upstream
// sends its response head, then waits until curl has shown it, then sends
// each event only once curl has printed the previous one: a head held
// back until the first body byte (as before the fix) stalls curl at the
// start.
func TestServerSentEventsThroughSidecar(t *testing.T) {
	requireRoot(t)
	step := make(chan struct{})
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/events" {
			return
		}
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(http.StatusOK)
		http.NewResponseController(w).Flush()
		for i := 1; i <= 3; i++ {
			select {
			case <-step:
			case <-r.Context().Done():
				return
			}
			fmt.Fprintf(w, "id: %d\ndata: event %d\n\n", i, i)
			http.NewResponseController(w).Flush()
		}
	})
	s := startStreamService(t, handler, false, nil, nil)
	for _, proto := range []string{"--http1.1", "--http2-prior-knowledge"} {
		t.Run(strings.TrimPrefix(proto, "--"), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			// -v prints the response head on stderr as it arrives
			// (curl's stderr is unbuffered; a head printed with -i on
			// stdout would wait in stdio's buffer for the first body
			// write); -N writes each body chunk out as it comes.
			cmd := exec.CommandContext(ctx, "ip", "netns", "exec", s.topo.Pod, "curl", "-sS", "-N", "-v", proto,
				"-H", "Host: "+s.host, s.url+"/events")
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			errOut, err := cmd.StderrPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			var verbose []string
			defer func() {
				cancel()
				cmd.Wait()
				if t.Failed() {
					t.Logf("curl -v:\n%s", strings.Join(verbose, "\n"))
				}
			}()
			lines, head := lineReader(out), lineReader(errOut)
			// The head, up to its end ("<" alone), while the upstream
			// waits for the test to see it.
			status, sawType := "", false
			for headDone := false; !headDone; {
				select {
				case l, ok := <-head:
					if !ok {
						t.Fatal("curl ended before the response head")
					}
					verbose = append(verbose, l)
					switch {
					case strings.HasPrefix(l, "< HTTP/"):
						status = l
					case strings.EqualFold(l, "< content-type: text/event-stream"):
						sawType = true
					case strings.TrimSpace(l) == "<" && status != "":
						headDone = true
					}
				case <-time.After(5 * time.Second):
					t.Fatal("the response head stalled while the upstream waited for it to arrive")
				}
			}
			if !strings.Contains(status, " 200") || !sawType {
				t.Fatalf("head: %q, content-type text/event-stream seen: %v", status, sawType)
			}
			for i := 1; i <= 3; i++ {
				step <- struct{}{}
				if l := nextLine(t, lines, fmt.Sprintf("event %d id", i)); l != fmt.Sprintf("id: %d", i) {
					t.Fatalf("event %d: %q", i, l)
				}
				if l := nextLine(t, lines, fmt.Sprintf("event %d data", i)); l != fmt.Sprintf("data: event %d", i) {
					t.Fatalf("event %d: %q", i, l)
				}
			}
		})
	}
}
