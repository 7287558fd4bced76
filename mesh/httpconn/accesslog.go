package httpconn

import (
	"net/netip"
	"strings"
	"time"
)

// Entry is what is known about one request when it ends: the fields of
// Envoy's default access log format (Istio's JSON names in comments).
type Entry struct {
	Start     time.Time
	Method    string // method
	Path      string // path: the original :path (x-envoy-original-path)
	Authority string // authority
	Protocol  string // protocol: "HTTP/1.1" or "HTTP/2"
	RequestID string // request_id
	UserAgent string // user_agent
	XFF       string // x_forwarded_for

	ResponseCode        int    // response_code (0: no response sent)
	ResponseFlags       Flags  // response_flags
	ResponseCodeDetails string // response_code_details
	RouteName           string // route_name
	UpstreamCluster     string // upstream_cluster
	UpstreamHost        netip.AddrPort
	DownstreamPeer      netip.AddrPort // downstream_remote_address
	DownstreamLocal     netip.AddrPort // downstream_local_address
	// DownstreamPeerURISAN is the client certificate's first URI SAN on
	// a TLS connection (downstream_peer_uri_san), "" otherwise.
	DownstreamPeerURISAN string
	BytesReceived        int64         // bytes_received: request body
	BytesSent            int64         // bytes_sent: response body
	Duration             time.Duration // duration: start to last byte sent
	UpstreamServiceTime  time.Duration // upstream_service_time: last attempt's request to response headers
	Attempts             int           // upstream_request_attempt_count
	// UpstreamPeerURISAN is the TLS upstream's certificate's first URI
	// SAN (upstream_peer_uri_san); UpstreamTransportFailureReason why the
	// last attempt's TLS handshake failed (upstream_transport_failure_reason).
	UpstreamPeerURISAN             string
	UpstreamTransportFailureReason string
}

// Flags is a set of Envoy response flags.
type Flags uint32

// Response flags, named as Envoy's %RESPONSE_FLAGS%.
const (
	FlagNR  Flags = 1 << iota // no route
	FlagNC                    // no cluster
	FlagUH                    // no healthy upstream
	FlagUF                    // upstream connection failure
	FlagUO                    // upstream overflow (circuit breaker)
	FlagURX                   // upstream retry limit exceeded
	FlagDC                    // downstream connection termination
	FlagUT                    // upstream request timeout
	FlagUC                    // upstream connection termination
	FlagUR                    // upstream remote reset
	FlagDPE                   // downstream protocol error
	FlagSI                    // stream idle timeout
	FlagFI                    // fault injected abort
	FlagDI                    // fault injected delay
	FlagUPE                   // upstream protocol error
	FlagDT                    // max stream duration reached
)

var flagNames = [...]string{"NR", "NC", "UH", "UF", "UO", "URX", "DC", "UT", "UC", "UR", "DPE", "SI", "FI", "DI", "UPE", "DT"}

// String renders the flags as Envoy does: comma-separated, "-" when none.
func (f Flags) String() string {
	if f == 0 {
		return "-"
	}
	var b strings.Builder
	for i, n := range flagNames {
		if f&(1<<i) != 0 {
			if b.Len() > 0 {
				b.WriteByte(',')
			}
			b.WriteString(n)
		}
	}
	return b.String()
}

// Has reports whether every flag of g is set.
func (f Flags) Has(g Flags) bool { return f&g == g }

func addrString(a netip.AddrPort) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}
