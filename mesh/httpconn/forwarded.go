package httpconn

import (
	"math/rand/v2"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
)

// prepareHeaders applies the connection manager's request edits that do
// not depend on the route: x-request-id, x-forwarded-for/-proto,
// x-forwarded-client-cert, Istio's peer metadata headers out, host port
// stripping.
func (s *stream) prepareHeaders() {
	r, cfg := s.r, s.cfg
	h := r.Header
	if vs := h["X-Request-Id"]; len(vs) > 0 && vs[0] != "" {
		s.e.RequestID = vs[0]
	} else if cfg.generateRequestID {
		s.e.RequestID = newUUID()
		h["X-Request-Id"] = []string{s.e.RequestID}
	}
	s.internal = cfg.mutateForwarded(h, s.h.info.Peer.Addr(), s.h.info.TLS != nil)
	s.mutateXFCC(h)
	stripPeerMetadata(h)
	if vs := h["X-Forwarded-For"]; len(vs) > 0 {
		s.e.XFF = vs[0]
	}
	switch {
	case cfg.stripAnyHostPort:
		r.Host = stripPort(r.Host)
	case cfg.stripMatchingHostPort && s.h.info.Local.IsValid():
		if p := strings.TrimPrefix(r.Host[len(stripPort(r.Host)):], ":"); p == strconv.Itoa(int(s.h.info.Local.Port())) {
			r.Host = stripPort(r.Host)
		}
	}
}

// mutateForwarded applies Envoy's x-forwarded-for, x-forwarded-proto,
// x-envoy-external-address and x-envoy-internal rules
// (config_http_conn_man_headers_x-forwarded-for) for a request from peer:
//
//   - The trusted client address: with use_remote_address, the peer, or
//     with xff_num_trusted_hops N > 0 the N-th XFF address from the right;
//     without, the (N+1)-th from the right (the peer if XFF is shorter).
//   - The request is internal, with use_remote_address, iff it has no XFF
//     and the peer is internal (RFC 1918, RFC 4193, loopback); without, iff
//     XFF is one internal address. x-envoy-internal: true is set on
//     internal requests and removed from external ones.
//   - Only with use_remote_address is XFF appended to (the peer, unless
//     skip_xff_append) and x-envoy-external-address set, to the trusted
//     client address of an external request; x-forwarded-proto is then
//     overwritten ("https" when the downstream connection is TLS, else
//     "http") unless a trusted hop (N > 0) set it. Otherwise XFF is left
//     as it came and x-forwarded-proto only added when missing.
//   - A request that is not internal loses the x-envoy-* headers that
//     steer Envoy (cleanInternalHeaders): a client outside must not pick
//     its own retries or timeouts.
//
// It reports whether the request is internal. Without XFF and
// use_remote_address (a mesh sidecar's usual request) it allocates
// nothing.
func (c *Config) mutateForwarded(h http.Header, peer netip.Addr, tls bool) (internal bool) {
	n := int(c.xffTrustedHops)
	scheme := "http"
	if tls {
		scheme = "https"
	}
	var xff string
	switch vs := h["X-Forwarded-For"]; len(vs) {
	case 0:
	case 1:
		xff = vs[0]
	default:
		xff = strings.Join(vs, ",")
	}
	if c.useRemoteAddress {
		internal = xff == "" && peer.IsValid() && isInternalAddr(peer)
		if !internal {
			trusted := ""
			if n > 0 {
				trusted, _ = xffFromRight(xff, n)
			}
			if trusted == "" && peer.IsValid() {
				trusted = peer.Unmap().String()
			}
			if trusted != "" {
				h["X-Envoy-External-Address"] = []string{trusted}
			}
		}
		if !c.skipXFFAppend && peer.IsValid() {
			ip := peer.Unmap().String()
			if xff != "" {
				ip = xff + "," + ip
			}
			h["X-Forwarded-For"] = []string{ip}
		}
		if _, ok := h["X-Forwarded-Proto"]; n == 0 || !ok {
			h["X-Forwarded-Proto"] = schemeValues(scheme)
		}
	} else {
		if xff != "" && strings.IndexByte(xff, ',') < 0 {
			a, err := netip.ParseAddr(strings.TrimSpace(xff))
			internal = err == nil && isInternalAddr(a)
		}
		if _, ok := h["X-Forwarded-Proto"]; !ok {
			h["X-Forwarded-Proto"] = schemeValues(scheme)
		}
	}
	if internal {
		h["X-Envoy-Internal"] = trueValues
	} else {
		delete(h, "X-Envoy-Internal")
		cleanInternalHeaders(h, c.useRemoteAddress)
	}
	return internal
}

