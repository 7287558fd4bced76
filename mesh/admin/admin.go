// Package admin serves Envoy's admin API for meshtun: the same paths and
// the same text formats, so `curl 127.0.0.1:15000/listeners` and tools that
// parse Envoy's output read meshtun's too. It reads the snapshot in force;
// it never changes the data path except through the endpoints that Envoy
// also lets change it.
package admin

import (
	"fmt"
	"net"
	"net/http"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/meshtun/meshtun/mesh"
	"github.com/meshtun/meshtun/mesh/cluster"
)

// Server is the admin HTTP handler.
type Server struct {
	D     *mesh.Dispatcher
	Start time.Time
	// Extra adds stats of other components by full name, e.g. the xDS
	// client's cluster_manager.cds.update_success (pilot-agent's readiness
	// probe reads it).
	Extra func() map[string]uint64

	mux *http.ServeMux
}

type endpoint struct {
	path, help string
	post       bool // mutating: POST only, as Envoy
	h          func(http.ResponseWriter, *http.Request)
}

func (s *Server) endpoints() []endpoint {
	return []endpoint{
		{"/clusters", "upstream cluster status", false, s.clusters},
		{"/help", "print out list of admin commands", false, s.help},
		{"/listeners", "print listener info", false, s.listeners},
		{"/ready", "print server state, return 200 if LIVE, otherwise return 503", false, s.ready},
		{"/server_info", "print server version/status information", false, s.serverInfo},
		{"/stats", "print server stats", false, s.stats},
	}
}

// Handler returns the admin mux.
func (s *Server) Handler() http.Handler {
	if s.mux == nil {
		s.mux = http.NewServeMux()
		for _, e := range s.endpoints() {
			e := e
			s.mux.HandleFunc(e.path, func(w http.ResponseWriter, r *http.Request) {
				if e.post && r.Method != http.MethodPost {
					w.Header().Set("Allow", "POST")
					http.Error(w, "This endpoint requires POST", http.StatusMethodNotAllowed)
					return
				}
				e.h(w, r)
			})
		}
		s.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusNotFound)
			s.writeHelp(w)
		})
	}
	return s.mux
}

// Serve runs the admin API on ln until it is closed.
func (s *Server) Serve(ln net.Listener) error {
	srv := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second}
	return srv.Serve(ln)
}

func (s *Server) writeHelp(w http.ResponseWriter) {
	fmt.Fprintln(w, "admin commands are:")
	for _, e := range s.endpoints() {
		fmt.Fprintf(w, "  %s: %s\n", e.path, e.help)
	}
}

func (s *Server) help(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=UTF-8")
	s.writeHelp(w)
}

// listeners prints Envoy's "name::address" lines.
func (s *Server) listeners(w http.ResponseWriter, r *http.Request) {
	snap := s.D.Snapshot()
	w.Header().Set("Content-Type", "text/plain; charset=UTF-8")
	if snap == nil {
		return
	}
	for _, l := range snap.Listeners {
		addr := l.Pipe
		if addr == "" {
			addr = l.Addr.String()
		}
		fmt.Fprintf(w, "%s::%s\n", l.Name, addr)
	}
}

