package httpconn

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync/atomic"
	"time"

	accesslogv3 "github.com/envoyproxy/go-control-plane/envoy/config/accesslog/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"

	"github.com/meshtun/meshtun/mesh/cluster"
	"github.com/meshtun/meshtun/mesh/tlsctx"
)

// Envoy's defaults for the connection manager.
const (
	DefaultStreamIdleTimeout = 5 * time.Minute
	DefaultIdleTimeout       = time.Hour // common_http_protocol_options.idle_timeout
	DefaultMaxHeadersKB      = 60        // max_request_headers_kb
	DefaultMaxHeadersCount   = 100       // common_http_protocol_options.max_headers_count

	// HTTP/2 downstream (http2_protocol_options). Envoy's own default for
	// max_concurrent_streams is 2^31-1, which its premature-reset
	// detection alone cannot bound: a client holding streams open (a
	// zero flow-control window) would cost a goroutine and a stream each.
	// meshtun's default bounds them per connection, and still serves a
	// thousand concurrent gRPC calls on one connection. The windows are
	// Go's defaults (Envoy's 256 MiB would let one connection buffer that
	// much before the proxy reads it).
	DefaultMaxConcurrentStreams = 1024
	DefaultInitialStreamWindow  = 1 << 20 // initial_stream_window_size
	DefaultInitialConnWindow    = 1 << 20 // initial_connection_window_size
	DefaultServerName           = "envoy"
)

// Env is what the engine needs from the proxy's current configuration.
// Each call is made per request, so an RDS or CDS update applies to the
// next request of a connection already open (as in Envoy).
type Env interface {
	// Routes returns the RouteConfiguration delivered by RDS under name,
	// nil if unknown (the request gets 404 with flag NR, as Envoy).
	Routes(name string) *Routes
	// Cluster returns a cluster by name, nil if unknown (503 NC).
	Cluster(name string) *cluster.Cluster
	// ClusterHTTP returns the cluster's upstream HTTP options
	// (cluster.ParseHTTPOptions of its proto, computed once per update).
	ClusterHTTP(name string) cluster.HTTPOptions
	// Pools returns the proxy's upstream connection pools.
	Pools() *Pools
}

// ConnInfo describes the downstream connection Serve runs on.
type ConnInfo struct {
	Peer  netip.AddrPort // the downstream client (original source)
	Local netip.AddrPort // the original destination (ORIGINAL_DST clusters dial it)
	// AccessLog, if set, receives one Entry per finished request.
	AccessLog func(Entry)
	// Draining, if set, is done when the connection's listener starts
	// draining (removed or changed by an update, /drain_listeners, the
	// proxy terminating): the connection is then asked to close (see
	// Serve). Its end, the drain period being over, is Serve's ctx.
	Draining context.Context
	// SNI is the TLS server name the listener saw (requested_server_name).
	SNI string
	// TLS is the connection's TLS state when its filter chain terminated
	// TLS, nil on plaintext. A peer certificate in it was verified by the
	// handshake: it is the client's identity, which x-forwarded-client-cert
	// carries on (forward_client_cert_details) and x-forwarded-proto says
	// "https" for.
	TLS *tls.ConnectionState
	// LocalURISAN is the first URI SAN of the certificate the proxy
	// presented on this connection (XFCC's By=), "" when none.
	LocalURISAN string
	// TLSPeer is the client's verified identity (from TLS), nil when it
	// presented no certificate. Filters find it through the request's
	// context (ConnInfoFrom): the principal RBAC matches.
	TLSPeer *tlsctx.Peer
}

type connInfoKey struct{}

func withConnInfo(ctx context.Context, info *ConnInfo) context.Context {
	return context.WithValue(ctx, connInfoKey{}, info)
}

// ConnInfoFrom is the downstream connection a request came on, from the
// request's context (or one derived from it): its addresses and, over
// TLS, who the client is. Nil outside a request Serve runs.
func ConnInfoFrom(ctx context.Context) *ConnInfo {
	info, _ := ctx.Value(connInfoKey{}).(*ConnInfo)
	return info
}

// http2Options are the downstream http2_protocol_options meshtun honours.
type http2Options struct {
	maxStreams   int
	streamWindow int
	connWindow   int
}

// codec is the downstream codec_type.
type codec uint8

const (
	codecAuto codec = iota
	codecHTTP1
	codecHTTP2
)