// cleanInternalHeaders is Envoy's ConnectionManagerUtility::
// cleanInternalHeaders for a request that is not internal: it removes the
// x-envoy-* request headers that tell Envoy (this router, or an Envoy
// further on) how to retry, time out, trace or account the request, which
// only a trusted, internal hop may set; and, for an edge request (edge:
// use_remote_address), the decorator and downstream-service ones. The
// route configuration's internal_only_headers are removed by the stream
// (they depend on the route configuration). One pass over the request's
// keys with a prefix test, so a request without x-envoy-* headers pays a
// few comparisons, not a delete per name.
func cleanInternalHeaders(h http.Header, edge bool) {
	const prefix = "X-Envoy-"
	for k := range h {
		if len(k) <= len(prefix) || k[:len(prefix)] != prefix {
			continue
		}
		switch k[len(prefix):] {
		case "Retriable-Status-Codes", "Retriable-Header-Names",
			"Retry-On", "Retry-Grpc-On", "Max-Retries",
			"Upstream-Alt-Stat-Name",
			"Upstream-Rq-Timeout-Ms", "Upstream-Rq-Per-Try-Timeout-Ms",
			"Upstream-Rq-Timeout-Alt-Response", "Expected-Rq-Timeout-Ms",
			"Force-Trace", "Ip-Tags", "Original-Url", "Hedge-On-Per-Try-Timeout":
			delete(h, k)
		case "Decorator-Operation", "Downstream-Service-Cluster", "Downstream-Service-Node":
			if edge {
				delete(h, k)
			}
		}
	}
}

// xffFromRight returns the n-th (1-based) address of a comma-separated
// XFF from the right, or false if XFF has fewer.
func xffFromRight(xff string, n int) (string, bool) {
	if xff == "" || n < 1 {
		return "", false
	}
	for i := 1; ; i++ {
		j := strings.LastIndexByte(xff, ',')
		if i == n {
			return strings.TrimSpace(xff[j+1:]), true
		}
		if j < 0 {
			return "", false
		}
		xff = xff[:j]
	}
}

// isInternalAddr is Envoy's default internal address test: RFC 1918 and
// RFC 4193 (unique local) addresses and loopback.
func isInternalAddr(a netip.Addr) bool {
	a = a.Unmap()
	return a.IsPrivate() || a.IsLoopback()
}

// newUUID returns a random (version 4) UUID, as Envoy's x-request-id.
func newUUID() string {
	var b [16]byte
	hi, lo := rand.Uint64(), rand.Uint64()
	for i := 0; i < 8; i++ {
		b[i], b[8+i] = byte(hi>>(8*i)), byte(lo>>(8*i))
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	const hex = "0123456789abcdef"
	var out [36]byte
	j := 0
	for i, c := range b {
		if i == 4 || i == 6 || i == 8 || i == 10 {
			out[j] = '-'
			j++
		}
		out[j], out[j+1] = hex[c>>4], hex[c&0xf]
		j += 2
	}
	return string(out[:])
}

// Header values shared by every request that sets them: their slices
// have len == cap, so a header op that appends to one copies it, and
// nothing writes into a header value in place.
var (
	httpValues  = []string{"http"}
	httpsValues = []string{"https"}
	trueValues  = []string{"true"}
)

func schemeValues(scheme string) []string {
	switch scheme {
	case "http":
		return httpValues
	case "https":
		return httpsValues
	}
	return []string{scheme}
}
