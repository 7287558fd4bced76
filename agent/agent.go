package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	"github.com/rs/zerolog"

	"github.com/meshtun/meshtun/internal/logging"
	"github.com/meshtun/meshtun/mesh/upstream"
	"github.com/meshtun/meshtun/tun"
)

// Config is a run of the agent.
type Config struct {
	Sources Sources
	// BootstrapOut is where the bootstrap is written for the proxy (and
	// for the user to read).
	BootstrapOut string
	Capture      CaptureOptions
	// ProxyBinary is the meshtun binary to run as `proxy` (default: this
	// executable); ProxyArgs are added to its flags.
	ProxyBinary string
	ProxyArgs   []string
	// LogLevel and LogFormat are passed to the proxy.
	LogLevel, LogFormat string
	// StatusHost is the address the status and readiness ports bind
	// ("" = every address).
	StatusHost string
	Restart    Backoff
	// Watch are more files or directories whose change reloads the proxy
	// (certificates, config); the bootstrap's own input files are always
	// watched.
	Watch         []string
	WatchInterval time.Duration
	// ShutdownGrace is how long past terminationDrainDuration the proxy
	// may take to exit before it is killed (default 5s).
	ShutdownGrace time.Duration
	// Signals delivers SIGTERM/SIGINT: the first drains and exits, a
	// second kills the proxy at once.
	Signals <-chan os.Signal
	// Output receives the proxy's output (the agent's log writer).
	Output io.Writer
}

// agent is a running meshtun agent.
type agent struct {
	cfg  Config
	log  zerolog.Logger
	root zerolog.Logger

	mu     sync.Mutex
	in     *Inputs
	js     []byte
	b      *bootstrapv3.Bootstrap
	podIPs []netip.Addr
	prober atomic.Pointer[prober]

	dev     *tun.Device
	capture *tun.Capture
	sup     *supervisor
	status  *statusServer
	// identity is the workload certificate served over SDS; nil without.
	identity *identity

	// reloadSignals counts the SIGHUPs sent to the proxy; whether it
	// applied them is the proxy's own server.bootstrap_reload.* stats
	// (merged into the status port's scrape). reloadErrors counts changes
	// never signalled because the new inputs were invalid.
	reloadSignals, reloadErrors atomic.Int64
	quit                        chan struct{}
	quitOnce                    sync.Once
}

// PrepareBootstrap loads the inputs, renders and validates the bootstrap.
func PrepareBootstrap(src Sources) (*Inputs, []byte, *bootstrapv3.Bootstrap, error) {
	in, err := Load(src)
	if err != nil {
		return nil, nil, nil, err
	}
	js, b, err := in.render()
	if err != nil {
		return nil, nil, nil, err
	}
	return in, js, b, nil
}

