// Package proxy owns the proxy process: where its configuration comes from
// (the bootstrap file and the xDS client it names), the applier that turns
// it into the snapshot in force, the xDS client's lifecycle across
// bootstrap reloads, the data path's setup (TUN device, capture, userspace
// stack), the termination drain, the exit, and the stats of all of it.
//
// cmd/meshtun maps its flags onto a Config and hands it to New, as
// wireguard-go's main builds a device and hands it everything; Run then
// serves until the process is told to stop.
//
// What survives a bootstrap reload is decided here and nowhere else: the
// snapshot machinery (mesh) carries unchanged clusters and listeners from
// one snapshot to the next, and the xDS client is reconfigured, never
// replaced, so its accepted configuration and its counters are the
// process's.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"sync/atomic"
	"syscall"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	"github.com/rs/zerolog"

	"github.com/meshtun/meshtun/internal/adminguard"
	"github.com/meshtun/meshtun/internal/logging"
	"github.com/meshtun/meshtun/mesh"
	"github.com/meshtun/meshtun/mesh/accesslog"
	"github.com/meshtun/meshtun/mesh/admin"
	"github.com/meshtun/meshtun/mesh/cluster"
	"github.com/meshtun/meshtun/mesh/httpconn"
	"github.com/meshtun/meshtun/mesh/secrets"
	"github.com/meshtun/meshtun/mesh/upstream"
	"github.com/meshtun/meshtun/netstack"
	"github.com/meshtun/meshtun/tun"
	"github.com/meshtun/meshtun/xdsclient"
)

// Capture modes (Config.Capture).
const (
	// CaptureSidecar routes the pod's outbound TCP/UDP and inbound TCP into
	// the TUN.
	CaptureSidecar = "sidecar"
	// CaptureLocal (laptop mode) routes only Config.CaptureCIDRs into the
	// TUN, nothing inbound.
	CaptureLocal = "local"
	// CaptureNone opens the TUN and changes no routes.
	CaptureNone = "none"
)

// exitGrace bounds the exit after the drain (or at once when there is no
// drain): what waits on peers at exit, the upstream connection pools, gets
// this long and no more, so the process is gone within
// terminationDrainDuration plus exitGrace.
const exitGrace = 500 * time.Millisecond

// Config is everything the proxy process is told at start.
type Config struct {
	// Bootstrap is the Envoy v3 bootstrap file (JSON or YAML); empty: every
	// flow passes through to its original destination.
	Bootstrap string
	// OutboundPort and InboundPort are the ports of the listeners that
	// receive captured flows (Istio's virtualOutbound, virtualInbound).
	OutboundPort, InboundPort uint16

	// Capture is CaptureSidecar, CaptureLocal or CaptureNone.
	Capture string
	// CaptureCIDRs are the destinations CaptureLocal routes into the TUN.
	CaptureCIDRs []netip.Prefix
	// TUNName, TUNMTU and TUNAddrs describe the TUN device to create.
	TUNName  string
	TUNMTU   int
	TUNAddrs []netip.Prefix
	// TUNFD, when 0 or more, is an inherited open TUN device used instead
	// of creating one (the agent keeps the device across proxy restarts).
	// Set it to -1 to create one.
	TUNFD int
	// StateDir is where capture records what it changed, so a crashed run
	// is undone by the next.
	StateDir string
	// Mark is the SO_MARK of the proxy's own sockets, which bypass capture.
	Mark uint32
	// PodInterface and PodIPs are the pod's interface and addresses
	// (defaults: the default route's interface, its global addresses).
	PodInterface string
	PodIPs       []netip.Addr
	// Inbound captures inbound TCP to the pod IPs.
	Inbound bool
	// Traffic capture leaves alone.
	ExcludeOutboundPorts []tun.PortRange
	ExcludeOutboundCIDRs []netip.Prefix
	ExcludeInboundPorts  []tun.PortRange

	// UDPIdleTimeout ends a UDP flow idle both ways; TCPIdleTimeout a TCP
	// one (0: never); ConnectTimeout bounds an upstream TCP connect.
	UDPIdleTimeout, TCPIdleTimeout, ConnectTimeout time.Duration
	// DrainDuration is how long flows on a listener removed or changed by
	// an update may go on (Istio's drainDuration).
	DrainDuration time.Duration
	// TerminationDrainDuration is how long flows may go on after SIGTERM;
	// the process exits within it plus a fraction of a second.
	TerminationDrainDuration time.Duration
	// Concurrency is reported as the admin's server.concurrency (the
	// caller sets GOMAXPROCS: it is the process's, not the proxy's).
	Concurrency int
	// Version is the xDS client's user agent version.
	Version string
	// Log is the root logger; components log under it by name.
	Log zerolog.Logger
	// Signals, when set, are the process's signals: SIGHUP reloads, SIGTERM
	// drains, SIGINT (or a second SIGTERM) stops.
	Signals *Signals
}

