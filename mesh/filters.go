package mesh

import (
	"errors"
	"fmt"
	"strings"

	udpatype "github.com/cncf/xds/go/udpa/type/v1"
	xdstype "github.com/cncf/xds/go/xds/type/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	netrbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	udpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/udp/udp_proxy/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/meshtun/meshtun/mesh/httpconn"
	"github.com/meshtun/meshtun/mesh/rbac"
	"github.com/meshtun/meshtun/mesh/tcpproxy"
	"github.com/meshtun/meshtun/mesh/udpproxy"
)

// Network filter names as Envoy and Istio write them.
const (
	TCPProxyFilter = tcpproxy.Name
	HCMFilter      = "envoy.filters.network.http_connection_manager"
)

// skippedNetworkFilters are filters Istio puts on sidecar chains for
// telemetry and peer metadata. They do not change where bytes go, so
// meshtun accepts and skips them (listed in the README); any other
// unknown filter is an error, as in Envoy.
var skippedNetworkFilters = map[string]bool{
	"istio.stats":                             true,
	"istio.metadata_exchange":                 true,
	"envoy.filters.network.metadata_exchange": true,
	"envoy.filters.network.wasm":              true,
	"envoy.filters.network.connection_limit":  true,
}

// skippedTypeURLs are the same filters recognised by their config type,
// for chains that name them differently.
var skippedTypeURLs = map[string]bool{
	"type.googleapis.com/stats.PluginConfig":                                                   true,
	"type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange":                   true,
	"type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm":                        true,
	"type.googleapis.com/envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit": true,
	"type.googleapis.com/io.istio.stats.PluginConfig":                                          true,
}

// typeURLOf returns the type a typed_config carries, looking through the
// TypedStruct wrappers (udpa.type.v1 and xds.type.v3) Istio and the
// bootstrap loader use for types this binary does not link.
func typeURLOf(a *anypb.Any) string {
	if a == nil {
		return ""
	}
	switch a.GetTypeUrl() {
	case "type.googleapis.com/xds.type.v3.TypedStruct":
		var ts xdstype.TypedStruct
		if a.UnmarshalTo(&ts) == nil {
			return ts.GetTypeUrl()
		}
	case "type.googleapis.com/udpa.type.v1.TypedStruct":
		var ts udpatype.TypedStruct
		if a.UnmarshalTo(&ts) == nil {
			return ts.GetTypeUrl()
		}
	}
	return a.GetTypeUrl()
}

// parseNetworkFilters validates a chain's filters: exactly one terminal
// filter, last (tcp_proxy, parsed by tcpproxy.Parse with its stats block
// from tcpStats, or http_connection_manager, by httpconn.ParseHCM), Istio
// telemetry filters skipped, RBAC filters (before the terminal one)
// compiled in their order, anything else an error.
func parseNetworkFilters(filters []*listenerv3.Filter, clusterExists func(string) bool, tcpStats func(prefix string) *tcpproxy.Stats) (*tcpproxy.Config, *httpconn.Config, []*rbac.Filter, []string, error) {
	var tp *tcpproxy.Config
	var hcm *httpconn.Config
	var skipped []string
	var authz []*rbac.Filter
	for i, f := range filters {
		field := fmt.Sprintf("filters[%d] (%s)", i, f.GetName())
		if f.GetConfigDiscovery() != nil {
			return nil, nil, nil, nil, fmt.Errorf("%s: config_discovery (ECDS) is not supported", field)
		}
		url := typeURLOf(f.GetTypedConfig())
		switch {
		case f.GetName() == TCPProxyFilter || url == tcpproxy.TypeURL:
			if tp != nil || hcm != nil {
				return nil, nil, nil, nil, fmt.Errorf("%s: a second terminal filter", field)
			}
			if i != len(filters)-1 {
				return nil, nil, nil, nil, fmt.Errorf("%s: tcp_proxy is a terminal filter and must be last", field)
			}
			var pb tcpproxyv3.TcpProxy
			if err := f.GetTypedConfig().UnmarshalTo(&pb); err != nil {
				return nil, nil, nil, nil, fmt.Errorf("%s: typed_config: want envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy: %w", field, err)
			}
			t, err := tcpproxy.Parse(&pb, clusterExists, tcpStats)
			if err != nil {
				return nil, nil, nil, nil, fmt.Errorf("%s: %w", field, err)
			}
			tp = t
		case f.GetName() == rbac.NetworkName || url == rbac.NetworkTypeURL:
			var pb netrbacv3.RBAC
			if err := unmarshalTyped(f.GetTypedConfig(), &pb); err != nil {
				return nil, nil, nil, nil, fmt.Errorf("%s: typed_config: want %s: %w", field, strings.TrimPrefix(rbac.NetworkTypeURL, "type.googleapis.com/"), err)
			}
			rf, err := rbac.FromNetwork(&pb)
			if err != nil {
				return nil, nil, nil, nil, fmt.Errorf("%s: %w", field, err)
			}
			authz = append(authz, rf)
		case skippedNetworkFilters[f.GetName()] || skippedTypeURLs[url]:
			skipped = append(skipped, f.GetName())
		case f.GetName() == HCMFilter || url == hcmType:
			if tp != nil || hcm != nil {
				return nil, nil, nil, nil, fmt.Errorf("%s: a second terminal filter", field)
			}
			if i != len(filters)-1 {
				return nil, nil, nil, nil, fmt.Errorf("%s: http_connection_manager is a terminal filter and must be last", field)
			}
			var pb hcmv3.HttpConnectionManager
			if err := unmarshalTyped(f.GetTypedConfig(), &pb); err != nil {
				return nil, nil, nil, nil, fmt.Errorf("%s: typed_config: want %s: %w", field, strings.TrimPrefix(hcmType, "type.googleapis.com/"), err)
			}
			c, err := httpconn.ParseHCM(&pb)
			if err != nil {
				return nil, nil, nil, nil, fmt.Errorf("%s: %w", field, err)
			}
			hcm = c
		default:
			return nil, nil, nil, nil, fmt.Errorf("%s: unknown network filter (type %q)", field, url)
		}
	}
	if tp == nil && hcm == nil {
		return nil, nil, nil, nil, fmt.Errorf("filters: no terminal filter (want %s or %s)", TCPProxyFilter, HCMFilter)
	}
	return tp, hcm, authz, skipped, nil
}

