package mesh

import (
	"fmt"
	"time"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
)

// Listener filter names.
const (
	TLSInspector  = "envoy.filters.listener.tls_inspector"
	HTTPInspector = "envoy.filters.listener.http_inspector"
	OriginalDst   = "envoy.filters.listener.original_dst"
)

var listenerFilterTypes = map[string]string{
	"type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector":   TLSInspector,
	"type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector": HTTPInspector,
	"type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst":     OriginalDst,
}

// portPredicate is a compiled ListenerFilterChainMatchPredicate; it is
// evaluated on the original destination port, as Envoy evaluates it after
// original_dst restored the address.
type portPredicate func(port uint16) bool

// inspection is what a listener's filters need to read before a filter
// chain can be chosen.
type inspection struct {
	tls, http                 bool
	tlsDisabled, httpDisabled portPredicate // nil: never disabled
	timeout                   time.Duration // listener_filters_timeout; 0 waits forever
	continueOnTimeout         bool
}

// wants reports whether any inspector runs for a flow to port.
func (in *inspection) wants(port uint16) (tls, http bool) {
	tls = in.tls && (in.tlsDisabled == nil || !in.tlsDisabled(port))
	http = in.http && (in.httpDisabled == nil || !in.httpDisabled(port))
	return tls, http
}

func parseListenerFilters(l *listenerv3.Listener) (inspection, error) {
	in := inspection{timeout: 15 * time.Second, continueOnTimeout: l.GetContinueOnListenerFiltersTimeout()}
	if l.GetListenerFiltersTimeout() != nil {
		in.timeout = l.GetListenerFiltersTimeout().AsDuration()
	}
	for i, f := range l.GetListenerFilters() {
		field := fmt.Sprintf("listener_filters[%d] (%s)", i, f.GetName())
		name := f.GetName()
		if n, ok := listenerFilterTypes[typeURLOf(f.GetTypedConfig())]; ok {
			name = n
		}
		pred, err := compilePredicate(f.GetFilterDisabled())
		if err != nil {
			return in, fmt.Errorf("%s: filter_disabled: %w", field, err)
		}
		switch name {
		case TLSInspector:
			in.tls, in.tlsDisabled = true, pred
		case HTTPInspector:
			in.http, in.httpDisabled = true, pred
		case OriginalDst:
			// Nothing to do: under TUN capture the local address already
			// is the original destination.
		default:
			return in, fmt.Errorf("%s: unknown listener filter", field)
		}
	}
	return in, nil
}

// compilePredicate turns a ListenerFilterChainMatchPredicate into a
// closure. Only the rules that depend on the destination port (what Istio
// uses) are supported.
func compilePredicate(p *listenerv3.ListenerFilterChainMatchPredicate) (portPredicate, error) {
	if p == nil {
		return nil, nil
	}
	switch r := p.GetRule().(type) {
	case *listenerv3.ListenerFilterChainMatchPredicate_AnyMatch:
		return func(uint16) bool { return r.AnyMatch }, nil
	case *listenerv3.ListenerFilterChainMatchPredicate_DestinationPortRange:
		start, end := r.DestinationPortRange.GetStart(), r.DestinationPortRange.GetEnd()
		if start < 0 || end > 65536 || start >= end {
			return nil, fmt.Errorf("destination_port_range [%d, %d): want 0 <= start < end <= 65536", start, end)
		}
		return func(port uint16) bool { return int32(port) >= start && int32(port) < end }, nil
	case *listenerv3.ListenerFilterChainMatchPredicate_NotMatch:
		inner, err := compilePredicate(r.NotMatch)
		if err != nil || inner == nil {
			return nil, fmt.Errorf("not_match: %w", orEmpty(err))
		}
		return func(port uint16) bool { return !inner(port) }, nil
	case *listenerv3.ListenerFilterChainMatchPredicate_OrMatch, *listenerv3.ListenerFilterChainMatchPredicate_AndMatch:
		set, isOr := p.GetOrMatch(), true
		if set == nil {
			set, isOr = p.GetAndMatch(), false
		}
		if len(set.GetRules()) < 2 {
			return nil, fmt.Errorf("or_match/and_match: want at least 2 rules")
		}
		rules := make([]portPredicate, 0, len(set.GetRules()))
		for i, sub := range set.GetRules() {
			c, err := compilePredicate(sub)
			if err != nil || c == nil {
				return nil, fmt.Errorf("rules[%d]: %w", i, orEmpty(err))
			}
			rules = append(rules, c)
		}
		if isOr {
			return func(port uint16) bool {
				for _, r := range rules {
					if r(port) {
						return true
					}
				}
				return false
			}, nil
		}
		return func(port uint16) bool {
			for _, r := range rules {
				if !r(port) {
					return false
				}
			}
			return true
		}, nil
	}
	return nil, fmt.Errorf("rule %T is not supported (only destination_port_range, any_match, not_match, or_match, and_match)", p.GetRule())
}

func orEmpty(err error) error {
	if err == nil {
		return fmt.Errorf("empty rule")
	}
	return err
}
