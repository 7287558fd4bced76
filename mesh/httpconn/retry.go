package httpconn

import (
	"fmt"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"time"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"

	"github.com/meshtun/meshtun/mesh/cluster"
)

// retryOn is the set of x-envoy-retry-on conditions of a retry policy.
type retryOn uint32

const (
	retry5xx retryOn = 1 << iota
	retryGatewayError
	retryConnectFailure
	retryReset
	retryRetriable4xx
	retryRefusedStream
	retryRetriableStatusCodes
	retryGRPCCancelled
	retryGRPCDeadlineExceeded
	retryGRPCResourceExhausted
	retryGRPCUnavailable
	retryGRPCInternal
	retryResetBeforeRequest
)

var retryOnNames = map[string]retryOn{
	"5xx":                        retry5xx,
	"gateway-error":              retryGatewayError,
	"connect-failure":            retryConnectFailure,
	"reset":                      retryReset,
	"retriable-4xx":              retryRetriable4xx,
	"refused-stream":             retryRefusedStream,
	"retriable-status-codes":     retryRetriableStatusCodes,
	"cancelled":                  retryGRPCCancelled,
	"deadline-exceeded":          retryGRPCDeadlineExceeded,
	"resource-exhausted":         retryGRPCResourceExhausted,
	"unavailable":                retryGRPCUnavailable,
	"internal":                   retryGRPCInternal,
	"reset-before-request":       retryResetBeforeRequest,
	"envoy-ratelimited":          0, // no rate limit filter: never true
	"retriable-headers":          0,
	"http3-post-connect-failure": 0,
}

// retryPolicy is a compiled route.v3.RetryPolicy.
type retryPolicy struct {
	on            retryOn
	numRetries    int
	perTry        time.Duration
	previousHosts bool
	codes         []int
	base, max     time.Duration
}

const previousHostsPredicate = "envoy.retry_host_predicates.previous_hosts"

// Envoy's retry defaults: one retry, back-off from 25 ms up to 10× that.
const (
	defaultNumRetries = 1
	defaultRetryBase  = 25 * time.Millisecond
)

func compileRetry(p *routev3.RetryPolicy, field string) (*retryPolicy, error) {
	rp := &retryPolicy{numRetries: defaultNumRetries, base: defaultRetryBase}
	for _, tok := range strings.Split(p.GetRetryOn(), ",") {
		tok = strings.TrimSpace(tok)
		if tok == "" {
			continue
		}
		bit, ok := retryOnNames[tok]
		if !ok {
			return nil, fieldf(field+".retry_on", "unknown condition %q", tok)
		}
		rp.on |= bit
	}
	if v := p.GetNumRetries(); v != nil {
		rp.numRetries = int(v.GetValue())
	}
	if d := p.GetPerTryTimeout(); d != nil {
		rp.perTry = d.AsDuration()
	}
	for i, hp := range p.GetRetryHostPredicate() {
		url := typeURLOf(hp.GetTypedConfig())
		if hp.GetName() == previousHostsPredicate || strings.HasSuffix(url, "previous_hosts.v3.PreviousHostsPredicate") {
			rp.previousHosts = true
			continue
		}
		return nil, fieldf(fmt.Sprintf("%s.retry_host_predicate[%d]", field, i), "%q not supported (only %s)", hp.GetName(), previousHostsPredicate)
	}
	for _, c := range p.GetRetriableStatusCodes() {
		rp.codes = append(rp.codes, int(c))
	}
	if b := p.GetRetryBackOff(); b != nil {
		rp.base = max(b.GetBaseInterval().AsDuration(), time.Millisecond)
		if b.GetMaxInterval() != nil {
			rp.max = max(b.GetMaxInterval().AsDuration(), time.Millisecond)
			if rp.max < rp.base {
				return nil, fieldf(field+".retry_back_off.max_interval", "must be greater than or equal to the base_interval")
			}
		}
	}
	if rp.max == 0 {
		rp.max = 10 * rp.base
	}
	switch {
	case p.GetRetryPriority() != nil:
		return nil, fieldf(field+".retry_priority", "not supported")
	case len(p.GetRetriableHeaders()) > 0 || len(p.GetRetriableRequestHeaders()) > 0:
		return nil, fieldf(field+".retriable_headers", "not supported")
	case p.GetRateLimitedRetryBackOff() != nil:
		return nil, fieldf(field+".rate_limited_retry_back_off", "not supported")
	}
	return rp, nil
}