// Proxy is one proxy process. Create it with New, serve with Run.
type Proxy struct {
	cfg  Config
	log  zerolog.Logger
	quit chan string

	// The data path, built whole by New and never reassigned: the pod's
	// addresses are resolved first (reading the host, changing nothing),
	// so each part gets everything through its constructor.
	pod        podAddrs
	gate       *mesh.Gate
	dispatcher *mesh.Dispatcher // nil without a bootstrap
	srv        *mesh.Server     // nil without a bootstrap
	pools      *httpconn.Pools  // nil without a bootstrap
	src        *source          // nil without a bootstrap
	// first is the bootstrap New read and validated; Run applies it.
	first     *bootstrapv3.Bootstrap
	firstXDS  *xdsclient.Config
	adminHTTP *http.Server // set by startConfig
	adminAddr net.Addr     // set by startConfig
	stack     atomic.Pointer[netstack.Stack]
	ran       atomic.Bool
}

// podAddrs is the pod's interface and addresses as capture will use them.
type podAddrs struct {
	iface string
	ips   []netip.Addr
}

// New checks cfg, reads the bootstrap, finds the pod's addresses and
// builds the data path (Passthrough, Dispatcher, Gate, Server) with them;
// nothing on the host changes until Run, so a bad bootstrap leaves no
// capture behind.
func New(cfg Config) (*Proxy, error) {
	switch {
	case cfg.Capture != CaptureSidecar && cfg.Capture != CaptureLocal && cfg.Capture != CaptureNone:
		return nil, fmt.Errorf("proxy: Config.Capture: want %q, %q or %q, got %q", CaptureSidecar, CaptureLocal, CaptureNone, cfg.Capture)
	case cfg.Capture == CaptureLocal && len(cfg.CaptureCIDRs) == 0:
		return nil, errors.New("proxy: Config.CaptureCIDRs: capture local needs at least one")
	case cfg.Capture != CaptureLocal && len(cfg.CaptureCIDRs) > 0:
		return nil, errors.New("proxy: Config.CaptureCIDRs: apply to capture local only")
	case cfg.Concurrency < 0:
		return nil, fmt.Errorf("proxy: Config.Concurrency: want 0 or more, got %d", cfg.Concurrency)
	}
	p := &Proxy{cfg: cfg, log: logging.Component(cfg.Log, "main"), quit: make(chan string, 1)}
	dialer := &upstream.Dialer{Mark: cfg.Mark, ConnectTimeout: cfg.ConnectTimeout, Log: logging.Component(cfg.Log, "upstream")}
	if cfg.Capture == CaptureLocal {
		// Where there is no socket mark (darwin), the proxy's sockets are
		// pinned to the outgoing interface so they skip the CIDR routes.
		idx, err := tun.DefaultInterface()
		if err != nil {
			return nil, fmt.Errorf("local capture: %w", err)
		}
		dialer.Interface = idx
	}
	if cfg.Bootstrap != "" {
		var err error
		if p.first, p.firstXDS, err = loadBootstrap(cfg.Bootstrap); err != nil {
			return nil, err
		}
	}
	// Last, so that a bad bootstrap is reported first: where the pod's
	// addresses cannot be found, nothing could be served anyway.
	var err error
	if p.pod, err = findPod(cfg); err != nil {
		return nil, err
	}
	local := mesh.NewLocalAddrs(p.pod.ips)

	// The access log is a logger of its own in /logging ("access"), so
	// that lowering another component's level does not turn it on.
	access := accesslog.NewGated(cfg.Log, logging.ComponentGate("access"))
	// The pod's listening sockets, for the inbound flows sent to their
	// original destination (accepted before their dial): one probe, one
	// cache, for both handlers.
	listening := netstack.NewListenProbe(logging.Component(cfg.Log, "conn_handler"))
	passthrough := mesh.NewPassthrough(mesh.PassthroughOptions{
		Dialer: dialer, Local: local, TCPIdleTimeout: cfg.TCPIdleTimeout, Access: access, Listening: listening,
	})
	if cfg.Bootstrap == "" {
		p.gate = mesh.NewGate(passthrough, local)
		return p, nil
	}
	p.dispatcher = mesh.NewDispatcher(mesh.DispatcherOptions{Local: local, Access: access, UDP: passthrough, Dialer: dialer, Listening: listening})
	p.gate = mesh.NewGate(p.dispatcher, local)
	p.srv = &mesh.Server{D: p.dispatcher, Log: logging.Component(cfg.Log, "conn_handler"), Gate: p.gate}
	p.pools = httpconn.NewPools()
	// One secret store: SDS fills it, /certs reads it, and the TLS
	// contexts of every snapshot look their secrets up in it.
	store := secrets.NewStore()
	p.src = &source{
		path: cfg.Bootstrap, root: cfg.Log, log: p.log, drain: cfg.DrainDuration,
		control: dialer.Control, version: cfg.Version, srv: p.srv, secrets: store,
		opts: mesh.BuildOptions{
			Roles:   mesh.Roles{OutboundPort: cfg.OutboundPort, InboundPort: cfg.InboundPort},
			Cluster: cluster.Options{Dialer: dialer, Log: logging.Component(cfg.Log, "upstream")},
			Pools:   p.pools,
			Secrets: store,
		},
	}
	return p, nil
}

