package proxy

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/rs/zerolog"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshtun/meshtun/agent/sds"
	"github.com/meshtun/meshtun/internal/xdstest"
	"github.com/meshtun/meshtun/mesh/secrets"
	"github.com/meshtun/meshtun/xdsclient"
)

const secureCluster = "outbound|443||secure.default.svc.cluster.local"

// asObj is m as the JSON object a bootstrap document holds.
func asObj(t *testing.T, m proto.Message) obj {
	t.Helper()
	b, err := protojson.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	var o obj
	if err := json.Unmarshal(b, &o); err != nil {
		t.Fatal(err)
	}
	return o
}

// staticSDSBootstrap is a bootstrap without ADS whose static cluster
// secure names default and ROOTCA over sds-grpc (a pipe to socket, as
// Istio's), with timeout as their initial_fetch_timeout, and a bound
// static listener whose tcp_proxy goes to it.
func staticSDSBootstrap(t *testing.T, socket string, timeout time.Duration) obj {
	c := xdstest.StaticCluster(secureCluster)
	c.ConnectTimeout = durationpb.New(time.Second)
	c.TransportSocket = xdstest.UpstreamTLSNaming(t,
		xdstest.SecretOverCluster("default", "sds-grpc", timeout), xdstest.SecretOverCluster("ROOTCA", "sds-grpc", timeout))
	lis := boundListener("front", freeAddr(t))
	lis["filter_chains"].([]obj)[0]["filters"].([]obj)[0]["typed_config"].(obj)["cluster"] = secureCluster
	return obj{
		"node":  obj{"id": "sidecar~10.0.0.1~app.default~default.svc.cluster.local", "cluster": "app.default"},
		"admin": obj{"address": obj{"socket_address": obj{"address": "127.0.0.1", "port_value": 0}}},
		"static_resources": obj{
			"clusters": []obj{
				{"name": "sds-grpc", "type": "STATIC", "connect_timeout": "1s", "load_assignment": obj{
					"cluster_name": "sds-grpc", "endpoints": []obj{{"lb_endpoints": []obj{{"endpoint": obj{"address": obj{
						"pipe": obj{"path": socket}}}}}}}}},
				asObj(t, c),
			},
			"listeners": []obj{lis},
		},
	}
}

// identityOf is a workload identity for the agent's SDS server: a
// self-signed SPIFFE certificate that is its own root.
func identityOf(t *testing.T) sds.Identity {
	cert, key := xdstest.SelfSigned(t, "spiffe://cluster.local/ns/default/sa/app")
	return sds.Identity{ChainPEM: cert, KeyPEM: key, RootsPEM: cert}
}

// TestStaticClusterWarmsOnSDS: a bootstrap whose static cluster names
// default and ROOTCA, which the agent's SDS server has not issued yet:
// the proxy is INITIALIZING and /ready names both secrets and their
// source; the cluster is not in force while the listener that goes to it
// is. The secrets arrive a second later: the cluster goes into force and
// the server is LIVE, without a reload.
func TestStaticClusterWarmsOnSDS(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "socket")
	agent, err := sds.New(sds.Options{SocketPath: socket, Log: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	defer agent.Close()
	p, _ := startProxy(t, staticSDSBootstrap(t, socket, 0))
	a := newAdminClient(t, p)

	code, body := a.get(t, "/ready")
	want := "INITIALIZING\nwaiting for secret ROOTCA from sds-grpc, secret default from sds-grpc\n"
	if code != 503 || body != want {
		t.Errorf("/ready = %d %q, want 503 %q", code, body, want)
	}
	if _, clusters := a.get(t, "/clusters"); strings.Contains(clusters, secureCluster) {
		t.Errorf("%s in force before its secrets:\n%s", secureCluster, clusters)
	}
	if !a.listeners(t)["front"] {
		t.Error("the listener that names no secret is not in force")
	}
	if _, dump := a.get(t, "/config_dump?resource=dynamic_warming_secrets"); !strings.Contains(dump, `"ROOTCA"`) || !strings.Contains(dump, `"default"`) {
		t.Errorf("warming secrets = %s", dump)
	}

	time.Sleep(time.Second)
	if code, _ := a.get(t, "/ready"); code != 503 {
		t.Fatalf("/ready = %d after a second without the secrets", code)
	}
	if err := agent.Update(identityOf(t)); err != nil {
		t.Fatal(err)
	}
	xdstest.Eventually(t, wait, "LIVE once the secrets arrived", func() bool {
		code, body := a.get(t, "/ready")
		return code == 200 && body == "LIVE\n"
	})
	if _, clusters := a.get(t, "/clusters"); !strings.Contains(clusters, secureCluster) {
		t.Errorf("%s not in force after its secrets arrived:\n%s", secureCluster, clusters)
	}
	if _, certs := a.get(t, "/certs"); !strings.Contains(certs, "spiffe://cluster.local/ns/default/sa/app") {
		t.Errorf("/certs = %s", certs)
	}
	if got := p.src.Stats()[statReloadSuccess]; got != 0 {
		t.Errorf("%d reloads: the cluster went into force through one", got)
	}
}

// TestInitialFetchTimeoutEndsWarming: with a positive
// initial_fetch_timeout, a cluster whose secrets never come goes into
// force without them once it has passed (its handshakes then fail naming
// the secret), and the server becomes LIVE; the secrets stay warming.
func TestInitialFetchTimeoutEndsWarming(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "nobody-listens")
	p, _ := startProxy(t, staticSDSBootstrap(t, socket, 700*time.Millisecond))
	a := newAdminClient(t, p)
	if code, body := a.get(t, "/ready"); code != 503 || !strings.Contains(body, "waiting for secret ROOTCA from sds-grpc") {
		t.Errorf("/ready = %d %q before the timeout", code, body)
	}
	start := time.Now()
	xdstest.Eventually(t, wait, "LIVE after the initial fetch timeout", func() bool {
		code, _ := a.get(t, "/ready")
		return code == 200
	})
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("LIVE %v after the timeout of 700ms", d)
	}
	if _, clusters := a.get(t, "/clusters"); !strings.Contains(clusters, secureCluster) {
		t.Errorf("%s not in force after its initial fetch timeout:\n%s", secureCluster, clusters)
	}
	if w := p.src.secrets.Warming(); len(w) != 2 {
		t.Errorf("warming secrets = %v, want ROOTCA and default still subscribed", w)
	}
}

