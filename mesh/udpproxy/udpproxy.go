// Package udpproxy is Envoy's envoy.filters.udp_listener.udp_proxy: each
// captured UDP flow (one downstream 4-tuple) to a UDP listener's address
// becomes a session to one host of the filter's cluster, over one
// connected, marked socket, until the flow idles out. Parse validates the
// filter's config; Config.Serve runs a session; Relay is the datagram
// mover, shared with the passthrough handler.
package udpproxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"

	udpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/udp/udp_proxy/v3"

	"github.com/meshtun/meshtun/mesh/accesslog"
	"github.com/meshtun/meshtun/mesh/cluster"
	"github.com/meshtun/meshtun/mesh/upstream"
	"github.com/meshtun/meshtun/netstack"
)

// Name is the filter's name as Envoy writes it.
const Name = "envoy.filters.udp_listener.udp_proxy"

// TypeURL is the type of its typed_config.
const TypeURL = "type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig"

// Config is a validated udp_proxy. It is immutable and shared by every
// flow of its listener.
type Config struct {
	StatPrefix string
	Cluster    string
	// IdleTimeout is the config's idle_timeout (Envoy's default 60 s).
	// Sessions end by the capture stack's UDP idle timeout
	// (netstack.Config.UDPIdleTimeout), which is what ends a flow's reads.
	IdleTimeout time.Duration
}

// Parse validates a udp_proxy config. clusterExists says whether a
// cluster name may be used.
func Parse(pb *udpproxyv3.UdpProxyConfig, clusterExists func(string) bool) (*Config, error) {
	if err := pb.ValidateAll(); err != nil {
		return nil, err
	}
	if pb.GetCluster() == "" {
		return nil, errors.New("matcher: not supported; use cluster")
	}
	if !clusterExists(pb.GetCluster()) {
		return nil, fmt.Errorf("cluster: %q is not a known cluster", pb.GetCluster())
	}
	u := &Config{StatPrefix: pb.GetStatPrefix(), Cluster: pb.GetCluster(), IdleTimeout: time.Minute}
	if pb.GetIdleTimeout() != nil {
		u.IdleTimeout = pb.GetIdleTimeout().AsDuration()
	}
	return u, nil
}

// Clusters resolves a cluster name in the configuration the flow started
// with; nil means no such cluster (yet).
type Clusters interface {
	Cluster(name string) *cluster.Cluster
}

// Serve runs one session of the captured flow f: a host of the cluster
// is picked (the load balancer sees f's original destination, for
// ORIGINAL_DST clusters) and datagrams are relayed to it through d until
// the flow ends. It fills in e's upstream fields and byte counts; when
// no session starts it closes f and sets Envoy's response flag (NC no
// such cluster, UH no host, UF the socket could not be opened).
func (c *Config) Serve(f *netstack.UDPFlow, clusters Clusters, d *upstream.Dialer, e *accesslog.Entry) {
	e.UpstreamCluster = c.Cluster
	cl := clusters.Cluster(c.Cluster)
	if cl == nil {
		f.Close()
		e.ResponseFlags, e.Details = "NC", "cluster not found"
		return
	}
	h, err := cl.PickHost(f.ID.Dst)
	if err != nil {
		f.Close()
		e.ResponseFlags, e.Details = "UH", err.Error()
		return
	}
	e.UpstreamHost = h.Address()
	Relay(f, d, h.Address(), e)
}

// Relay carries the datagrams of flow f to and from upstream dst over
// one connected socket opened by d (marked, so it is not captured again),
// until the flow ends; e gets the byte counts.
func Relay(f *netstack.UDPFlow, d *upstream.Dialer, dst netip.AddrPort, e *accesslog.Entry) {
	up, err := d.DialUDP(context.Background(), dst)
	if err != nil {
		f.Close()
		e.ResponseFlags = "UF"
		e.Details = err.Error()
		return
	}
	e.UpstreamLocal = up.LocalAddr().(*net.UDPAddr).AddrPort()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // upstream → client
		defer wg.Done()
		bp := bufPool.Get().(*[]byte)
		defer bufPool.Put(bp)
		for {
			n, err := up.Read(*bp)
			if err != nil {
				if errors.Is(err, syscall.ECONNREFUSED) {
					continue // ICMP port unreachable from an earlier datagram
				}
				f.Close()
				return
			}
			if _, err := f.WritePacket((*bp)[:n]); err != nil {
				f.Close()
				return
			}
			e.BytesSent += int64(n)
		}
	}()
	bp := bufPool.Get().(*[]byte)
	for {
		n, err := f.ReadPacket(*bp)
		if err != nil {
			break
		}
		if _, err := up.Write((*bp)[:n]); err != nil && !errors.Is(err, syscall.ECONNREFUSED) {
			break
		}
		e.BytesReceived += int64(n)
	}
	bufPool.Put(bp)
	f.Close()
	up.Close()
	wg.Wait()
}

// bufPool holds datagram buffers of the largest UDP payload.
var bufPool = sync.Pool{New: func() any { b := make([]byte, 64<<10); return &b }}