// findPod is the pod's interface and addresses: for sidecar capture those
// capture will use (given, else discovered as it discovers them), in
// laptop mode none (nothing is inbound), without capture Config.PodIPs.
func findPod(cfg Config) (podAddrs, error) {
	switch cfg.Capture {
	case CaptureSidecar:
		iface, ips, err := tun.PodAddrs(cfg.PodInterface, cfg.PodIPs)
		if err != nil {
			return podAddrs{}, err
		}
		return podAddrs{iface: iface, ips: ips}, nil
	case CaptureLocal:
		return podAddrs{}, nil
	}
	return podAddrs{iface: cfg.PodInterface, ips: cfg.PodIPs}, nil
}

// Run sets the proxy up (configuration, admin API, TUN device, capture,
// userspace stack), serves until ctx ends, a signal or /quitquitquit stops
// it or a SIGTERM's drain ends, and undoes what it set up. It returns an
// error if the setup fails; a proxy runs once.
//
// The exit is bounded: the drain takes at most TerminationDrainDuration,
// and the teardown that follows at most exitGrace for what waits on
// others (an xDS update being applied, upstream connections still busy);
// undoing capture is never cut short.
func (p *Proxy) Run(ctx context.Context) error {
	if !p.ran.CompareAndSwap(false, true) {
		return errors.New("proxy: Run called twice")
	}
	// Teardown, in reverse order of setup, with one deadline for all.
	var undo []func(exitBy time.Time)
	defer func() {
		exitBy := time.Now().Add(exitGrace)
		for i := len(undo) - 1; i >= 0; i-- {
			undo[i](exitBy)
		}
	}()

	if p.src != nil {
		undo = append(undo, func(by time.Time) { p.closePools(by) })
		if err := p.startConfig(); err != nil {
			return err
		}
		undo = append(undo, p.stopConfig)
	}
	dev, err := p.openTUN()
	if err != nil {
		return err
	}
	undo = append(undo, func(time.Time) { dev.Close() })

	undoCapture, err := p.setupCapture(dev)
	if err != nil {
		return err
	}
	undo = append(undo, func(time.Time) { undoCapture() })

	st, err := netstack.New(dev.Dev(), p.gate, netstack.Config{
		UDPIdleTimeout: p.cfg.UDPIdleTimeout,
		// The half-open budgets split by the direction the Gate uses.
		Inbound: mesh.NewLocalAddrs(p.pod.ips).Contains,
	}, logging.Component(p.cfg.Log, "netstack"))
	if err != nil {
		return err
	}
	undo = append(undo, func(time.Time) { st.Close() })
	p.stack.Store(st)

	p.log.Log().Str("level", "info").Str("capture", p.cfg.Capture).Interface("pod_ips", p.pod.ips).Msg("proxy ready")
	// Start-up is over: what it alone touched of the binary goes.
	n, err := releaseStartupPages()
	p.log.Debug().Int64("bytes", n).Err(err).Msg("start-up pages of the executable released")
	p.serve(ctx)
	return nil
}