// adsSecureCluster is an EDS cluster whose TLS context trusts the CA in
// secret name, delivered over ADS.
func adsSecureCluster(t *testing.T, name string, timeout time.Duration) *clusterv3.Cluster {
	c := xdstest.EDSCluster(secureCluster)
	c.TransportSocket = xdstest.UpstreamTLSNaming(t, nil, xdstest.SecretOverADS(name, timeout))
	return c
}

func withSecure(t *testing.T, c *clusterv3.Cluster, secs ...types.Resource) map[string][]types.Resource {
	res := services(t, 1)
	res[resource.ClusterType] = append(res[resource.ClusterType], c)
	res[resource.EndpointType] = append(res[resource.EndpointType], xdstest.Assignment(secureCluster))
	if len(secs) > 0 {
		res[resource.SecretType] = secs
	}
	return res
}

// TestADSClusterWarmsOnSecret: a cluster naming a kubernetes:// secret
// over ADS is ACKed and warms (dynamic_warming_clusters, not in /clusters,
// /ready names the secret) until the control plane sends the secret on
// the same stream; a changed version naming a missing secret keeps the
// previous one serving; a bad secret is NACKed by name and the cluster
// keeps waiting; the good one puts it in force.
func TestADSClusterWarmsOnSecret(t *testing.T) {
	apis(t, func(t *testing.T, api string) {
		srv := xdstest.NewServer(t)
		const node = "node-a"
		srv.Set(t, node, withSecure(t, adsSecureCluster(t, "kubernetes://ca", 0)))
		p, _ := startProxy(t, bootstrapDoc(node, srv.Addr, api))
		a := newAdminClient(t, p)
		xdstest.Eventually(t, wait, "svc0's listener in force", func() bool { return a.listeners(t)[svc0] })
		xdstest.Eventually(t, wait, "CDS ACKed", func() bool { return srv.ACKs(resource.ClusterType) > 0 })
		if code, body := a.get(t, "/ready"); code != 503 || body != "INITIALIZING\nwaiting for secret kubernetes://ca from ADS\n" {
			t.Errorf("/ready = %d %q", code, body)
		}
		if _, dump := a.get(t, "/config_dump?resource=dynamic_warming_clusters"); !strings.Contains(dump, secureCluster) {
			t.Errorf("dynamic_warming_clusters = %s", dump)
		}
		if _, clusters := a.get(t, "/clusters"); strings.Contains(clusters, secureCluster) {
			t.Errorf("%s in force before its secret", secureCluster)
		}

		ca, _ := xdstest.SelfSigned(t, "spiffe://cluster.local/ns/istio-system/sa/ca")
		srv.Set(t, node, withSecure(t, adsSecureCluster(t, "kubernetes://ca", 0), xdstest.CASecret("kubernetes://ca", ca)))
		xdstest.Eventually(t, wait, "LIVE with the cluster in force", func() bool {
			code, _ := a.get(t, "/ready")
			_, clusters := a.get(t, "/clusters")
			return code == 200 && strings.Contains(clusters, secureCluster)
		})
		// The secret is applied before its ACK is sent: the cluster can be
		// in force a moment before the server has the ACK.
		xdstest.Eventually(t, wait, "the secret ACKed", func() bool { return srv.ACKs(resource.SecretType) > 0 })
		if _, dump := a.get(t, "/config_dump?resource=dynamic_warming_clusters"); strings.Contains(dump, secureCluster) {
			t.Errorf("still warming: %s", dump)
		}

		// A new version that names a secret the server does not have: the
		// previous one keeps serving, the new one warms, LIVE stays.
		changed := adsSecureCluster(t, "kubernetes://other", 0)
		changed.ConnectTimeout = durationpb.New(7 * time.Second)
		srv.Set(t, node, withSecure(t, changed, xdstest.CASecret("kubernetes://ca", ca)))
		xdstest.Eventually(t, wait, "the new version warming", func() bool {
			_, dump := a.get(t, "/config_dump?resource=dynamic_warming_clusters")
			return strings.Contains(dump, "kubernetes://other")
		})
		_, active := a.get(t, "/config_dump?resource=dynamic_active_clusters")
		if !strings.Contains(active, secureCluster) || strings.Contains(active, "kubernetes://other") || strings.Contains(active, `"7s"`) {
			t.Errorf("dynamic_active_clusters does not hold the previous version:\n%s", active)
		}
		if code, _ := a.get(t, "/ready"); code != 200 {
			t.Errorf("/ready = %d: a later update warming made the server not LIVE", code)
		}

		// A bad secret is NACKed by name; the cluster keeps waiting.
		bad := xdstest.CASecret("kubernetes://other", []byte("not a certificate"))
		srv.Set(t, node, withSecure(t, changed, xdstest.CASecret("kubernetes://ca", ca), bad))
		xdstest.Eventually(t, wait, "the bad secret NACKed", func() bool {
			for _, n := range srv.NACKs() {
				if n.TypeURL == resource.SecretType && strings.Contains(n.Message, `secret "kubernetes://other": validation_context.trusted_ca: no PEM certificate`) {
					return true
				}
			}
			return false
		})
		if _, dump := a.get(t, "/config_dump?resource=dynamic_warming_clusters"); !strings.Contains(dump, "kubernetes://other") {
			t.Errorf("the changed cluster stopped warming on a bad secret: %s", dump)
		}
		other, _ := xdstest.SelfSigned(t, "spiffe://cluster.local/ns/istio-system/sa/other")
		srv.Set(t, node, withSecure(t, changed, xdstest.CASecret("kubernetes://ca", ca), xdstest.CASecret("kubernetes://other", other)))
		xdstest.Eventually(t, wait, "the new version in force", func() bool {
			_, active := a.get(t, "/config_dump?resource=dynamic_active_clusters")
			return strings.Contains(active, "kubernetes://other") && strings.Contains(active, `"7s"`)
		})
	})
}