// Run runs the agent until a signal or /quitquitquit: bootstrap, capture,
// status ports, the supervised proxy, reloads; then drain and teardown.
// Errors before the proxy starts leave the host as it was. root is the
// root logger; the agent logs as component "agent", capture as "capture".
func Run(cfg Config, root zerolog.Logger) error {
	log := logging.Component(root, "agent")
	if cfg.ShutdownGrace <= 0 {
		cfg.ShutdownGrace = 5 * time.Second
	}
	cfg.Capture.setDefaults()
	if cfg.Output == nil {
		cfg.Output = os.Stderr
	}
	a := &agent{cfg: cfg, log: log, root: root, quit: make(chan struct{})}
	in, js, b, err := PrepareBootstrap(cfg.Sources)
	if err != nil {
		return err
	}
	logStartInputs(log, in)
	if err := writeFile(cfg.BootstrapOut, js); err != nil {
		return err
	}
	a.in, a.js, a.b = in, js, b
	log.Info().Str("path", cfg.BootstrapOut).Str("node", in.nodeID()).Str("cluster", in.serviceCluster()).
		Bool("xds", hasADS(b)).Msg("bootstrap written")

	// The status ports first: a port in use fails the start before
	// anything on the host changes.
	pc := in.ProxyConfig
	statusLn, err := net.Listen("tcp", net.JoinHostPort(cfg.StatusHost, strconv.Itoa(pc.StatusPort)))
	if err != nil {
		return fmt.Errorf("status port: %w", err)
	}
	defer statusLn.Close()
	readyLn, err := net.Listen("tcp", net.JoinHostPort(cfg.StatusHost, strconv.Itoa(in.ReadinessPort)))
	if err != nil {
		return fmt.Errorf("readiness port: %w", err)
	}
	defer readyLn.Close()

	// The SDS socket before capture too: one another server answers on
	// stops the start with the host unchanged.
	if a.identity, err = startIdentity(in.identity, (&upstream.Dialer{Mark: cfg.Capture.Mark}).Control, root); err != nil {
		return err
	}
	defer a.identity.stop()

	if err := a.setupCapture(in); err != nil {
		return err
	}
	defer a.teardownCapture()

	a.sup = &supervisor{
		Command: a.proxyCommand,
		Live: func(ctx context.Context) error {
			return a.prober.Load().Live(ctx)
		},
		Backoff: cfg.Restart,
		Output:  cfg.Output,
		Log:     log,
	}
	if a.capture != nil {
		a.sup.Capture, a.sup.CaptureBlocked = a.capture, true
	}
	a.status = &statusServer{
		Ready:        a.ready,
		AgentMetrics: a.writeMetrics,
		ProxyMetrics: a.proxyMetrics,
		Quit:         func() { a.quitOnce.Do(func() { close(a.quit) }) },
		Drain:        a.drainProxy,
		AppProbes:    in.appProbers,
		Log:          log,
	}
	a.prober.Store(newProber(AdminAddress(b), hasADS(b)))
	statusSrv := serve(statusLn, a.status.StatusHandler())
	readySrv := serve(readyLn, a.status.ReadinessHandler())
	defer statusSrv.Close()
	defer readySrv.Close()
	log.Info().Str("status", statusLn.Addr().String()).Str("readiness", readyLn.Addr().String()).Msg("status ports listening")

	runDone := make(chan struct{})
	go func() {
		defer close(runDone)
		a.sup.Run()
	}()
	w := &watcher{Paths: a.watched(in), Interval: cfg.WatchInterval, OnChange: a.reload}
	stopWatch := w.Start()
	defer stopWatch()

	select {
	case sig := <-cfg.Signals:
		log.Info().Str("signal", sig.String()).Msg("terminating")
	case <-a.quit:
	}
	// No reload may be in flight once the drain starts: a SIGHUP sent
	// after the SIGTERM would reach a draining proxy.
	stopWatch()
	a.status.SetDraining()
	grace := pc.TerminationDrainDuration + cfg.ShutdownGrace
	// The proxy refuses new inbound flows at once (the pod is leaving its
	// endpoints) and serves outbound ones, as Envoy's drain does under
	// Istio, until the active flows end or the drain duration is over.
	log.Info().Dur("termination_drain_duration", pc.TerminationDrainDuration).
		Msg("draining: new inbound flows are refused; active flows may finish")
	stopErr := make(chan error, 1)
	go func() { stopErr <- a.sup.Stop(grace) }()
	var serr error
	for done := false; !done; {
		select {
		case serr = <-stopErr:
			done = true
		case sig := <-cfg.Signals:
			log.Warn().Str("signal", sig.String()).Msg("second signal: killing the proxy")
			a.sup.Kill()
		}
	}
	<-runDone
	if serr != nil {
		return fmt.Errorf("proxy shutdown: %w", serr)
	}
	log.Info().Msg("proxy exited; agent done")
	return nil
}

// logStartInputs logs, at start, the inputs' warnings and, in one info
// line, the ProxyConfig fields meshtun accepts but does not act on: they
// are valid Istio settings (the injector passes whatever the mesh config
// sets), so not a warning, but a user should see they change nothing
// here. A reload logs only the warnings.
func logStartInputs(log zerolog.Logger, in *Inputs) {
	for _, w := range in.Warnings {
		log.Warn().Msg(w)
	}
	if len(in.ProxyConfigNotActedOn) > 0 {
		log.Info().Strs("fields", in.ProxyConfigNotActedOn).
			Msg("ProxyConfig: fields accepted and sent to istiod in the node metadata, not acted on by meshtun")
	}
}

// proxyCommand is the child for the next start, from the current
// bootstrap: `meshtun proxy` on the agent's TUN (fd 3) with capture left
// to the agent.
func (a *agent) proxyCommand() (*exec.Cmd, error) {
	a.mu.Lock()
	in, b := a.in, a.b
	a.mu.Unlock()
	bin := a.cfg.ProxyBinary
	if bin == "" {
		exe, err := os.Executable()
		if err != nil {
			return nil, err
		}
		bin = exe
	}
	pc := in.ProxyConfig
	co := a.cfg.Capture
	args := []string{"proxy", "--bootstrap", a.cfg.BootstrapOut, "--capture", "none"}
	var files []*os.File
	if co.Mode == "local" {
		cidrs := make([]string, len(co.CIDRs))
		for i, p := range co.CIDRs {
			cidrs[i] = p.String()
		}
		args = []string{"proxy", "--bootstrap", a.cfg.BootstrapOut, "--capture", "local", "--capture-cidr", strings.Join(cidrs, ","),
			"--tun-name", co.TunName}
	} else if a.dev != nil {
		f := a.dev.File()
		if f == nil {
			return nil, errors.New("the TUN device has no file to hand to the proxy")
		}
		files = []*os.File{f} // fd 3 in the child
		args = append(args, "--tun-fd", "3")
	} else {
		args = append(args, "--tun-name", co.TunName)
	}
	args = append(args,
		"--tun-mtu", strconv.Itoa(co.TunMTU),
		"--termination-drain-duration", pc.TerminationDrainDuration.String(),
		"--drain-duration", pc.DrainDuration.String(),
		"--concurrency", strconv.Itoa(pc.Concurrency),
		"--mark", markArg(co.Mark),
	)
	if a.cfg.LogLevel != "" {
		args = append(args, "--log-level", a.cfg.LogLevel)
	}
	if a.cfg.LogFormat != "" {
		args = append(args, "--log-format", a.cfg.LogFormat)
	}
	if len(a.podIPs) > 0 && co.Mode != "local" {
		ips := make([]string, len(a.podIPs))
		for i, ip := range a.podIPs {
			ips[i] = ip.String()
		}
		args = append(args, "--pod-ips", strings.Join(ips, ","))
	}
	cmd := exec.Command(bin, append(args, a.cfg.ProxyArgs...)...)
	cmd.ExtraFiles = files
	// net/http's HTTP/2 server takes RFC 8441 extended CONNECT (WebSocket
	// over h2, http2_protocol_options.allow_connect) only when this is set
	// as the process starts.
	cmd.Env = withGODEBUG(os.Environ(), "http2xconnect=1")
	// This child is probed at the admin address of the bootstrap it starts with.
	a.prober.Store(newProber(AdminAddress(b), hasADS(b)))
	return cmd, nil
}

