//go:build linux

package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/original_dst/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

const xdsNode = "sidecar~10.0.0.2~app.default~default.svc.cluster.local"

// toProto turns one of the JSON building blocks into its proto.
func toProto[T proto.Message](t *testing.T, o obj, m T) T {
	t.Helper()
	b, err := json.Marshal(o)
	if err != nil {
		t.Fatal(err)
	}
	if err := protojson.Unmarshal(b, m); err != nil {
		t.Fatalf("%s: %v", b, err)
	}
	return m
}

// controlPlane is go-control-plane's ADS server, listening in a namespace.
type controlPlane struct {
	cache    cachev3.SnapshotCache
	mu       sync.Mutex
	acks     map[string]int // type URL -> ACKs (requests with a nonce and no error)
	nacks    int
	lastNack string
	nackMsg  string
	stop     func()
	nodeID   string
	agent    string
	nodeMeta string // the last node's metadata, as JSON
	replies  []xdsReply
}

// xdsReply is a request that answered a response (it carries the
// response's nonce): an ACK, or a NACK with its error_detail.
type xdsReply struct {
	typ, version string // version: SotW's version_info ("" over delta)
	nack         bool
	detail       string
}

func (cp *controlPlane) setNode(node *corev3.Node) {
	md, _ := protojson.Marshal(node.GetMetadata())
	cp.mu.Lock()
	defer cp.mu.Unlock()
	cp.nodeID, cp.agent, cp.nodeMeta = node.GetId(), node.GetUserAgentName(), string(md)
}

// lastNodeMetadata is the metadata of the node last seen on a stream.
func (cp *controlPlane) lastNodeMetadata() string {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	return cp.nodeMeta
}

func (cp *controlPlane) setNackMsg(m string) {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	cp.nackMsg = m
}

func (cp *controlPlane) nack() (int, string) {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	return cp.nacks, cp.nackMsg
}

