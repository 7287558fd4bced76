package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/meshtun/meshtun/agent"
	"github.com/meshtun/meshtun/agent/caclient"
	"github.com/meshtun/meshtun/agent/sds"
	"github.com/meshtun/meshtun/internal/logging"
	"github.com/meshtun/meshtun/mesh/bootstrap"
	"github.com/meshtun/meshtun/tun"
)

// agentSources registers the flags that say where the bootstrap's inputs
// come from (besides the environment).
func agentSources(fs *flag.FlagSet, src *agent.Sources, out *string) {
	fs.StringVar(out, "bootstrap-out", "/etc/istio/proxy/envoy-rev.json", "where the generated bootstrap is written (the proxy reads it; so can you)")
	fs.StringVar(&src.ProxyConfigFile, "proxy-config", "", "ProxyConfig file (YAML or JSON, like mesh config's defaultConfig); $PROXY_CONFIG overrides it field by field; watched")
	fs.StringVar(&src.DiscoveryAddress, "discovery-address", "", "xDS server host:port (default: ProxyConfig's discoveryAddress, istiod.istio-system.svc:15010)")
	fs.StringVar(&src.ExtraBootstrap, "bootstrap-extra", "", "Envoy bootstrap fragment merged over the generated one, e.g. static listeners and clusters (default $ISTIO_BOOTSTRAP_OVERRIDE); watched")
	fs.BoolVar(&src.NoXDS, "no-xds", false, "no ADS: the proxy serves the static resources of --bootstrap-extra only")
	fs.StringVar(&src.LabelsFile, "pod-labels-file", agent.DefaultLabelsFile, "downward-API pod labels (key=\"value\" lines); ignored if missing; watched")
	fs.StringVar(&src.AnnotationsFile, "pod-annotations-file", agent.DefaultAnnotationsFile, "downward-API pod annotations, incl. traffic.sidecar.istio.io/*; ignored if missing; watched")
	fs.StringVar(&src.Domain, "domain", "", "DNS domain of the node id (default <namespace>.svc.cluster.local)")
	fs.IntVar(&src.ReadinessPort, "readiness-port", 15021, "port of /healthz/ready (Istio's ENVOY_STATUS_PORT)")
	fs.StringVar(&src.Identity.Mode, "identity", "", `workload certificate: "ca" (istiod's CA at $CA_ADDR, default the discovery address), "files" (mounted in --cert-dir, as FILE_MOUNTED_CERTS=true) or "none"; default: files if FILE_MOUNTED_CERTS=true, ca if $CA_ADDR is set or the discovery address is on istiod's TLS port 15012, else none`)
	fs.StringVar(&src.RootCertFile, "ca-root-file", caclient.DefaultRootFile, "root certificate istiod's TLS port 15012 (CA and xDS) is verified against")
	fs.StringVar(&src.TokenFile, "token-file", caclient.DefaultTokenFile, "bearer token sent to istiod's TLS port (CA and xDS), re-read on every call")
	fs.StringVar(&src.Identity.SocketPath, "sds-socket", sds.DefaultSocketPath, "Unix socket where SDS serves the workload certificate (default and ROOTCA)")
	fs.StringVar(&src.Identity.CertDir, "cert-dir", "/etc/certs", "with --identity files: the folder of cert-chain.pem, key.pem and root-cert.pem")
}

