package admin

import (
	"encoding/json"
	"fmt"
	"net/http"
	"runtime"
	"sort"
	"strings"
	"time"
)

// stat is one named value of /stats, with what the Prometheus form needs:
// Envoy's tag extraction turns cluster.<name>.x into envoy_cluster_x with
// cluster_name="<name>" (Istio's bootstrap tags: cluster_name,
// listener_address, tcp_prefix).
type stat struct {
	name     string
	value    uint64
	gauge    bool
	used     bool
	family   string // Prometheus metric name
	tagName  string // "" when the name carries no tag
	tagValue string
}

// collect gathers every stat with Envoy's full names, counters net of the
// last /reset_counters.
func (s *Server) collect() []stat {
	var out []stat
	add := func(name string, v uint64, gauge bool, tagName, tagValue, rest string) {
		fam := "envoy_" + sanitize(name)
		if tagName != "" {
			fam = "envoy_" + sanitize(rest)
		}
		out = append(out, stat{name: name, value: v, gauge: gauge, used: v != 0, family: fam, tagName: tagName, tagValue: tagValue})
	}
	plain := func(name string, v uint64, gauge bool) { add(name, v, gauge, "", "", "") }
	snap := s.D.Snapshot()
	live, state := uint64(1), uint64(s.state())
	if s.healthFailed.Load() || snap == nil {
		live = 0
	}
	plain("server.live", live, true)
	plain("server.state", state, true)
	plain("server.uptime", uint64(time.Since(s.Start).Seconds()), true)
	plain("server.concurrency", uint64(max(1, s.Concurrency)), true)
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	plain("server.memory_allocated", ms.HeapAlloc, true)
	plain("server.memory_heap_size", ms.HeapSys, true)
	plain("server.memory_physical_size", ms.Sys-ms.HeapReleased, true)
	// pilot-agent's readiness reads these as used stats: set them used.
	for i := range out {
		out[i].used = true
	}
	if snap != nil {
		plain("listener_manager.total_listeners_active", uint64(len(snap.Listeners)), true)
		plain("listener_manager.workers_started", 1, true)
		out[len(out)-1].used = true
		plain("cluster_manager.active_clusters", uint64(len(snap.Clusters)), true)
		for _, l := range snap.Listeners {
			p := strings.TrimSuffix(l.Stats.Prefix, ".")
			addr := strings.TrimPrefix(p, "listener.")
			lst := func(n string, v uint64, g bool) { add(p+"."+n, v, g, "listener_address", addr, "listener."+n) }
			lst("downstream_cx_total", l.Stats.DownstreamCxTotal.Load(), false)
			lst("downstream_cx_active", uint64(max(0, l.Stats.DownstreamCxActive.Load())), true)
			lst("downstream_cx_destroy", l.Stats.DownstreamCxDestroy.Load(), false)
			lst("no_filter_chain_match", l.Stats.NoFilterChainMatch.Load(), false)
			lst("downstream_pre_cx_active", uint64(max(0, l.Stats.DownstreamPreCxActive.Load())), true)
			lst("downstream_pre_cx_timeout", l.Stats.DownstreamListenerTimeout.Load(), false)
		}
		for _, c := range snap.Clusters {
			// Envoy scopes cluster stats by alt_stat_name when set (Istio:
			// "PassthroughCluster;" → "PassthroughCluster").
			scope := strings.TrimSuffix(c.ObservabilityName(), ";")
			for _, st := range append(c.Stats(), c.HTTPStats().Stats()...) {
				add("cluster."+scope+"."+st.Name, st.Value, st.Gauge, "cluster_name", scope, "cluster."+st.Name)
			}
		}
		for _, t := range snap.TCPStats() {
			prefix := strings.TrimSuffix(strings.TrimPrefix(t.Prefix, "tcp."), ".")
			tcp := func(n string, v uint64) { add(t.Prefix+n, v, false, "tcp_prefix", prefix, "tcp."+n) }
			tcp("downstream_cx_total", t.DownstreamCxTotal.Load())
			tcp("downstream_cx_no_route", t.DownstreamCxNoRoute.Load())
			tcp("downstream_cx_rx_bytes_total", t.DownstreamRxBytes.Load())
			tcp("downstream_cx_tx_bytes_total", t.DownstreamTxBytes.Load())
			tcp("idle_timeout", t.IdleTimeout.Load())
		}
		for prefix, hs := range snap.HTTPStats() {
			for _, st := range hs.List() {
				add("http."+prefix+"."+st.Name, st.Value, st.Gauge, "http_conn_manager_prefix", prefix, "http."+st.Name)
			}
		}
	}
	if s.Extra != nil {
		for name, v := range s.Extra() {
			plain(name, v, strings.HasSuffix(name, "connected_state"))
		}
	}
	s.resetMu.Lock()
	for i := range out {
		if base, ok := s.resetBaseline[out[i].name]; ok && !out[i].gauge {
			if out[i].value >= base {
				out[i].value -= base
			}
			out[i].used = out[i].used && out[i].value != 0 || out[i].name == "listener_manager.workers_started"
		}
	}
	s.resetMu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

// sanitize makes a Prometheus metric name: Envoy replaces every character
// outside [a-zA-Z0-9_] with '_'.
func sanitize(s string) string {
	b := []byte(s)
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_') {
			b[i] = '_'
		}
	}
	return string(b)
}

