package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"syscall"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/rs/zerolog"

	"github.com/meshtun/meshtun/internal/logging"
	"github.com/meshtun/meshtun/mesh"
	"github.com/meshtun/meshtun/mesh/accesslog"
	"github.com/meshtun/meshtun/mesh/admin"
	"github.com/meshtun/meshtun/mesh/cluster"
	"github.com/meshtun/meshtun/mesh/httpconn"
	"github.com/meshtun/meshtun/mesh/upstream"
	"github.com/meshtun/meshtun/netstack"
	"github.com/meshtun/meshtun/tun"
)

type proxyFlags struct {
	bootstrap      string
	outboundPort   uint
	inboundPort    uint
	capture        string
	tunName        string
	tunMTU         int
	tunAddrs       []netip.Prefix
	stateDir       string
	mark           uint32
	podIface       string
	podIPs         []netip.Addr
	inbound        bool
	exclOutPorts   []tun.PortRange
	exclOutCIDRs   []netip.Prefix
	exclInPorts    []tun.PortRange
	udpIdle        time.Duration
	tcpIdle        time.Duration
	connectTimeout time.Duration
	logLevel       string
	logFormat      string
	cpuProfile     string
	concurrency    int
	drainDuration  time.Duration
	termDrain      time.Duration
	captureCIDRs   []netip.Prefix
	tunFD          int
}

func (f *proxyFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.bootstrap, "bootstrap", "", "Envoy v3 bootstrap (JSON or YAML) with static listeners and clusters; without it every flow passes through to its original destination")
	fs.UintVar(&f.outboundPort, "outbound-port", 15001, "port of the listener that receives captured outbound flows (Istio's virtualOutbound)")
	fs.UintVar(&f.inboundPort, "inbound-port", 15006, "port of the listener that receives captured inbound flows (Istio's virtualInbound)")
	fs.StringVar(&f.capture, "capture", "sidecar", `traffic capture: "sidecar" (route the pod's outbound TCP/UDP and inbound TCP into the TUN), "local" (laptop mode: route only --capture-cidr into the TUN, nothing inbound) or "none" (open the TUN, change no routes)`)
	fs.Func("capture-cidr", `with --capture local: destinations routed into the TUN, comma separated or repeated, e.g. the mesh's service range "10.96.0.0/12"`, func(s string) error {
		ps, err := parseCaptureCIDRs(s)
		f.captureCIDRs = append(f.captureCIDRs, ps...)
		return err
	})
	fs.StringVar(&f.tunName, "tun-name", "meshtun0", "TUN device name")
	fs.IntVar(&f.tunMTU, "tun-mtu", 65535, "TUN MTU (1280..65535); flows are terminated locally, so a large MTU costs nothing and saves per-packet work")
	fs.Func("tun-addrs", "addresses to put on the TUN, comma separated CIDRs (none needed for capture)", func(s string) (err error) {
		f.tunAddrs, err = tun.ParseCIDRs(s)
		return err
	})
	fs.StringVar(&f.stateDir, "state-dir", "/run/meshtun", "where capture records what it changed, so a crashed run is undone by the next")
	fs.Func("mark", "SO_MARK of the proxy's upstream sockets; marked traffic bypasses capture (default 0x539)", func(s string) (err error) {
		f.mark, err = parseMark(s)
		return err
	})
	fs.StringVar(&f.podIface, "pod-iface", "", "the pod's network interface (default: the interface of the default route)")
	fs.Func("pod-ips", "the pod's IPs, comma separated (default: the global addresses of --pod-iface)", func(s string) error {
		ips, err := parseIPs(s)
		f.podIPs = ips
		return err
	})
	fs.BoolVar(&f.inbound, "inbound", true, "capture inbound TCP to the pod IPs")
	fs.Func("exclude-outbound-ports", `outbound destination ports not captured, e.g. "3306,8000-8100" (traffic.sidecar.istio.io/excludeOutboundPorts)`, func(s string) (err error) {
		f.exclOutPorts, err = tun.ParsePorts(s)
		return err
	})
	fs.Func("exclude-outbound-cidrs", `outbound destinations not captured, e.g. "10.1.0.0/16,fd00::/8" (traffic.sidecar.istio.io/excludeOutboundIPRanges)`, func(s string) (err error) {
		f.exclOutCIDRs, err = tun.ParseCIDRs(s)
		return err
	})
	fs.Func("exclude-inbound-ports", `inbound ports not captured (traffic.sidecar.istio.io/excludeInboundPorts); 15000,15020,15021,15090 always are`, func(s string) (err error) {
		f.exclInPorts, err = tun.ParsePorts(s)
		return err
	})
	fs.DurationVar(&f.udpIdle, "udp-idle-timeout", 60*time.Second, "a UDP flow with no datagram either way for this long ends")
	fs.DurationVar(&f.tcpIdle, "tcp-idle-timeout", time.Hour, "a TCP flow idle in both directions for this long is closed (Envoy tcp_proxy idle_timeout); 0 disables")
	fs.DurationVar(&f.connectTimeout, "connect-timeout", 10*time.Second, "upstream TCP connect timeout (Istio's mesh connectTimeout)")
	fs.StringVar(&f.logLevel, "log-level", "info", "trace, debug, info, warning, error, critical or off")
	fs.StringVar(&f.logFormat, "log-format", "console", "console or json")
	fs.DurationVar(&f.drainDuration, "drain-duration", 45*time.Second, "how long flows on a listener removed or changed by an xDS update may go on before they are closed (Istio's drainDuration)")
	fs.DurationVar(&f.termDrain, "termination-drain-duration", 5*time.Second, "on SIGTERM, how long flows in progress may go on before the proxy exits; new inbound flows are refused at once (Istio's terminationDrainDuration)")
	fs.IntVar(&f.tunFD, "tun-fd", -1, "use this inherited file descriptor of an open TUN device instead of creating one (the agent keeps the device, so capture survives a proxy restart)")
	fs.IntVar(&f.concurrency, "concurrency", 1, "processors the data path runs on (GOMAXPROCS; Envoy's --concurrency, 0 means 1 as in Envoy). 1 measured best on a 2-core pod: fewer cross-CPU hand-offs, less contention with the app")
	fs.StringVar(&f.cpuProfile, "cpu-profile", "", "write a Go CPU profile of the whole run to this file (for tuning)")
}