const hcmType = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"

// unmarshalTyped decodes a typed_config into m, also when it arrives as
// a TypedStruct (JSON fields under the real type's URL), as bootstraps and
// some control planes send configs.
func unmarshalTyped(a *anypb.Any, m proto.Message) error {
	var fields *structpb.Struct
	switch a.GetTypeUrl() {
	case "type.googleapis.com/xds.type.v3.TypedStruct":
		var ts xdstype.TypedStruct
		if err := a.UnmarshalTo(&ts); err != nil {
			return err
		}
		fields = ts.GetValue()
	case "type.googleapis.com/udpa.type.v1.TypedStruct":
		var ts udpatype.TypedStruct
		if err := a.UnmarshalTo(&ts); err != nil {
			return err
		}
		fields = ts.GetValue()
	default:
		return a.UnmarshalTo(m)
	}
	b, err := protojson.Marshal(fields)
	if err != nil {
		return err
	}
	return protojson.Unmarshal(b, m)
}

// parseUDPListener reads a UDP listener's udp_proxy: a UDP listener has no
// filter chains, and its one filter (the last wins if there are several,
// as before) is a udp_proxy listener filter, parsed by udpproxy.Parse.
func parseUDPListener(pb *listenerv3.Listener, clusterExists func(string) bool) (*udpproxy.Config, error) {
	if len(pb.GetFilterChains()) > 0 || pb.GetDefaultFilterChain() != nil {
		return nil, errors.New("filter_chains: a UDP listener takes its udp_proxy in listener_filters, not filter chains")
	}
	var u *udpproxy.Config
	for i, f := range pb.GetListenerFilters() {
		field := fmt.Sprintf("listener_filters[%d] (%s)", i, f.GetName())
		if f.GetName() != udpproxy.Name && typeURLOf(f.GetTypedConfig()) != udpproxy.TypeURL {
			return nil, fmt.Errorf("%s: unknown UDP listener filter (want %s)", field, udpproxy.Name)
		}
		var cfg udpproxyv3.UdpProxyConfig
		if err := f.GetTypedConfig().UnmarshalTo(&cfg); err != nil {
			return nil, fmt.Errorf("%s: typed_config: want envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig: %w", field, err)
		}
		c, err := udpproxy.Parse(&cfg, clusterExists)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", field, err)
		}
		u = c
	}
	if u == nil {
		return nil, fmt.Errorf("listener_filters: a UDP listener needs %s", udpproxy.Name)
	}
	return u, nil
}