// stats prints "name: value" lines; ?filter=<re2>, ?usedonly and
// ?format=json|prometheus as Envoy.
func (s *Server) stats(w http.ResponseWriter, r *http.Request) {
	f, ok := format(w, r, "json", "prometheus")
	if !ok {
		return
	}
	if f == "prometheus" {
		s.prometheus(w, r)
		return
	}
	sel, ok := s.selected(w, r)
	if !ok {
		return
	}
	if f == "json" {
		type jstat struct {
			Name  string `json:"name"`
			Value uint64 `json:"value"`
		}
		out := struct {
			Stats []jstat `json:"stats"`
		}{Stats: []jstat{}}
		for _, st := range sel {
			out.Stats = append(out.Stats, jstat{st.name, st.value})
		}
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", " ")
		enc.Encode(out)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=UTF-8")
	for _, st := range sel {
		fmt.Fprintf(w, "%s: %d\n", st.name, st.value)
	}
}

// selected applies ?filter= and ?usedonly.
func (s *Server) selected(w http.ResponseWriter, r *http.Request) ([]stat, bool) {
	re, ok := filterParam(w, r)
	if !ok {
		return nil, false
	}
	_, usedOnly := r.URL.Query()["usedonly"]
	all := s.collect()
	out := all[:0]
	for _, st := range all {
		if (usedOnly && !st.used) || (re != nil && !re.MatchString(st.name)) {
			continue
		}
		out = append(out, st)
	}
	return out, true
}

// prometheus serves the text exposition format, one family per metric
// name with its TYPE line, as Envoy's /stats/prometheus.
func (s *Server) prometheus(w http.ResponseWriter, r *http.Request) {
	sel, ok := s.selected(w, r)
	if !ok {
		return
	}
	sort.SliceStable(sel, func(i, j int) bool { return sel[i].family < sel[j].family })
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	var last string
	for _, st := range sel {
		if st.family != last {
			t := "counter"
			if st.gauge {
				t = "gauge"
			}
			fmt.Fprintf(w, "# TYPE %s %s\n", st.family, t)
			last = st.family
		}
		if st.tagName != "" {
			fmt.Fprintf(w, "%s{%s=\"%s\"} %d\n", st.family, st.tagName, escapeLabel(st.tagValue), st.value)
		} else {
			fmt.Fprintf(w, "%s{} %d\n", st.family, st.value)
		}
	}
}

var labelEscaper = strings.NewReplacer(`\`, `\\`, "\n", `\n`, `"`, `\"`)

func escapeLabel(v string) string { return labelEscaper.Replace(v) }
