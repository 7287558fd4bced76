package proxy

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/rs/zerolog"
	"google.golang.org/protobuf/proto"

	"github.com/meshtun/meshtun/internal/logging"
	"github.com/meshtun/meshtun/mesh"
	"github.com/meshtun/meshtun/mesh/bootstrap"
	clusterpkg "github.com/meshtun/meshtun/mesh/cluster"
	"github.com/meshtun/meshtun/mesh/secrets"
	"github.com/meshtun/meshtun/xdsclient"
)

// The admin stats of bootstrap reloads, named as Envoy names the outcome
// of a configuration update (update_success, update_rejected).
const (
	statReloadSuccess  = "server.bootstrap_reload.update_success"
	statReloadRejected = "server.bootstrap_reload.update_rejected"
)

// source owns where the proxy's configuration comes from: the bootstrap
// file (static resources) and, when it has an ads_config, one xDS client
// for the life of the process. Reload re-reads the file in process
// (SIGHUP, as the agent sends when the bootstrap's inputs change): flows in
// progress keep the snapshot they started with, and a bad file changes
// nothing.
//
// Two locks, taken in this order: reloadMu makes reloads (and start, stop)
// one at a time; applyMu makes what changes the configuration in force one
// at a time (an xDS update, the static part of a reload). Nothing the admin
// reads takes either: the bootstrap in force is an immutable value behind
// an atomic pointer, the counters are atomics, so /stats and /ready answer
// while a 10,000-service update is being built.
type source struct {
	// Fixed by New, before start.
	path    string
	root    zerolog.Logger
	log     zerolog.Logger
	srv     *mesh.Server
	opts    mesh.BuildOptions
	drain   time.Duration
	control func(network, address string, c syscall.RawConn) error
	version string // the xDS client's user agent version
	// secrets is the SDS secret store /certs and /config_dump read; sds
	// (set by start) fetches what the configuration in force references.
	secrets *secrets.Store
	sds     atomic.Pointer[secrets.Client]

	reloadMu sync.Mutex
	// run is the xDS client's Run in progress (reloadMu); nil when the
	// bootstrap has no ADS.
	run *xdsRun

	applyMu sync.Mutex
	// dynamic is the xDS configuration in force (applyMu): a reload applies
	// the new static resources with it, so dynamic listeners and clusters
	// serve through a reload.
	dynamic *xdsclient.Resources
	// xdsOn (applyMu): the bootstrap in force has ADS. An update that races
	// the reload that removed it is refused, not applied.
	xdsOn bool
	// mem hands the memory big xDS updates free back to the OS, after
	// them (memory.go).
	mem releaser

	// cur is the bootstrap in force and the applier built for it.
	cur atomic.Pointer[loaded]
	// client is the xDS client, created with the first bootstrap that has
	// ADS and reconfigured, never replaced, by reloads: its accepted state
	// and counters are the process's.
	client atomic.Pointer[xdsclient.Client]

	// initialized is set once the first configuration is in force with
	// nothing waiting for a secret (settle). Until then the server is
	// INITIALIZING, as Envoy is before its first CDS/LDS responses and
	// while its initial clusters and listeners warm.
	initialized atomic.Bool
	// configured (applyMu): the first configuration was delivered:
	// without ADS when the bootstrap is applied (at start or by a
	// reload), else when the first xDS update with listeners is.
	configured bool

	// Warming on secrets (warming.go), all applyMu but the atomics:
	// force is what the last plan put in force, refCache the references
	// of the resources it saw, warm what waits (read by the admin),
	// deadline the next initial_fetch_timeout expiry (UnixNano, 0: none)
	// and wake tells the rewarm loop that it changed.
	force      inForce
	refCache   refCache
	warm       atomic.Pointer[warmState]
	deadline   atomic.Int64
	wake       chan struct{}
	rewarmStop context.CancelFunc
	rewarmDone chan struct{}
	// bootADS: the bootstrap in force has an ads_config; adsNames are the
	// secrets subscribed to over ADS.
	bootADS  bool
	adsNames []string

	// reloaded and rejected count the bootstrap reloads (SIGHUP) applied
	// and refused: the outcome the agent's signal counter cannot see.
	reloaded, rejected atomic.Uint64
}

// loaded is a bootstrap in force: immutable once stored.
type loaded struct {
	b       *bootstrapv3.Bootstrap
	at      time.Time
	applier *mesh.XDSApplier
}

type xdsRun struct {
	cancel context.CancelFunc
	done   chan struct{}
}

