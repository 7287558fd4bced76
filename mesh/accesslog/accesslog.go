// Package accesslog writes one line per finished flow, with the field
// names of Istio's JSON access log (Envoy command operators in snake case),
// so tools and people who read Envoy's logs find the same keys.
package accesslog

import (
	"net/netip"
	"time"

	"github.com/rs/zerolog"
)

// Entry is what is known about a flow when it ends.
type Entry struct {
	Transport       string // "tcp" or "udp"
	Direction       string // "outbound" or "inbound"
	Start           time.Time
	DownstreamLocal netip.AddrPort // the original destination
	DownstreamPeer  netip.AddrPort // the original source
	UpstreamHost    netip.AddrPort
	UpstreamLocal   netip.AddrPort
	UpstreamCluster string
	BytesReceived   int64 // from downstream
	BytesSent       int64 // to downstream
	ResponseFlags   string
	Details         string // connection_termination_details / failure reason
	// UpstreamPeerURISAN is the upstream TLS certificate's first URI SAN
	// (its SPIFFE ID), "" over plaintext: upstream_peer_uri_san.
	UpstreamPeerURISAN string
	// UpstreamTransportFailureReason is why the upstream TLS handshake
	// failed (with flag UF): upstream_transport_failure_reason.
	UpstreamTransportFailureReason string
	// DownstreamPeerURISAN is the first URI SAN of the certificate the
	// downstream presented on a TLS chain (downstream_peer_uri_san): the
	// client's SPIFFE identity; "" on plaintext.
	DownstreamPeerURISAN string
	// DownstreamTransportFailureReason says why the downstream TLS
	// handshake failed (downstream_transport_failure_reason).
	DownstreamTransportFailureReason string
	// HTTP is set on the line of one HTTP request.
	HTTP *HTTP
}

// HTTP holds a request's fields, named as Istio's JSON access log.
type HTTP struct {
	Method, Path, Protocol, Authority string
	RequestID, UserAgent, XFF         string
	ResponseCode                      int
	ResponseCodeDetails, RouteName    string
	UpstreamServiceTime               time.Duration
	Attempts                          int
}

// Logger emits entries. The zero value discards them.
type Logger struct {
	l       zerolog.Logger
	enabled bool
	gate    Gate // nil: the logger's own and the global level decide
}

// Gate is a live level the access log follows as well (the admin's
// /logging?access=<level>); entries are written at info.
type Gate interface {
	Allows(zerolog.Level) bool
}

// New returns a Logger writing through l with logger=access.
func New(l zerolog.Logger) *Logger {
	return &Logger{l: l.With().Str("logger", "access").Logger(), enabled: true}
}

// NewGated is New, with entries written only while gate allows info.
func NewGated(l zerolog.Logger, gate Gate) *Logger {
	a := New(l)
	a.gate = gate
	return a
}

// Enabled reports whether Log would write: callers skip building an
// entry per HTTP request when access logging is off (--log-level warn).
func (a *Logger) Enabled() bool {
	return a != nil && a.enabled && a.l.GetLevel() <= zerolog.InfoLevel && zerolog.GlobalLevel() <= zerolog.InfoLevel &&
		(a.gate == nil || a.gate.Allows(zerolog.InfoLevel))
}

// Log writes e at info level.
func (a *Logger) Log(e *Entry) {
	if a == nil || !a.enabled || (a.gate != nil && !a.gate.Allows(zerolog.InfoLevel)) {
		return
	}
	ev := a.l.Info()
	if !ev.Enabled() {
		return
	}
	flags := e.ResponseFlags
	if flags == "" {
		flags = "-"
	}
	ev = ev.Str("transport", e.Transport).
		Str("direction", e.Direction).
		Time("start_time", e.Start).
		Int64("duration", time.Since(e.Start).Milliseconds()).
		Str("downstream_remote_address", addr(e.DownstreamPeer)).
		Str("downstream_local_address", addr(e.DownstreamLocal)).
		Str("upstream_host", addr(e.UpstreamHost)).
		Str("upstream_local_address", addr(e.UpstreamLocal)).
		Str("upstream_cluster", e.UpstreamCluster).
		Int64("bytes_received", e.BytesReceived).
		Int64("bytes_sent", e.BytesSent).
		Str("response_flags", flags)
	if e.Details != "" {
		ev = ev.Str("connection_termination_details", e.Details)
	}
	if e.UpstreamPeerURISAN != "" {
		ev = ev.Str("upstream_peer_uri_san", e.UpstreamPeerURISAN)
	}
	if e.UpstreamTransportFailureReason != "" {
		ev = ev.Str("upstream_transport_failure_reason", e.UpstreamTransportFailureReason)
	}
	if e.DownstreamPeerURISAN != "" {
		ev = ev.Str("downstream_peer_uri_san", e.DownstreamPeerURISAN)
	}
	if e.DownstreamTransportFailureReason != "" {
		ev = ev.Str("downstream_transport_failure_reason", e.DownstreamTransportFailureReason)
	}
	if h := e.HTTP; h != nil {
		ev = ev.Str("method", h.Method).Str("path", h.Path).Str("protocol", h.Protocol).
			Int("response_code", h.ResponseCode).Str("authority", h.Authority).
			Str("request_id", h.RequestID).Str("user_agent", dash(h.UserAgent)).Str("x_forwarded_for", dash(h.XFF)).
			Str("response_code_details", dash(h.ResponseCodeDetails)).Str("route_name", dash(h.RouteName)).
			Int64("upstream_service_time", h.UpstreamServiceTime.Milliseconds()).
			Int("upstream_request_attempt_count", h.Attempts)
	}
	ev.Msg("access")
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func addr(a netip.AddrPort) string {
	if !a.IsValid() {
		return "-"
	}
	return a.String()
}
