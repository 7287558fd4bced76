package httpconn

import (
	"fmt"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"time"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
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

func compileRetry(p *routev3.RetryPolicy, field string) (*retryPolicy, error) {
	rp := &retryPolicy{numRetries: 1, base: 25 * time.Millisecond}
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