// ready is the pod's readiness: the workload certificate is served (when
// the agent has an identity), a proxy runs, is live, and has its first
// configuration.
func (a *agent) ready(ctx context.Context) error {
	if err := a.identity.notReady(); err != nil {
		return err
	}
	if a.sup.Pid() == 0 {
		return errors.New("proxy not running")
	}
	// The proxy says why it is not ready (no configuration yet, say)
	// before the supervisor's view is consulted.
	if err := a.prober.Load().Ready(ctx); err != nil {
		return err
	}
	if !a.sup.IsLive() {
		return errors.New("proxy starting")
	}
	return nil
}

func (a *agent) proxyMetrics(ctx context.Context) ([]byte, error) {
	if a.sup.Pid() == 0 {
		return nil, errors.New("proxy not running")
	}
	code, body, err := a.prober.Load().Get(ctx, "/stats/prometheus")
	if err != nil {
		return nil, err
	}
	if code != 200 {
		return nil, fmt.Errorf("proxy /stats/prometheus: %d", code)
	}
	return body, nil
}

// drainProxy asks the proxy, through its admin, to stop taking new inbound
// flows and to start closing its HTTP connections gracefully, as
// pilot-agent's /drain asks Envoy (drain_listeners?inboundonly&graceful).
func (a *agent) drainProxy() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	code, body, err := a.prober.Load().Do(ctx, http.MethodPost, "/drain_listeners?inboundonly&graceful")
	switch {
	case err != nil:
		a.log.Warn().Err(err).Msg("/drain: the proxy's admin did not answer; it drains at termination")
	case code != http.StatusOK:
		a.log.Warn().Int("status", code).Str("body", strings.TrimSpace(string(body))).Msg("/drain: the proxy refused drain_listeners")
	}
}

func (a *agent) writeMetrics(w io.Writer) {
	metric(w, "meshtun_agent_proxy_restarts_total", "counter", "Times the agent restarted the proxy after it exited on its own.", float64(a.sup.Restarts()))
	metric(w, "meshtun_agent_proxy_live", "gauge", "1 while a proxy runs and answers its admin /ready.", b2f(a.sup.IsLive()))
	metric(w, "meshtun_agent_capture_blocked", "gauge", "1 while captured flows are refused because no proxy serves them.", b2f(a.sup.Blocked()))
	metric(w, "meshtun_agent_reload_signals_total", "counter", "Reload signals (SIGHUP) sent to the proxy after a watched file changed; the proxy counts the reloads it applied as envoy_server_bootstrap_reload_update_success.", float64(a.reloadSignals.Load()))
	metric(w, "meshtun_agent_reload_errors_total", "counter", "Watched-file changes not sent to the proxy because the new inputs were invalid or the bootstrap could not be written.", float64(a.reloadErrors.Load()))
}

// markArg is the proxy's --mark: none for the least-privilege sidecar,
// whose sockets capture exempts by user (SO_MARK needs CAP_NET_ADMIN).
func markArg(m uint32) string {
	if m == 0 {
		return "none"
	}
	return fmt.Sprintf("%#x", m)
}

// withGODEBUG adds setting to env's GODEBUG, unless it names the setting's
// key already (the user's choice stands).
func withGODEBUG(env []string, setting string) []string {
	key, _, _ := strings.Cut(setting, "=")
	for i, kv := range env {
		v, ok := strings.CutPrefix(kv, "GODEBUG=")
		if !ok {
			continue
		}
		for _, part := range strings.Split(v, ",") {
			if k, _, _ := strings.Cut(part, "="); k == key {
				return env
			}
		}
		if v != "" {
			v += ","
		}
		out := slices.Clone(env)
		out[i] = "GODEBUG=" + v + setting
		return out
	}
	return append(slices.Clone(env), "GODEBUG="+setting)
}
