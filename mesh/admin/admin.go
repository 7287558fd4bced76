// Package admin serves Envoy's admin API for meshtun: the same paths and
// the same text formats, so `curl 127.0.0.1:15000/listeners` and tools that
// parse Envoy's output read meshtun's too. It reads the snapshot in force;
// it never changes the data path except through the endpoints that Envoy
// also lets change it.
package admin

import (
	"fmt"
	"sync"
	"sync/atomic"

	adminv3 "github.com/envoyproxy/go-control-plane/envoy/admin/v3"
	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
	"net"
	"net/http"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/meshtun/meshtun/internal/adminguard"
	"github.com/meshtun/meshtun/mesh"
	"github.com/meshtun/meshtun/mesh/cluster"
	"github.com/meshtun/meshtun/mesh/secrets"
	"github.com/meshtun/meshtun/xdsclient"
)

// Server is the admin HTTP handler.
type Server struct {
	D     *mesh.Dispatcher
	Start time.Time
	// Extra adds stats of other components by full name, e.g. the xDS
	// client's cluster_manager.cds.update_success (pilot-agent's readiness
	// probe reads it).
	Extra func() map[string]uint64
	// Bootstrap returns the bootstrap in force and when it was loaded, for
	// /config_dump.
	Bootstrap func() (*bootstrapv3.Bootstrap, time.Time)
	// Initialized, when set, reports whether the first configuration is
	// in force; until it does the server is INITIALIZING (Envoy waits for
	// its first CDS and LDS responses before it is LIVE). Nil: a snapshot
	// is enough.
	Initialized func() bool
	// Waiting, when set, says what the initial configuration still waits
	// for ("waiting for secret ROOTCA from sds-grpc"; "" for nothing
	// named): /ready prints it under the state while not LIVE, so that a
	// readiness probe's failure says why.
	Waiting func() string
	// Warming, when set, returns the listeners and clusters received over
	// xDS that are not in force yet (nil: none), for /config_dump's
	// warming states.
	Warming func() *xdsclient.Warming
	// Secrets, when set, is the proxy's SDS secret store, for /certs and
	// /config_dump's secrets.
	Secrets *secrets.Store
	// Concurrency is reported as server.concurrency.
	Concurrency int
	// Drain stops listeners taking new flows (/drain_listeners).
	Drain func(inboundOnly, graceful bool)
	// Quit asks the proxy to exit (/quitquitquit).
	Quit func()

	mux           *http.ServeMux
	healthFailed  atomic.Bool
	drained       atomic.Bool
	promMu        sync.Mutex
	promNames     map[string]promName // the last /stats/prometheus's names, by stat name
	resetMu       sync.Mutex
	resetBaseline map[statKey]uint64 // raw counter values at the last /reset_counters
}

type endpoint struct {
	path, help string
	post       bool // mutating: POST only, as Envoy
	h          func(http.ResponseWriter, *http.Request)
}