// runAgent is `meshtun agent`: pilot-agent. Subcommands `wait` and
// `request` are pilot-agent's too.
func runAgent(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 {
		switch args[0] {
		case "wait":
			return runAgentWait(args[1:], stderr)
		case "request":
			return runAgentRequest(args[1:], stdout, stderr)
		}
	}
	fs := flag.NewFlagSet("meshtun agent", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: meshtun agent [flags]            run capture and the supervised proxy (pilot-agent)\n"+
			"       meshtun agent wait [flags]       wait until the proxy is ready\n"+
			"       meshtun agent request METHOD PATH [BODY]   query the proxy's admin API\n\nflags:")
		fs.PrintDefaults()
	}
	var cfg agent.Config
	agentSources(fs, &cfg.Sources, &cfg.BootstrapOut)
	printBootstrap := fs.Bool("print-bootstrap", false, "print the bootstrap the environment gives and exit (nothing is started or written)")
	captureOnly := fs.Bool("capture-only", false, "install capture (blocked until the agent's proxy serves) and exit: the init container, like istio-init; with interception mode NONE (--capture none, ISTIO_META_INTERCEPTION_MODE=NONE) it changes nothing")
	co := &cfg.Capture
	fs.StringVar(&co.Mode, "capture", "", `"sidecar" (capture the pod's traffic), "attach" (least privilege: attach, as its owner, to the TUN the init container made with --tun-owner; no capability needed), "local" (laptop mode, as --mode local) or "none"; default: none if ISTIO_META_INTERCEPTION_MODE=NONE, else sidecar`)
	fs.IntVar(&co.TunOwner, "tun-owner", 0, "with --capture-only: make the TUN persistent and owned by this uid (the sidecar's, e.g. 1337), and exempt that uid's sockets from capture, for a sidecar running with --capture attach")
	fs.IntVar(&co.TunGroup, "tun-group", -1, "with --tun-owner: the TUN's group (-1: none)")
	fs.StringVar(&co.TunNode, "tun-node", "/dev/net/tun", "the TUN clone device; created (c 10:200) when missing. Share one on an emptyDir between the init container and the sidecar")
	mode := fs.String("mode", "sidecar", `"sidecar" (in a pod, next to istiod) or "local" (a developer's machine: only --capture-cidr is routed into the TUN, nothing inbound; POD_NAME, POD_NAMESPACE and INSTANCE_IP default to the host name, "default" and the default route's address)`)
	fs.Func("capture-cidr", `with --mode local: destinations routed into the TUN, comma separated or repeated (the mesh's service range, e.g. 10.96.0.0/12)`, func(s string) error {
		ps, err := parseCaptureCIDRs(s)
		co.CIDRs = append(co.CIDRs, ps...)
		return err
	})
	fs.StringVar(&cfg.Sources.DiscoveryAddress, "discovery", "", "same as --discovery-address")
	fs.StringVar(&co.TunName, "tun-name", "meshtun0", "TUN device name")
	fs.IntVar(&co.TunMTU, "tun-mtu", 65535, "TUN MTU")
	fs.StringVar(&co.StateDir, "state-dir", "/run/meshtun", "where capture records what it changed (share it with the init container)")
	co.Mark = 0x539
	fs.Func("mark", "SO_MARK of the proxy's upstream sockets (default 0x539)", func(s string) (err error) {
		co.Mark, err = parseMark(s)
		return err
	})
	fs.StringVar(&co.PodInterface, "pod-iface", "", "the pod's interface (default: the default route's)")
	fs.Func("pod-ips", "the pod's IPs for capture, comma separated (default: the pod interface's addresses)", func(s string) (err error) {
		co.PodIPs, err = parseIPs(s)
		return err
	})
	fs.BoolVar(&co.Inbound, "inbound", true, "capture inbound TCP (the includeInboundPorts=\"\" annotation turns it off too)")
	fs.Func("exclude-outbound-ports", "outbound ports not captured, added to traffic.sidecar.istio.io/excludeOutboundPorts", func(s string) (err error) {
		co.ExcludeOutboundPorts, err = tun.ParsePorts(s)
		return err
	})
	fs.Func("exclude-outbound-cidrs", "outbound destinations not captured, added to traffic.sidecar.istio.io/excludeOutboundIPRanges", func(s string) (err error) {
		co.ExcludeOutboundCIDRs, err = tun.ParseCIDRs(s)
		return err
	})
	fs.Func("exclude-inbound-ports", "inbound ports not captured, added to traffic.sidecar.istio.io/excludeInboundPorts", func(s string) (err error) {
		co.ExcludeInboundPorts, err = tun.ParsePorts(s)
		return err
	})
	fs.StringVar(&cfg.ProxyBinary, "proxy-binary", "", "meshtun binary run as the proxy (default: this one)")
	fs.Func("proxy-arg", "extra flag for `meshtun proxy` (repeatable), e.g. --proxy-arg=--tcp-idle-timeout=10m", func(s string) error {
		cfg.ProxyArgs = append(cfg.ProxyArgs, s)
		return nil
	})
	fs.StringVar(&cfg.StatusHost, "status-address", "", "address the status and readiness ports bind (default: all)")
	fs.DurationVar(&cfg.Restart.Initial, "restart-backoff", 100*time.Millisecond, "wait before restarting a proxy that exited; doubles on each exit")
	fs.DurationVar(&cfg.Restart.Max, "restart-max-backoff", 10*time.Second, "the longest wait between restarts")
	fs.DurationVar(&cfg.Restart.ResetAfter, "restart-reset-after", 30*time.Second, "a proxy that served this long is restarted after --restart-backoff again")
	fs.Func("watch", "file or directory (certificates, config) whose change reloads the proxy; repeatable", func(s string) error {
		cfg.Watch = append(cfg.Watch, s)
		return nil
	})
	fs.DurationVar(&cfg.WatchInterval, "watch-interval", time.Second, "how often watched files are compared")
	fs.DurationVar(&cfg.ShutdownGrace, "shutdown-grace", 5*time.Second, "time past terminationDrainDuration the proxy may take to exit before it is killed")
	fs.StringVar(&cfg.LogLevel, "log-level", "info", "agent and proxy log level")
	fs.StringVar(&cfg.LogFormat, "log-format", "console", "console or json (agent and proxy)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "meshtun agent: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	switch *mode {
	case "sidecar":
	case "local":
		if co.Mode != "" && co.Mode != "local" {
			fmt.Fprintf(stderr, "meshtun agent: --mode local captures --capture-cidr only; drop --capture %s\n", co.Mode)
			return 2
		}
		co.Mode = "local"
	default:
		fmt.Fprintf(stderr, "meshtun agent: -mode: want \"sidecar\" or \"local\", got %q\n", *mode)
		return 2
	}
	switch {
	case *captureOnly && co.Mode == "local":
		fmt.Fprintf(stderr, "meshtun agent: --capture-only: laptop mode has no init container; drop --capture-only (its proxy routes --capture-cidr itself)\n")
		return 2
	case co.Mode != "" && co.Mode != "sidecar" && co.Mode != "none" && co.Mode != "local" && co.Mode != "attach":
		fmt.Fprintf(stderr, "meshtun agent: -capture: want \"sidecar\", \"attach\", \"local\" or \"none\", got %q\n", co.Mode)
		return 2
	case co.TunOwner != 0 && !*captureOnly:
		fmt.Fprintf(stderr, "meshtun agent: --tun-owner applies to --capture-only (the init container); the sidecar attaches with --capture attach\n")
		return 2
	case co.TunOwner < 0:
		fmt.Fprintf(stderr, "meshtun agent: --tun-owner %d: want a uid\n", co.TunOwner)
		return 2
	case co.Mode == "attach" && *captureOnly:
		fmt.Fprintf(stderr, "meshtun agent: --capture attach is the sidecar's; the init container creates the device with --capture-only --tun-owner UID\n")
		return 2
	case co.Mode == "local" && len(co.CIDRs) == 0:
		fmt.Fprintf(stderr, "meshtun agent: --mode local needs at least one --capture-cidr\n")
		return 2
	case co.Mode != "local" && len(co.CIDRs) > 0:
		fmt.Fprintf(stderr, "meshtun agent: --capture-cidr applies to --mode local only\n")
		return 2
	}
	if co.Mode == "attach" {
		// Its sockets are exempt from capture by user: SO_MARK needs
		// CAP_NET_ADMIN, which this sidecar does not have.
		co.Mark = 0
	}
	out := &agent.LockedWriter{W: stderr}
	log, err := logging.New(logging.Options{Level: cfg.LogLevel, Format: logging.Format(cfg.LogFormat), Out: out})
	if err != nil {
		fmt.Fprintf(stderr, "meshtun agent: %v\n", err)
		return 2
	}
	cfg.Sources.Environ = os.Environ()
	if co.Mode == "local" {
		cfg.Sources.Environ = agent.LocalEnviron(cfg.Sources.Environ)
	}
	if *captureOnly {
		if err := agent.CaptureOnly(cfg.Capture, cfg.Sources, log); err != nil {
			fmt.Fprintf(stderr, "meshtun agent: %v\n", err)
			return 1
		}
		return 0
	}
	// The environment is checked before anything starts: a bad value
	// exits 2 naming it.
	_, js, _, err := agent.PrepareBootstrap(cfg.Sources)
	if err != nil {
		fmt.Fprintf(stderr, "meshtun agent: %v\n", err)
		return 2
	}
	if *printBootstrap {
		stdout.Write(js)
		return 0
	}
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)
	cfg.Signals = sigs
	cfg.Output = out
	if err := agent.Run(cfg, log); err != nil {
		alog := logging.Component(log, "agent")
		alog.Error().Err(err).Msg("agent failed")
		return 1
	}
	return 0
}