// TestPlanHoldsListeners: the plan of an update keeps a listener whose
// chain names a missing secret out of force when it is new, at its
// previous version (with the route configurations that version uses) when
// it changed, and lists it in the warming dump; once the secret is in the
// store the same desired configuration goes into force whole.
func TestPlanHoldsListeners(t *testing.T) {
	s := &source{secrets: secrets.NewStore(), log: zerolog.Nop()}
	tlsChain := func(l *listenerv3.Listener) *listenerv3.Listener {
		l = proto.Clone(l).(*listenerv3.Listener)
		l.FilterChains[0].TransportSocket = xdstest.DownstreamTLSNaming(t, xdstest.SecretOverCluster("default", "sds-grpc", 0), nil)
		return l
	}
	oldL := xdstest.HTTPListener(t, "changed", "10.0.0.1", 80, "old-routes", false)
	prev := &xdsclient.Resources{
		Listeners: map[string]*listenerv3.Listener{"changed": oldL},
		Routes:    map[string]*routev3.RouteConfiguration{"old-routes": xdstest.RouteConfig("old-routes", "c")},
		Versions:  map[string]string{xdsclient.ListenerType: "1"},
	}
	s.force.dyn = prev
	desired := &xdsclient.Resources{
		Listeners: map[string]*listenerv3.Listener{
			"changed": tlsChain(xdstest.HTTPListener(t, "changed", "10.0.0.1", 80, "new-routes", false)),
			"new":     tlsChain(xdstest.TCPListener(t, "new", "10.0.0.2", 80, "c", false)),
			"plain":   xdstest.TCPListener(t, "plain", "10.0.0.3", 80, "c", false),
		},
		Routes:   map[string]*routev3.RouteConfiguration{"new-routes": xdstest.RouteConfig("new-routes", "c")},
		Versions: map[string]string{xdsclient.ListenerType: "2"},
	}
	now := time.Now()
	p, err := s.makePlan(nil, nil, desired, now)
	if err != nil {
		t.Fatal(err)
	}
	if p.dyn.Listeners["changed"] != oldL || p.dyn.Listeners["new"] != nil || p.dyn.Listeners["plain"] != desired.Listeners["plain"] {
		t.Errorf("listeners in force = %v", p.dyn.Listeners)
	}
	if p.dyn.Routes["old-routes"] == nil || p.dyn.Routes["new-routes"] == nil {
		t.Errorf("routes = %v: the kept version's routes must stay", p.dyn.Routes)
	}
	if len(p.warm.listeners) != 2 || p.warm.waiting != "waiting for secret default from sds-grpc" {
		t.Errorf("warming = %v %q", p.warm.listeners, p.warm.waiting)
	}
	if _, ok := p.refs.Names["default"]; !ok {
		t.Errorf("refs = %v: the warming listeners' secret is not subscribed", p.refs.Names)
	}
	s.warm.Store(p.warm)
	w := s.warming()
	if r, ok := w.Listeners["new"]; !ok || r.Version != "2" || r.Msg != desired.Listeners["new"] {
		t.Errorf("warming dump = %+v", w.Listeners)
	}

	s.secrets.SetRefs(p.refs)
	cert, key := xdstest.SelfSigned(t, "spiffe://cluster.local/ns/default/sa/app")
	if err := s.secrets.Put("1", xdstest.CertSecret("default", cert, key), now); err != nil {
		t.Fatal(err)
	}
	select {
	case <-s.secrets.Arrived():
	default:
		t.Error("the store did not signal the arrival")
	}
	p, err = s.makePlan(nil, nil, desired, now)
	if err != nil {
		t.Fatal(err)
	}
	if p.dyn != desired || !p.warm.empty() {
		t.Errorf("with the secret: in force %v, warming %v; want the desired configuration whole", p.dyn.Listeners, p.warm.listeners)
	}
}

