package admin

import (
	"fmt"
	"net/http"
	"runtime"
	"strings"

	adminv3 "github.com/envoyproxy/go-control-plane/envoy/admin/v3"

	"github.com/meshtun/meshtun/internal/logging"
)

// The mutating endpoints. Envoy requires POST for them (the table in
// endpoints marks them), so a stray GET from a browser changes nothing.

func ok(w http.ResponseWriter) {
	w.Header().Set("Content-Type", "text/plain; charset=UTF-8")
	fmt.Fprintln(w, "OK")
}

// resetCounters zeroes every counter as /stats shows it; gauges keep
// their values. The live counters are untouched (other readers, and the
// data path, never see a reset): /stats subtracts the values recorded here,
// each for the counter it was read from (statKey), so a counter created
// after the reset, even under an old name, counts from its own zero. The
// new baseline replaces the old one in a single step: a concurrent /stats
// sees one or the other, never raw values.
func (s *Server) resetCounters(w http.ResponseWriter, r *http.Request) {
	base := map[statKey]uint64{}
	for _, st := range s.collectRaw() {
		if !st.gauge {
			base[statKey{st.owner, st.name}] = st.value
		}
	}
	s.resetMu.Lock()
	s.resetBaseline = base
	s.resetMu.Unlock()
	ok(w)
}

func (s *Server) healthcheckFail(w http.ResponseWriter, r *http.Request) {
	s.healthFailed.Store(true)
	ok(w)
}

func (s *Server) healthcheckOK(w http.ResponseWriter, r *http.Request) {
	s.healthFailed.Store(false)
	ok(w)
}

// drainListeners is Envoy's /drain_listeners: listeners stop taking new
// flows (?inboundonly: only inbound ones); with ?graceful after the drain
// duration. Their HTTP connections are told to close at once (Connection:
// close, GOAWAY) and, with ?graceful, closed when the drain duration is
// over; TCP flows in progress go on. What Drain does decides it.
func (s *Server) drainListeners(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	for k := range q {
		switch k {
		case "inboundonly", "graceful", "skip_exit":
		default:
			http.Error(w, fmt.Sprintf("drain_listeners: unknown parameter %q; want inboundonly, graceful, skip_exit", k), http.StatusBadRequest)
			return
		}
	}
	_, inbound := q["inboundonly"]
	_, graceful := q["graceful"]
	if s.Drain != nil {
		s.Drain(inbound, graceful)
	}
	ok(w)
}

func (s *Server) quit(w http.ResponseWriter, r *http.Request) {
	ok(w)
	if f, isF := w.(http.Flusher); isF {
		f.Flush()
	}
	if s.Quit != nil {
		s.Quit()
	}
}

// memory is envoy.admin.v3.Memory, from the Go runtime's accounting.
func (s *Server) memory(w http.ResponseWriter, r *http.Request) {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	writeProto(w, &adminv3.Memory{
		Allocated:          ms.HeapAlloc,
		HeapSize:           ms.HeapSys,
		PageheapUnmapped:   ms.HeapReleased,
		PageheapFree:       ms.HeapIdle - ms.HeapReleased,
		TotalThreadCache:   ms.MCacheInuse,
		TotalPhysicalBytes: ms.Sys - ms.HeapReleased,
	})
}

// logging is Envoy's /logging: no parameter lists the loggers;
// ?level=L sets all; ?paths=name:L,name:L or ?name=L set some.
func (s *Server) logging(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	type change struct{ name, level string }
	var changes []change
	for k, vs := range q {
		v := vs[len(vs)-1]
		switch k {
		case "level":
			changes = append(changes, change{"", v})
		case "paths":
			for _, p := range strings.Split(v, ",") {
				name, lvl, found := strings.Cut(p, ":")
				if !found {
					http.Error(w, fmt.Sprintf("paths=%s: want logger:level pairs separated by commas", v), http.StatusBadRequest)
					return
				}
				changes = append(changes, change{name, lvl})
			}
		default:
			changes = append(changes, change{k, v})
		}
	}
	known := logging.Loggers()
	// Validate everything first: a bad request changes nothing.
	for _, c := range changes {
		if _, err := logging.ParseLevel(c.level); err != nil || c.level == "" {
			http.Error(w, fmt.Sprintf("logging: level %q: want trace, debug, info, warning, error, critical or off", c.level), http.StatusBadRequest)
			return
		}
		if _, exists := known[c.name]; c.name != "" && !exists {
			http.Error(w, fmt.Sprintf("logging: unknown logger %q; loggers: %s", c.name, strings.Join(logging.LoggerNames(), ", ")), http.StatusBadRequest)
			return
		}
	}
	for _, c := range changes {
		lvl, _ := logging.ParseLevel(c.level)
		logging.SetLevel(c.name, lvl)
	}
	w.Header().Set("Content-Type", "text/plain; charset=UTF-8")
	fmt.Fprintln(w, "active loggers:")
	levels := logging.Loggers()
	for _, n := range logging.LoggerNames() {
		fmt.Fprintf(w, "  %s: %s\n", n, logging.LevelName(levels[n]))
	}
}
