package agent

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// envAppProbers is how Istio's injector hands the application's probes to
// the agent when it rewrites them to the status port: a JSON object from
// the status-port path (/app-health/<container>/livez|readyz|startupz,
// /app-lifecycle/<container>/prestopz|poststartz) to the probe the kubelet
// would have run.
const envAppProbers = "ISTIO_KUBE_APP_PROBERS"

// appProberPath is the paths the injector writes (pilot-agent accepts the same).
var appProberPath = regexp.MustCompile(`^/(app-health|app-lifecycle)/[^/]+/(livez|readyz|startupz|prestopz|poststartz)$`)

// intOrString is Kubernetes' IntOrString as JSON: a number or a string.
// The injector only rewrites probes whose port is a number (a named port
// is resolved before); a string here is an error, as in pilot-agent.
type intOrString struct {
	Int   int
	Str   string
	IsStr bool
}

func (p *intOrString) UnmarshalJSON(b []byte) error {
	if len(b) > 0 && b[0] == '"' {
		p.IsStr = true
		return json.Unmarshal(b, &p.Str)
	}
	return json.Unmarshal(b, &p.Int)
}

// appProbe is one container probe: exactly one of HTTPGet, TCPSocket, GRPC.
type appProbe struct {
	HTTPGet *struct {
		Path   string      `json:"path"`
		Port   intOrString `json:"port"`
		Host   string      `json:"host"`
		Scheme string      `json:"scheme"`
	} `json:"httpGet"`
	TCPSocket *struct {
		Port intOrString `json:"port"`
		Host string      `json:"host"`
	} `json:"tcpSocket"`
	GRPC *struct {
		Port    int     `json:"port"`
		Service *string `json:"service"`
	} `json:"grpc"`
	TimeoutSeconds int `json:"timeoutSeconds"`
}

// appProbers runs the application's probes from inside the pod, as
// pilot-agent does: the kubelet reaches the status port (never captured)
// and the agent probes the application at the pod's IP, which is local and
// so delivered without passing through capture.
type appProbers struct {
	probes map[string]*appProbe
	// dest is where the application is probed: the pod's IP (kubelet's
	// behaviour), or localhost when the pod has none.
	dest string
	// statusPort is the agent's own port, replaced in a forwarded Host.
	statusPort int
	clients    map[string]*http.Client
}

// parseAppProbers decodes ISTIO_KUBE_APP_PROBERS. Every error names the
// variable and the path at fault.
func parseAppProbers(js string, podIP netip.Addr, statusPort int) (*appProbers, error) {
	ap := &appProbers{probes: map[string]*appProbe{}, clients: map[string]*http.Client{}, statusPort: statusPort, dest: "localhost"}
	if podIP.IsValid() {
		ap.dest = podIP.String()
	}
	if strings.TrimSpace(js) == "" {
		return ap, nil
	}
	dec := json.NewDecoder(strings.NewReader(js))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&ap.probes); err != nil {
		return nil, fmt.Errorf("%s: %v", envAppProbers, err)
	}
	paths := make([]string, 0, len(ap.probes))
	for p := range ap.probes {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	for _, path := range paths {
		p := ap.probes[path]
		if err := p.validate(path); err != nil {
			return nil, fmt.Errorf("%s: %q: %v", envAppProbers, path, err)
		}
		if p.HTTPGet != nil {
			// As the kubelet's prober: no keep-alive (an idle timeout on the
			// application's side must not fail a probe), certificates not
			// verified for https, redirects followed on the same host only.
			ap.clients[path] = &http.Client{
				Timeout: p.timeout(),
				Transport: &http.Transport{
					DisableKeepAlives: true,
					TLSClientConfig:   &tls.Config{InsecureSkipVerify: true}, //nolint:gosec // kubelet does not verify probe certificates either
				},
				CheckRedirect: func(req *http.Request, via []*http.Request) error {
					if req.URL.Hostname() != via[0].URL.Hostname() {
						return http.ErrUseLastResponse
					}
					if len(via) >= 10 {
						return errors.New("stopped after 10 redirects")
					}
					return nil
				},
			}
		}
	}
	return ap, nil
}

func (p *appProbe) validate(path string) error {
	if p == nil {
		return errors.New("null probe")
	}
	if !appProberPath.MatchString(path) {
		return fmt.Errorf("path must match %s", appProberPath)
	}
	n := 0
	for _, set := range []bool{p.HTTPGet != nil, p.TCPSocket != nil, p.GRPC != nil} {
		if set {
			n++
		}
	}
	if n != 1 {
		return errors.New("want exactly one of httpGet, tcpSocket, grpc")
	}
	port := 0
	switch {
	case p.HTTPGet != nil:
		if p.HTTPGet.Port.IsStr {
			return fmt.Errorf("httpGet.port %q: must be a number", p.HTTPGet.Port.Str)
		}
		if s := strings.ToUpper(p.HTTPGet.Scheme); s != "" && s != "HTTP" && s != "HTTPS" {
			return fmt.Errorf("httpGet.scheme %q: want HTTP or HTTPS", p.HTTPGet.Scheme)
		}
		port = p.HTTPGet.Port.Int
	case p.TCPSocket != nil:
		if p.TCPSocket.Port.IsStr {
			return fmt.Errorf("tcpSocket.port %q: must be a number", p.TCPSocket.Port.Str)
		}
		port = p.TCPSocket.Port.Int
	default:
		port = p.GRPC.Port
	}
	if port < 1 || port > 65535 {
		return fmt.Errorf("port %d: out of range", port)
	}
	if p.TimeoutSeconds < 0 {
		return fmt.Errorf("timeoutSeconds %d: must not be negative", p.TimeoutSeconds)
	}
	return nil
}

