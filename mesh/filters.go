package mesh

import (
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	udpatype "github.com/cncf/xds/go/udpa/type/v1"
	xdstype "github.com/cncf/xds/go/xds/type/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/meshtun/meshtun/mesh/httpconn"
)

// Network filter names as Envoy and Istio write them.
const (
	TCPProxyFilter = "envoy.filters.network.tcp_proxy"
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
	"envoy.filters.network.rbac":              true, // Istio AuthorizationPolicy; not enforced (README)
	"envoy.filters.network.connection_limit":  true,
}

// skippedTypeURLs are the same filters recognised by their config type,
// for chains that name them differently.
var skippedTypeURLs = map[string]bool{
	"type.googleapis.com/stats.PluginConfig":                                                   true,
	"type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange":                   true,
	"type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm":                        true,
	"type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC":                        true,
	"type.googleapis.com/envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit": true,
	"type.googleapis.com/io.istio.stats.PluginConfig":                                          true,
}

// TCPProxy is a validated envoy.filters.network.tcp_proxy.
type TCPProxy struct {
	StatPrefix         string
	Cluster            string           // set unless Weighted is
	Weighted           []WeightedTarget // weighted_clusters
	totalWeight        uint32
	IdleTimeout        time.Duration // 0: disabled
	MaxConnectAttempts int
	Stats              *TCPStats // shared by every tcp_proxy with this StatPrefix
}

// TCPStats are Envoy's tcp.<stat_prefix>.* counters.
type TCPStats struct {
	Prefix              string // "tcp.<stat_prefix>."
	DownstreamCxTotal   atomic.Uint64
	DownstreamCxNoRoute atomic.Uint64
	DownstreamRxBytes   atomic.Uint64 // downstream_cx_rx_bytes_total
	DownstreamTxBytes   atomic.Uint64 // downstream_cx_tx_bytes_total
	IdleTimeout         atomic.Uint64
	UpstreamFlushTotal  atomic.Uint64
}

// WeightedTarget is one entry of tcp_proxy weighted_clusters.
type WeightedTarget struct {
	Cluster string
	Weight  uint32
}

// pickCluster chooses the cluster for a new flow; r is uniform in
// [0, 1<<32).
func (t *TCPProxy) pickCluster(r uint32) string {
	if len(t.Weighted) == 0 {
		return t.Cluster
	}
	x := uint32((uint64(r) * uint64(t.totalWeight)) >> 32)
	for _, w := range t.Weighted {
		if x < w.Weight {
			return w.Cluster
		}
		x -= w.Weight
	}
	return t.Weighted[len(t.Weighted)-1].Cluster
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
// tcp_proxy, Istio telemetry filters skipped, anything else an error.
func parseNetworkFilters(filters []*listenerv3.Filter, clusterExists func(string) bool) (*TCPProxy, *httpconn.Config, []string, error) {
	var tp *TCPProxy
	var hcm *httpconn.Config
	var skipped []string
	for i, f := range filters {
		field := fmt.Sprintf("filters[%d] (%s)", i, f.GetName())
		if f.GetConfigDiscovery() != nil {
			return nil, nil, nil, fmt.Errorf("%s: config_discovery (ECDS) is not supported", field)
		}
		url := typeURLOf(f.GetTypedConfig())
		switch {
		case f.GetName() == TCPProxyFilter || url == "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy":
			if tp != nil || hcm != nil {
				return nil, nil, nil, fmt.Errorf("%s: a second terminal filter", field)
			}
			if i != len(filters)-1 {
				return nil, nil, nil, fmt.Errorf("%s: tcp_proxy is a terminal filter and must be last", field)
			}
			var pb tcpproxyv3.TcpProxy
			if err := f.GetTypedConfig().UnmarshalTo(&pb); err != nil {
				return nil, nil, nil, fmt.Errorf("%s: typed_config: want envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy: %w", field, err)
			}
			t, err := parseTCPProxy(&pb, clusterExists)
			if err != nil {
				return nil, nil, nil, fmt.Errorf("%s: %w", field, err)
			}
			tp = t
		case skippedNetworkFilters[f.GetName()] || skippedTypeURLs[url]:
			skipped = append(skipped, f.GetName())
		case f.GetName() == HCMFilter || url == hcmType:
			if tp != nil || hcm != nil {
				return nil, nil, nil, fmt.Errorf("%s: a second terminal filter", field)
			}
			if i != len(filters)-1 {
				return nil, nil, nil, fmt.Errorf("%s: http_connection_manager is a terminal filter and must be last", field)
			}
			var pb hcmv3.HttpConnectionManager
			if err := unmarshalTyped(f.GetTypedConfig(), &pb); err != nil {
				return nil, nil, nil, fmt.Errorf("%s: typed_config: want %s: %w", field, strings.TrimPrefix(hcmType, "type.googleapis.com/"), err)
			}
			c, err := httpconn.ParseHCM(&pb)
			if err != nil {
				return nil, nil, nil, fmt.Errorf("%s: %w", field, err)
			}
			hcm = c
		default:
			return nil, nil, nil, fmt.Errorf("%s: unknown network filter (type %q)", field, url)
		}
	}
	if tp == nil && hcm == nil {
		return nil, nil, nil, fmt.Errorf("filters: no terminal filter (want %s or %s)", TCPProxyFilter, HCMFilter)
	}
	return tp, hcm, skipped, nil
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

func parseTCPProxy(pb *tcpproxyv3.TcpProxy, clusterExists func(string) bool) (*TCPProxy, error) {
	if err := pb.ValidateAll(); err != nil {
		return nil, err
	}
	t := &TCPProxy{StatPrefix: pb.GetStatPrefix(), MaxConnectAttempts: 1, IdleTimeout: time.Hour}
	if pb.GetMaxConnectAttempts() != nil {
		t.MaxConnectAttempts = int(pb.GetMaxConnectAttempts().GetValue())
	}
	if pb.GetIdleTimeout() != nil {
		t.IdleTimeout = pb.GetIdleTimeout().AsDuration() // 0 disables, as in Envoy
	}
	if pb.GetOnDemand() != nil || pb.GetTunnelingConfig() != nil {
		return nil, fmt.Errorf("on_demand and tunneling_config are not supported")
	}
	switch {
	case pb.GetCluster() != "":
		if !clusterExists(pb.GetCluster()) {
			return nil, fmt.Errorf("cluster: %q is not a known cluster", pb.GetCluster())
		}
		t.Cluster = pb.GetCluster()
	case pb.GetWeightedClusters() != nil:
		for i, c := range pb.GetWeightedClusters().GetClusters() {
			if !clusterExists(c.GetName()) {
				return nil, fmt.Errorf("weighted_clusters.clusters[%d].name: %q is not a known cluster", i, c.GetName())
			}
			if c.GetWeight() == 0 {
				continue
			}
			t.Weighted = append(t.Weighted, WeightedTarget{Cluster: c.GetName(), Weight: c.GetWeight()})
			t.totalWeight += c.GetWeight()
		}
		if t.totalWeight == 0 {
			return nil, fmt.Errorf("weighted_clusters: total weight is 0")
		}
	default:
		return nil, fmt.Errorf("cluster_specifier: want cluster or weighted_clusters")
	}
	return t, nil
}