// Config is a validated envoy.filters.network.http_connection_manager.
// It is immutable and shared by every connection of its filter chain.
type Config struct {
	StatPrefix string

	codec                 codec
	rdsName               string
	routes                *Routes // inline route_config
	filters               httpFilters
	streamIdleTimeout     time.Duration
	requestTimeout        time.Duration
	requestHeadersTimeout time.Duration
	idleTimeout           time.Duration
	maxStreamDuration     time.Duration // common_http_protocol_options.max_stream_duration; 0: none
	maxHeaderBytes        int
	maxHeadersCount       int
	h2                    http2Options
	allowChunkedLength    bool // http_protocol_options.allow_chunked_length
	useRemoteAddress      bool
	xffTrustedHops        uint32
	skipXFFAppend         bool
	serverName            string
	serverVals            []string // {serverName}, shared by every response (len == cap: an append copies)
	serverTransform       hcmv3.HttpConnectionManager_ServerHeaderTransformation
	generateRequestID     bool
	preserveExternalID    bool
	alwaysSetRequestID    bool
	stripAnyHostPort      bool
	stripMatchingHostPort bool
	accessLog             bool     // access_log has a logger meshtun writes (writesAccessLog)
	paths                 pathNorm // normalize_path, merge_slashes, path_with_escaped_slashes_action
	xfcc                  xfccConfig
	upgrades              upgrades // upgrade_configs (upgrade.go)
	allowConnect          bool     // http2_protocol_options.allow_connect: RFC 8441 upgrades

	stats *Stats
}

// Stats are the connection manager's http.<stat_prefix>.* counters.
type Stats struct {
	DownstreamCxTotal      atomic.Uint64
	DownstreamCxActive     atomic.Int64
	DownstreamCxHTTP1Total atomic.Uint64
	DownstreamCxHTTP2Total atomic.Uint64
	DownstreamRqTotal      atomic.Uint64
	DownstreamRqActive     atomic.Int64
	DownstreamRqHTTP1Total atomic.Uint64
	DownstreamRqHTTP2Total atomic.Uint64
	DownstreamRq2xx        atomic.Uint64
	DownstreamRq3xx        atomic.Uint64
	DownstreamRq4xx        atomic.Uint64
	DownstreamRq5xx        atomic.Uint64
	DownstreamRqTimeout    atomic.Uint64 // request_timeout fired
	DownstreamRqIdle       atomic.Uint64 // downstream_rq_idle_timeout
	// DownstreamRqHeaderTimeout counts requests answered 408 by
	// request_headers_timeout (downstream_rq_header_timeout).
	DownstreamRqHeaderTimeout atomic.Uint64
	// PrematureResets counts connections closed for too many streams
	// reset by the client right after they began
	// (downstream_rq_too_many_premature_resets).
	PrematureResets atomic.Uint64
	// DownstreamRqMaxDurationReached counts streams ended by their max
	// stream duration (downstream_rq_max_duration_reached).
	DownstreamRqMaxDurationReached atomic.Uint64
	// DownstreamCxUpgradesTotal and DownstreamCxUpgradesActive count
	// upgraded (WebSocket) connections: downstream_cx_upgrades_*.
	DownstreamCxUpgradesTotal  atomic.Uint64
	DownstreamCxUpgradesActive atomic.Int64
	NoRoute                    atomic.Uint64 // no_route
	NoCluster                  atomic.Uint64 // no_cluster
	RqRedirect                 atomic.Uint64 // rq_redirect
	RqDirectResponse           atomic.Uint64 // rq_direct_response
	FaultAborts                atomic.Uint64 // fault.aborts_injected
	FaultDelays                atomic.Uint64 // fault.delays_injected
	// FailedPathNormalization counts requests answered 400 by path
	// handling (downstream_rq_failed_path_normalization).
	FailedPathNormalization atomic.Uint64
	// RedirectedWithNormalizedPath counts UNESCAPE_AND_REDIRECT redirects
	// (downstream_rq_redirected_with_normalized_path).
	RedirectedWithNormalizedPath atomic.Uint64
}