// retriableReset reports whether a failure without response (connect
// failure, reset) is retried (Envoy's wouldRetryFromReset): 5xx,
// gateway-error and reset retry any; connect-failure and
// reset-before-request only a connect failure, where no byte of the
// request reached the upstream (a reset after the request was written
// counts as started, as Envoy's upstream_request_started).
func (p *retryPolicy) retriableReset(connectFailure bool) bool {
	if p.on&(retry5xx|retryGatewayError|retryReset) != 0 {
		return true
	}
	return connectFailure && p.on&(retryConnectFailure|retryResetBeforeRequest) != 0
}

// retriableTimeout reports whether a per-try timeout is retried. Envoy
// resets the attempt and asks wouldRetryFromReset with the request
// started: 5xx, gateway-error and reset retry it ("does not respond at
// all (disconnect/reset/read timeout)"); connect-failure explicitly does
// not cover request timeouts, reset-before-request does not apply to a
// request already sent, and the status-code conditions
// (retriable-status-codes, retriable-4xx, gRPC) only look at responses.
func (p *retryPolicy) retriableTimeout() bool {
	return p.on&(retry5xx|retryGatewayError|retryReset) != 0
}

// retriableResponse reports whether a response is retried (Envoy's
// wouldRetryFromHeaders).
func (p *retryPolicy) retriableResponse(code int, h http.Header) bool {
	if p.on&retry5xx != 0 && code >= 500 {
		return true
	}
	if p.on&retryGatewayError != 0 && code >= 502 && code <= 504 {
		return true
	}
	if p.on&retryRetriable4xx != 0 && code == http.StatusConflict {
		return true
	}
	if p.on&retryRetriableStatusCodes != 0 {
		for _, c := range p.codes {
			if c == code {
				return true
			}
		}
	}
	if p.on&(retryGRPCCancelled|retryGRPCDeadlineExceeded|retryGRPCResourceExhausted|retryGRPCUnavailable|retryGRPCInternal) != 0 {
		if vs := h["Grpc-Status"]; len(vs) > 0 {
			s, _ := strconv.Atoi(vs[0])
			switch {
			case s == 1 && p.on&retryGRPCCancelled != 0,
				s == 4 && p.on&retryGRPCDeadlineExceeded != 0,
				s == 8 && p.on&retryGRPCResourceExhausted != 0,
				s == 14 && p.on&retryGRPCUnavailable != 0,
				s == 13 && p.on&retryGRPCInternal != 0:
				return true
			}
		}
	}
	return false
}

// backoff is Envoy's jittered exponential back-off: a random duration in
// [0, base·2^n), capped at max_interval.
func (p *retryPolicy) backoff(n int) time.Duration {
	ceil := p.base << min(n, 20)
	if ceil > p.max || ceil <= 0 {
		ceil = p.max
	}
	return time.Duration(rand.Int64N(int64(ceil)) + 1)
}

