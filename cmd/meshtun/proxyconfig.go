package main

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	"github.com/rs/zerolog"
	"google.golang.org/protobuf/proto"

	"github.com/meshtun/meshtun/internal/logging"
	"github.com/meshtun/meshtun/mesh"
	"github.com/meshtun/meshtun/mesh/bootstrap"
	"github.com/meshtun/meshtun/xdsclient"
)

// configSource owns where the proxy's configuration comes from: the
// bootstrap file (static resources) and, when it has an ads_config, an xDS
// client. Reload re-reads the file in process (SIGHUP, as the agent sends
// when the bootstrap's inputs change): flows in progress keep the snapshot
// they started with, and a bad file changes nothing.
type configSource struct {
	path    string
	root    zerolog.Logger
	log     zerolog.Logger
	srv     *mesh.Server
	opts    mesh.BuildOptions
	drain   time.Duration
	control func(network, address string, c syscall.RawConn) error

	mu        sync.Mutex
	b         *bootstrapv3.Bootstrap
	loadedAt  time.Time
	applier   *mesh.XDSApplier
	client    *xdsclient.Client
	stopXDS   context.CancelFunc
	xdsDone   chan struct{}
	xdsServer string
	// lastXDS is the last xDS configuration applied, by any client: a
	// reload that restarts the client (a changed node) keeps serving it
	// until the new stream delivers, instead of dropping every dynamic
	// listener and cluster in between.
	lastXDS *xdsclient.Resources
	// prevStats are the counters of clients stopped by reloads, so the
	// admin's update_success counters never go back (pilot-agent's
	// readiness reads them).
	prevStats map[string]uint64

	// initialized is set once the first configuration is in force: without
	// ADS when the bootstrap is applied (at start or by a reload), else
	// when the first xDS update with listeners is. Until then the server
	// is INITIALIZING, as Envoy is before its first CDS/LDS responses.
	initialized atomic.Bool

	// reloaded and rejected count the bootstrap reloads (SIGHUP) applied
	// and refused: the outcome the agent's signal counter cannot see.
	reloaded, rejected atomic.Uint64
}

// The admin stats of bootstrap reloads, named as Envoy names the outcome
// of a configuration update (update_success, update_rejected).
const (
	statReloadSuccess  = "server.bootstrap_reload.update_success"
	statReloadRejected = "server.bootstrap_reload.update_rejected"
)

// Initialized reports whether the first configuration is in force (the
// admin's /ready and server.state).
func (c *configSource) Initialized() bool { return c.initialized.Load() }

// load reads and validates the bootstrap without applying anything.
func (c *configSource) load() (*bootstrapv3.Bootstrap, *xdsclient.Config, error) {
	b, err := bootstrap.Load(c.path)
	if err != nil {
		return nil, nil, err
	}
	if b.GetDynamicResources().GetAdsConfig() == nil {
		return b, nil, nil
	}
	xcfg, err := xdsclient.FromBootstrap(b)
	if err != nil {
		return nil, nil, fmt.Errorf("bootstrap %s: %w", c.path, err)
	}
	return b, &xcfg, nil
}

// start applies the bootstrap's static resources and starts the xDS
// client. Nothing on the host has changed yet when it fails.
func (c *configSource) start() error {
	b, xcfg, err := c.load()
	if err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.applyStatic(b); err != nil {
		return err
	}
	if xcfg != nil {
		c.startXDS(*xcfg)
	} else {
		c.initialized.Store(true)
	}
	return nil
}

// applyStatic installs b's static resources, with the accepted xDS
// resources when a client has some.
func (c *configSource) applyStatic(b *bootstrapv3.Bootstrap) error {
	now := time.Now()
	opts := c.opts
	opts.AllowUnknownClusters = b.GetDynamicResources().GetAdsConfig() != nil
	sr := b.GetStaticResources()
	a := &mesh.XDSApplier{
		Server:          c.srv,
		StaticListeners: sr.GetListeners(),
		StaticClusters:  sr.GetClusters(),
		StaticDump:      mesh.StaticDump(sr.GetListeners(), sr.GetClusters(), now),
		Options:         opts,
		DrainDuration:   c.drain,
	}
	if c.applier != nil {
		a.Adopt(c.applier)
	}
	res := &xdsclient.Resources{}
	if c.lastXDS != nil && opts.AllowUnknownClusters {
		res = c.lastXDS
	}
	if err := a.Apply(context.Background(), res); err != nil {
		return fmt.Errorf("bootstrap %s: %w", c.path, err)
	}
	c.applier, c.b, c.loadedAt = a, b, now
	return nil
}

