package agent

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/meshtun/meshtun/internal/adminguard"
)

// statusServer is what the kubelet and Prometheus talk to: readiness
// (Istio's :15021 /healthz/ready), liveness, and on the status port
// (:15020) the agent's metrics merged with the proxy's and /quitquitquit.
// It runs in the agent, so it answers (not ready) while the proxy is down.
type statusServer struct {
	// Ready returns nil when the pod may get traffic, else why not.
	Ready func(ctx context.Context) error
	// AgentMetrics writes the agent's own metrics (Prometheus text).
	AgentMetrics func(w io.Writer)
	// ProxyMetrics fetches the proxy's Prometheus text; an error leaves
	// them out (the proxy may be down).
	ProxyMetrics func(ctx context.Context) ([]byte, error)
	// Quit starts a graceful exit (POST /quitquitquit, from the pod only).
	Quit func()
	// Drain starts the proxy's drain without exiting (POST /drain, from
	// the pod only): Istio's native-sidecar preStop hook calls it through
	// `pilot-agent request --debug-port=15020 POST drain`.
	Drain func()
	// AppProbes serves /app-health/ and /app-lifecycle/ (nil: 404).
	AppProbes http.Handler
	Log       zerolog.Logger

	draining atomic.Bool
}

// SetDraining makes readiness fail from now on: the pod is terminating.
func (s *statusServer) SetDraining() { s.draining.Store(true) }

func (s *statusServer) ready(w http.ResponseWriter, r *http.Request) {
	if s.draining.Load() {
		http.Error(w, "draining: the pod is terminating", http.StatusServiceUnavailable)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 3*time.Second) // PROXY_READINESS_PROBE_TIMEOUT
	defer cancel()
	if err := s.Ready(ctx); err != nil {
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
		return
	}
	w.WriteHeader(http.StatusOK)
}

func (s *statusServer) live(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	fmt.Fprintln(w, "LIVE")
}

// metrics is the merged scrape: the agent's metrics, then the proxy's.
func (s *statusServer) metrics(w http.ResponseWriter, r *http.Request) {
	var buf bytes.Buffer
	s.AgentMetrics(&buf)
	if s.ProxyMetrics != nil {
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		defer cancel()
		if b, err := s.ProxyMetrics(ctx); err == nil {
			buf.Write(b)
			if len(b) > 0 && b[len(b)-1] != '\n' {
				buf.WriteByte('\n')
			}
		} else {
			s.Log.Debug().Err(err).Msg("proxy metrics left out of the scrape")
		}
	}
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	_, _ = w.Write(buf.Bytes())
}

// quit is pilot-agent's /quitquitquit: a job's main container calls it
// when done so the sidecar does not keep the pod alive. Only the pod
// itself may (a loopback peer), and only with POST.
func (s *statusServer) quit(w http.ResponseWriter, r *http.Request) {
	if !fromPod(w, r) {
		return
	}
	fmt.Fprintln(w, "OK")
	s.Log.Info().Msg("/quitquitquit: exiting")
	go s.Quit()
}

// drain is pilot-agent's /drain: readiness fails from now on and the
// proxy stops taking new inbound flows while it keeps serving; the exit
// comes later, with the SIGTERM.
func (s *statusServer) drain(w http.ResponseWriter, r *http.Request) {
	if !fromPod(w, r) {
		return
	}
	s.SetDraining()
	fmt.Fprintln(w, "OK")
	s.Log.Info().Msg("/drain: draining; the proxy keeps serving until terminated")
	if s.Drain != nil {
		go s.Drain()
	}
}

// fromPod admits only POSTs from a loopback peer (the pod itself).
func fromPod(w http.ResponseWriter, r *http.Request) bool {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		http.Error(w, "use POST", http.StatusMethodNotAllowed)
		return false
	}
	if ap, err := netip.ParseAddrPort(r.RemoteAddr); err != nil || !ap.Addr().IsLoopback() {
		http.Error(w, "only from within the pod", http.StatusForbidden)
		return false
	}
	return true
}

// appHealth serves the application probes the injector rewrote.
func (s *statusServer) appHealth(w http.ResponseWriter, r *http.Request) {
	if s.AppProbes == nil {
		http.NotFound(w, r)
		return
	}
	s.AppProbes.ServeHTTP(w, r)
}

// StatusHandler serves the status port: /healthz/ready, /healthz/live,
// /stats/prometheus, /quitquitquit, /drain, and the application's probes
// under /app-health/ and /app-lifecycle/.
func (s *statusServer) StatusHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz/ready", s.ready)
	mux.HandleFunc("/healthz/live", s.live)
	mux.HandleFunc("/stats/prometheus", s.metrics)
	mux.HandleFunc("/quitquitquit", s.quit)
	mux.HandleFunc("/drain", s.drain)
	mux.HandleFunc("/app-health/", s.appHealth)
	mux.HandleFunc("/app-lifecycle/", s.appHealth)
	return mux
}

// ReadinessHandler serves the readiness port: /healthz/ready and
// /healthz/live only, as Envoy's :15021 listener does for Istio.
func (s *statusServer) ReadinessHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz/ready", s.ready)
	mux.HandleFunc("/healthz/live", s.live)
	return mux
}

// serve runs h on ln until ln closes.
func serve(ln net.Listener, h http.Handler) *http.Server {
	srv := &http.Server{Handler: adminguard.Wrap(h, adminguard.Options{}), ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = srv.Serve(ln) }()
	return srv
}

// metric writes one Prometheus sample with its help and type.
func metric(w io.Writer, name, typ, help string, v float64) {
	fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s %s\n%s %v\n", name, help, name, typ, name, v)
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