// errXDSOff refuses an xDS update that arrives after a reload removed ADS
// from the bootstrap, while its client stops.
var errXDSOff = errors.New("the bootstrap in force has no dynamic_resources.ads_config")

// load reads and validates the bootstrap without applying anything.
func (s *source) load() (*bootstrapv3.Bootstrap, *xdsclient.Config, error) {
	return loadBootstrap(s.path)
}

// loadBootstrap reads and validates the bootstrap at path, and the xDS
// client configuration it names, without applying anything.
func loadBootstrap(path string) (*bootstrapv3.Bootstrap, *xdsclient.Config, error) {
	b, err := bootstrap.Load(path)
	if err != nil {
		return nil, nil, err
	}
	if b.GetDynamicResources().GetAdsConfig() == nil {
		return b, nil, nil
	}
	xcfg, err := xdsclient.FromBootstrap(b)
	if err != nil {
		return nil, nil, fmt.Errorf("bootstrap %s: %w", path, err)
	}
	return b, &xcfg, nil
}

// start applies b (from load) and starts its xDS client. Nothing on the
// host has changed yet when it fails.
func (s *source) start(b *bootstrapv3.Bootstrap, xcfg *xdsclient.Config) error {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	s.sds.Store(secrets.NewClient(secrets.ClientOptions{
		Store: s.secrets, Node: b.GetNode(), Target: s.sdsTarget, Log: logging.Component(s.root, "sds"),
	}))
	s.wake = make(chan struct{}, 1)
	ctx, cancel := context.WithCancel(context.Background())
	s.rewarmStop, s.rewarmDone = cancel, make(chan struct{})
	go s.rewarmLoop(ctx, s.rewarmDone)
	s.applyMu.Lock()
	s.xdsOn = xcfg != nil
	s.configured = xcfg == nil
	err := s.applyStatic(b)
	if err == nil {
		s.settle()
	}
	s.applyMu.Unlock()
	if err != nil {
		s.closeSecrets()
		return err
	}
	if xcfg == nil {
		return nil
	}
	return s.runXDS(*xcfg)
}

// stop stops the xDS client; its accepted state and counters stay. An
// update being applied is waited for until exitBy (zero: no bound), then
// left to finish on its own: the process is exiting.
func (s *source) stop(exitBy time.Time) {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	defer s.mem.stop()
	if s.run == nil {
		return
	}
	s.run.cancel()
	if !waitUntil(s.run.done, exitBy) {
		s.log.Warn().Msg("exit: an xDS update still being applied is abandoned")
	}
	s.run = nil
}

// applyStatic installs b's static resources with the desired xDS
// resources (applyMu held), each resource waiting for its secrets, and
// makes b the bootstrap in force.
func (s *source) applyStatic(b *bootstrapv3.Bootstrap) error {
	now := time.Now()
	opts := s.opts
	ads := b.GetDynamicResources().GetAdsConfig() != nil
	opts.AllowUnknownClusters = ads
	sr := b.GetStaticResources()
	a := &mesh.XDSApplier{
		Server:          s.srv,
		StaticListeners: sr.GetListeners(),
		StaticClusters:  sr.GetClusters(),
		StaticDump:      mesh.StaticDump(sr.GetListeners(), sr.GetClusters(), now),
		Options:         opts,
		DrainDuration:   s.drain,
	}
	if cur := s.cur.Load(); cur != nil {
		a.Adopt(cur.applier)
	}
	res := &xdsclient.Resources{}
	if s.dynamic != nil && ads {
		res = s.dynamic
	}
	s.bootADS = ads
	p, err := s.makePlan(sr.GetListeners(), sr.GetClusters(), res, now)
	if err == nil {
		err = s.install(context.Background(), a, p, sr.GetListeners(), sr.GetClusters(), res, ads)
	}
	if err != nil {
		if cur := s.cur.Load(); cur != nil {
			s.bootADS = cur.b.GetDynamicResources().GetAdsConfig() != nil
		}
		return fmt.Errorf("bootstrap %s: %w", s.path, err)
	}
	s.cur.Store(&loaded{b: b, at: now, applier: a})
	return nil
}