// timeout is the probe's timeoutSeconds; 0 is the kubelet's default, 1 s.
func (p *appProbe) timeout() time.Duration {
	if p.TimeoutSeconds == 0 {
		return time.Second
	}
	return time.Duration(p.TimeoutSeconds) * time.Second
}

// maxProbeBody is how much of the application's answer is passed back
// (pilot-agent's limit).
const maxProbeBody = 10 << 10

// ServeHTTP answers /app-health/… and /app-lifecycle/…: 200 when the
// application's probe passes, its status otherwise (500 when it cannot be
// reached), 404 for a path no probe was given for.
func (ap *appProbers) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p := ap.probes[r.URL.Path]
	if p == nil {
		http.Error(w, fmt.Sprintf("no application probe for %s (%s has none)", r.URL.Path, envAppProbers), http.StatusNotFound)
		return
	}
	switch {
	case p.HTTPGet != nil:
		ap.probeHTTP(w, r, p)
	case p.TCPSocket != nil:
		ap.probeTCP(w, p)
	default:
		ap.probeGRPC(w, r, p)
	}
}

func (ap *appProbers) probeHTTP(w http.ResponseWriter, r *http.Request, p *appProbe) {
	g := p.HTTPGet
	host := ap.dest
	if g.Host != "" {
		host = g.Host
	}
	scheme := "http"
	if strings.EqualFold(g.Scheme, "HTTPS") {
		scheme = "https"
	}
	path := g.Path
	if !strings.HasPrefix(path, "/") {
		path = "/" + path
	}
	port := strconv.Itoa(g.Port.Int)
	ctx, cancel := context.WithTimeout(r.Context(), p.timeout())
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, scheme+"://"+net.JoinHostPort(host, port)+path, nil)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	// The kubelet's headers (its User-Agent, the probe's httpHeaders) go to
	// the application; a Host aimed at the status port is aimed at the
	// application's port instead.
	for k, v := range r.Header {
		req.Header[k] = append([]string(nil), v...)
	}
	req.Host = r.Host
	if h, p, err := net.SplitHostPort(r.Host); err == nil && p == strconv.Itoa(ap.statusPort) {
		req.Host = net.JoinHostPort(h, port)
	}
	resp, err := ap.clients[r.URL.Path].Do(req)
	if err != nil {
		http.Error(w, "application probe failed: "+err.Error(), http.StatusInternalServerError)
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 && resp.StatusCode < 400 {
		// A redirect off the host passes, as for the kubelet.
		w.WriteHeader(http.StatusOK)
		return
	}
	w.WriteHeader(resp.StatusCode)
	_, _ = io.Copy(w, io.LimitReader(resp.Body, maxProbeBody))
}

func (ap *appProbers) probeTCP(w http.ResponseWriter, p *appProbe) {
	host := ap.dest
	if p.TCPSocket.Host != "" {
		host = p.TCPSocket.Host
	}
	c, err := net.DialTimeout("tcp", net.JoinHostPort(host, strconv.Itoa(p.TCPSocket.Port.Int)), p.timeout())
	if err != nil {
		http.Error(w, "application probe failed: "+err.Error(), http.StatusInternalServerError)
		return
	}
	c.Close()
	w.WriteHeader(http.StatusOK)
}

// probeGRPC is the kubelet's grpc probe: grpc.health.v1.Health/Check on
// the port, in plaintext, SERVING passes.
func (ap *appProbers) probeGRPC(w http.ResponseWriter, r *http.Request, p *appProbe) {
	ctx, cancel := context.WithTimeout(r.Context(), p.timeout())
	defer cancel()
	opts := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	if ua := r.Header.Get("User-Agent"); ua != "" {
		opts = append(opts, grpc.WithUserAgent(ua))
	}
	conn, err := grpc.NewClient(net.JoinHostPort(ap.dest, strconv.Itoa(p.GRPC.Port)), opts...)
	if err != nil {
		http.Error(w, "application probe failed: "+err.Error(), http.StatusInternalServerError)
		return
	}
	defer conn.Close()
	svc := ""
	if p.GRPC.Service != nil {
		svc = *p.GRPC.Service
	}
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
	if err != nil {
		http.Error(w, "application probe failed: "+err.Error(), http.StatusInternalServerError)
		return
	}
	if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		http.Error(w, "application probe: "+resp.GetStatus().String(), http.StatusInternalServerError)
		return
	}
	w.WriteHeader(http.StatusOK)
}
