package main

import (
	"context"
	"fmt"
	"sync"
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
}

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
	if c.client != nil {
		if acc := c.client.Accepted(); acc != nil {
			res = acc
		}
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
		return c.applier.Apply(ctx, r)
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
func (c *configSource) Reload() error {
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
	if restart && c.stopXDS != nil {
		cancel, done = c.stopXDS, c.xdsDone
		c.stopXDS, c.client = nil, nil
	}
	c.mu.Unlock()
	if cancel != nil {
		cancel()
		<-done
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
	if xcfg == nil && c.stopXDS != nil {
		c.stopXDS()
		c.stopXDS, c.client = nil, nil
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

// Stats returns the xDS client's counters for the admin /stats.
func (c *configSource) Stats() map[string]uint64 {
	c.mu.Lock()
	cl := c.client
	c.mu.Unlock()
	if cl == nil {
		return nil
	}
	return cl.Stats()
}