// List returns the stats with Envoy's names relative to the
// http.<stat_prefix>. scope.
func (s *Stats) List() []cluster.Stat {
	g := func(v int64) uint64 {
		if v < 0 {
			return 0
		}
		return uint64(v)
	}
	return []cluster.Stat{
		{Name: "downstream_cx_active", Value: g(s.DownstreamCxActive.Load()), Gauge: true},
		{Name: "downstream_cx_http1_total", Value: s.DownstreamCxHTTP1Total.Load()},
		{Name: "downstream_cx_http2_total", Value: s.DownstreamCxHTTP2Total.Load()},
		{Name: "downstream_cx_total", Value: s.DownstreamCxTotal.Load()},
		{Name: "downstream_cx_upgrades_active", Value: g(s.DownstreamCxUpgradesActive.Load()), Gauge: true},
		{Name: "downstream_cx_upgrades_total", Value: s.DownstreamCxUpgradesTotal.Load()},
		{Name: "downstream_rq_2xx", Value: s.DownstreamRq2xx.Load()},
		{Name: "downstream_rq_3xx", Value: s.DownstreamRq3xx.Load()},
		{Name: "downstream_rq_4xx", Value: s.DownstreamRq4xx.Load()},
		{Name: "downstream_rq_5xx", Value: s.DownstreamRq5xx.Load()},
		{Name: "downstream_rq_active", Value: g(s.DownstreamRqActive.Load()), Gauge: true},
		{Name: "downstream_rq_failed_path_normalization", Value: s.FailedPathNormalization.Load()},
		{Name: "downstream_rq_header_timeout", Value: s.DownstreamRqHeaderTimeout.Load()},
		{Name: "downstream_rq_http1_total", Value: s.DownstreamRqHTTP1Total.Load()},
		{Name: "downstream_rq_http2_total", Value: s.DownstreamRqHTTP2Total.Load()},
		{Name: "downstream_rq_idle_timeout", Value: s.DownstreamRqIdle.Load()},
		{Name: "downstream_rq_max_duration_reached", Value: s.DownstreamRqMaxDurationReached.Load()},
		{Name: "downstream_rq_redirected_with_normalized_path", Value: s.RedirectedWithNormalizedPath.Load()},
		{Name: "downstream_rq_timeout", Value: s.DownstreamRqTimeout.Load()},
		{Name: "downstream_rq_too_many_premature_resets", Value: s.PrematureResets.Load()},
		{Name: "downstream_rq_total", Value: s.DownstreamRqTotal.Load()},
		{Name: "fault.aborts_injected", Value: s.FaultAborts.Load()},
		{Name: "fault.delays_injected", Value: s.FaultDelays.Load()},
		{Name: "no_cluster", Value: s.NoCluster.Load()},
		{Name: "no_route", Value: s.NoRoute.Load()},
		{Name: "rq_direct_response", Value: s.RqDirectResponse.Load()},
		{Name: "rq_redirect", Value: s.RqRedirect.Load()},
	}
}

func (s *Stats) countCode(code int) {
	switch code / 100 {
	case 2:
		s.DownstreamRq2xx.Add(1)
	case 3:
		s.DownstreamRq3xx.Add(1)
	case 4:
		s.DownstreamRq4xx.Add(1)
	case 5:
		s.DownstreamRq5xx.Add(1)
	}
}

// Stats returns the connection manager's counters.
func (c *Config) Stats() *Stats { return c.stats }

// RDSName is rds.route_config_name, "" when route_config is inline.
func (c *Config) RDSName() string { return c.rdsName }

// InlineRoutes is the compiled inline route_config (nil with RDS).
func (c *Config) InlineRoutes() *Routes { return c.routes }

// HasAccessLog reports whether the HCM's access_log asks for one entry per
// request, as Envoy writes one only through the connection manager's own
// access_log: without one, the caller passes no ConnInfo.AccessLog and a
// request costs no entry. See writesAccessLog for the loggers that count.
func (c *Config) HasAccessLog() bool { return c.accessLog }

// Access loggers that write meshtun's access log: Envoy's file logger
// (Istio's meshConfig.accessLogFile, usually /dev/stdout) and the stream
// loggers (stdout, stderr). meshtun has one access log, written with
// Istio's JSON field names where its log goes, so the file's path and
// log_format are not honoured, nor access_log filters; loggers it cannot
// deliver to (gRPC ALS, OpenTelemetry) write nothing.
var accessLoggerNames = map[string]bool{
	"envoy.access_loggers.file":   true,
	"envoy.file_access_log":       true, // Envoy's deprecated name
	"envoy.access_loggers.stdout": true,
	"envoy.access_loggers.stderr": true,
	"envoy.access_loggers.stream": true,
}

var accessLoggerTypes = map[string]bool{
	"type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog":     true,
	"type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog": true,
	"type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StderrAccessLog": true,
}