// sdsTarget is the gRPC target of an sds_config's cluster, from the
// configuration in force: its first host, a Unix socket for a pipe.
func (s *source) sdsTarget(cluster string) (string, error) {
	snap := s.srv.D.Snapshot()
	var c *clusterpkg.Cluster
	if snap != nil {
		c = snap.Cluster(cluster)
	}
	if c == nil {
		return "", fmt.Errorf("sds_config cluster %q: no such cluster", cluster)
	}
	hs := c.Hosts()
	if len(hs) == 0 {
		return "", fmt.Errorf("sds_config cluster %q: no host", cluster)
	}
	if p := hs[0].Pipe(); p != "" {
		return "unix:" + p, nil
	}
	return hs[0].Address().String(), nil
}

// closeSecrets stops the rewarm loop and the SDS client.
func (s *source) closeSecrets() {
	if s.rewarmStop != nil {
		s.rewarmStop()
		<-s.rewarmDone
		s.rewarmStop = nil
	}
	if c := s.sds.Swap(nil); c != nil {
		c.Close()
	}
}

// applyXDS is the xDS client's Applier: an update is applied with the
// static resources in force, one at a time with reloads; what waits for
// secrets is held back (warming.go). r becomes the desired xDS
// configuration, and the client ACKs it: as in Envoy, a resource warming
// on a secret is accepted, not pending.
func (s *source) applyXDS(ctx context.Context, r *xdsclient.Resources) error {
	s.applyMu.Lock()
	defer s.applyMu.Unlock()
	if !s.xdsOn {
		return errXDSOff
	}
	big := false
	s.mem.begin()
	defer func() { s.mem.end(big) }()
	cur := s.cur.Load()
	sr := cur.b.GetStaticResources()
	p, err := s.makePlan(sr.GetListeners(), sr.GetClusters(), r, time.Now())
	if err == nil {
		err = s.install(ctx, cur.applier, p, sr.GetListeners(), sr.GetClusters(), r, true)
	}
	if err != nil {
		return err
	}
	big = bigUpdate(s.dynamic, r)
	s.dynamic = r
	if _, ok := r.Versions[xdsclient.ListenerType]; ok {
		// Envoy is LIVE once its first CDS and LDS responses (with the
		// listeners' routes) are in force, not at the first CDS.
		s.configured = true
	}
	s.settle()
	return nil
}

// xdsSink is what the xDS client delivers to: configurations (Apply) and
// secrets subscribed to over ADS (ApplySecrets).
type xdsSink struct{ s *source }

func (x xdsSink) Apply(ctx context.Context, r *xdsclient.Resources) error {
	return x.s.applyXDS(ctx, r)
}

func (x xdsSink) ApplySecrets(version string, secs []*tlsv3.Secret) error {
	return x.s.ApplySecrets(version, secs)
}

// clientConfig completes a Config read from the bootstrap with what the
// process adds.
func (s *source) clientConfig(c xdsclient.Config) xdsclient.Config {
	c.Control = s.control
	c.Log = logging.Component(s.root, "xds")
	c.UserAgentVersion = s.version
	c.Busy = xdsBusy
	return c
}

// xdsBusy gives the xDS client one processor beyond --concurrency while it
// decodes and applies a large response, as Envoy processes xDS on its main
// thread, which is not one of its --concurrency workers: with GOMAXPROCS 1
// (meshtun's default on a 2-core pod) a 10,000-service push was decoded
// on one goroutine and its garbage collections took turns with the build
// on the same processor, while the pod's other core could have run them.
// Nothing is raised beyond the machine's CPUs.
func xdsBusy() (done func()) {
	n := runtime.GOMAXPROCS(0)
	if n >= runtime.NumCPU() {
		return func() {}
	}
	runtime.GOMAXPROCS(n + 1)
	return func() { runtime.GOMAXPROCS(n) }
}

// runXDS runs the xDS client with xcfg (reloadMu held): the first time a
// new client, later the same one reconfigured. (A client a reload stopped,
// ADS removed, and another restarted, ADS back, starts from what it had
// accepted, as after a long disconnection: its first responses replace it.)
// A Run that fails is logged; there is no rollback to fail, since a reload
// touches the client only after the bootstrap is in force.
func (s *source) runXDS(xcfg xdsclient.Config) error {
	cfg := s.clientConfig(xcfg)
	c := s.client.Load()
	if c == nil {
		c = xdsclient.New(cfg, xdsSink{s})
		s.client.Store(c)
		s.applyMu.Lock()
		c.WatchSecrets(s.adsNames) // named by the static resources
		s.applyMu.Unlock()
	} else if err := c.Reconfigure(cfg); err != nil {
		return err
	}
	s.applyMu.Lock()
	s.xdsOn = true
	s.applyMu.Unlock()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := c.Run(ctx); !errors.Is(err, context.Canceled) {
			s.log.Error().Err(err).Msg("xds client stopped: the configuration in force keeps serving, without updates")
		}
	}()
	s.run = &xdsRun{cancel: cancel, done: done}
	s.log.Info().Str("server", cfg.Server).Bool("delta", cfg.Delta).Msg("xds client started")
	return nil
}

