package cluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sort"
	"strconv"
	"sync/atomic"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"

	"github.com/meshtun/meshtun/internal/rawsock"
)

// This file holds what an HTTP connection manager needs from a cluster
// beyond tcp_proxy's Connect: picking a host per request (with the hosts a
// retry must avoid), connecting to that host through the same accounting
// as Connect, the cluster's upstream HTTP protocol options, and the
// request-level counters Envoy keeps per cluster.

// HTTPOptionsKey is the typed_extension_protocol_options key of the
// upstream HTTP protocol options.
const HTTPOptionsKey = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

// HTTPProtocol is the protocol an HTTP connection manager speaks to a
// cluster's hosts.
type HTTPProtocol uint8

const (
	// HTTP1 is HTTP/1.1 with keep-alive (Envoy's default).
	HTTP1 HTTPProtocol = iota
	// HTTP2 is cleartext HTTP/2 with prior knowledge (h2c): explicit
	// http2_protocol_options.
	HTTP2
	// DownstreamProtocol uses the downstream request's protocol
	// (use_downstream_protocol_config).
	DownstreamProtocol
)

func (p HTTPProtocol) String() string {
	switch p {
	case HTTP2:
		return "HTTP/2"
	case DownstreamProtocol:
		return "downstream"
	}
	return "HTTP/1.1"
}

// HTTPOptions are a cluster's upstream HTTP settings.
type HTTPOptions struct {
	Protocol HTTPProtocol
	// IdleTimeout closes a pooled connection idle this long
	// (common_http_protocol_options.idle_timeout; Envoy's default 1 h).
	IdleTimeout time.Duration
	// MaxRequestsPerConnection closes a connection after this many
	// requests (0: unlimited).
	MaxRequestsPerConnection uint32
}

// DefaultHTTPOptions are Envoy's defaults: HTTP/1.1, 1 h idle timeout.
var DefaultHTTPOptions = HTTPOptions{Protocol: HTTP1, IdleTimeout: time.Hour}

// ParseHTTPOptions reads the upstream HTTP settings of pb: its
// typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"],
// else the deprecated cluster-level http2_protocol_options. auto_config
// (ALPN) is HTTP/1.1 on cleartext connections, as in Envoy; HTTP/3 is an
// error.
func ParseHTTPOptions(pb *clusterv3.Cluster) (HTTPOptions, error) {
	o := DefaultHTTPOptions
	if pb.GetHttp2ProtocolOptions() != nil {
		o.Protocol = HTTP2
	}
	if v := pb.GetCommonHttpProtocolOptions(); v != nil {
		applyCommon(&o, v.GetIdleTimeout().AsDuration(), v.GetIdleTimeout() != nil, v.GetMaxRequestsPerConnection().GetValue())
	}
	a, ok := pb.GetTypedExtensionProtocolOptions()[HTTPOptionsKey]
	if !ok {
		return o, nil
	}
	field := fmt.Sprintf("typed_extension_protocol_options[%q]", HTTPOptionsKey)
	var hpo httpv3.HttpProtocolOptions
	if err := a.UnmarshalTo(&hpo); err != nil {
		return o, fmt.Errorf("%s: %w", field, err)
	}
	if err := hpo.ValidateAll(); err != nil {
		return o, fmt.Errorf("%s: %w", field, err)
	}
	if v := hpo.GetCommonHttpProtocolOptions(); v != nil {
		applyCommon(&o, v.GetIdleTimeout().AsDuration(), v.GetIdleTimeout() != nil, v.GetMaxRequestsPerConnection().GetValue())
	}
	switch {
	case hpo.GetExplicitHttpConfig() != nil:
		e := hpo.GetExplicitHttpConfig()
		switch {
		case e.GetHttp2ProtocolOptions() != nil:
			o.Protocol = HTTP2
		case e.GetHttp3ProtocolOptions() != nil:
			return o, fmt.Errorf("%s.explicit_http_config.http3_protocol_options: HTTP/3 is not supported", field)
		default:
			o.Protocol = HTTP1
		}
	case hpo.GetUseDownstreamProtocolConfig() != nil:
		d := hpo.GetUseDownstreamProtocolConfig()
		if d.GetHttp3ProtocolOptions() != nil {
			return o, fmt.Errorf("%s.use_downstream_protocol_config.http3_protocol_options: HTTP/3 is not supported", field)
		}
		o.Protocol = DownstreamProtocol
	case hpo.GetAutoConfig() != nil:
		// ALPN needs TLS; on cleartext Envoy's auto pool speaks HTTP/1.1.
		o.Protocol = HTTP1
	}
	return o, nil
}