func (s *Server) endpoints() []endpoint {
	return []endpoint{
		{"/certs", "print certs on machine", false, s.certs},
		{"/clusters", "upstream cluster status", false, s.clusters},
		{"/config_dump", "dump current Envoy configs (resource=, name_regex=, include_eds)", false, s.configDump},
		{"/drain_listeners", "drain listeners (inboundonly, graceful)", true, s.drainListeners},
		{"/healthcheck/fail", "cause the server to fail health checks", true, s.healthcheckFail},
		{"/healthcheck/ok", "cause the server to pass health checks", true, s.healthcheckOK},
		{"/help", "print out list of admin commands", false, s.help},
		{"/listeners", "print listener info (format=json)", false, s.listeners},
		{"/logging", "query/change logging levels (level=, paths=, <logger>=)", true, s.logging},
		{"/memory", "print current allocation/heap usage", false, s.memory},
		{"/quitquitquit", "exit the server", true, s.quit},
		{"/ready", "print server state, return 200 if LIVE, otherwise return 503", false, s.ready},
		{"/reset_counters", "reset all counters to zero", true, s.resetCounters},
		{"/server_info", "print server version/status information", false, s.serverInfo},
		{"/stats", "print server stats (filter=, usedonly, format=json|prometheus)", false, s.stats},
		{"/stats/prometheus", "print server stats in prometheus format (filter=, usedonly)", false, s.prometheus},
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
	srv := &http.Server{Handler: adminguard.Wrap(s.Handler(), adminguard.Options{CheckHost: true}), ReadHeaderTimeout: 10 * time.Second}
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

// format reads ?format=: "" or "text" is the text form; json is Envoy's
// JSON; anything else is a 400 naming the choices.
func format(w http.ResponseWriter, r *http.Request, choices ...string) (string, bool) {
	f := r.URL.Query().Get("format")
	if f == "" || f == "text" {
		return "text", true
	}
	for _, c := range choices {
		if f == c {
			return f, true
		}
	}
	http.Error(w, fmt.Sprintf("format=%s: unknown format; want text or %s", f, strings.Join(choices, " or ")), http.StatusBadRequest)
	return "", false
}

// certs serves /certs: Envoy's envoy.admin.v3.Certificates of the secrets
// the configuration references (empty without a secret store).
func (s *Server) certs(w http.ResponseWriter, r *http.Request) {
	out := &adminv3.Certificates{}
	if s.Secrets != nil {
		out = s.Secrets.Certificates(time.Now())
	}
	writeProto(w, out)
}

func writeProto(w http.ResponseWriter, m proto.Message) {
	b, err := dumpJSON.Marshal(m)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write(b)
	w.Write([]byte("\n"))
}

// listeners prints Envoy's "name::address" lines, or with ?format=json
// envoy.admin.v3.Listeners.
func (s *Server) listeners(w http.ResponseWriter, r *http.Request) {
	f, ok := format(w, r, "json")
	if !ok {
		return
	}
	snap := s.D.Snapshot()
	if f == "json" {
		out := &adminv3.Listeners{}
		if snap != nil {
			for _, l := range snap.Listeners {
				out.ListenerStatuses = append(out.ListenerStatuses, &adminv3.ListenerStatus{
					Name: l.Name, LocalAddress: l.Proto.GetAddress(), AdditionalLocalAddresses: addrs(l.Proto.GetAdditionalAddresses())})
			}
		}
		writeProto(w, out)
		return
	}
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

func addrs(as []*listenerv3.AdditionalAddress) []*corev3.Address {
	var out []*corev3.Address
	for _, a := range as {
		out = append(out, a.GetAddress())
	}
	return out
}

// clusters prints Envoy's per-cluster and per-host lines, or with
// ?format=json envoy.admin.v3.Clusters.
func (s *Server) clusters(w http.ResponseWriter, r *http.Request) {
	re, ok := filterParam(w, r)
	if !ok {
		return
	}
	f, ok := format(w, r, "json")
	if !ok {
		return
	}
	snap := s.D.Snapshot()
	var names []string
	if snap != nil {
		for n := range snap.Clusters {
			if re == nil || re.MatchString(n) {
				names = append(names, n)
			}
		}
	}
	sort.Strings(names)
	if f == "json" {
		out := &adminv3.Clusters{}
		for _, n := range names {
			out.ClusterStatuses = append(out.ClusterStatuses, clusterStatus(snap.Clusters[n]))
		}
		writeProto(w, out)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=UTF-8")
	for _, n := range names {
		c := snap.Clusters[n]
		fmt.Fprintf(w, "%s::observability_name::%s\n", n, c.ObservabilityName())
		for _, p := range priorities {
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
		for _, h := range hostsByPriority(c) {
			hp := fmt.Sprintf("%s::%s", n, h) // a pipe host prints its path, as Envoy
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

var priorities = []struct {
	name string
	pr   cluster.ResourcePriority
	pb   corev3.RoutingPriority
}{{"default_priority", cluster.PriorityDefault, corev3.RoutingPriority_DEFAULT}, {"high_priority", cluster.PriorityHigh, corev3.RoutingPriority_HIGH}}

func clusterStatus(c *cluster.Cluster) *adminv3.ClusterStatus {
	cs := &adminv3.ClusterStatus{
		Name: c.Name(), AddedViaApi: c.AddedViaAPI(), ObservabilityName: c.ObservabilityName(),
		EdsServiceName: c.EDSServiceName(), CircuitBreakers: &clusterv3.CircuitBreakers{},
	}
	for _, p := range priorities {
		th := c.Thresholds(p.pr)
		cs.CircuitBreakers.Thresholds = append(cs.CircuitBreakers.Thresholds, &clusterv3.CircuitBreakers_Thresholds{
			Priority:           p.pb,
			MaxConnections:     wrapperspb.UInt32(th.MaxConnections),
			MaxPendingRequests: wrapperspb.UInt32(th.MaxPendingRequests),
			MaxRequests:        wrapperspb.UInt32(th.MaxRequests),
			MaxRetries:         wrapperspb.UInt32(th.MaxRetries),
		})
	}
	for _, h := range hostsByPriority(c) {
		a := h.Address()
		addr := &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
			Address: a.Addr().String(), PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: uint32(a.Port())}}}}
		if p := h.Pipe(); p != "" {
			addr = &corev3.Address{Address: &corev3.Address_Pipe{Pipe: &corev3.Pipe{Path: p}}}
		}
		hs := &adminv3.HostStatus{
			Address:      addr,
			HealthStatus: &adminv3.HostHealthStatus{EdsHealthStatus: h.HealthStatus()},
			Weight:       h.Weight(),
			Hostname:     h.Hostname(),
			Priority:     h.Priority(),
			// Envoy sets the locality whether or not it has a field set
			// (MergeFrom of the host's locality), so readers find "locality": {}.
			Locality: &corev3.Locality{Region: h.Region(), Zone: h.Zone(), SubZone: h.SubZone()},
		}
		if sr := h.SuccessRate(); sr >= 0 {
			hs.SuccessRate = &typev3.Percent{Value: sr}
		}
		// Envoy lists a host's counters, then its gauges (host->counters(),
		// host->gauges()), each in name order.
		for _, gauges := range []bool{false, true} {
			for _, st := range h.Stats() {
				if st.Gauge != gauges {
					continue
				}
				t := adminv3.SimpleMetric_COUNTER
				if st.Gauge {
					t = adminv3.SimpleMetric_GAUGE
				}
				hs.Stats = append(hs.Stats, &adminv3.SimpleMetric{Name: st.Name, Value: st.Value, Type: t})
			}
		}
		cs.HostStatuses = append(cs.HostStatuses, hs)
	}
	return cs
}

// hostsByPriority is the order Envoy's /clusters lists hosts in: by
// priority level (it walks the priority set's host sets, 0 first), in
// configuration order within one.
func hostsByPriority(c *cluster.Cluster) []*cluster.Host {
	hs := c.Hosts()
	sort.SliceStable(hs, func(i, j int) bool { return hs[i].Priority() < hs[j].Priority() })
	return hs
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

func (s *Server) ready(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=UTF-8")
	st := s.state()
	if st != adminv3.ServerInfo_LIVE {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	fmt.Fprintln(w, st.String())
	if st == adminv3.ServerInfo_INITIALIZING && s.Waiting != nil {
		if why := s.Waiting(); why != "" {
			fmt.Fprintln(w, why)
		}
	}
}

// state is Envoy's server state: PRE_INITIALIZING before any snapshot,
// INITIALIZING until the first configuration is in force, DRAINING while health checks are failed.
func (s *Server) state() adminv3.ServerInfo_State {
	switch {
	case s.D.Snapshot() == nil:
		return adminv3.ServerInfo_PRE_INITIALIZING
	case s.Initialized != nil && !s.Initialized():
		return adminv3.ServerInfo_INITIALIZING
	case s.healthFailed.Load():
		return adminv3.ServerInfo_DRAINING
	}
	return adminv3.ServerInfo_LIVE
}

func (s *Server) serverInfo(w http.ResponseWriter, r *http.Request) {
	up := time.Since(s.Start)
	writeProto(w, &adminv3.ServerInfo{
		Version:            "meshtun",
		State:              s.state(),
		UptimeCurrentEpoch: durationpb.New(up.Truncate(time.Second)),
		UptimeAllEpochs:    durationpb.New(up.Truncate(time.Second)),
		CommandLineOptions: &adminv3.CommandLineOptions{Concurrency: uint32(max(1, s.Concurrency))},
	})
}