// writesAccessLog reports whether access_log holds a logger meshtun
// writes, recognised by its typed_config type (which decides in Envoy) or,
// when the config is untyped or a TypedStruct wrapper, by its name.
func writesAccessLog(als []*accesslogv3.AccessLog) bool {
	for _, al := range als {
		switch u := al.GetTypedConfig().GetTypeUrl(); u {
		case "", "type.googleapis.com/udpa.type.v1.TypedStruct", "type.googleapis.com/xds.type.v3.TypedStruct":
		default:
			if accessLoggerTypes[u] {
				return true
			}
			continue
		}
		if accessLoggerNames[al.GetName()] {
			return true
		}
	}
	return false
}

// SkippedFilters are the HTTP filters accepted and not run.
func (c *Config) SkippedFilters() []string {
	return append(append([]string(nil), c.filters.noOps...), c.filters.skippedOptions...)
}

// ParseHCM validates an HttpConnectionManager. Errors name the field from
// "http_connection_manager." down, e.g.
// "http_connection_manager.route_config.virtual_hosts[1].routes[0].route: …".
func ParseHCM(hcm *hcmv3.HttpConnectionManager) (*Config, error) {
	c, err := parseHCM(hcm)
	if err != nil {
		return nil, at("http_connection_manager", err)
	}
	return c, nil
}

