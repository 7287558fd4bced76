package mesh

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	udpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/udp/udp_proxy/v3"

	"github.com/meshtun/meshtun/mesh/accesslog"
	"github.com/meshtun/meshtun/mesh/upstream"
	"github.com/meshtun/meshtun/netstack"
)

// UDPProxyFilter is Envoy's UDP listener filter name.
const UDPProxyFilter = "envoy.filters.udp_listener.udp_proxy"

// UDPProxy is a validated envoy.filters.udp_listener.udp_proxy: each
// downstream 4-tuple is a session to one host of the cluster.
type UDPProxy struct {
	StatPrefix  string
	Cluster     string
	IdleTimeout time.Duration // Envoy's default 60 s
}

func parseUDPListener(pb *listenerv3.Listener, clusterExists func(string) bool) (*UDPProxy, error) {
	if len(pb.GetFilterChains()) > 0 || pb.GetDefaultFilterChain() != nil {
		return nil, errors.New("filter_chains: a UDP listener takes its udp_proxy in listener_filters, not filter chains")
	}
	var u *UDPProxy
	for i, f := range pb.GetListenerFilters() {
		field := fmt.Sprintf("listener_filters[%d] (%s)", i, f.GetName())
		if f.GetName() != UDPProxyFilter && typeURLOf(f.GetTypedConfig()) != "type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig" {
			return nil, fmt.Errorf("%s: unknown UDP listener filter (want %s)", field, UDPProxyFilter)
		}
		var cfg udpproxyv3.UdpProxyConfig
		if err := f.GetTypedConfig().UnmarshalTo(&cfg); err != nil {
			return nil, fmt.Errorf("%s: typed_config: want envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig: %w", field, err)
		}
		if err := cfg.ValidateAll(); err != nil {
			return nil, fmt.Errorf("%s: %w", field, err)
		}
		if cfg.GetCluster() == "" {
			return nil, fmt.Errorf("%s: matcher: not supported; use cluster", field)
		}
		if !clusterExists(cfg.GetCluster()) {
			return nil, fmt.Errorf("%s: cluster: %q is not a known cluster", field, cfg.GetCluster())
		}
		u = &UDPProxy{StatPrefix: cfg.GetStatPrefix(), Cluster: cfg.GetCluster(), IdleTimeout: time.Minute}
		if cfg.GetIdleTimeout() != nil {
			u.IdleTimeout = cfg.GetIdleTimeout().AsDuration()
		}
	}
	if u == nil {
		return nil, fmt.Errorf("listener_filters: a UDP listener needs %s", UDPProxyFilter)
	}
	return u, nil
}

// relayUDP carries the datagrams of flow f to and from upstream dst over
// one connected, marked socket, until the flow idles out.
func relayUDP(f *netstack.UDPFlow, d *upstream.Dialer, dst netip.AddrPort, e *accesslog.Entry) {
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
		bp := udpBufPool.Get().(*[]byte)
		defer udpBufPool.Put(bp)
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
	bp := udpBufPool.Get().(*[]byte)
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
	udpBufPool.Put(bp)
	f.Close()
	up.Close()
	wg.Wait()
}

var udpBufPool = sync.Pool{New: func() any { b := make([]byte, 64<<10); return &b }}