func parseIPs(s string) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, tok := range strings.Split(s, ",") {
		tok = strings.TrimSpace(tok)
		if tok == "" {
			continue
		}
		ip, err := netip.ParseAddr(tok)
		if err != nil {
			return nil, fmt.Errorf("%q is not an IP address", tok)
		}
		out = append(out, ip.Unmap())
	}
	return out, nil
}

// parseCaptureCIDRs reads a --capture-cidr value: CIDRs without host bits
// (a route covers a whole network; 10.96.0.1/12 is a typo for 10.96.0.0/12).
func parseCaptureCIDRs(s string) ([]netip.Prefix, error) {
	for _, tok := range strings.Split(s, ",") {
		if p, err := netip.ParsePrefix(strings.TrimSpace(tok)); err == nil && p != p.Masked() {
			return nil, fmt.Errorf("%v: host bits set (did you mean %v?)", p, p.Masked())
		}
	}
	return tun.ParseCIDRs(s)
}

// parseMark reads a --mark value: a non-zero 32-bit number, decimal or 0x hex.
func parseMark(s string) (uint32, error) {
	v, err := strconv.ParseUint(s, 0, 32)
	if err != nil || v == 0 {
		return 0, fmt.Errorf("want a non-zero 32-bit number such as 0x539, got %q", s)
	}
	return uint32(v), nil
}

