package xdsclient

import (
	"context"
	"errors"
	"math"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
)

// Client keeps one ADS stream to the control plane and hands every complete,
// consistent configuration to its Applier. Create it with New and start it with Run.
type Client struct {
	cfg     Config
	applier Applier
	log     zerolog.Logger

	// accepted is the last state Apply accepted (or the empty state). Only the
	// session goroutine stores it; anyone may load it.
	accepted atomic.Pointer[state]
	// initialized: listeners were requested once, so a new stream requests all
	// types at once instead of waiting for clusters to initialize.
	initialized atomic.Bool
	running     atomic.Bool
	stats       stats
	// warming is what the current stream holds back while it warms (nil:
	// nothing); see Warming.
	warming atomic.Pointer[Warming]

	mu      sync.Mutex
	lastErr error
}

// New returns a client for cfg that installs configurations with applier.
// Zero durations in cfg take the documented defaults.
func New(cfg Config, applier Applier) *Client {
	c := &Client{cfg: cfg.withDefaults(), applier: applier}
	c.log = c.cfg.Log.With().Str("component", "xdsclient").Str("server", cfg.Server).Logger()
	c.accepted.Store(emptyState())
	return c
}

// Accepted returns the configuration last accepted by the Applier, or nil before
// the first one. It stays in place while the control plane is unreachable.
func (c *Client) Accepted() *Resources {
	st := c.current()
	if !st.applied {
		return nil
	}
	return st.res
}

// LastError returns the most recent error: a rejected update or the resources
// rejected from one (ResourceErrors: every one, of all the types NACKed), or the
// reason the last stream ended. It is not cleared by later successes; Stats tells
// whether updates succeeded since.
func (c *Client) LastError() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lastErr
}

func (c *Client) setLastError(err error) {
	c.mu.Lock()
	c.lastErr = err
	c.mu.Unlock()
}

func (c *Client) current() *state { return c.accepted.Load() }

// Run connects to the control plane and processes configuration until ctx is done,
// reconnecting with exponential backoff and full jitter whenever the stream ends.
// It returns ctx.Err(), or an error at once if the Config is unusable or Run is
// already running.
func (c *Client) Run(ctx context.Context) error {
	if err := c.cfg.validate(); err != nil {
		return err
	}
	if !c.running.CompareAndSwap(false, true) {
		return errors.New("xdsclient: Run called twice")
	}
	defer c.running.Store(false)

	bo := backoff{base: c.cfg.BackoffBase, max: c.cfg.BackoffMax}
	unreachable := false // logged that the control plane cannot be reached
	for {
		established, up, err := c.runStream(ctx)
		c.stats.connected.Store(0)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if up >= stableStream {
			bo.reset()
		}
		c.setLastError(err)
		delay := bo.next()
		switch {
		case established: // one line per lost stream
			unreachable = false
			c.log.Warn().Err(err).Dur("stream_uptime", up).Dur("retry_in", delay).
				Msg("xds: stream to control plane closed, keeping the accepted configuration")
		case !unreachable: // one line per outage, not per attempt
			unreachable = true
			c.log.Warn().Err(err).Dur("retry_in", delay).Msg("xds: cannot reach control plane, retrying")
		default:
			c.log.Debug().Err(err).Dur("retry_in", delay).Msg("xds: cannot reach control plane, retrying")
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
	}
}

// runStream dials, runs one ADS stream to its end and reports whether it was
// established and for how long.
func (c *Client) runStream(ctx context.Context) (established bool, up time.Duration, err error) {
	creds := insecure.NewCredentials()
	if c.cfg.TLS != nil {
		creds = credentials.NewTLS(c.cfg.TLS)
	}
	conn, err := grpc.NewClient(c.cfg.Server,
		grpc.WithTransportCredentials(creds),
		grpc.WithContextDialer(c.dial),
		// istiod's responses can exceed gRPC's 4 MiB default; Envoy sets no limit.
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(math.MaxInt32)),
	)
	if err != nil {
		return false, 0, err
	}
	defer conn.Close()

	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ads := discoveryv3.NewAggregatedDiscoveryServiceClient(conn)
	node := proto.Clone(c.cfg.Node).(*corev3.Node)
	if node == nil {
		node = &corev3.Node{}
	}
	// As Envoy identifies itself ("envoy" + build version), so does meshtun.
	if node.GetUserAgentName() == "" {
		node.UserAgentName = "meshtun"
	}
	if node.GetUserAgentVersionType() == nil {
		v := c.cfg.UserAgentVersion
		if v == "" {
			v = "dev"
		}
		node.UserAgentVersionType = &corev3.Node_UserAgentVersion{UserAgentVersion: v}
	}
	s := newSession(c, ctx)
	if c.cfg.Delta {
		st, err := ads.DeltaAggregatedResources(sctx)
		if err != nil {
			return false, 0, err
		}
		s.w = newDeltaWire(st, node, s)
	} else {
		st, err := ads.StreamAggregatedResources(sctx)
		if err != nil {
			return false, 0, err
		}
		s.w = newSotwWire(st, node, s, c.current().res.Versions)
	}
	start := time.Now()
	c.stats.connected.Store(1)
	c.log.Info().Bool("delta", c.cfg.Delta).Msg("xds: stream to control plane established")

	err = s.run()
	s.stop()
	// A new stream starts again from the accepted state: nothing warms.
	c.warming.Store(nil)
	cancel() // ends the receive goroutine's Recv
	s.wg.Wait()
	return true, time.Since(start), err
}

// dial connects to addr with TCP keepalive, or to a unix socket (gRPC hands a custom
// dialer unix targets as "unix://abs", "unix:rel", or "\x00abstract").
func (c *Client) dial(ctx context.Context, addr string) (net.Conn, error) {
	network := "tcp"
	switch {
	case strings.HasPrefix(addr, "unix://"):
		network, addr = "unix", strings.TrimPrefix(addr, "unix://")
	case strings.HasPrefix(addr, "unix:"):
		network, addr = "unix", strings.TrimPrefix(addr, "unix:")
	case strings.HasPrefix(addr, "\x00"):
		network, addr = "unix", "@"+addr[1:]
	}
	d := net.Dialer{Control: c.cfg.Control, KeepAliveConfig: net.KeepAliveConfig{Enable: c.cfg.Keepalive > 0, Idle: c.cfg.Keepalive, Interval: -1, Count: -1}}
	if c.cfg.Keepalive < 0 {
		d.KeepAlive = -1
	}
	return d.DialContext(ctx, network, addr)
}
