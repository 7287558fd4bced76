// Package tcpproxy is Envoy's envoy.filters.network.tcp_proxy, the
// terminal network filter of a filter chain that forwards bytes: Parse
// validates its config, Config.Connect opens the upstream connection
// (cluster choice, max_connect_attempts, each attempt to a host not tried
// before) and Config.Serve splices downstream and upstream until both are
// done. The steps are separate because the dispatcher runs them around
// the downstream handshake: with no listener filter to wait for, a
// captured flow's upstream is connected before its SYN is answered, so a
// refused upstream reaches the client as a refused connect.
//
// Splice is the byte mover itself, shared with the passthrough handler:
// both directions at once, a FIN on one side becomes a FIN on the other
// (half-close), a reset becomes a reset, and a connection idle in both
// directions is closed.
package tcpproxy

import (
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
)

// Name is the filter's name as Envoy and Istio write it.
const Name = "envoy.filters.network.tcp_proxy"

// TypeURL is the type of its typed_config.
const TypeURL = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"

// Config is a validated envoy.filters.network.tcp_proxy. It is immutable
// and shared by every flow of its filter chain.
type Config struct {
	StatPrefix         string
	Cluster            string           // set unless Weighted is
	Weighted           []WeightedTarget // weighted_clusters
	totalWeight        uint32
	IdleTimeout        time.Duration // 0: disabled
	MaxConnectAttempts int
	// Stats is the tcp.<stat_prefix>. block of the proxy's stats store:
	// every tcp_proxy with this StatPrefix counts into it, and it outlives
	// the Config, so an LDS update does not restart its counters.
	Stats *Stats
}

// Stats are Envoy's tcp.<stat_prefix>.* counters.
type Stats struct {
	Prefix              string // "tcp.<stat_prefix>."
	DownstreamCxTotal   atomic.Uint64
	DownstreamCxNoRoute atomic.Uint64
	DownstreamRxBytes   atomic.Uint64 // downstream_cx_rx_bytes_total
	DownstreamTxBytes   atomic.Uint64 // downstream_cx_tx_bytes_total
	IdleTimeout         atomic.Uint64
	UpstreamFlushTotal  atomic.Uint64
}

// StatsPrefix is the stat scope of a tcp_proxy with stat_prefix p.
func StatsPrefix(p string) string { return "tcp." + p + "." }

// WeightedTarget is one entry of tcp_proxy weighted_clusters.
type WeightedTarget struct {
	Cluster string
	Weight  uint32
}

// Parse validates a tcp_proxy config. clusterExists says whether a
// cluster name may be used (a build that allows clusters to arrive later
// says yes to every name). scope returns the stats block for a scope
// name (StatsPrefix): the proxy's store, so that chains sharing a
// stat_prefix share counters and a rebuilt chain finds its old ones; nil
// gives the Config a block of its own.
func Parse(pb *tcpproxyv3.TcpProxy, clusterExists func(string) bool, scope func(prefix string) *Stats) (*Config, error) {
	if err := pb.ValidateAll(); err != nil {
		return nil, err
	}
	t := &Config{StatPrefix: pb.GetStatPrefix(), MaxConnectAttempts: 1, IdleTimeout: time.Hour}
	if pb.GetMaxConnectAttempts() != nil {
		t.MaxConnectAttempts = int(pb.GetMaxConnectAttempts().GetValue())
	}
	if pb.GetIdleTimeout() != nil {
		t.IdleTimeout = pb.GetIdleTimeout().AsDuration() // 0 disables, as in Envoy
	}
	if pb.GetOnDemand() != nil || pb.GetTunnelingConfig() != nil {
		return nil, errors.New("on_demand and tunneling_config are not supported")
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
			return nil, errors.New("weighted_clusters: total weight is 0")
		}
	default:
		return nil, errors.New("cluster_specifier: want cluster or weighted_clusters")
	}
	prefix := StatsPrefix(t.StatPrefix)
	if scope != nil {
		t.Stats = scope(prefix)
	} else {
		t.Stats = &Stats{Prefix: prefix}
	}
	return t, nil
}

// pickCluster chooses the cluster for a new flow; r is uniform in
// [0, 1<<32).
func (t *Config) pickCluster(r uint32) string {
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