// TestPlanRejectsUnfollowableReference: a dynamic resource whose TLS
// context names a secret meshtun cannot fetch is named alone (NACKed);
// a static one fails the bootstrap.
func TestPlanRejectsUnfollowableReference(t *testing.T) {
	s := &source{secrets: secrets.NewStore(), log: zerolog.Nop()}
	bad := xdstest.EDSCluster("bad")
	sc := xdstest.SecretOverCluster("default", "sds-grpc", 0)
	sc.SdsConfig.GetApiConfigSource().ApiType = 1 // REST
	bad.TransportSocket = xdstest.UpstreamTLSNaming(t, sc, nil)
	_, err := s.makePlan(nil, nil, &xdsclient.Resources{Clusters: map[string]*clusterv3.Cluster{"bad": bad, "ok": xdstest.EDSCluster("ok")}}, time.Now())
	es, ok := xdsclient.AsResourceErrors(err)
	if !ok || len(es) != 1 || es[0].Name != "bad" ||
		es[0].Error() != `cluster "bad": transport_socket.common_tls_context.tls_certificate_sds_secret_configs[0] (default).sds_config.api_config_source.api_type: REST not supported (want GRPC)` {
		t.Errorf("err = %v", err)
	}
	_, err = s.makePlan(nil, []*clusterv3.Cluster{bad}, &xdsclient.Resources{}, time.Now())
	if _, ok := xdsclient.AsResourceErrors(err); ok || err == nil || !strings.HasPrefix(err.Error(), `static_resources: cluster "bad": transport_socket`) {
		t.Errorf("static: err = %v", err)
	}
}

// TestWarmingClusterValidatedOnArrival: a cluster that would warm on a
// missing secret but is invalid is NACKed when it arrives, naming it and
// its field, as Envoy rejects it, rather than ACKed and found out when its
// secret comes; nothing waits for it.
func TestWarmingClusterValidatedOnArrival(t *testing.T) {
	srv := xdstest.NewServer(t)
	const node = "node-b"
	bad := adsSecureCluster(t, "kubernetes://never", 0)
	bad.LbSubsetConfig = &clusterv3.Cluster_LbSubsetConfig{}
	srv.Set(t, node, withSecure(t, bad))
	p, _ := startProxy(t, bootstrapDoc(node, srv.Addr, "GRPC"))
	a := newAdminClient(t, p)
	xdstest.Eventually(t, wait, "the invalid cluster NACKed", func() bool {
		for _, n := range srv.NACKs() {
			if n.TypeURL == resource.ClusterType && strings.Contains(n.Message, `cluster "`+secureCluster+`": lb_subset_config: subset load balancing not supported`) {
				return true
			}
		}
		return false
	})
	xdstest.Eventually(t, wait, "LIVE with svc0 in force", func() bool {
		code, _ := a.get(t, "/ready")
		return code == 200 && a.listeners(t)[svc0]
	})
	if _, dump := a.get(t, "/config_dump?resource=dynamic_warming_clusters"); strings.Contains(dump, secureCluster) {
		t.Errorf("the rejected cluster warms: %s", dump)
	}
}
