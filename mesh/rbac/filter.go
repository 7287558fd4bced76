package rbac

import (
	"fmt"
	"sync/atomic"

	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
)

// Filter is one RBAC filter's rules (enforced) and shadow_rules (counted
// only), with its stats. Either may be nil: no rules means the filter
// enforces nothing, as Envoy (rules absent ≠ rules: {}, which with the
// default ALLOW action denies everything).
type Filter struct {
	Rules  *Engine
	Shadow *Engine
	// StatsPrefix is where the counters live: "tcp.rbac." for Istio's
	// network filter, "http.<hcm prefix>.rbac.<rules_stat_prefix>" for
	// the HTTP filter. ShadowPrefix is shadow_rules_stat_prefix.
	StatsPrefix  string
	ShadowPrefix string
	// Stats and ShadowStats are the filter's counters; the snapshot
	// replaces them with its stats store's blocks of the same prefix so
	// that they outlive config updates.
	Stats       *Stats
	ShadowStats *ShadowStats
}

// Stats are Envoy's RBAC filter counters (Filters::Common::RBAC
// generateStats) under Prefix ("tcp.rbac."). Filters with the same
// prefix (istiod's DENY and ALLOW filters on one chain) count into the
// same block, as into the same counters in Envoy.
type Stats struct {
	Prefix    string
	Allowed   atomic.Uint64
	Denied    atomic.Uint64
	Logged    atomic.Uint64
	NotLogged atomic.Uint64
}

// ShadowStats count what the shadow rules would have decided, under
// Prefix = the filter's prefix + shadow_rules_stat_prefix + "shadow_"
// ("tcp.rbac.istio_dry_run_allow_shadow_").
type ShadowStats struct {
	Prefix  string
	Allowed atomic.Uint64
	Denied  atomic.Uint64
}

// Stat is one counter's full name and value.
type Stat struct {
	Name  string
	Value uint64
}

// List returns the counters with their full names, as the admin prints
// them.
func (s *Stats) List() []Stat {
	return []Stat{
		{s.Prefix + "allowed", s.Allowed.Load()},
		{s.Prefix + "denied", s.Denied.Load()},
		{s.Prefix + "logged", s.Logged.Load()},
		{s.Prefix + "not_logged", s.NotLogged.Load()},
	}
}

// List returns the shadow counters with their full names.
func (s *ShadowStats) List() []Stat {
	return []Stat{
		{s.Prefix + "allowed", s.Allowed.Load()},
		{s.Prefix + "denied", s.Denied.Load()},
	}
}

// NewFilter compiles a filter's rules and shadow_rules. statsPrefix is
// the full counter prefix (see Filter.StatsPrefix).
func NewFilter(rules, shadow *rbacv3.RBAC, statsPrefix, shadowPrefix string) (*Filter, error) {
	f := &Filter{StatsPrefix: statsPrefix, ShadowPrefix: shadowPrefix}
	var err error
	if rules != nil {
		if f.Rules, err = Compile(rules, "rules"); err != nil {
			return nil, err
		}
	}
	if shadow != nil {
		if f.Shadow, err = Compile(shadow, "shadow_rules"); err != nil {
			return nil, err
		}
	}
	f.Stats = &Stats{Prefix: statsPrefix}
	f.ShadowStats = &ShadowStats{Prefix: f.ShadowStatsPrefix()}
	return f, nil
}

// ShadowStatsPrefix is the shadow counters' prefix.
func (f *Filter) ShadowStatsPrefix() string { return f.StatsPrefix + f.ShadowPrefix + "shadow_" }

// Decision is what a filter decided for one connection or request.
type Decision struct {
	Allowed bool
	Logged  bool   // a LOG policy matched: the access log should record it
	Policy  string // the matched policy of the enforced rules ("" if none)
}

// Details is Envoy's connection_termination_details / response code
// details for a denial: "rbac_access_denied_matched_policy[<name>]",
// "[none]" when an ALLOW filter matched nothing. It allocates, and is
// only called on a denial.
func (d Decision) Details() string {
	p := d.Policy
	if p == "" {
		p = "none"
	}
	return fmt.Sprintf("rbac_access_denied_matched_policy[%s]", p)
}

// Evaluate runs the shadow rules (counted only) and the rules, counting
// the outcome, and returns the decision. It allocates nothing.
func (f *Filter) Evaluate(in *Input) Decision { return f.EvaluateInto(in, f) }

// EvaluateInto evaluates f counting into counters' stats: a per-route
// override (RBACPerRoute) counts as the filter it overrides.
func (f *Filter) EvaluateInto(in *Input, counters *Filter) Decision {
	st, sh := counters.Stats, counters.ShadowStats
	if f.Shadow != nil {
		if ok, _, _ := f.Shadow.Allowed(in); ok {
			sh.Allowed.Add(1)
		} else {
			sh.Denied.Add(1)
		}
	}
	if f.Rules == nil {
		return Decision{Allowed: true}
	}
	ok, logged, name := f.Rules.Allowed(in)
	d := Decision{Allowed: ok, Logged: logged, Policy: name}
	if f.Rules.action == Log {
		if logged {
			st.Logged.Add(1)
		} else {
			st.NotLogged.Add(1)
		}
		return d
	}
	if ok {
		st.Allowed.Add(1)
	} else {
		st.Denied.Add(1)
	}
	return d
}