func (c *configSource) startXDS(xcfg xdsclient.Config) {
	xcfg.Control = c.control
	xcfg.Log = logging.Component(c.root, "xds")
	xcfg.UserAgentVersion = version
	// Updates and reloads are applied one at a time, each with the
	// static resources in force.
	client := xdsclient.New(xcfg, xdsclient.ApplierFunc(func(ctx context.Context, r *xdsclient.Resources) error {
		c.mu.Lock()
		defer c.mu.Unlock()
		if _, ok := r.Versions[xdsclient.ListenerType]; !ok && c.lastXDS != nil {
			// A client a reload restarted delivers clusters before it has
			// listeners: the listeners (and their routes) in force stay
			// until its first LDS response replaces them.
			merged := *r
			merged.Listeners, merged.Routes = c.lastXDS.Listeners, c.lastXDS.Routes
			r = &merged
		}
		if err := c.applier.Apply(ctx, r); err != nil {
			return err
		}
		c.lastXDS = r
		if _, ok := r.Versions[xdsclient.ListenerType]; ok {
			// Envoy is LIVE once its first CDS and LDS responses (with
			// the listeners' routes) are in force, not at the first CDS.
			c.initialized.Store(true)
		}
		return nil
	}))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		client.Run(ctx)
	}()
	c.client, c.stopXDS, c.xdsDone, c.xdsServer = client, cancel, done, xcfg.Server
	c.log.Info().Str("server", xcfg.Server).Bool("delta", xcfg.Delta).Msg("xds client started")
}

func (c *configSource) stop() {
	c.mu.Lock()
	cancel, done := c.stopXDS, c.xdsDone
	c.stopXDS, c.client = nil, nil
	c.mu.Unlock()
	if cancel != nil {
		cancel()
		<-done
	}
}

// Reload re-reads the bootstrap file. Static resources are swapped in like
// an xDS update; when the node or the xDS settings changed the client
// reconnects with the new ones (the config in force serves meanwhile).
// The outcome is counted in the admin stats.
func (c *configSource) Reload() error {
	if err := c.reload(); err != nil {
		c.rejected.Add(1)
		return err
	}
	c.reloaded.Add(1)
	return nil
}

func (c *configSource) reload() error {
	b, xcfg, err := c.load()
	if err != nil {
		return err
	}
	c.mu.Lock()
	old := c.b
	restart := !proto.Equal(old.GetNode(), b.GetNode()) ||
		!proto.Equal(old.GetDynamicResources(), b.GetDynamicResources()) ||
		!proto.Equal(xdsCluster(old), xdsCluster(b))
	if !proto.Equal(old.GetAdmin(), b.GetAdmin()) {
		c.log.Warn().Msg("bootstrap reload: a changed admin address takes effect on restart")
	}
	var cancel context.CancelFunc
	var done chan struct{}
	var stopped *xdsclient.Client
	if restart && c.stopXDS != nil {
		cancel, done, stopped = c.stopXDS, c.xdsDone, c.client
		c.stopXDS, c.client = nil, nil
	}
	c.mu.Unlock()
	if cancel != nil {
		cancel()
		<-done
		c.mu.Lock()
		c.keepStats(stopped)
		c.mu.Unlock()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.applyStatic(b); err != nil {
		if cancel != nil {
			// The old xDS settings keep serving: restart the old client.
			if oc, e := xdsclient.FromBootstrap(old); e == nil {
				c.startXDS(oc)
			}
		}
		return err
	}
	if xcfg != nil && c.stopXDS == nil {
		c.startXDS(*xcfg)
	}
	if xcfg == nil {
		// No ADS any more (its client was stopped above, as a changed
		// dynamic_resources restarts it): the static resources are the
		// whole configuration, and they are in force.
		c.lastXDS = nil
		c.initialized.Store(true)
	}
	c.log.Info().Str("bootstrap", c.path).Bool("xds_restarted", restart && xcfg != nil).Msg("bootstrap reloaded")
	return nil
}

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

// Bootstrap returns the bootstrap in force and when it was loaded.
func (c *configSource) Bootstrap() (*bootstrapv3.Bootstrap, time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.b, c.loadedAt
}

// keepStats folds a stopped client's counters into prevStats (c.mu held).
func (c *configSource) keepStats(cl *xdsclient.Client) {
	if cl == nil {
		return
	}
	if c.prevStats == nil {
		c.prevStats = map[string]uint64{}
	}
	for k, v := range cl.Stats() {
		if k != xdsclient.StatConnectedState { // a gauge: only the live client's counts
			c.prevStats[k] += v
		}
	}
}

// Stats returns the bootstrap reload counters and the xDS client's
// counters for the admin /stats, with those of clients a reload replaced.
func (c *configSource) Stats() map[string]uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[string]uint64, len(c.prevStats)+10)
	out[statReloadSuccess] = c.reloaded.Load()
	out[statReloadRejected] = c.rejected.Load()
	for k, v := range c.prevStats {
		out[k] = v
	}
	if c.client != nil {
		for k, v := range c.client.Stats() {
			out[k] += v
		}
	}
	return out
}

// Warming returns what the xDS client holds back while it warms, for the
// admin's /config_dump.
func (c *configSource) Warming() *xdsclient.Warming {
	c.mu.Lock()
	cl := c.client
	c.mu.Unlock()
	if cl == nil {
		return nil
	}
	return cl.Warming()
}
