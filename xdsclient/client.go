package xdsclient

import (
	"context"
	"errors"
	"math"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/rs/zerolog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/experimental"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
)

// Client keeps one ADS stream to the control plane and hands every complete,
// consistent configuration to its Applier. Create it with New and start it with
// Run; Reconfigure points a running client at a new node or server.
type Client struct {
	// cfg and log are the settings of the current stream. Only Run's goroutine
	// reads them (the session runs on it) and only between streams does it
	// replace them, with what Reconfigure left in next: no lock on the stream's
	// path, and no stream sees two configurations.
	cfg     Config
	applier Applier
	log     zerolog.Logger
	// creds secure the streams of cfg (nil: plaintext); with a root file
	// they keep the pool read from it across streams.
	creds credentials.TransportCredentials

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
	// secretNames are the secrets to subscribe to over ADS (WatchSecrets);
	// secretsChanged tells the session they changed.
	secretNames    atomic.Pointer[map[string]bool]
	secretsChanged chan struct{}

	mu      sync.Mutex
	lastErr error
	// next is the Config Reconfigure left for the next stream (nil: none).
	next *Config
	// restart ends the current stream (nil between streams).
	restart context.CancelFunc
	// kick wakes Run from its backoff when Reconfigure was called.
	kick chan struct{}
}

// New returns a client for cfg that installs configurations with applier.
// Zero durations in cfg take the documented defaults.
func New(cfg Config, applier Applier) *Client {
	c := &Client{applier: applier, kick: make(chan struct{}, 1), secretsChanged: make(chan struct{}, 1)}
	c.use(cfg.withDefaults())
	c.accepted.Store(emptyState())
	return c
}

// use makes cfg the configuration of the streams to come (Run's goroutine, or
// New before anyone else has the client).
func (c *Client) use(cfg Config) {
	c.cfg = cfg
	switch {
	case cfg.TLS != nil && cfg.RootFile != "":
		c.creds = newRootCreds(cfg.TLS, cfg.RootFile)
	case cfg.TLS != nil:
		c.creds = credentials.NewTLS(cfg.TLS)
	default:
		c.creds = insecure.NewCredentials()
	}
	c.log = cfg.Log.With().Str("component", "xdsclient").Str("server", cfg.Server).Logger()
}

// Reconfigure makes the client talk to the control plane with cfg from now on: a
// new node, server, TLS or delta setting, as a bootstrap reload brings them. The
// current stream ends and a new one starts at once with cfg. Everything the client
// accepted stays in force, and is where the new stream starts from (its versions
// in state of the world, its initial_resource_versions in delta), so the proxy
// serves the accepted configuration until the new stream delivers a newer one; the
// counters go on counting. This replaces stopping the client and starting another,
// which would start from nothing and lose the counters.
//
// An unusable cfg is an error and changes nothing. Reconfigure does not wait for
// the new stream; it may be called whether or not Run is running (before Run, cfg
// replaces New's).
func (c *Client) Reconfigure(cfg Config) error {
	if err := cfg.validate(); err != nil {
		return err
	}
	cfg = cfg.withDefaults()
	c.mu.Lock()
	c.next = &cfg
	restart := c.restart
	c.mu.Unlock()
	if restart != nil {
		restart()
	}
	select {
	case c.kick <- struct{}{}:
	default: // a wake-up is pending already
	}
	return nil
}

// adoptNext takes the Config Reconfigure left, if any, for the next stream, and
// reports whether there was one. Run's goroutine only, between streams.
func (c *Client) adoptNext() bool {
	c.mu.Lock()
	next := c.next
	c.next = nil
	c.mu.Unlock()
	select {
	case <-c.kick: // this wake-up is for the config taken here
	default:
	}
	if next == nil {
		return false
	}
	c.use(*next)
	return true
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
	if !c.running.CompareAndSwap(false, true) {
		return errors.New("xdsclient: Run called twice")
	}
	defer c.running.Store(false)
	c.adoptNext()
	if err := c.cfg.validate(); err != nil {
		return err
	}

	bo := backoff{base: c.cfg.BackoffBase, max: c.cfg.BackoffMax}
	unreachable := false // logged that the control plane cannot be reached
	for {
		established, up, err := c.runStream(ctx)
		c.stats.connected.Store(0)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if c.adoptNext() {
			// Reconfigured: the new settings get a stream at once and a
			// backoff of their own.
			bo = backoff{base: c.cfg.BackoffBase, max: c.cfg.BackoffMax}
			unreachable = false
			c.log.Info().Bool("delta", c.cfg.Delta).Bool("was_established", established).
				Msg("xds: reconfigured, starting a new stream from the accepted configuration")
			continue
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
		case <-c.kick: // Reconfigure: the next stream uses its config at once
			t.Stop()
			if c.adoptNext() {
				bo = backoff{base: c.cfg.BackoffBase, max: c.cfg.BackoffMax}
				unreachable = false
			}
		}
	}
}

