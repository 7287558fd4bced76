package admin

import (
	"regexp"
	"strings"
)

// Envoy's tag extraction, configured as Istio's sidecar bootstrap
// configures it, turns a stat's flat name into a metric name and labels
// for /stats/prometheus: cluster.X.upstream_rq_200 is
// envoy_cluster_upstream_rq{response_code="200",cluster_name="X"}.
// Dashboards and istioctl's queries are written against these names, so
// they have to come out exactly as a real sidecar prints them.
//
// The mechanics are Envoy's (source/common/stats/tag_extractor_impl.cc,
// tag_producer_impl.cc): every regex is matched against the full name; the
// first capture group is the part removed from the name, the second (or
// the first when there is only one) is the tag's value. Regexes without a
// "^token\." prefix are tried first, then those whose token is the name's
// first segment, each group in configuration order; the labels come out in
// that order.

// tag is one extracted label.
type tag struct{ name, value string }

type tagExtractor struct {
	name   string
	prefix string // the name's first segment the regex requires ("" for any)
	re     *regexp.Regexp
}

// istioStatsTags are the stats_tags of Istio's sidecar bootstrap, in its
// order, with use_all_default_tags false: istio/istio
// tools/packaging/common/envoy_bootstrap.json, stats_config.stats_tags.
// Note that these differ from Envoy's defaults
// (source/common/config/well_known_names.cc): Envoy's response_code_class
// is `_rq_(\d)xx$` (upstream_rq_xx{response_code_class="2"}), Istio's is
// `_rq(_(\dxx))$` (upstream_rq{response_code_class="2xx"}); Envoy's
// http_conn_manager_prefix takes any prefix (`^http\.((.*?)\.)`), Istio's
// only address-shaped ones (the same character classes as
// listener_address), so "outbound_0.0.0.0_80" is left in the name. The
// bootstrap's templated extraStatTags are per-deployment and not included.
var istioStatsTags = []tagExtractor{
	{"cluster_name", "cluster", regexp.MustCompile(`^cluster\.((.+?(\..+?\.svc\.cluster\.local)?)\.)`)},
	{"tcp_prefix", "tcp", regexp.MustCompile(`^tcp\.((.*?)\.)\w+?$`)},
	{"response_code", "", regexp.MustCompile(`_rq(_(\d{3}))$`)},
	{"response_code_class", "", regexp.MustCompile(`_rq(_(\dxx))$`)},
	// Istio writes `^listener(?=\.).*?\.http\.(…)`; RE2 has no lookahead,
	// and this form matches the same names with the same groups.
	{"http_conn_manager_listener_prefix", "listener", regexp.MustCompile(`^listener(?:\..*?)?\.http\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)`)},
	{"http_conn_manager_prefix", "http", regexp.MustCompile(`^http\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)`)},
	{"listener_address", "listener", regexp.MustCompile(`^listener\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)`)},
	{"mongo_prefix", "mongo", regexp.MustCompile(`^mongo\.(.+?)\.(collection|cmd|cx_|op_|delays_|decoding_)(.*?)$`)},
	{"cache", "", regexp.MustCompile(`(cache\.(.+?)\.)`)},
	{"component", "", regexp.MustCompile(`(component\.(.+?)\.)`)},
	{"tag", "", regexp.MustCompile(`(tag\.(.+?);\.)`)},
	{"wasm_filter", "", regexp.MustCompile(`(wasm_filter\.(.+?)\.)`)},
	{"authz_enforce_result", "", regexp.MustCompile(`rbac(\.(allowed|denied))`)},
	{"authz_dry_run_action", "", regexp.MustCompile(`(\.istio_dry_run_(allow|deny)_)`)},
	{"authz_dry_run_result", "", regexp.MustCompile(`(\.shadow_(allowed|denied))`)},
}

// extractTags returns name with the tagged parts removed, and the tags.
func extractTags(name string) (string, []tag) {
	first, _, _ := strings.Cut(name, ".")
	var tags []tag
	var cut [][2]int // removed byte ranges
	apply := func(e *tagExtractor) {
		m := e.re.FindStringSubmatchIndex(name)
		if m == nil || m[2] < 0 {
			return
		}
		v := m[2:4]
		if len(m) >= 6 && m[4] >= 0 {
			v = m[4:6]
		}
		tags = append(tags, tag{e.name, name[v[0]:v[1]]})
		cut = append(cut, [2]int{m[2], m[3]})
	}
	for i := range istioStatsTags {
		if istioStatsTags[i].prefix == "" {
			apply(&istioStatsTags[i])
		}
	}
	for i := range istioStatsTags {
		if p := istioStatsTags[i].prefix; p != "" && p == first {
			apply(&istioStatsTags[i])
		}
	}
	if len(cut) == 0 {
		return name, nil
	}
	var b strings.Builder
	for i := 0; i < len(name); i++ {
		removed := false
		for _, c := range cut {
			if i >= c[0] && i < c[1] {
				removed = true
				break
			}
		}
		if !removed {
			b.WriteByte(name[i])
		}
	}
	return b.String(), tags
}