func runProxy(args []string, stdout, stderr io.Writer) int {
	// Signals are taken first thing: a SIGHUP the agent sends while the
	// proxy starts (a watched file changed) must queue a reload, not kill
	// the process by the default action.
	sigs := notifyProxySignals()
	defer sigs.stop()
	fs := flag.NewFlagSet("meshtun proxy", flag.ContinueOnError)
	fs.SetOutput(stderr)
	f := proxyFlags{mark: 0x539}
	f.register(fs)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "meshtun proxy: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	switch {
	case f.capture != "sidecar" && f.capture != "none" && f.capture != "local":
		fmt.Fprintf(stderr, "meshtun proxy: -capture: want \"sidecar\", \"local\" or \"none\", got %q\n", f.capture)
		return 2
	case f.capture == "local" && len(f.captureCIDRs) == 0:
		fmt.Fprintf(stderr, "meshtun proxy: -capture local needs at least one -capture-cidr\n")
		return 2
	case f.capture != "local" && len(f.captureCIDRs) > 0:
		fmt.Fprintf(stderr, "meshtun proxy: -capture-cidr applies to -capture local only\n")
		return 2
	}
	if f.capture == "local" && runtime.GOOS == "darwin" && f.tunName == "meshtun0" {
		f.tunName = "utun" // darwin names utun devices itself
	}
	log, err := logging.New(logging.Options{Level: f.logLevel, Format: logging.Format(f.logFormat), Out: stderr})
	if err != nil {
		fmt.Fprintf(stderr, "meshtun proxy: %v\n", err)
		return 2
	}
	if f.cpuProfile != "" {
		pf, err := os.Create(f.cpuProfile)
		if err != nil {
			fmt.Fprintf(stderr, "meshtun proxy: -cpu-profile: %v\n", err)
			return 2
		}
		defer pf.Close()
		if err := pprof.StartCPUProfile(pf); err != nil {
			fmt.Fprintf(stderr, "meshtun proxy: -cpu-profile: %v\n", err)
			return 2
		}
		defer pprof.StopCPUProfile()
	}
	if f.concurrency < 0 {
		fmt.Fprintf(stderr, "meshtun proxy: -concurrency: want 0 or more, got %d\n", f.concurrency)
		return 2
	}
	runtime.GOMAXPROCS(max(1, f.concurrency))
	if f.outboundPort > 65535 || f.inboundPort > 65535 {
		fmt.Fprintf(stderr, "meshtun proxy: -outbound-port/-inbound-port: want a port number\n")
		return 2
	}
	if err := serveProxy(&f, log, sigs); err != nil {
		log.Error().Err(err).Msg("proxy failed")
		return 1
	}
	return 0
}

// proxySignals receives the proxy's signals from the start of the run
// and sorts them: SIGHUPs coalesce into one pending reload (applied once
// the configuration source exists, so one that arrives during startup
// waits for it), SIGTERM/SIGINT queue in order (the first drains, a
// second ends the drain). Its goroutine is owned by the run and ends with
// stop.
type proxySignals struct {
	in     chan os.Signal
	reload chan struct{}  // a reload is pending
	term   chan os.Signal // SIGTERM/SIGINT received, in order
	quit   chan struct{}
	done   chan struct{}
	notify bool // in is registered with signal.Notify
}

func notifyProxySignals() *proxySignals {
	in := make(chan os.Signal, 8)
	signal.Notify(in, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT)
	s := startProxySignals(in)
	s.notify = true
	return s
}

// startProxySignals sorts the signals arriving on in.
func startProxySignals(in chan os.Signal) *proxySignals {
	s := &proxySignals{in: in, reload: make(chan struct{}, 1), term: make(chan os.Signal, 2),
		quit: make(chan struct{}), done: make(chan struct{})}
	go s.run()
	return s
}

func (s *proxySignals) run() {
	defer close(s.done)
	for {
		select {
		case <-s.quit:
			return
		case sig := <-s.in:
			if sig == syscall.SIGHUP {
				select {
				case s.reload <- struct{}{}:
				default: // one is pending already: it reads the latest file
				}
				continue
			}
			select {
			case s.term <- sig:
			default: // the first ends the run, the second the drain: more change nothing
			}
		}
	}
}

func (s *proxySignals) stop() {
	if s.notify {
		signal.Stop(s.in)
	}
	close(s.quit)
	<-s.done
}

// awaitDrainEnd returns a context that ends at timeout or when a second
// SIGTERM/SIGINT arrives; a SIGHUP meanwhile is ignored (the proxy is
// leaving, and a reload must not cut the drain short). wait ends the
// watch and waits for its goroutine.
func (s *proxySignals) awaitDrainEnd(timeout time.Duration, log zerolog.Logger) (ctx context.Context, wait func()) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case sig := <-s.term:
				log.Warn().Str("signal", sig.String()).Msg("second signal: ending the drain now")
				cancel()
				return
			case <-s.reload:
				log.Info().Msg("SIGHUP while draining: ignored")
			case <-ctx.Done():
				return
			}
		}
	}()
	return ctx, func() {
		cancel()
		<-done
	}
}