// startConfig applies the bootstrap New read, starts its xDS client and
// opens the admin API.
func (p *Proxy) startConfig() error {
	if err := p.src.start(p.first, p.firstXDS); err != nil {
		return err
	}
	b, _ := p.src.Bootstrap()
	ln, err := ListenAdmin(b.GetAdmin().GetAddress())
	if err != nil {
		p.stopConfig(time.Time{})
		return fmt.Errorf("bootstrap %s: admin.address: %w", p.cfg.Bootstrap, err)
	}
	p.adminHTTP = &http.Server{Handler: adminguard.Wrap(p.newAdmin().Handler(), adminguard.Options{CheckHost: true}), ReadHeaderTimeout: 10 * time.Second,
		ErrorLog: adminErrorLog(logging.Component(p.cfg.Log, "admin"))}
	p.adminAddr = ln.Addr()
	go p.adminHTTP.Serve(ln)
	snap := p.dispatcher.Snapshot()
	p.log.Info().Str("address", ln.Addr().String()).Msg("admin listening")
	p.log.Info().Str("bootstrap", p.cfg.Bootstrap).Int("listeners", len(snap.Listeners)).Int("clusters", len(snap.Clusters)).Msg("static configuration applied")
	return nil
}

// stopConfig closes the admin API, stops the xDS client (waiting for an
// update being applied until exitBy at most; zero: no bound) and the
// listeners' sockets, and retires the snapshot in force.
func (p *Proxy) stopConfig(exitBy time.Time) {
	if p.adminHTTP != nil {
		p.adminHTTP.Close()
	}
	p.src.stop(exitBy)
	p.src.closeSecrets()
	p.srv.Close()
	if s := p.dispatcher.Snapshot(); s != nil {
		s.Retire(nil)
	}
}

// newAdmin is the admin API over the proxy's state. Nothing it reads waits
// for an update being applied.
func (p *Proxy) newAdmin() *admin.Server {
	return &admin.Server{
		D: p.dispatcher, Start: time.Now(), Extra: p.Stats, Bootstrap: p.src.Bootstrap, Initialized: p.src.Initialized,
		Warming:     p.src.Warming,
		Waiting:     p.src.Waiting,
		Secrets:     p.src.secrets,
		Concurrency: max(1, p.cfg.Concurrency),
		// The listeners drain (HTTP connections told to close); with
		// ?graceful they take new flows for the drain duration, after
		// which the HTTP connections left are closed.
		Drain: func(inboundOnly, graceful bool) {
			if p.srv != nil {
				p.srv.StartDrain(inboundOnly)
			}
			if graceful && p.cfg.DrainDuration > 0 {
				time.AfterFunc(p.cfg.DrainDuration, func() {
					p.gate.Close(inboundOnly)
					if p.srv != nil {
						p.srv.EndDrain(inboundOnly)
					}
				})
				return
			}
			p.gate.Close(inboundOnly)
		},
		Quit: func() { p.requestQuit("quitquitquit") },
	}
}

func (p *Proxy) requestQuit(why string) {
	select {
	case p.quit <- why:
	default:
	}
}

func (p *Proxy) openTUN() (*tun.Device, error) {
	var dev *tun.Device
	var err error
	if p.cfg.TUNFD >= 0 {
		dev, err = tun.OpenFile(p.cfg.TUNFD, p.cfg.TUNMTU)
	} else {
		dev, err = tun.Open(tun.DeviceConfig{Name: p.cfg.TUNName, MTU: p.cfg.TUNMTU, Addrs: p.cfg.TUNAddrs})
	}
	if err != nil {
		return nil, err
	}
	off := dev.Offloads()
	p.log.Log().Str("level", "info").Str("name", dev.Name()).Int("mtu", dev.MTU()).Bool("vnet_hdr", off.VNetHdr).
		Bool("tso", off.TSO).Bool("gro", off.GRO).Int("batch_size", off.BatchSize).Msg("tun device open")
	return dev, nil
}

