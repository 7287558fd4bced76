package admin

import (
	"encoding/json"
	"fmt"
	"net/http"
	"runtime"
	"sort"
	"strings"
	"time"
	"weak"
)

// stat is one named value of /stats. owner identifies the object that
// holds the counter (see statKey); the Prometheus form derives its metric
// name and labels from name alone, by Istio's tag extraction (tags.go).
type stat struct {
	name  string
	value uint64
	gauge bool
	used  bool
	owner any
}

// statKey identifies one counter for /reset_counters: its name and a weak
// reference to the object that holds it (a listener's, cluster's,
// tcp_proxy's or HCM's stats block in the stats store; nil for the
// process-wide ones). A scope dropped from the store and created again
// (a cluster removed, then added back) is a new holder with zeroed
// counters, so a baseline taken from the old one never applies to it (a
// baseline keyed by name alone would hide the new block's first N
// counts); a weak reference keeps a dropped block collectable, and once
// collected it never matches again.
type statKey struct {
	owner any
	name  string
}

// holder returns the identity collect records for stats held by p.
func holder[T any](p *T) any { return weak.Make(p) }

// collect gathers every stat with Envoy's full names, counters net of the
// last /reset_counters.
func (s *Server) collect() []stat {
	out := s.collectRaw()
	s.resetMu.Lock()
	base := s.resetBaseline
	s.resetMu.Unlock()
	if base != nil {
		for i := range out {
			st := &out[i]
			if st.gauge {
				continue
			}
			if b, ok := base[statKey{st.owner, st.name}]; ok && st.value >= b {
				st.value -= b
				st.used = st.used && st.value != 0
			}
		}
	}
	return out
}

// collectRaw gathers every stat as its holder counts it, sorted by name.
func (s *Server) collectRaw() []stat {
	var out []stat
	add := func(name string, v uint64, gauge bool, owner any) {
		out = append(out, stat{name: name, value: v, gauge: gauge, used: v != 0, owner: owner})
	}
	plain := func(name string, v uint64, gauge bool) { add(name, v, gauge, nil) }
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
	// Envoy's gauge of open downstream connections, here those of the
	// listeners in force: with the fd count of the process it tells a
	// flow leak from a socket leak.
	var active uint64
	if snap != nil {
		for _, l := range snap.Listeners {
			active += uint64(max(0, l.Stats.DownstreamCxActive.Load()))
		}
	}
	plain("server.total_connections", active, true)
	// Envoy's workers are a fixed set of threads; a Go proxy runs
	// goroutines per flow instead, so their count is the figure that
	// grows with load and must come back down after it (a leak shows
	// here first). Beside the memory gauges, it reaches the same
	// dashboards as they do (envoy_server_goroutines in Prometheus).
	plain("server.goroutines", uint64(runtime.NumGoroutine()), true)
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
			p, owner := l.Stats.Prefix, holder(l.Stats)
			lst := func(n string, v uint64, g bool) { add(p+n, v, g, owner) }
			lst("downstream_cx_total", l.Stats.DownstreamCxTotal.Load(), false)
			lst("downstream_cx_active", uint64(max(0, l.Stats.DownstreamCxActive.Load())), true)
			lst("downstream_cx_destroy", l.Stats.DownstreamCxDestroy.Load(), false)
			lst("no_filter_chain_match", l.Stats.NoFilterChainMatch.Load(), false)
			lst("downstream_pre_cx_active", uint64(max(0, l.Stats.DownstreamPreCxActive.Load())), true)
			lst("downstream_pre_cx_timeout", l.Stats.DownstreamListenerTimeout.Load(), false)
			if l.TerminatesTLS() {
				// Envoy has ssl.* only where a chain has a TLS context.
				for _, st := range l.Stats.SSL().List() {
					lst("ssl."+st.Name, st.Value, false)
				}
			}
		}
		for _, c := range snap.Clusters {
			// Envoy scopes cluster stats by alt_stat_name when set (Istio:
			// "PassthroughCluster;" → "PassthroughCluster").
			// The counters are the stats store's block for the scope,
			// which outlives a cluster re-created by CDS: it is their
			// holder.
			scope, owner := strings.TrimSuffix(c.ObservabilityName(), ";"), holder(c.Scope())
			for _, st := range c.Stats() {
				add("cluster."+scope+"."+st.Name, st.Value, st.Gauge, owner)
			}
			for _, st := range c.HTTPStats().Stats() {
				add("cluster."+scope+"."+st.Name, st.Value, st.Gauge, owner)
			}
			if ssl := snap.ClusterSSL(c.Name()); ssl != nil {
				sslOwner := holder(ssl)
				for _, st := range ssl.List() {
					add("cluster."+scope+".ssl."+st.Name, st.Value, false, sslOwner)
				}
			}
		}
		for _, t := range snap.TCPStats() {
			owner := holder(t)
			tcp := func(n string, v uint64) { add(t.Prefix+n, v, false, owner) }
			tcp("downstream_cx_total", t.DownstreamCxTotal.Load())
			tcp("downstream_cx_no_route", t.DownstreamCxNoRoute.Load())
			tcp("downstream_cx_rx_bytes_total", t.DownstreamRxBytes.Load())
			tcp("downstream_cx_tx_bytes_total", t.DownstreamTxBytes.Load())
			tcp("idle_timeout", t.IdleTimeout.Load())
		}
		authz, shadow := snap.RBACStats()
		for _, b := range authz {
			owner := holder(b)
			for _, st := range b.List() {
				add(st.Name, st.Value, false, owner)
			}
		}
		for _, b := range shadow {
			owner := holder(b)
			for _, st := range b.List() {
				add(st.Name, st.Value, false, owner)
			}
		}
		for prefix, hs := range snap.HTTPStats() {
			owner := holder(hs)
			for _, st := range hs.List() {
				add("http."+prefix+"."+st.Name, st.Value, st.Gauge, owner)
			}
		}
	}
	if s.Extra != nil {
		for name, v := range s.Extra() {
			plain(name, v, strings.HasSuffix(name, "connected_state") || strings.HasSuffix(name, "_active"))
		}
	}
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