func parseHCM(h *hcmv3.HttpConnectionManager) (c *Config, err error) {
	if h == nil {
		return nil, errors.New("missing")
	}
	if err := h.ValidateAll(); err != nil {
		return nil, err
	}
	c = &Config{
		StatPrefix:        h.GetStatPrefix(),
		streamIdleTimeout: DefaultStreamIdleTimeout,
		idleTimeout:       DefaultIdleTimeout,
		maxHeaderBytes:    DefaultMaxHeadersKB << 10,
		maxHeadersCount:   DefaultMaxHeadersCount,
		h2:                http2Options{DefaultMaxConcurrentStreams, DefaultInitialStreamWindow, DefaultInitialConnWindow},
		useRemoteAddress:  h.GetUseRemoteAddress().GetValue(),
		xffTrustedHops:    h.GetXffNumTrustedHops(),
		skipXFFAppend:     h.GetSkipXffAppend(),
		serverName:        h.GetServerName(),
		serverTransform:   h.GetServerHeaderTransformation(),
		generateRequestID: true,
		stripAnyHostPort:  h.GetStripAnyHostPort(),
		accessLog:         writesAccessLog(h.GetAccessLog()),
		stats:             &Stats{},
	}
	c.stripMatchingHostPort = h.GetStripMatchingHostPort()
	c.preserveExternalID = h.GetPreserveExternalRequestId()
	c.alwaysSetRequestID = h.GetAlwaysSetRequestIdInResponse()
	if c.serverName == "" {
		c.serverName = DefaultServerName
	}
	c.serverVals = []string{c.serverName}
	if v := h.GetGenerateRequestId(); v != nil {
		c.generateRequestID = v.GetValue()
	}
	switch h.GetCodecType() {
	case hcmv3.HttpConnectionManager_AUTO:
		c.codec = codecAuto
	case hcmv3.HttpConnectionManager_HTTP1:
		c.codec = codecHTTP1
	case hcmv3.HttpConnectionManager_HTTP2:
		c.codec = codecHTTP2
	default:
		return nil, fieldf("codec_type", "%s not supported", h.GetCodecType())
	}
	if d := h.GetStreamIdleTimeout(); d != nil {
		c.streamIdleTimeout = d.AsDuration() // 0 disables
	}
	if d := h.GetRequestTimeout(); d != nil {
		c.requestTimeout = d.AsDuration()
	}
	if d := h.GetRequestHeadersTimeout(); d != nil {
		c.requestHeadersTimeout = d.AsDuration()
	}
	if d := h.GetCommonHttpProtocolOptions().GetIdleTimeout(); d != nil {
		c.idleTimeout = d.AsDuration()
	}
	c.maxStreamDuration = h.GetCommonHttpProtocolOptions().GetMaxStreamDuration().AsDuration()
	if v := h.GetMaxRequestHeadersKb(); v != nil {
		c.maxHeaderBytes = int(v.GetValue()) << 10
	}
	if v := h.GetCommonHttpProtocolOptions().GetMaxHeadersCount(); v != nil {
		c.maxHeadersCount = int(v.GetValue()) // validated >= 1
	}
	// Validated ranges: streams >= 1, windows 65535..2^31-1.
	if o := h.GetHttp2ProtocolOptions(); o != nil {
		if v := o.GetMaxConcurrentStreams(); v != nil {
			c.h2.maxStreams = int(v.GetValue())
		}
		if v := o.GetInitialStreamWindowSize(); v != nil {
			c.h2.streamWindow = int(v.GetValue())
		}
		if v := o.GetInitialConnectionWindowSize(); v != nil {
			c.h2.connWindow = int(v.GetValue())
		}
	}
	c.allowChunkedLength = h.GetHttpProtocolOptions().GetAllowChunkedLength()
	// Path handling, applied before routing (pathNorm.apply). Unset
	// normalize_path is false (Envoy's runtime default for
	// http_connection_manager.normalize_path is 0%); Istio sets it true.
	c.paths = pathNorm{
		normalize:      h.GetNormalizePath().GetValue(),
		mergeSlashes:   h.GetMergeSlashes(),
		escapedSlashes: h.GetPathWithEscapedSlashesAction(),
	}
	switch a := h.GetPathWithEscapedSlashesAction(); a {
	case hcmv3.HttpConnectionManager_IMPLEMENTATION_SPECIFIC_DEFAULT, hcmv3.HttpConnectionManager_KEEP_UNCHANGED,
		hcmv3.HttpConnectionManager_REJECT_REQUEST, hcmv3.HttpConnectionManager_UNESCAPE_AND_REDIRECT,
		hcmv3.HttpConnectionManager_UNESCAPE_AND_FORWARD:
	default:
		return nil, fieldf("path_with_escaped_slashes_action", "unknown action %d; valid: KEEP_UNCHANGED, REJECT_REQUEST, UNESCAPE_AND_REDIRECT, UNESCAPE_AND_FORWARD", int32(a))
	}
	xfcc, err := parseXFCC(h)
	if err != nil {
		return nil, err
	}
	c.xfcc = xfcc
	if h.GetScopedRoutes() != nil {
		return nil, fieldf("scoped_routes", "not supported (use rds or route_config)")
	}
	if h.GetHttp3ProtocolOptions() != nil {
		return nil, fieldf("http3_protocol_options", "HTTP/3 is not supported")
	}
	if len(h.GetOriginalIpDetectionExtensions()) > 0 {
		return nil, fieldf("original_ip_detection_extensions", "not supported")
	}
	switch {
	case h.GetRds() != nil:
		c.rdsName = h.GetRds().GetRouteConfigName()
		if c.rdsName == "" {
			return nil, fieldf("rds.route_config_name", "empty")
		}
	case h.GetRouteConfig() != nil:
		rt, err := CompileRoutes(h.GetRouteConfig())
		if err != nil {
			return nil, at("route_config", err)
		}
		c.routes = rt
	default:
		return nil, fieldf("route_specifier", "want rds or route_config")
	}
	c.allowConnect = h.GetHttp2ProtocolOptions().GetAllowConnect()
	if c.upgrades, err = parseHCMUpgrades(h.GetUpgradeConfigs()); err != nil {
		return nil, err
	}
	f, err := parseHTTPFilters(h.GetHttpFilters(), c.StatPrefix)
	if err != nil {
		return nil, err
	}
	c.filters = f
	return c, nil
}

// hostname is %HOSTNAME%.
var hostname, _ = os.Hostname()

// fieldError is an error at a field path such as
// "virtual_hosts[1].routes[0].route"; at() prepends the enclosing field.
type fieldError struct {
	path string
	err  error
}

func (e *fieldError) Error() string { return e.path + ": " + e.err.Error() }
func (e *fieldError) Unwrap() error { return e.err }

// at places err under field: "field.inner.path: msg", or "field: msg"
// when err names no field.
func at(field string, err error) error {
	if err == nil {
		return nil
	}
	var fe *fieldError
	if errors.As(err, &fe) && fe == err {
		sep := "."
		if fe.path == "" || fe.path[0] == '[' {
			sep = ""
		}
		return &fieldError{field + sep + fe.path, fe.err}
	}
	return &fieldError{field, err}
}

// fieldf is a leaf error at field.
func fieldf(field, format string, args ...any) error {
	return &fieldError{field, fmt.Errorf(format, args...)}
}

// ShareStats makes c count into s: the proxy gives every connection
// manager with the same stat_prefix one Stats, kept across configuration
// updates, as Envoy's stat scopes are. Call before c serves.
func (c *Config) ShareStats(s *Stats) { c.stats = s }