// setupCapture routes traffic into dev as Config.Capture says, for the
// pod interface and addresses New found (the data path was built with
// them), and returns how to undo it.
func (p *Proxy) setupCapture(dev *tun.Device) (undo func(), err error) {
	f := &p.cfg
	switch f.Capture {
	case CaptureSidecar:
		capt, err := tun.SetupCapture(tun.CaptureConfig{
			TunName:              dev.Name(),
			Mark:                 f.Mark,
			PodInterface:         p.pod.iface,
			PodIPs:               p.pod.ips,
			Inbound:              f.Inbound,
			ExcludeOutboundPorts: f.ExcludeOutboundPorts,
			ExcludeOutboundCIDRs: f.ExcludeOutboundCIDRs,
			ExcludeInboundPorts:  f.ExcludeInboundPorts,
			StateDir:             f.StateDir,
		}, logging.Component(f.Log, "capture"))
		if err != nil {
			return nil, err
		}
		return func() {
			if err := capt.Teardown(); err != nil {
				p.log.Error().Err(err).Msg("capture teardown")
			}
		}, nil
	case CaptureLocal:
		lc, err := tun.SetupLocal(tun.LocalConfig{TunName: dev.Name(), CIDRs: f.CaptureCIDRs, Mark: f.Mark}, logging.Component(f.Log, "capture"))
		if err != nil {
			return nil, err
		}
		return func() {
			if err := lc.Teardown(); err != nil {
				p.log.Error().Err(err).Msg("local capture teardown")
			}
		}, nil
	}
	return func() {}, nil
}

// serve handles signals and /quitquitquit until the proxy is to exit.
func (p *Proxy) serve(ctx context.Context) {
	sigs := p.cfg.Signals
	for {
		select {
		case <-ctx.Done():
			p.log.Info().Str("reason", context.Cause(ctx).Error()).Msg("shutting down")
			return
		case why := <-p.quit:
			p.log.Info().Str("reason", why).Msg("shutting down")
			return
		case <-sigs.reloads():
			if p.src == nil {
				p.log.Warn().Msg("SIGHUP: started without --bootstrap, nothing to reload")
				continue
			}
			if err := p.Reload(); err != nil {
				p.log.Error().Err(err).Msg("bootstrap reload rejected; the configuration in force keeps serving")
			}
		case sig := <-sigs.terms():
			if sig != syscall.SIGTERM {
				p.log.Info().Str("signal", sig.String()).Msg("shutting down")
				return
			}
			p.gate.Close(true) // first: the log line says new inbound flows are refused
			if p.srv != nil {
				// Inbound HTTP connections are told to close at once
				// (pilot-agent's /drain_listeners?inboundonly&graceful).
				p.srv.StartDrain(true)
			}
			p.log.Info().Int64("active_flows", p.gate.Active()).Dur("termination_drain_duration", p.cfg.TerminationDrainDuration).Msg("SIGTERM: draining")
			dctx, endWatch := sigs.awaitDrainEnd(p.cfg.TerminationDrainDuration, p.log)
			done := p.Drain(dctx)
			endWatch()
			p.log.Info().Bool("all_flows_ended", done).Int64("active_flows", p.gate.Active()).Msg("drained, shutting down")
			return
		}
	}
}