// prometheus serves the text exposition format as Envoy's
// /stats/prometheus: each stat's name goes through Istio's tag extraction
// (tags.go), the rest becomes the metric name ("envoy_" + '.'→'_'), one
// family per metric name with its TYPE line.
func (s *Server) prometheus(w http.ResponseWriter, r *http.Request) {
	sel, ok := s.selected(w, r)
	if !ok {
		return
	}
	type sample struct {
		family, labels string
		value          uint64
		gauge          bool
	}
	samples := make([]sample, 0, len(sel))
	// Tag extraction runs Istio's ~15 regexes per name; names are stable
	// between scrapes, so the last scrape's results are reused (and only
	// the names still present are kept).
	s.promMu.Lock()
	prev, next := s.promNames, make(map[string]promName, len(sel))
	var lb strings.Builder
	for _, st := range sel {
		pn, ok := prev[st.name]
		if !ok {
			rest, tags := extractTags(st.name)
			lb.Reset()
			for i, t := range tags {
				if i > 0 {
					lb.WriteByte(',')
				}
				fmt.Fprintf(&lb, "%s=\"%s\"", sanitize(t.name), escapeLabel(t.value))
			}
			pn = promName{"envoy_" + sanitize(rest), lb.String()}
		}
		next[st.name] = pn
		samples = append(samples, sample{pn.family, pn.labels, st.value, st.gauge})
	}
	s.promNames = next
	s.promMu.Unlock()
	// Envoy writes the counters, then the gauges, each sorted by metric name.
	sort.SliceStable(samples, func(i, j int) bool {
		if samples[i].gauge != samples[j].gauge {
			return !samples[i].gauge
		}
		return samples[i].family < samples[j].family
	})
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	var last string
	for _, m := range samples {
		if m.family != last {
			t := "counter"
			if m.gauge {
				t = "gauge"
			}
			fmt.Fprintf(w, "# TYPE %s %s\n", m.family, t)
			last = m.family
		}
		fmt.Fprintf(w, "%s{%s} %d\n", m.family, m.labels, m.value)
	}
}

// promName is a stat's Prometheus metric name and labels.
type promName struct{ family, labels string }

var labelEscaper = strings.NewReplacer(`\`, `\\`, "\n", `\n`, `"`, `\"`)

func escapeLabel(v string) string { return labelEscaper.Replace(v) }
