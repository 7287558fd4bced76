package cluster

import (
	"net/netip"
	"sync/atomic"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
)

// Host is one upstream endpoint of a cluster. A Host keeps its identity
// (and so its stats) for as long as its address stays in the cluster: an
// EDS update or DNS refresh that still lists the address reuses the same
// *Host and only replaces its attributes.
type Host struct {
	addr netip.AddrPort
	// pipe is the Unix socket path of a pipe endpoint (STATIC clusters
	// only, such as Istio's sds-grpc and xds-grpc); addr is then zero.
	pipe string
	meta atomic.Pointer[hostMeta]

	cxActive      atomic.Int64
	cxTotal       atomic.Uint64
	cxConnectFail atomic.Uint64
	rqActive      atomic.Int64
	rqTotal       atomic.Uint64
	rqSuccess     atomic.Uint64
	rqError       atomic.Uint64
	rqTimeout     atomic.Uint64

	used atomic.Bool // ORIGINAL_DST: picked since the last cleanup sweep
}

// hostMeta is the part of a host that an update may change. It is
// replaced as a whole, never mutated.
type hostMeta struct {
	hostname              string
	weight                uint32
	region, zone, subZone string
	localityWeight        uint32
	priority              uint32
	health                corev3.HealthStatus
	// The envoy.transport_socket_match labels of the endpoint and of its
	// locality (tsLabels form), and the transport they select in the
	// host's cluster (transports.at), resolved when the set is built.
	tsEndpoint, tsLocality string
	ts                     uint16
}

// coarse health of a host, as Envoy's Host::Health plus the excluded set.
type healthClass uint8

const (
	classHealthy healthClass = iota
	classDegraded
	classUnhealthy
	classExcluded // DRAINING: kept for stats, never picked
)

func classify(s corev3.HealthStatus) healthClass {
	switch s {
	case corev3.HealthStatus_UNHEALTHY, corev3.HealthStatus_TIMEOUT:
		return classUnhealthy
	case corev3.HealthStatus_DRAINING:
		return classExcluded
	case corev3.HealthStatus_DEGRADED:
		return classDegraded
	}
	return classHealthy // UNKNOWN, HEALTHY
}

var defaultMeta = &hostMeta{weight: 1}

func newHost(addr netip.AddrPort, m *hostMeta) *Host {
	h := &Host{addr: addr}
	h.meta.Store(m)
	return h
}

// hostKey identifies a host in a cluster: its IP and port, or its pipe path.
type hostKey struct {
	addr netip.AddrPort
	pipe string
}

func (h *Host) key() hostKey { return hostKey{h.addr, h.pipe} }

// Address is the host's IP and port (zero for a pipe host).
func (h *Host) Address() netip.AddrPort { return h.addr }

// Pipe is the Unix socket path of a pipe host, "" for an IP host.
func (h *Host) Pipe() string { return h.pipe }

// String is the host's address as Envoy prints it in /clusters and logs:
// "ip:port", or the socket path of a pipe host.
func (h *Host) String() string {
	if h.pipe != "" {
		return h.pipe
	}
	return h.addr.String()
}

// Hostname is the endpoint's hostname (for STRICT_DNS the DNS name).
func (h *Host) Hostname() string { return h.meta.Load().hostname }

// Weight is the endpoint's load_balancing_weight (1 by default).
func (h *Host) Weight() uint32 { return h.meta.Load().weight }

// LocalityWeight is the load_balancing_weight of the host's locality
// (0 when unset).
func (h *Host) LocalityWeight() uint32 { return h.meta.Load().localityWeight }

// Region, Zone and SubZone are the host's locality.
func (h *Host) Region() string  { return h.meta.Load().region }
func (h *Host) Zone() string    { return h.meta.Load().zone }
func (h *Host) SubZone() string { return h.meta.Load().subZone }

// Priority is the priority of the host's LocalityLbEndpoints.
func (h *Host) Priority() uint32 { return h.meta.Load().priority }

// HealthStatus is the EDS health status the host was configured with.
func (h *Host) HealthStatus() corev3.HealthStatus { return h.meta.Load().health }

// Healthy reports whether the load balancer may pick the host at its
// priority level (HEALTHY or UNKNOWN).
func (h *Host) Healthy() bool { return classify(h.meta.Load().health) == classHealthy }

// HealthFlags renders the host's health as Envoy's /clusters does:
// "healthy", or the failing flags such as "/failed_eds_health".
func (h *Host) HealthFlags() string {
	switch h.meta.Load().health {
	case corev3.HealthStatus_UNHEALTHY, corev3.HealthStatus_TIMEOUT:
		return "/failed_eds_health"
	case corev3.HealthStatus_DRAINING:
		return "/eds_status_draining"
	case corev3.HealthStatus_DEGRADED:
		return "/degraded_eds_health"
	}
	return "healthy"
}

// Canary is always false (no canary metadata support).
func (h *Host) Canary() bool { return false }

// SuccessRate is -1: no outlier detection, so no success rate.
func (h *Host) SuccessRate() float64 { return -1 }

// ActiveConnections is the host's cx_active gauge.
func (h *Host) ActiveConnections() int64 { return h.cxActive.Load() }

// Stats returns the per-host stats Envoy's /clusters prints, sorted by
// name: cx_active, cx_connect_fail, cx_total, rq_active, rq_error,
// rq_success, rq_timeout, rq_total.
func (h *Host) Stats() []Stat {
	return []Stat{
		{"cx_active", gauge(h.cxActive.Load()), true},
		{"cx_connect_fail", h.cxConnectFail.Load(), false},
		{"cx_total", h.cxTotal.Load(), false},
		{"rq_active", gauge(h.rqActive.Load()), true},
		{"rq_error", h.rqError.Load(), false},
		{"rq_success", h.rqSuccess.Load(), false},
		{"rq_timeout", h.rqTimeout.Load(), false},
		{"rq_total", h.rqTotal.Load(), false},
	}
}

// RequestOutcome is how a request on a host ended, for its rq_* stats.
type RequestOutcome uint8

const (
	RequestSuccess RequestOutcome = iota
	RequestError
	RequestTimeout
)

// BeginRequest counts a request started on the host (rq_total, rq_active).
// Every BeginRequest must be matched by one EndRequest.
func (h *Host) BeginRequest() {
	h.rqTotal.Add(1)
	h.rqActive.Add(1)
}

// EndRequest counts the end of a request started with BeginRequest.
func (h *Host) EndRequest(o RequestOutcome) {
	h.rqActive.Add(-1)
	switch o {
	case RequestSuccess:
		h.rqSuccess.Add(1)
	case RequestTimeout:
		h.rqTimeout.Add(1)
	default:
		h.rqError.Add(1)
	}
}

// load is what LEAST_REQUEST compares: the host's active requests plus
// its active connections (tcp_proxy traffic has connections, no requests).
func (h *Host) load() uint64 {
	return gauge(h.cxActive.Load() + h.rqActive.Load())
}