func applyCommon(o *HTTPOptions, idle time.Duration, idleSet bool, maxReq uint32) {
	if idleSet {
		o.IdleTimeout = idle // 0 disables, as in Envoy
	}
	if maxReq > 0 {
		o.MaxRequestsPerConnection = maxReq
	}
}

// PickHostFor chooses a host for one HTTP request the way Connect does:
// origDst is the downstream connection's original destination (used by
// ORIGINAL_DST clusters), exclude rejects hosts a retry must avoid (Envoy's
// previous_hosts predicate; if every host is rejected one is returned
// anyway). With no host to pick it counts upstream_cx_none_healthy and
// returns ErrNoHealthyUpstream.
func (c *Cluster) PickHostFor(origDst netip.AddrPort, exclude func(*Host) bool) (*Host, error) {
	h := c.pick(origDst, exclude)
	if h == nil {
		c.stats.cxNoneHealthy.Add(1)
		return nil, &c.errNoHealthy
	}
	return h, nil
}

// MembershipVersion changes whenever the cluster's hosts change (EDS, DNS,
// ORIGINAL_DST hosts added or swept; it is membership_change): HTTP
// connection pools compare it on each request, one atomic load, to find
// out when to drop what they keep for hosts that are gone.
func (c *Cluster) MembershipVersion() uint64 { return c.stats.membershipChange.Load() }

// ConnectHost opens a connection to h, a host of this cluster chosen by
// PickHostFor, with Connect's accounting: the default-priority
// max_connections breaker (ErrOverflow, upstream_cx_overflow),
// connect_timeout, cluster and host cx stats, and the capture-bypass
// dialer. HTTP connection pools dial through it so that every pooled
// connection is a counted cluster connection; on ErrOverflow an HTTP
// request waits as pending for ConnectionReleased instead of failing.
// It is ConnectHostFor with no application protocol (a TCP flow).
func (c *Cluster) ConnectHost(ctx context.Context, h *Host) (*UpstreamConn, error) {
	return c.ConnectHostFor(ctx, h, "")
}

// ConnectHostFor is ConnectHost for an application protocol: "" for
// TCP, "http/1.1" or "h2" from an HTTP pool. When the host's transport
// socket (chosen when the host set was built) is TLS, the handshake runs
// after the dial, and connect_timeout bounds both; appProto then selects
// the ALPN list offered. A failed handshake is a connect failure
// (upstream_cx_connect_fail, the host's cx_connect_fail) whose
// ConnectError carries the TransportFailure reason (Envoy's
// upstream_transport_failure_reason; the access log flag is UF).
func (c *Cluster) ConnectHostFor(ctx context.Context, h *Host, appProto string) (*UpstreamConn, error) {
	if h == nil {
		return nil, errors.New("cluster: ConnectHost: nil host")
	}
	res := c.resources[PriorityDefault]
	if !res.cx.tryAcquire() {
		c.stats.cxOverflow.Add(1)
		return nil, &c.errOverflow
	}
	c.stats.cxTotal.Add(1)
	c.stats.cxActive.Add(1)
	h.cxTotal.Add(1)
	h.cxActive.Add(1)

	dctx, cancel := context.WithTimeout(ctx, c.connectTimeout)
	var (
		tc   *net.TCPConn
		conn net.Conn
		err  error
	)
	if h.pipe != "" {
		var uc *net.UnixConn
		if uc, err = c.dialPipe(dctx, h.pipe); err == nil {
			conn = uc
		}
	} else if tc, err = c.dial(dctx, h.addr, c.sourceFor(h.addr.Addr())); err == nil {
		conn = tc
	}
	u := &UpstreamConn{conn: conn, raw: conn, rawTCP: tc, tcp: tc, host: h, c: c, res: res}
	if tc != nil {
		u.rio = rawsock.New(tc)
	}
	var reason string
	if err == nil {
		if tr := c.tr.at(h.meta.Load().ts); tr != nil {
			var sc net.Conn
			if sc, err = tr.Secure(dctx, conn, appProto); err == nil {
				u.secured(sc)
			} else {
				reason = failureReason(err)
				conn.Close()
			}
		}
	}
	timedOut := err != nil && ctx.Err() == nil && (errors.Is(dctx.Err(), context.DeadlineExceeded) || isTimeout(err))
	cancel()
	if err != nil {
		if ctx.Err() == nil {
			c.stats.cxConnectFail.Add(1)
			h.cxConnectFail.Add(1)
			if timedOut {
				c.stats.cxConnectTimeout.Add(1)
			}
		}
		c.released(h, res)
		return nil, &ConnectError{Cluster: c.name, Host: h, Timeout: timedOut, TransportFailure: reason, Err: err}
	}
	return u, nil
}