// Drain is Istio's termination drain: new inbound flows are refused at once
// (the pod is leaving its endpoints), outbound ones still served so the
// application can finish its own shutdown. It returns when no flow is left
// and what the proxy wrote to its clients is acknowledged, or when ctx
// ends, and reports whether every flow ended.
func (p *Proxy) Drain(ctx context.Context) bool {
	p.gate.Close(true)
	done := p.gate.Wait(ctx)
	// The flows are over, but what the proxy wrote to its clients may
	// still be in the stack's send queues: wait (within the same
	// deadline) for the peers to ACK it.
	st := p.stack.Load()
	for done && st != nil && st.Unflushed() > 0 && ctx.Err() == nil {
		time.Sleep(10 * time.Millisecond)
	}
	if !done && p.srv != nil {
		// The drain is over: HTTP connections still open are closed now
		// (their requests end, which frees their pooled upstream
		// connections), and their FINs get flushTimeout to leave before
		// the stack goes with the process (a client waiting for a
		// response would not learn otherwise). The exit ends the rest.
		p.srv.EndDrain(false)
		fctx, cancel := context.WithTimeout(context.Background(), flushTimeout)
		for p.gate.Wait(fctx) && st != nil && st.Unflushed() > 0 && fctx.Err() == nil {
			time.Sleep(10 * time.Millisecond)
		}
		cancel()
	}
	return done
}

// flushTimeout bounds how long, after the termination drain, the FINs of
// the connections it closed may take to leave.
const flushTimeout = 500 * time.Millisecond

// closePools is the last step of the exit: the upstream connection pools
// close, idle connections at once and busy ones as their requests end, but
// the exit waits for them only until exitBy (zero: no bound). A
// connection still busy then is the peer's to see cut when the process
// ends: the drain, which was the time for requests to finish, is over.
// It reports whether every pool closed in time.
func (p *Proxy) closePools(exitBy time.Time) bool {
	if p.pools == nil {
		return true
	}
	// The drain, which was the time for requests to finish, is over:
	// busy connections are waited for only until exitBy.
	ctx, cancel := context.Background(), context.CancelFunc(func() {})
	if !exitBy.IsZero() {
		ctx, cancel = context.WithDeadline(ctx, exitBy)
	}
	defer cancel()
	if !p.pools.Close(ctx) {
		p.log.Warn().Msg("exit: upstream connections still busy after the drain are abandoned")
		return false
	}
	return true
}

// waitUntil waits for done until deadline (zero: no bound) and reports
// whether done closed.
func waitUntil(done <-chan struct{}, deadline time.Time) bool {
	if deadline.IsZero() {
		<-done
		return true
	}
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C:
		return false
	}
}

// Reload re-reads the bootstrap file and applies it (SIGHUP); see the
// package documentation for what survives. A bootstrap that cannot be
// applied is an error and changes nothing. Counted in the admin stats
// (server.bootstrap_reload.update_success / update_rejected).
func (p *Proxy) Reload() error {
	if p.src == nil {
		return errors.New("proxy: started without a bootstrap, nothing to reload")
	}
	if p.src.cur.Load() == nil {
		return errors.New("proxy: not running")
	}
	return p.src.Reload()
}

// Stats returns the counters of the proxy process that are not in the
// snapshot: bootstrap reloads and the xDS client's, by Envoy name, and the
// capture stack's (netstack.*). It reads atomics only and never waits for
// an update being applied.
func (p *Proxy) Stats() map[string]uint64 {
	out := map[string]uint64{}
	if p.src != nil {
		out = p.src.Stats()
	}
	if st := p.stack.Load(); st != nil {
		netstackStats(st.Stats(), out)
	}
	return out
}

// netstackStats adds the capture stack's counters to out. The names end in
// _active for gauges, as Envoy's do; the SYN cookie ones are Linux's
// (TcpExtSyncookiesSent, …).
func netstackStats(s netstack.Stats, out map[string]uint64) {
	out["netstack.tcp.half_open_inbound_active"] = uint64(s.TCPHalfOpenInbound)
	out["netstack.tcp.half_open_outbound_active"] = uint64(s.TCPHalfOpenOutbound)
	out["netstack.tcp.syn_over_budget"] = s.TCPSynOverBudget
	out["netstack.tcp.syn_over_source_cap"] = s.TCPSynOverSourceCap
	out["netstack.tcp.syncookies_sent"] = s.TCPSynCookiesSent
	out["netstack.tcp.syncookies_recv"] = s.TCPSynCookiesRecv
	out["netstack.tcp.syncookies_failed"] = s.TCPSynCookiesFailed
	out["netstack.tcp.synack_timeout"] = s.TCPSynAckTimeouts
	out["netstack.tcp.forward_dropped"] = s.TCPForwardDropped
	out["netstack.udp.flows_active"] = uint64(s.UDPFlowsActive)
}
