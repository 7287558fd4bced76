// Package secrets is the proxy's secret store, fed by SDS: the names of the
// secrets the configuration references (tls_certificate and
// validation-context SDS configs inside clusters' and listeners' TLS
// transport sockets), a client that subscribes to them over the
// sds_config's gRPC cluster (Istio's sds-grpc, a Unix socket to the
// agent), and the store /certs and /config_dump read. It only holds the
// secrets; TLS itself is not done here. Secrets named with `ads: {}`
// (Istio's kubernetes:// credentials) arrive over the xDS client's ADS
// stream and are put in the same store by the proxy.
//
// The references are found per resource (ClusterRefs, ListenerRefs) so
// that the proxy can hold back exactly the clusters and listeners whose
// secrets have not arrived (Envoy's warming on SDS) and let the rest of
// an update go into force.
package secrets

import (
	"fmt"
	"maps"
	"slices"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
)

const (
	upstreamTLSType   = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
	downstreamTLSType = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
)

// DefaultInitialFetchTimeout is Envoy's ConfigSource.initial_fetch_timeout
// when an sds_config does not set one. Istio sets 0s: wait forever.
const DefaultInitialFetchTimeout = 15 * time.Second

// Source is where a secret comes from: the gRPC cluster of its sds_config's
// api_config_source (Istio's "sds-grpc"), or ADS.
type Source struct {
	Cluster string // envoy_grpc.cluster_name; "" with ADS
	ADS     bool
}

// String names the source as readiness messages do: the cluster, or "ADS".
func (s Source) String() string {
	if s.ADS {
		return "ADS"
	}
	return s.Cluster
}

// Pair is one TLS context's secrets, as /certs lists them: the
// certificate ("" if none over SDS) and the validation context ("" if none).
type Pair struct {
	Cert, Validation string
}

// Refs are the secrets a resource or a configuration references.
type Refs struct {
	// Names maps each secret name to its source.
	Names map[string]Source
	// Pairs are the distinct (certificate, validation) combinations of the
	// TLS contexts, sorted.
	Pairs []Pair
	// Timeouts is each name's sds_config initial_fetch_timeout: how long
	// a resource naming it waits before it goes into force without it
	// (0: forever). When references disagree, the shortest wait wins.
	Timeouts map[string]time.Duration
	// fields is where each name was first referenced, for the error of a
	// later reference that gives it another source.
	fields map[string]string
}

// NewRefs returns refs that name nothing, to Add to.
func NewRefs() *Refs { return newRefs() }

func newRefs() *Refs {
	return &Refs{Names: map[string]Source{}, Timeouts: map[string]time.Duration{}, fields: map[string]string{}}
}

// Empty reports whether r references no secret (nil refs are empty).
func (r *Refs) Empty() bool { return r == nil || len(r.Names) == 0 }

// ClusterRefs collects the SDS secret references of a cluster: its
// transport_socket and every transport_socket_matches entry. Only the TLS
// contexts' secret names and sds_configs are read. An error names the
// cluster and field of a reference meshtun cannot follow.
//
// A cluster that references no secret (most of them) has nil refs, and
// one without a transport socket costs nothing: this runs for every
// cluster of an update.
func ClusterRefs(c *clusterv3.Cluster) (*Refs, error) {
	if c.GetTransportSocket() == nil && len(c.GetTransportSocketMatches()) == 0 {
		return nil, nil
	}
	r := &Refs{}
	if err := r.socket(c.GetTransportSocket(), fmt.Sprintf("cluster %q: transport_socket", c.GetName())); err != nil {
		return nil, err
	}
	for i, m := range c.GetTransportSocketMatches() {
		where := fmt.Sprintf("cluster %q: transport_socket_matches[%d] (%s).transport_socket", c.GetName(), i, m.GetName())
		if err := r.socket(m.GetTransportSocket(), where); err != nil {
			return nil, err
		}
	}
	return r.done(), nil
}