// HTTPStats are the request-level counters Envoy keeps per cluster under
// cluster.<name>. (upstream_rq_2xx, upstream_rq_timeout, …). The existing
// upstream_rq_total/active, pending and retry counters stay in Stats; these
// complete them for HTTP.
type HTTPStats struct {
	RqCompleted          atomic.Uint64 // upstream_rq_completed
	RqTimeout            atomic.Uint64 // upstream_rq_timeout
	RqPerTryTimeout      atomic.Uint64 // upstream_rq_per_try_timeout
	RqRetrySuccess       atomic.Uint64 // upstream_rq_retry_success
	RqRetryLimitExceeded atomic.Uint64 // upstream_rq_retry_limit_exceeded
	RqRxReset            atomic.Uint64 // upstream_rq_rx_reset
	RqTxReset            atomic.Uint64 // upstream_rq_tx_reset
	CxHTTP1Total         atomic.Uint64 // upstream_cx_http1_total
	CxHTTP2Total         atomic.Uint64 // upstream_cx_http2_total
	// RetryOrShadowAbandoned counts requests whose body outgrew the retry
	// buffer (1 MiB, Envoy's per_connection_buffer_limit_bytes default),
	// so that they went on without retries (retry_or_shadow_abandoned).
	RetryOrShadowAbandoned atomic.Uint64

	class [6]atomic.Uint64   // upstream_rq_1xx … upstream_rq_5xx (index = code/100)
	code  [500]atomic.Uint64 // upstream_rq_<code> for 100…599
}

// CountResponse counts one upstream response by its status code
// (upstream_rq_<code>, upstream_rq_<N>xx, upstream_rq_completed).
func (s *HTTPStats) CountResponse(code int) {
	s.RqCompleted.Add(1)
	if code >= 100 && code < 600 {
		s.class[code/100].Add(1)
		s.code[code-100].Add(1)
	}
}

// Stats returns the counters with Envoy's names, sorted; per-code counters
// appear once used.
func (s *HTTPStats) Stats() []Stat {
	out := []Stat{
		{"upstream_rq_completed", s.RqCompleted.Load(), false},
		{"upstream_rq_timeout", s.RqTimeout.Load(), false},
		{"upstream_rq_per_try_timeout", s.RqPerTryTimeout.Load(), false},
		{"upstream_rq_retry_success", s.RqRetrySuccess.Load(), false},
		{"upstream_rq_retry_limit_exceeded", s.RqRetryLimitExceeded.Load(), false},
		{"upstream_rq_rx_reset", s.RqRxReset.Load(), false},
		{"upstream_rq_tx_reset", s.RqTxReset.Load(), false},
		{"upstream_cx_http1_total", s.CxHTTP1Total.Load(), false},
		{"upstream_cx_http2_total", s.CxHTTP2Total.Load(), false},
		{"retry_or_shadow_abandoned", s.RetryOrShadowAbandoned.Load(), false},
	}
	for i := 1; i < 6; i++ {
		out = append(out, Stat{"upstream_rq_" + strconv.Itoa(i) + "xx", s.class[i].Load(), false})
	}
	for i := range s.code {
		if v := s.code[i].Load(); v > 0 {
			out = append(out, Stat{"upstream_rq_" + strconv.Itoa(i+100), v, false})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// HTTPStats returns the cluster's HTTP request counters, part of its
// Scope (made on first use).
func (c *Cluster) HTTPStats() *HTTPStats {
	if s := c.stats.http.Load(); s != nil {
		return s
	}
	c.stats.http.CompareAndSwap(nil, new(HTTPStats))
	return c.stats.http.Load()
}
