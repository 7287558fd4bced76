package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"time"

	"github.com/rs/zerolog"

	"github.com/meshtun/meshtun/internal/logging"
	"github.com/meshtun/meshtun/proxy"
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
	if s == "none" {
		// Sockets unmarked: capture exempts the proxy's user instead (the
		// least-privilege sidecar cannot set SO_MARK).
		return 0, nil
	}
	v, err := strconv.ParseUint(s, 0, 32)
	if err != nil || v == 0 {
		return 0, fmt.Errorf("want a non-zero 32-bit number such as 0x539, or none, got %q", s)
	}
	return uint32(v), nil
}

func runProxy(args []string, stdout, stderr io.Writer) int {
	// Signals are taken first thing: a SIGHUP the agent sends while the
	// proxy starts (a watched file changed) must queue a reload, not kill
	// the process by the default action.
	sigs := proxy.NotifySignals()
	defer sigs.Stop()
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
	px, err := proxy.New(f.config(log, sigs))
	if err == nil {
		err = px.Run(context.Background())
	}
	if err != nil {
		log.Error().Err(err).Msg("proxy failed")
		return 1
	}
	return 0
}

// config maps the flags onto the proxy's Config, and does nothing else.
func (f *proxyFlags) config(log zerolog.Logger, sigs *proxy.Signals) proxy.Config {
	return proxy.Config{
		Bootstrap:                f.bootstrap,
		OutboundPort:             uint16(f.outboundPort),
		InboundPort:              uint16(f.inboundPort),
		Capture:                  f.capture,
		CaptureCIDRs:             f.captureCIDRs,
		TUNName:                  f.tunName,
		TUNMTU:                   f.tunMTU,
		TUNAddrs:                 f.tunAddrs,
		TUNFD:                    f.tunFD,
		StateDir:                 f.stateDir,
		Mark:                     f.mark,
		PodInterface:             f.podIface,
		PodIPs:                   f.podIPs,
		Inbound:                  f.inbound,
		ExcludeOutboundPorts:     f.exclOutPorts,
		ExcludeOutboundCIDRs:     f.exclOutCIDRs,
		ExcludeInboundPorts:      f.exclInPorts,
		UDPIdleTimeout:           f.udpIdle,
		TCPIdleTimeout:           f.tcpIdle,
		ConnectTimeout:           f.connectTimeout,
		DrainDuration:            f.drainDuration,
		TerminationDrainDuration: f.termDrain,
		Concurrency:              f.concurrency,
		Version:                  version,
		Log:                      log,
		Signals:                  sigs,
	}
}