// ListenerRefs collects the SDS secret references of a listener: every
// filter chain's and the default chain's transport_socket (nil refs when
// there are none).
func ListenerRefs(l *listenerv3.Listener) (*Refs, error) {
	sockets := l.GetDefaultFilterChain().GetTransportSocket() != nil
	for _, fc := range l.GetFilterChains() {
		sockets = sockets || fc.GetTransportSocket() != nil
	}
	if !sockets {
		return nil, nil
	}
	r := &Refs{}
	for i, fc := range l.GetFilterChains() {
		where := fmt.Sprintf("listener %q: filter_chains[%d] (%s).transport_socket", l.GetName(), i, fc.GetName())
		if err := r.socket(fc.GetTransportSocket(), where); err != nil {
			return nil, err
		}
	}
	if fc := l.GetDefaultFilterChain(); fc != nil {
		if err := r.socket(fc.GetTransportSocket(), fmt.Sprintf("listener %q: default_filter_chain.transport_socket", l.GetName())); err != nil {
			return nil, err
		}
	}
	return r.done(), nil
}

// done is r sorted, or nil when it references nothing.
func (r *Refs) done() *Refs {
	if len(r.Names) == 0 {
		return nil
	}
	r.sortPairs()
	return r
}

// Merge is the union of parts (nil parts are skipped). A name given two
// sources is an error naming the field of the later reference.
func Merge(parts ...*Refs) (*Refs, error) {
	out := newRefs()
	for _, p := range parts {
		if err := out.Add(p); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// Add adds o's references to r (a nil o adds nothing). A name o gives
// another source than r does is an error naming o's field, and r is then
// unchanged.
func (r *Refs) Add(o *Refs) error {
	if o == nil {
		return nil
	}
	names := slices.Sorted(maps.Keys(o.Names))
	for _, name := range names {
		if prev, ok := r.Names[name]; ok && prev != o.Names[name] {
			return fmt.Errorf("%s (%s).sds_config: the secret has another source elsewhere (%s, at %s)",
				o.fields[name], name, prev, r.fields[name])
		}
	}
	for _, name := range names {
		if _, ok := r.Names[name]; ok {
			r.Timeouts[name] = shorter(r.Timeouts[name], o.Timeouts[name])
			continue
		}
		r.Names[name], r.fields[name], r.Timeouts[name] = o.Names[name], o.fields[name], o.Timeouts[name]
	}
	added := false
	for _, p := range o.Pairs {
		if !slices.Contains(r.Pairs, p) {
			r.Pairs = append(r.Pairs, p)
			added = true
		}
	}
	if added {
		r.sortPairs()
	}
	return nil
}

// Find collects the SDS secret references of clusters and listeners
// (ClusterRefs, ListenerRefs, merged). An error names the resource and
// field of a reference meshtun cannot follow, or of one name given two
// sources.
func Find(clusters []*clusterv3.Cluster, listeners []*listenerv3.Listener) (*Refs, error) {
	parts := make([]*Refs, 0, len(clusters)+len(listeners))
	for _, c := range clusters {
		r, err := ClusterRefs(c)
		if err != nil {
			return nil, err
		}
		parts = append(parts, r)
	}
	for _, l := range listeners {
		r, err := ListenerRefs(l)
		if err != nil {
			return nil, err
		}
		parts = append(parts, r)
	}
	return Merge(parts...)
}

// shorter is the wait of two references to one secret: a bounded one
// bounds it.
func shorter(a, b time.Duration) time.Duration {
	switch {
	case a == 0:
		return b
	case b == 0:
		return a
	}
	return min(a, b)
}

// socket records the references of one transport socket; other sockets
// than the TLS contexts (raw_buffer, …) have none.
func (r *Refs) socket(ts *corev3.TransportSocket, where string) error {
	if ts == nil {
		return nil
	}
	var common *tlsv3.CommonTlsContext
	switch a := ts.GetTypedConfig(); a.GetTypeUrl() {
	case upstreamTLSType:
		var u tlsv3.UpstreamTlsContext
		if err := a.UnmarshalTo(&u); err != nil {
			return fmt.Errorf("%s.typed_config: %w", where, err)
		}
		common = u.GetCommonTlsContext()
	case downstreamTLSType:
		var d tlsv3.DownstreamTlsContext
		if err := a.UnmarshalTo(&d); err != nil {
			return fmt.Errorf("%s.typed_config: %w", where, err)
		}
		common = d.GetCommonTlsContext()
	default:
		return nil
	}
	var p Pair
	for i, sc := range common.GetTlsCertificateSdsSecretConfigs() {
		f := fmt.Sprintf("%s.common_tls_context.tls_certificate_sds_secret_configs[%d]", where, i)
		if err := r.note(sc, f); err != nil {
			return err
		}
		if i == 0 {
			p.Cert = sc.GetName()
		}
	}
	vsc := common.GetValidationContextSdsSecretConfig()
	vf := where + ".common_tls_context.validation_context_sds_secret_config"
	if cvc := common.GetCombinedValidationContext(); cvc != nil {
		vsc = cvc.GetValidationContextSdsSecretConfig()
		vf = where + ".common_tls_context.combined_validation_context.validation_context_sds_secret_config"
	}
	if vsc != nil {
		if err := r.note(vsc, vf); err != nil {
			return err
		}
		p.Validation = vsc.GetName()
	}
	if p != (Pair{}) && !slices.Contains(r.Pairs, p) {
		r.Pairs = append(r.Pairs, p)
	}
	return nil
}

func (r *Refs) sortPairs() {
	slices.SortFunc(r.Pairs, func(a, b Pair) int {
		if a.Cert != b.Cert {
			return cmpStr(a.Cert, b.Cert)
		}
		return cmpStr(a.Validation, b.Validation)
	})
}

func cmpStr(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// note records one SdsSecretConfig reference.
func (r *Refs) note(sc *tlsv3.SdsSecretConfig, field string) error {
	if sc.GetName() == "" {
		return fmt.Errorf("%s.name: empty", field)
	}
	cs := sc.GetSdsConfig()
	if cs == nil {
		return fmt.Errorf("%s (%s).sds_config: missing (static secrets are not supported)", field, sc.GetName())
	}
	var src Source
	switch {
	case cs.GetAds() != nil:
		src.ADS = true
	case cs.GetApiConfigSource() != nil:
		acs := cs.GetApiConfigSource()
		if acs.GetApiType() != corev3.ApiConfigSource_GRPC {
			return fmt.Errorf("%s (%s).sds_config.api_config_source.api_type: %s not supported (want GRPC)", field, sc.GetName(), acs.GetApiType())
		}
		gs := acs.GetGrpcServices()
		if len(gs) != 1 || gs[0].GetEnvoyGrpc() == nil {
			return fmt.Errorf("%s (%s).sds_config.api_config_source.grpc_services: want one envoy_grpc service", field, sc.GetName())
		}
		src.Cluster = gs[0].GetEnvoyGrpc().GetClusterName()
	default:
		return fmt.Errorf("%s (%s).sds_config: want ads or api_config_source", field, sc.GetName())
	}
	if r.Names == nil {
		r.Names, r.Timeouts, r.fields = map[string]Source{}, map[string]time.Duration{}, map[string]string{}
	}
	timeout := DefaultInitialFetchTimeout
	if d := cs.GetInitialFetchTimeout(); d != nil {
		if err := d.CheckValid(); err != nil || d.AsDuration() < 0 {
			return fmt.Errorf("%s (%s).sds_config.initial_fetch_timeout: want a duration of 0 or more", field, sc.GetName())
		}
		timeout = d.AsDuration()
	}
	if prev, ok := r.Names[sc.GetName()]; ok {
		if prev != src {
			return fmt.Errorf("%s (%s).sds_config: the secret has another source elsewhere (%s, at %s)", field, sc.GetName(), prev, r.fields[sc.GetName()])
		}
		r.Timeouts[sc.GetName()] = shorter(r.Timeouts[sc.GetName()], timeout)
		return nil
	}
	r.Names[sc.GetName()], r.Timeouts[sc.GetName()], r.fields[sc.GetName()] = src, timeout, field
	return nil
}