// clusters prints Envoy's per-cluster and per-host lines.
func (s *Server) clusters(w http.ResponseWriter, r *http.Request) {
	re, ok := filterParam(w, r)
	if !ok {
		return
	}
	snap := s.D.Snapshot()
	w.Header().Set("Content-Type", "text/plain; charset=UTF-8")
	if snap == nil {
		return
	}
	names := make([]string, 0, len(snap.Clusters))
	for n := range snap.Clusters {
		if re == nil || re.MatchString(n) {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	for _, n := range names {
		c := snap.Clusters[n]
		fmt.Fprintf(w, "%s::observability_name::%s\n", n, c.ObservabilityName())
		for _, p := range []struct {
			name string
			pr   cluster.ResourcePriority
		}{{"default_priority", cluster.PriorityDefault}, {"high_priority", cluster.PriorityHigh}} {
			th := c.Thresholds(p.pr)
			fmt.Fprintf(w, "%s::%s::max_connections::%d\n", n, p.name, th.MaxConnections)
			fmt.Fprintf(w, "%s::%s::max_pending_requests::%d\n", n, p.name, th.MaxPendingRequests)
			fmt.Fprintf(w, "%s::%s::max_requests::%d\n", n, p.name, th.MaxRequests)
			fmt.Fprintf(w, "%s::%s::max_retries::%d\n", n, p.name, th.MaxRetries)
		}
		fmt.Fprintf(w, "%s::added_via_api::%t\n", n, c.AddedViaAPI())
		if e := c.EDSServiceName(); e != "" {
			fmt.Fprintf(w, "%s::eds_service_name::%s\n", n, e)
		}
		for _, h := range c.Hosts() {
			hp := fmt.Sprintf("%s::%s", n, h.Address())
			for _, st := range h.Stats() {
				fmt.Fprintf(w, "%s::%s::%d\n", hp, st.Name, st.Value)
			}
			fmt.Fprintf(w, "%s::hostname::%s\n", hp, h.Hostname())
			fmt.Fprintf(w, "%s::health_flags::%s\n", hp, h.HealthFlags())
			fmt.Fprintf(w, "%s::weight::%d\n", hp, h.Weight())
			fmt.Fprintf(w, "%s::region::%s\n", hp, h.Region())
			fmt.Fprintf(w, "%s::zone::%s\n", hp, h.Zone())
			fmt.Fprintf(w, "%s::sub_zone::%s\n", hp, h.SubZone())
			fmt.Fprintf(w, "%s::canary::%t\n", hp, h.Canary())
			fmt.Fprintf(w, "%s::priority::%d\n", hp, h.Priority())
			fmt.Fprintf(w, "%s::success_rate::%s\n", hp, strconv.FormatFloat(h.SuccessRate(), 'g', -1, 64))
			fmt.Fprintf(w, "%s::local_origin_success_rate::-1\n", hp)
		}
	}
}

func filterParam(w http.ResponseWriter, r *http.Request) (*regexp.Regexp, bool) {
	f := r.URL.Query().Get("filter")
	if f == "" {
		return nil, true
	}
	re, err := regexp.Compile(f)
	if err != nil {
		http.Error(w, fmt.Sprintf("Invalid re2 regex: %v", err), http.StatusBadRequest)
		return nil, false
	}
	return re, true
}

// stat is one named value of the /stats output.
type stat struct {
	name  string
	value uint64
	used  bool
}

// collect gathers every stat with Envoy's full names.
func (s *Server) collect() []stat {
	var out []stat
	add := func(name string, v uint64, used bool) { out = append(out, stat{name, v, used || v != 0}) }
	snap := s.D.Snapshot()
	add("server.live", 1, true)
	add("server.state", 0, true) // 0 = LIVE
	add("server.uptime", uint64(time.Since(s.Start).Seconds()), true)
	if snap != nil {
		add("listener_manager.total_listeners_active", uint64(len(snap.Listeners)), true)
		add("listener_manager.workers_started", 1, true)
		add("cluster_manager.active_clusters", uint64(len(snap.Clusters)), true)
		for _, l := range snap.Listeners {
			p := strings.TrimSuffix(l.Stats.Prefix, ".")
			add(p+".downstream_cx_total", l.Stats.DownstreamCxTotal.Load(), false)
			add(p+".downstream_cx_active", uint64(max(0, l.Stats.DownstreamCxActive.Load())), false)
			add(p+".downstream_cx_destroy", l.Stats.DownstreamCxDestroy.Load(), false)
			add(p+".no_filter_chain_match", l.Stats.NoFilterChainMatch.Load(), false)
			add(p+".downstream_pre_cx_active", uint64(max(0, l.Stats.DownstreamPreCxActive.Load())), false)
			add(p+".downstream_pre_cx_timeout", l.Stats.DownstreamListenerTimeout.Load(), false)
		}
		for _, c := range snap.Clusters {
			// Envoy scopes cluster stats by alt_stat_name when set (Istio:
			// "PassthroughCluster;" → "PassthroughCluster").
			scope := strings.TrimSuffix(c.ObservabilityName(), ";")
			for _, st := range c.Stats() {
				add("cluster."+scope+"."+st.Name, st.Value, false)
			}
		}
	}
	if s.Extra != nil {
		for name, v := range s.Extra() {
			add(name, v, false)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

// stats prints "name: value" lines; ?filter=<re2> and ?usedonly as Envoy.
func (s *Server) stats(w http.ResponseWriter, r *http.Request) {
	re, ok := filterParam(w, r)
	if !ok {
		return
	}
	q := r.URL.Query()
	_, usedOnly := q["usedonly"]
	if f := q.Get("format"); f != "" && f != "text" {
		http.Error(w, fmt.Sprintf("usage: /stats?format=(text) — format %q is not supported yet", f), http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=UTF-8")
	for _, st := range s.collect() {
		if (usedOnly && !st.used) || (re != nil && !re.MatchString(st.name)) {
			continue
		}
		fmt.Fprintf(w, "%s: %d\n", st.name, st.value)
	}
}

func (s *Server) ready(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=UTF-8")
	if s.D.Snapshot() == nil {
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprintln(w, "PRE_INITIALIZING")
		return
	}
	fmt.Fprintln(w, "LIVE")
}

func (s *Server) serverInfo(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	fmt.Fprintf(w, "{\n \"version\": \"meshtun\",\n \"state\": \"LIVE\",\n \"uptime_current_epoch\": \"%ds\"\n}\n", int(time.Since(s.Start).Seconds()))
}