// streamStarted registers cancel as the way Reconfigure ends the stream being
// started, ending it at once if a Config is already waiting.
func (c *Client) streamStarted(cancel context.CancelFunc) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.restart = cancel
	if c.next != nil {
		cancel()
	}
}

func (c *Client) streamEnded() {
	c.mu.Lock()
	c.restart = nil
	c.mu.Unlock()
}

// runStream dials, runs one ADS stream to its end and reports whether it was
// established and for how long.
//
// The stream runs under a context of its own, which Reconfigure cancels: the
// session (and an Apply in progress) keeps Run's context, so a reconfiguration
// ends the stream as a lost connection does, never in the middle of an Apply.
func (c *Client) runStream(ctx context.Context) (established bool, up time.Duration, err error) {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	c.streamStarted(cancel)
	defer c.streamEnded()

	opts := []grpc.DialOption{grpc.WithTransportCredentials(c.creds)}
	if c.cfg.FileMetadata != nil {
		opts = append(opts, grpc.WithPerRPCCredentials(fileCreds{*c.cfg.FileMetadata}))
	}
	conn, err := grpc.NewClient(c.cfg.Server, append(opts,
		// gRPC dials on goroutines of its own, which may outlive the stream:
		// they get this stream's settings, not the Client's.
		grpc.WithContextDialer(dialer(c.cfg.Control, c.cfg.Keepalive)),
		// istiod's responses can exceed gRPC's 4 MiB default; Envoy sets no limit.
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(math.MaxInt32)),
		experimental.WithBufferPool(recvPool{}),
	)...)
	if err != nil {
		return false, 0, err
	}
	defer conn.Close()

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

// dialer returns a dial function that connects to addr with TCP keepalive, or to a
// unix socket (gRPC hands a custom dialer unix targets as "unix://abs", "unix:rel",
// or "\x00abstract").
func dialer(control func(network, address string, c syscall.RawConn) error, keepalive time.Duration) func(ctx context.Context, addr string) (net.Conn, error) {
	return func(ctx context.Context, addr string) (net.Conn, error) {
		return dial(ctx, addr, control, keepalive)
	}
}

func dial(ctx context.Context, addr string, control func(network, address string, c syscall.RawConn) error, keepalive time.Duration) (net.Conn, error) {
	network := "tcp"
	switch {
	case strings.HasPrefix(addr, "unix://"):
		network, addr = "unix", strings.TrimPrefix(addr, "unix://")
	case strings.HasPrefix(addr, "unix:"):
		network, addr = "unix", strings.TrimPrefix(addr, "unix:")
	case strings.HasPrefix(addr, "\x00"):
		network, addr = "unix", "@"+addr[1:]
	}
	d := net.Dialer{Control: control, KeepAliveConfig: net.KeepAliveConfig{Enable: keepalive > 0, Idle: keepalive, Interval: -1, Count: -1}}
	if keepalive < 0 {
		d.KeepAlive = -1
	}
	return d.DialContext(ctx, network, addr)
}

// recvPool is gRPC's default buffer pool for buffers up to pooledMax, and
// plain allocation for larger ones: a whole large response is read into one
// buffer (10 MB for 10,000 listeners), which the default pool would keep
// for reuse past the next collection, as live memory that raises the
// heap's goal while the response's update is built. Responses that large
// come a few times per push; the buffer is garbage once decoded.
type recvPool struct{}

const pooledMax = 1 << 20

func (recvPool) Get(n int) *[]byte {
	if n > pooledMax {
		b := make([]byte, n)
		return &b
	}
	return mem.DefaultBufferPool().Get(n)
}

func (recvPool) Put(b *[]byte) {
	if cap(*b) > pooledMax {
		return
	}
	mem.DefaultBufferPool().Put(b)
}