// stopXDS stops the client's Run and waits for it (reloadMu held, applyMu
// not: an update in progress must be able to finish).
func (s *source) stopXDS() {
	if s.run == nil {
		return
	}
	s.run.cancel()
	<-s.run.done
	s.run = nil
}

// Reload re-reads the bootstrap file. Static resources are swapped in like
// an xDS update, with the xDS resources in force; when the node or the xDS
// settings changed the client is reconfigured, and it keeps serving what
// it accepted until its new stream delivers. A bootstrap that cannot be
// applied changes nothing, the xDS client included. The outcome is
// counted in the admin stats.
func (s *source) Reload() error {
	xdsRestarted, err := s.reload()
	if err != nil {
		s.rejected.Add(1)
		return err
	}
	// Counted before it is logged: whoever reads the line and then the
	// counter (the agent, a test) sees the reload counted.
	s.reloaded.Add(1)
	s.log.Info().Str("bootstrap", s.path).Bool("xds_restarted", xdsRestarted).Msg("bootstrap reloaded")
	return nil
}

func (s *source) reload() (xdsRestarted bool, err error) {
	b, xcfg, err := s.load()
	if err != nil {
		return false, err
	}
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	old := s.cur.Load().b
	restart := !proto.Equal(old.GetNode(), b.GetNode()) ||
		!proto.Equal(old.GetDynamicResources(), b.GetDynamicResources()) ||
		!proto.Equal(xdsCluster(old), xdsCluster(b))
	if !proto.Equal(old.GetAdmin(), b.GetAdmin()) {
		s.log.Warn().Msg("bootstrap reload: a changed admin address takes effect on restart")
	}

	s.applyMu.Lock()
	err = s.applyStatic(b)
	if err == nil && xcfg == nil {
		// No ADS any more: the static resources are the whole
		// configuration, and they are in force.
		s.xdsOn, s.dynamic = false, nil
		s.configured = true
	}
	if err == nil {
		s.settle() // the new static resources may wait for no secret
	}
	s.applyMu.Unlock()
	if err != nil {
		return false, err // the client was not touched: nothing to roll back
	}

	switch {
	case xcfg == nil:
		s.stopXDS()
	case s.run == nil:
		err = s.runXDS(*xcfg)
	case restart:
		err = s.client.Load().Reconfigure(s.clientConfig(*xcfg))
	}
	if err != nil {
		return false, fmt.Errorf("bootstrap %s: static resources applied, but the xDS client keeps its previous settings: %w", s.path, err)
	}
	return restart && xcfg != nil, nil
}

// xdsCluster is the static cluster that says where the control plane is.
func xdsCluster(b *bootstrapv3.Bootstrap) proto.Message {
	gs := b.GetDynamicResources().GetAdsConfig().GetGrpcServices()
	if len(gs) == 0 {
		return nil
	}
	name := gs[0].GetEnvoyGrpc().GetClusterName()
	for _, cl := range b.GetStaticResources().GetClusters() {
		if cl.GetName() == name {
			return cl
		}
	}
	return nil
}

// Initialized reports whether the first configuration is in force (the
// admin's /ready and server.state).
func (s *source) Initialized() bool { return s.initialized.Load() }

// Bootstrap returns the bootstrap in force and when it was loaded.
func (s *source) Bootstrap() (*bootstrapv3.Bootstrap, time.Time) {
	cur := s.cur.Load()
	if cur == nil {
		return nil, time.Time{}
	}
	return cur.b, cur.at
}

// Stats returns the bootstrap reload counters and the xDS client's
// counters, which live as long as the process (a reload reconfigures the
// client, it does not replace it).
func (s *source) Stats() map[string]uint64 {
	out := map[string]uint64{
		statReloadSuccess:  s.reloaded.Load(),
		statReloadRejected: s.rejected.Load(),
	}
	if c := s.client.Load(); c != nil {
		for k, v := range c.Stats() {
			out[k] = v
		}
	}
	return out
}

// Warming returns what is received but not in force yet, for the admin's
// /config_dump: what the xDS client holds back while it warms on
// endpoints or routes, and the resources waiting for secrets.
func (s *source) Warming() *xdsclient.Warming { return s.warming() }