func startControlPlane(t *testing.T, ns, addr string) *controlPlane {
	t.Helper()
	cp := &controlPlane{cache: cachev3.NewSnapshotCache(true, cachev3.IDHash{}, nil), acks: map[string]int{}}
	lis, err := listenTCP(ns, addr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	count := func(typ, nonce, version string, detail *status.Status) {
		cp.mu.Lock()
		defer cp.mu.Unlock()
		nack := detail != nil
		if nonce != "" || nack {
			cp.replies = append(cp.replies, xdsReply{typ: typ, version: version, nack: nack, detail: detail.GetMessage()})
		}
		switch {
		case nack:
			cp.nacks++
			cp.lastNack = typ
		case nonce != "":
			cp.acks[typ]++
		}
	}
	seen := func(typ, nonce, version string, node *corev3.Node, detail *status.Status) {
		if node != nil {
			cp.setNode(node)
		}
		count(typ, nonce, version, detail)
		if detail != nil {
			cp.setNackMsg(detail.GetMessage())
		}
	}
	cb := serverv3.CallbackFuncs{
		StreamDeltaRequestFunc: func(_ int64, r *discoveryv3.DeltaDiscoveryRequest) error {
			seen(r.GetTypeUrl(), r.GetResponseNonce(), "", r.GetNode(), r.GetErrorDetail())
			return nil
		},
		StreamRequestFunc: func(_ int64, r *discoveryv3.DiscoveryRequest) error {
			seen(r.GetTypeUrl(), r.GetResponseNonce(), r.GetVersionInfo(), r.GetNode(), r.GetErrorDetail())
			return nil
		},
	}
	gs := grpc.NewServer()
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(gs, serverv3.NewServer(ctx, cp.cache, cb))
	go gs.Serve(lis)
	cp.stop = func() { cancel(); gs.Stop() }
	t.Cleanup(cp.stop)
	return cp
}

func (cp *controlPlane) ackCount(typ string) int {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	return cp.acks[typ]
}

// xdsListener converts a listener; the Istio telemetry filter, whose type
// no Go package here defines, is sent as istiod sends it: an opaque Any.
func xdsListener(t *testing.T, l obj) *listenerv3.Listener {
	t.Helper()
	var opaque []int
	chains, _ := l["filter_chains"].([]obj)
	for i, fc := range chains {
		fs := fc["filters"].([]obj)
		if len(fs) > 0 && fs[0]["name"] == "istio.stats" {
			fc["filters"] = fs[1:]
			opaque = append(opaque, i)
		}
	}
	pb := toProto(t, l, &listenerv3.Listener{})
	for _, i := range opaque {
		fc := pb.FilterChains[i]
		fc.Filters = append([]*listenerv3.Filter{{Name: "istio.stats", ConfigType: &listenerv3.Filter_TypedConfig{
			TypedConfig: &anypb.Any{TypeUrl: "type.googleapis.com/stats.PluginConfig", Value: []byte{0x0a, 0x00}}}}}, fc.Filters...)
	}
	return pb
}

func (cp *controlPlane) push(t *testing.T, version string, listeners, clusters []obj, endpoints map[string][]netip.AddrPort) {
	t.Helper()
	cp.pushHTTP(t, version, listeners, clusters, endpoints, nil)
}

func edsCluster(name string) obj {
	return obj{"name": name, "type": "EDS", "connect_timeout": "2s", "lb_policy": "ROUND_ROBIN",
		"eds_cluster_config": obj{"eds_config": obj{"ads": obj{}, "resource_api_version": "V3"}}}
}

// TestXDSServesNacksAndFlipsCatchAll is xDS cases 1, 2 and 5, over delta
// and state-of-the-world ADS: the proxy takes listeners, an EDS cluster
// and its endpoints from go-control-plane, serves a VIP through them and
// ACKs; an invalid listener is NACKed naming it while traffic continues;
// a push that turns the catch-all into BlackHoleCluster refuses new flows
// to an unregistered destination within 1 s of its ACK.
func TestXDSServesNacksAndFlipsCatchAll(t *testing.T) {
	requireRoot(t)
	for _, api := range []string{"DELTA_GRPC", "GRPC"} {
		t.Run(api, func(t *testing.T) { xdsServesNacksAndFlips(t, api) })
	}
}

func xdsServesNacksAndFlips(t *testing.T, api string) {
	topo := newTopology(t)
	cp := startControlPlane(t, topo.Services, ap(topo.GwV4, 15010))
	ep1 := startTCPServer(t, topo.Services, ap(topo.SvcV4, 9080), echo)
	ep2 := startTCPServer(t, topo.Services, ap(topo.Svc2V4, 9080), echo)
	ext := startTCPServer(t, topo.Services, ap(topo.SvcV4, 7000), echo)
	v := vip(topo, false, 80)
	cl := "outbound|9080||reviews.default.svc.cluster.local"
	eps := map[string][]netip.AddrPort{cl: {netip.AddrPortFrom(topo.SvcV4, 9080), netip.AddrPortFrom(topo.Svc2V4, 9080)}}
	cp.push(t, "1", []obj{virtualOutbound("PassthroughCluster"), virtualInbound(), serviceListener(v, 9080, cl)},
		append(istioClusters(), edsCluster(cl)), eps)

	bs := adsBootstrap(t, topo, api)
	px := startProxy(t, topo, "--bootstrap", bs)

	// The first flows wait for the configuration to arrive.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := tcpEcho(topo.Pod, ap(v, 9080), 1024); err == nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("the VIP never served: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	for i := 0; i < 3; i++ {
		if _, err := tcpEcho(topo.Pod, ap(v, 9080), 1024); err != nil {
			t.Fatal(err)
		}
	}
	if a, b := len(ep1.accepted()), len(ep2.accepted()); a+b != 4 || a == 0 || b == 0 {
		t.Fatalf("EDS endpoints accepted %d and %d, want 4 spread over both", a, b)
	}
	for _, typ := range []string{resource.ClusterType, resource.EndpointType, resource.ListenerType} {
		if cp.ackCount(typ) == 0 {
			t.Errorf("the control plane saw no ACK for %s", typ)
		}
	}
	// pilot-agent's readiness reads these from /stats.
	stats := adminGet(t, topo, "/stats?usedonly&filter=^(cluster_manager\\.cds|listener_manager\\.lds)\\.update_success$")
	if !strings.Contains(stats, "cluster_manager.cds.update_success: ") || !strings.Contains(stats, "listener_manager.lds.update_success: ") {
		t.Errorf("admin /stats lacks the xDS update counters:\n%s", stats)
	}
	cp.mu.Lock()
	if cp.nodeID != xdsNode || cp.agent != "meshtun" {
		t.Errorf("node seen by the control plane: id %q user_agent_name %q", cp.nodeID, cp.agent)
	}
	cp.mu.Unlock()
	if _, err := tcpEcho(topo.Pod, ap(topo.SvcV4, 7000), 1024); err != nil {
		t.Fatalf("ALLOW_ANY passthrough: %v", err)
	}
	before := len(ext.accepted())

	// A listener meshtun cannot serve (tcp_proxy tunneling_config) is
	// NACKed, naming it and the field; the previous configuration keeps
	// serving. (A cluster not yet known is not an error over xDS, as in
	// Envoy: LDS and CDS may arrive in either order.)
	n0, _ := cp.nack()
	bad := serviceListener(vip(topo, false, 81), 9090, cl)
	bad["filter_chains"].([]obj)[0]["filters"].([]obj)[0]["typed_config"].(obj)["tunneling_config"] = obj{"hostname": "example.com:443"}
	cp.push(t, "1b", []obj{virtualOutbound("PassthroughCluster"), virtualInbound(), serviceListener(v, 9080, cl), bad},
		append(istioClusters(), edsCluster(cl)), eps)
	deadline = time.Now().Add(10 * time.Second)
	for {
		n, msg := cp.nack()
		if n > n0 {
			if !strings.Contains(msg, vip(topo, false, 81).String()+"_9090") || !strings.Contains(msg, "tunneling_config") {
				t.Fatalf("NACK error_detail %q does not name the listener and the field", msg)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the invalid listener was never NACKed")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := tcpEcho(topo.Pod, ap(v, 9080), 1024); err != nil {
		t.Fatalf("after the NACK the previous configuration stopped serving: %v", err)
	}

	// REGISTRY_ONLY by a push.
	lacks := cp.ackCount(resource.ListenerType)
	cp.push(t, "2", []obj{virtualOutbound("BlackHoleCluster"), virtualInbound(), serviceListener(v, 9080, cl)},
		append(istioClusters(), edsCluster(cl)), eps)
	deadline = time.Now().Add(5 * time.Second)
	for cp.ackCount(resource.ListenerType) == lacks && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	acked := time.Now()
	for {
		c, err := dialTCP(topo.Pod, ap(topo.SvcV4, 7000), time.Second)
		if err != nil {
			break
		}
		c.Close()
		if time.Since(acked) > time.Second {
			t.Fatal("an unregistered destination still connects 1s after the ACK of the BlackHole push")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if n := len(ext.accepted()); n > before+20 {
		t.Fatalf("external server accepted %d connections after the push", n-before)
	}
	if _, err := tcpEcho(topo.Pod, ap(v, 9080), 1024); err != nil {
		t.Fatalf("the registered VIP stopped working after the push: %v", err)
	}
	if e, ok := px.waitAccess(func(e AccessEntry) bool { return e.UpstreamCluster == "BlackHoleCluster" }, accessWait); !ok {
		t.Fatalf("no BlackHoleCluster access line: %v", e)
	}
}

func writeBootstrapObj(t *testing.T, o obj) string {
	t.Helper()
	b, err := json.MarshalIndent(o, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	p := t.TempDir() + "/bootstrap.json"
	if err := writeFile(p, b); err != nil {
		t.Fatal(err)
	}
	return p
}

func writeFile(p string, b []byte) error { return os.WriteFile(p, b, 0o644) }

// TestXDSFlowsSurvivePushesAndRestart is xDS cases 3 and 4: 500 flows stay
// open and intact while the control plane pushes 50 updates (endpoint
// changes, an unrelated listener added and removed), then the control
// plane is killed — traffic continues — and a new one on the same address
// is reconnected to and its next update applied.
func TestXDSFlowsSurvivePushesAndRestart(t *testing.T) {
	requireRoot(t)
	raiseNoFile(t, 8192)
	topo := newTopology(t)
	addr := ap(topo.GwV4, 15010)
	cp := startControlPlane(t, topo.Services, addr)
	startTCPServer(t, topo.Services, ap(topo.SvcV4, 9080), echo)
	startTCPServer(t, topo.Services, ap(topo.Svc2V4, 9080), echo)
	v, extra := vip(topo, false, 90), vip(topo, false, 91)
	cl := "outbound|9080||reviews.default.svc.cluster.local"
	e1, e2 := netip.AddrPortFrom(topo.SvcV4, 9080), netip.AddrPortFrom(topo.Svc2V4, 9080)
	base := []obj{virtualOutbound("PassthroughCluster"), virtualInbound(), serviceListener(v, 9080, cl)}
	clusters := append(istioClusters(), edsCluster(cl))
	cp.push(t, "1", base, clusters, map[string][]netip.AddrPort{cl: {e1, e2}})
	bs := adsBootstrap(t, topo, "DELTA_GRPC")
	startProxy(t, topo, "--bootstrap", bs)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := tcpEcho(topo.Pod, ap(v, 9080), 64); err == nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("the VIP never served: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}

	// 500 flows, open for the whole push series.
	const flows = 500
	conns := make([]*net.TCPConn, flows)
	for i := range conns {
		c, err := dialTCP(topo.Pod, ap(v, 9080), dialTimeout)
		if err != nil {
			t.Fatalf("flow %d: %v", i, err)
		}
		defer c.Close()
		conns[i] = c
	}
	roundAll := func(round int) {
		t.Helper()
		var wg sync.WaitGroup
		errs := make(chan error, flows)
		for i, c := range conns {
			wg.Add(1)
			go func(i int, c *net.TCPConn) {
				defer wg.Done()
				if err := pingPong(c, randomPayload(2048)); err != nil {
					errs <- fmt.Errorf("flow %d round %d: %w", i, round, err)
				}
			}(i, c)
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
	}
	roundAll(0)
	for i := 0; i < 50; i++ {
		ls := base
		if i%2 == 0 {
			ls = append(append([]obj(nil), base...), serviceListener(extra, 9080, cl))
		}
		eps := []netip.AddrPort{e1, e2}
		if i%3 == 1 {
			eps = []netip.AddrPort{e2}
		}
		cp.push(t, fmt.Sprintf("p%d", i), ls, clusters, map[string][]netip.AddrPort{cl: eps})
		time.Sleep(20 * time.Millisecond)
	}
	roundAll(1)

	// Control plane gone: traffic continues on the last configuration.
	cp.stop()
	if _, err := tcpEcho(topo.Pod, ap(v, 9080), 1024); err != nil {
		t.Fatalf("with the control plane down: %v", err)
	}
	roundAll(2)
	// A new control plane on the same address: reconnect, next update applied.
	cp2 := startControlPlane(t, topo.Services, addr)
	startTCPServer(t, topo.Services, ap(topo.SvcV4, 9081), echo)
	cl2 := "outbound|9081||details.default.svc.cluster.local"
	newVIP := vip(topo, false, 92)
	cp2.push(t, "r1", append(append([]obj(nil), base...), serviceListener(newVIP, 9081, cl2)),
		append(append([]obj(nil), clusters...), staticCluster(cl2, "ROUND_ROBIN", netip.AddrPortFrom(topo.SvcV4, 9081))),
		map[string][]netip.AddrPort{cl: {e1, e2}})
	deadline = time.Now().Add(20 * time.Second)
	for {
		if _, err := tcpEcho(topo.Pod, ap(newVIP, 9081), 64); err == nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("the update from the restarted control plane was never applied: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	roundAll(3)
}

// pingPong sends msg on a long-lived echo connection and reads it back
// without closing anything: the flow stays open for the next round.
func pingPong(c *net.TCPConn, msg []byte) error {
	c.SetDeadline(time.Now().Add(echoTimeout))
	if _, err := c.Write(msg); err != nil {
		return err
	}
	got := make([]byte, len(msg))
	if _, err := readFull(c, got); err != nil {
		return err
	}
	if string(got) != string(msg) {
		return fmt.Errorf("echo corrupted")
	}
	return nil
}

// TestXDSListenerRemovedDrains is xDS case 6: a listener removed by a push
// stops taking new flows (they go to the catch-all, here BlackHoleCluster:
// refused) while its open flows go on, until --drain-duration closes them.
func TestXDSListenerRemovedDrains(t *testing.T) {
	requireRoot(t)
	topo := newTopology(t)
	cp := startControlPlane(t, topo.Services, ap(topo.GwV4, 15010))
	startTCPServer(t, topo.Services, ap(topo.SvcV4, 9080), echo)
	v := vip(topo, false, 95)
	cl := "outbound|9080||reviews.default.svc.cluster.local"
	eps := map[string][]netip.AddrPort{cl: {netip.AddrPortFrom(topo.SvcV4, 9080)}}
	clusters := append(istioClusters(), edsCluster(cl))
	cp.push(t, "1", []obj{virtualOutbound("BlackHoleCluster"), virtualInbound(), serviceListener(v, 9080, cl)}, clusters, eps)
	bs := adsBootstrap(t, topo, "DELTA_GRPC")
	px := startProxy(t, topo, "--bootstrap", bs, "--drain-duration", "1500ms")
	var old *net.TCPConn
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := dialTCP(topo.Pod, ap(v, 9080), time.Second)
		if err == nil {
			if err = pingPong(c, []byte("before")); err == nil {
				old = c
				break
			}
			c.Close()
		}
		if time.Now().After(deadline) {
			t.Fatalf("the VIP never served: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	defer old.Close()

	lacks := cp.ackCount(resource.ListenerType)
	cp.push(t, "2", []obj{virtualOutbound("BlackHoleCluster"), virtualInbound()}, clusters, eps)
	for cp.ackCount(resource.ListenerType) == lacks && time.Now().Before(deadline.Add(10*time.Second)) {
		time.Sleep(20 * time.Millisecond)
	}
	removed := time.Now()
	// New flows to the removed listener's address go to the catch-all.
	if c, err := dialTCP(topo.Pod, ap(v, 9080), time.Second); err == nil {
		c.Close()
		t.Fatal("a new flow still reached the removed listener")
	}
	// The open flow goes on while draining...
	if err := pingPong(old, []byte("draining")); err != nil {
		t.Fatalf("open flow cut at removal: %v", err)
	}
	// ...and is closed once the drain duration has passed.
	old.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := old.Read(make([]byte, 16))
	if err == nil || isTimeout(err) {
		t.Fatalf("flow still open %v after removal (read: %v)", time.Since(removed), err)
	}
	if d := time.Since(removed); d < time.Second {
		t.Fatalf("flow closed after %v, before the 1.5s drain", d)
	}
	if e, ok := px.waitAccess(func(e AccessEntry) bool { return strings.Contains(e.Raw, "listener drained") }, accessWait); !ok {
		t.Fatalf("no access line saying the flow was drained: %v", e)
	}
}

// adsBootstrap is Istio's shape of an xDS bootstrap: ADS of the given
// api_type to the static cluster xds-grpc, the control plane at
// GwV4:15010 in the services namespace.
func adsBootstrap(t *testing.T, topo *topology, api string) string {
	return writeBootstrapObj(t, obj{
		"node": obj{"id": xdsNode, "cluster": "app.default"},
		"dynamic_resources": obj{
			"ads_config": obj{"api_type": api, "transport_api_version": "V3", "grpc_services": []obj{{"envoy_grpc": obj{"cluster_name": "xds-grpc"}}}},
			"cds_config": obj{"ads": obj{}, "resource_api_version": "V3"},
			"lds_config": obj{"ads": obj{}, "resource_api_version": "V3"},
		},
		"static_resources": obj{"clusters": []obj{staticCluster("xds-grpc", "ROUND_ROBIN", netip.AddrPortFrom(topo.GwV4, 15010))}},
	})
}