func serveProxy(f *proxyFlags, root zerolog.Logger, sigs *proxySignals) error {
	log := logging.Component(root, "main")
	dialer := &upstream.Dialer{Mark: f.mark, ConnectTimeout: f.connectTimeout}
	if f.capture == "local" {
		// Where there is no socket mark (darwin), the proxy's sockets are
		// pinned to the outgoing interface so they skip the CIDR routes.
		idx, err := tun.DefaultInterface()
		if err != nil {
			return fmt.Errorf("local capture: %w", err)
		}
		dialer.Interface = idx
	}
	// The access log is a logger of its own in /logging ("access"), so
	// that lowering another component's level does not turn it on.
	access := accesslog.NewGated(root, logging.ComponentGate("access"))
	passthrough := &mesh.Passthrough{Dialer: dialer, TCPIdleTimeout: f.tcpIdle, Access: access}
	gate := &mesh.Gate{H: passthrough}
	quit := make(chan string, 1)
	requestQuit := func(why string) {
		select {
		case quit <- why:
		default:
		}
	}

	// The configuration is read and validated before anything on the
	// host changes: a bad bootstrap leaves no capture behind.
	var dispatcher *mesh.Dispatcher
	var cfg *configSource
	if f.bootstrap != "" {
		dispatcher = &mesh.Dispatcher{Access: access, UDP: passthrough, Dialer: dialer}
		srv := &mesh.Server{D: dispatcher, Log: logging.Component(root, "conn_handler"), Gate: gate}
		cfg = &configSource{
			path: f.bootstrap, root: root, log: log, srv: srv, drain: f.drainDuration, control: dialer.Control,
			opts: mesh.BuildOptions{
				Roles:   mesh.Roles{OutboundPort: uint16(f.outboundPort), InboundPort: uint16(f.inboundPort)},
				Cluster: cluster.Options{Dialer: dialer, Log: logging.Component(root, "upstream")},
				Pools:   httpconn.NewPools(),
			},
		}
		defer func() {
			// The proxy is leaving and its drain, if any, is over: what a
			// pooled upstream connection still carries is cut now, not
			// waited for.
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			cfg.opts.Pools.Close(ctx)
		}()
		if err := cfg.start(); err != nil {
			return err
		}
		defer func() {
			cfg.stop()
			srv.Close()
			if s := dispatcher.Snapshot(); s != nil {
				s.Retire(nil)
			}
		}()
		gate.H = dispatcher
		b, _ := cfg.Bootstrap()
		adminLn, err := listenAdmin(b.GetAdmin().GetAddress())
		if err != nil {
			return fmt.Errorf("bootstrap %s: admin.address: %w", f.bootstrap, err)
		}
		defer adminLn.Close()
		adm := &admin.Server{
			D: dispatcher, Start: time.Now(), Extra: cfg.Stats, Bootstrap: cfg.Bootstrap, Initialized: cfg.Initialized,
			Warming:     cfg.Warming,
			Concurrency: max(1, f.concurrency),
			// The listeners drain (HTTP connections told to close); with
			// ?graceful they take new flows for the drain duration, after
			// which the HTTP connections left are closed.
			Drain: func(inboundOnly, graceful bool) {
				srv.StartDrain(inboundOnly)
				if graceful && f.drainDuration > 0 {
					time.AfterFunc(f.drainDuration, func() {
						gate.Close(inboundOnly)
						srv.EndDrain(inboundOnly)
					})
					return
				}
				gate.Close(inboundOnly)
			},
			Quit: func() { requestQuit("quitquitquit") },
		}
		go adm.Serve(adminLn)
		snap := dispatcher.Snapshot()
		log.Info().Str("address", adminLn.Addr().String()).Msg("admin listening")
		log.Info().Str("bootstrap", f.bootstrap).Int("listeners", len(snap.Listeners)).Int("clusters", len(snap.Clusters)).Msg("static configuration applied")
	}
	var dev *tun.Device
	var err error
	if f.tunFD >= 0 {
		dev, err = tun.OpenFile(f.tunFD, f.tunMTU)
	} else {
		dev, err = tun.Open(tun.DeviceConfig{Name: f.tunName, MTU: f.tunMTU, Addrs: f.tunAddrs})
	}
	if err != nil {
		return err
	}
	defer dev.Close()
	off := dev.Offloads()
	log.Log().Str("level", "info").Str("name", dev.Name()).Int("mtu", dev.MTU()).Bool("vnet_hdr", off.VNetHdr).
		Bool("tso", off.TSO).Bool("gro", off.GRO).Int("batch_size", off.BatchSize).Msg("tun device open")

	podIPs := f.podIPs
	if f.capture == "sidecar" {
		capt, err := tun.SetupCapture(tun.CaptureConfig{
			TunName:              dev.Name(),
			Mark:                 f.mark,
			PodInterface:         f.podIface,
			PodIPs:               f.podIPs,
			Inbound:              f.inbound,
			ExcludeOutboundPorts: f.exclOutPorts,
			ExcludeOutboundCIDRs: f.exclOutCIDRs,
			ExcludeInboundPorts:  f.exclInPorts,
			StateDir:             f.stateDir,
		}, logging.Component(root, "capture"))
		if err != nil {
			return err
		}
		defer func() {
			if err := capt.Teardown(); err != nil {
				log.Error().Err(err).Msg("capture teardown")
			}
		}()
		podIPs = capt.PodIPs()
	}

	if f.capture == "local" {
		lc, err := tun.SetupLocal(tun.LocalConfig{TunName: dev.Name(), CIDRs: f.captureCIDRs, Mark: f.mark}, logging.Component(root, "capture"))
		if err != nil {
			return err
		}
		defer func() {
			if err := lc.Teardown(); err != nil {
				log.Error().Err(err).Msg("local capture teardown")
			}
		}()
		podIPs = nil // nothing is inbound in laptop mode
	}

	passthrough.LocalIPs = podIPs
	gate.LocalIPs = podIPs
	if dispatcher != nil {
		dispatcher.LocalIPs = podIPs
	}
	st, err := netstack.New(dev.Dev(), gate, netstack.Config{UDPIdleTimeout: f.udpIdle}, logging.Component(root, "netstack"))
	if err != nil {
		return err
	}
	defer st.Close()

	log.Log().Str("level", "info").Str("capture", f.capture).Interface("pod_ips", podIPs).Msg("proxy ready")
	for {
		select {
		case why := <-quit:
			log.Info().Str("reason", why).Msg("shutting down")
			return nil
		case <-sigs.reload:
			if cfg == nil {
				log.Warn().Msg("SIGHUP: started without --bootstrap, nothing to reload")
				continue
			}
			if err := cfg.Reload(); err != nil {
				log.Error().Err(err).Msg("bootstrap reload rejected; the configuration in force keeps serving")
			}
		case sig := <-sigs.term:
			if sig != syscall.SIGTERM {
				log.Info().Str("signal", sig.String()).Msg("shutting down")
				return nil
			}
			// Istio's termination: new inbound flows are refused at once
			// (the pod is leaving its endpoints), outbound ones still
			// served so the application can finish its own shutdown; the
			// proxy exits when no flow is left or at the termination
			// drain duration.
			gate.Close(true)
			if cfg != nil {
				// Inbound HTTP connections are told to close at once
				// (pilot-agent's /drain_listeners?inboundonly&graceful).
				cfg.srv.StartDrain(true)
			}
			log.Info().Int64("active_flows", gate.Active()).Dur("termination_drain_duration", f.termDrain).Msg("SIGTERM: draining")
			ctx, endWatch := sigs.awaitDrainEnd(f.termDrain, log)
			done := gate.Wait(ctx)
			// The flows are over, but what the proxy wrote to its
			// clients may still be in the stack's send queues: wait
			// (within the same deadline) for the peers to ACK it.
			for done && st.Unflushed() > 0 && ctx.Err() == nil {
				time.Sleep(10 * time.Millisecond)
			}
			endWatch()
			if cfg != nil && !done {
				// The drain is over: HTTP connections still open are
				// closed now (their requests end, which frees their
				// pooled upstream connections), and their FINs get half
				// a second to leave before the stack goes with the
				// process (a client waiting for a response would not
				// learn otherwise). The exit ends the rest.
				cfg.srv.EndDrain(false)
				fctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
				for gate.Wait(fctx) && st.Unflushed() > 0 && fctx.Err() == nil {
					time.Sleep(10 * time.Millisecond)
				}
				cancel()
			}
			log.Info().Bool("all_flows_ended", done).Int64("active_flows", gate.Active()).Msg("drained, shutting down")
			return nil
		}
	}
}

// listenAdmin opens the admin listener: the bootstrap's admin address (an
// IP socket or a Unix domain socket), Istio's 127.0.0.1:15000 when unset.
// Capture never takes port 15000 inbound, and loopback is not reachable
// from outside the pod.
func listenAdmin(a *corev3.Address) (net.Listener, error) {
	if p := a.GetPipe(); p != nil {
		if fi, err := os.Lstat(p.GetPath()); err == nil && fi.Mode()&os.ModeSocket != 0 {
			os.Remove(p.GetPath())
		}
		return net.Listen("unix", p.GetPath())
	}
	addr := "127.0.0.1:15000"
	if sa := a.GetSocketAddress(); sa != nil {
		addr = net.JoinHostPort(sa.GetAddress(), strconv.Itoa(int(sa.GetPortValue())))
	}
	return net.Listen("tcp", addr)
}
