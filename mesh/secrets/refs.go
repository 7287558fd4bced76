// Package secrets is the proxy's secret store, fed by SDS: the names of the
// secrets the configuration in force references (tls_certificate and
// validation-context SDS configs inside clusters' and listeners' TLS
// transport sockets), a client that subscribes to them over the
// sds_config's gRPC cluster (Istio's sds-grpc, a Unix socket to the
// agent), and the store /certs and /config_dump read. It only holds the
// secrets; TLS itself is not done here.
package secrets

import (
	"fmt"
	"slices"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
)

const (
	upstreamTLSType   = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
	downstreamTLSType = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
)

// Source is where a secret comes from: the gRPC cluster of its sds_config's
// api_config_source (Istio's "sds-grpc"), or ADS.
type Source struct {
	Cluster string // envoy_grpc.cluster_name; "" with ADS
	ADS     bool
}

// Pair is one TLS context's secrets, as /certs lists them: the
// certificate ("" if none over SDS) and the validation context ("" if none).
type Pair struct {
	Cert, Validation string
}

// Refs are the secrets a configuration references.
type Refs struct {
	// Names maps each secret name to its source.
	Names map[string]Source
	// Pairs are the distinct (certificate, validation) combinations of the
	// TLS contexts, sorted.
	Pairs []Pair
}

// Find collects the SDS secret references of clusters (transport_socket and
// every transport_socket_matches entry) and listeners (every filter chain's
// and the default chain's transport_socket). Only the TLS contexts' secret
// names and sds_configs are read. An error names the resource and field of
// a reference meshtun cannot follow, or of one name given two sources.
func Find(clusters []*clusterv3.Cluster, listeners []*listenerv3.Listener) (*Refs, error) {
	r := &Refs{Names: map[string]Source{}}
	seen := map[Pair]bool{}
	add := func(ts *corev3.TransportSocket, where string) error {
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
		if p != (Pair{}) && !seen[p] {
			seen[p] = true
			r.Pairs = append(r.Pairs, p)
		}
		return nil
	}
	for _, c := range clusters {
		where := fmt.Sprintf("cluster %q: transport_socket", c.GetName())
		if err := add(c.GetTransportSocket(), where); err != nil {
			return nil, err
		}
		for i, m := range c.GetTransportSocketMatches() {
			where := fmt.Sprintf("cluster %q: transport_socket_matches[%d] (%s).transport_socket", c.GetName(), i, m.GetName())
			if err := add(m.GetTransportSocket(), where); err != nil {
				return nil, err
			}
		}
	}
	for _, l := range listeners {
		for i, fc := range l.GetFilterChains() {
			where := fmt.Sprintf("listener %q: filter_chains[%d] (%s).transport_socket", l.GetName(), i, fc.GetName())
			if err := add(fc.GetTransportSocket(), where); err != nil {
				return nil, err
			}
		}
		if fc := l.GetDefaultFilterChain(); fc != nil {
			if err := add(fc.GetTransportSocket(), fmt.Sprintf("listener %q: default_filter_chain.transport_socket", l.GetName())); err != nil {
				return nil, err
			}
		}
	}
	slices.SortFunc(r.Pairs, func(a, b Pair) int {
		if a.Cert != b.Cert {
			return cmpStr(a.Cert, b.Cert)
		}
		return cmpStr(a.Validation, b.Validation)
	})
	return r, nil
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
	if prev, ok := r.Names[sc.GetName()]; ok && prev != src {
		return fmt.Errorf("%s (%s).sds_config: the secret has another source elsewhere (%+v)", field, sc.GetName(), prev)
	}
	r.Names[sc.GetName()] = src
	return nil
}