// runAgentWait is `pilot-agent wait`: block until the proxy is ready.
func runAgentWait(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("meshtun agent wait", flag.ContinueOnError)
	fs.SetOutput(stderr)
	timeout := fs.Duration("timeout", 60*time.Second, "give up after this long")
	period := fs.Duration("period", 500*time.Millisecond, "poll interval")
	url := fs.String("url", agent.DefaultReadyURL, "readiness URL")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "meshtun agent wait: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	if *timeout <= 0 || *period <= 0 {
		fmt.Fprintln(stderr, "meshtun agent wait: -timeout and -period must be positive")
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	start := time.Now()
	if err := agent.Wait(ctx, *url, *period); err != nil {
		fmt.Fprintf(stderr, "meshtun agent wait: timeout after %v: %v\n", timeout.Round(time.Millisecond), err)
		return 1
	}
	fmt.Fprintf(stderr, "meshtun agent wait: ready after %v\n", time.Since(start).Round(time.Millisecond))
	return 0
}

// runAgentRequest is `pilot-agent request`: `meshtun request` at the
// admin address the agent configured (from its bootstrap, else from the
// environment's ProxyConfig).
func runAgentRequest(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("meshtun agent request", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var src agent.Sources
	var out string
	agentSources(fs, &src, &out)
	admin := fs.String("admin-address", "", "admin address (default: the agent's)")
	timeout := fs.String("timeout", "60s", "request timeout")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: meshtun agent request [flags] <METHOD> <PATH> [BODY]")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return 2
	}
	addr := *admin
	if addr == "" {
		if b, err := bootstrap.Load(out); err == nil {
			addr = agent.AdminAddress(b)
		} else {
			src.Environ = os.Environ()
			if in, err := agent.Load(src); err == nil {
				addr = fmt.Sprintf("127.0.0.1:%d", in.ProxyConfig.ProxyAdminPort)
			}
		}
	}
	rargs := []string{"--timeout", *timeout}
	if addr != "" {
		rargs = append(rargs, "--admin-address", addr)
	}
	return runRequest(append(rargs, fs.Args()...), stdout, stderr)
}