// requestOverrides applies the router's request headers (an internal
// request's: the connection manager strips them from others) to the
// route's timeout and retry policy, as Envoy's router does:
//
//   - x-envoy-upstream-rq-timeout-ms replaces the route timeout (0
//     disables it) and x-envoy-upstream-rq-per-try-timeout-ms the per-try
//     timeout, ignored when not below the global one (finalTimeout); both
//     are consumed, not forwarded.
//   - x-envoy-retry-on and x-envoy-retry-grpc-on add conditions to the
//     route's retry_on (a route without a retry policy gets Envoy's
//     default one: 1 retry, 25 ms base back-off); unknown names are
//     ignored, as Envoy does for headers. x-envoy-retriable-status-codes
//     adds codes for retriable-status-codes, and x-envoy-max-retries then
//     replaces num_retries (RetryStateImpl).
//
// The route's policy is shared, so a changed one is a copy; a request
// without these headers costs a few map lookups and allocates nothing.
func requestOverrides(h http.Header, timeout time.Duration, p *retryPolicy) (time.Duration, *retryPolicy) {
	perTry := time.Duration(-1)
	if vs, ok := h["X-Envoy-Upstream-Rq-Timeout-Ms"]; ok {
		if ms, err := strconv.ParseUint(firstOf(vs), 10, 32); err == nil {
			timeout = time.Duration(ms) * time.Millisecond
		}
		delete(h, "X-Envoy-Upstream-Rq-Timeout-Ms")
	}
	if vs, ok := h["X-Envoy-Upstream-Rq-Per-Try-Timeout-Ms"]; ok {
		if ms, err := strconv.ParseUint(firstOf(vs), 10, 32); err == nil {
			perTry = time.Duration(ms) * time.Millisecond
		}
		delete(h, "X-Envoy-Upstream-Rq-Per-Try-Timeout-Ms")
	}
	var on retryOn
	rOn, hasOn := h["X-Envoy-Retry-On"]
	gOn, hasGOn := h["X-Envoy-Retry-Grpc-On"]
	if hasOn {
		on |= parseRetryOnHeader(firstOf(rOn), false)
	}
	if hasGOn {
		on |= parseRetryOnHeader(firstOf(gOn), true)
	}
	if perTry < 0 && on == 0 {
		return timeout, p
	}
	var np retryPolicy
	if p != nil {
		np = *p
	} else {
		np = retryPolicy{numRetries: defaultNumRetries, base: defaultRetryBase, max: 10 * defaultRetryBase}
	}
	if perTry >= 0 {
		np.perTry = perTry
	}
	if timeout > 0 && np.perTry >= timeout {
		np.perTry = 0
	}
	np.on |= on
	if np.on&retryRetriableStatusCodes != 0 {
		if vs, ok := h["X-Envoy-Retriable-Status-Codes"]; ok {
			codes := append([]int(nil), np.codes...)
			for _, c := range strings.Split(firstOf(vs), ",") {
				if n, err := strconv.Atoi(strings.TrimSpace(c)); err == nil && n >= 100 && n < 600 {
					codes = append(codes, n)
				}
			}
			np.codes = codes
		}
	}
	if np.on != 0 {
		if vs, ok := h["X-Envoy-Max-Retries"]; ok {
			if n, err := strconv.ParseUint(firstOf(vs), 10, 32); err == nil {
				np.numRetries = int(n)
			}
		}
	}
	return timeout, &np
}

// parseRetryOnHeader parses an x-envoy-retry-on (grpc false) or
// x-envoy-retry-grpc-on (grpc true) value; names of the other header or
// unknown ones are ignored.
func parseRetryOnHeader(v string, grpc bool) retryOn {
	const grpcBits = retryGRPCCancelled | retryGRPCDeadlineExceeded | retryGRPCResourceExhausted | retryGRPCUnavailable | retryGRPCInternal
	var on retryOn
	for tok := range strings.SplitSeq(v, ",") {
		bit := retryOnNames[strings.TrimSpace(tok)]
		if (bit&grpcBits != 0) == grpc {
			on |= bit
		}
	}
	return on
}

func firstOf(vs []string) string {
	if len(vs) == 0 {
		return ""
	}
	return vs[0]
}

// retry decides whether another attempt may go, takes a retry from the
// max_retries breaker (upstream_rq_retry) and waits the back-off.
func (s *stream) retry(cl *cluster.Cluster, p *retryPolicy, attempt int, tried *[]*cluster.Host, exclude *func(*cluster.Host) bool, h *cluster.Host) bool {
	rel, ok := cl.TryAcquireRetry()
	if !ok {
		return false
	}
	defer rel()
	if p.previousHosts {
		*tried = append(*tried, h)
		if *exclude == nil {
			t := tried
			*exclude = func(x *cluster.Host) bool {
				for _, y := range *t {
					if x == y {
						return true
					}
				}
				return false
			}
		}
	}
	t := time.NewTimer(p.backoff(attempt - 1))
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-s.ctx.Done():
		// The route timeout, which bounds the back-offs too: the next
		// attempt does not begin (beginAttempt answers 504, UT).
		return !s.cancelled()
	}
}
