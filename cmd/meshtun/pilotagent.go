package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/meshtun/meshtun/agent"
)

// runPilotAgent is meshtun started under the name pilot-agent (a link or
// copy of the binary, as the image ships it): Istio's injection template
// runs `pilot-agent proxy sidecar …` as the sidecar's arguments,
// `pilot-agent wait` as the application's postStart hook and
// `pilot-agent request --debug-port=15020 POST drain` as the native
// sidecar's preStop hook. Those argv are accepted as pilot-agent takes
// them; what meshtun has no use for is accepted and named once.
func runPilotAgent(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, pilotUsage)
		return 2
	}
	switch args[0] {
	case "proxy":
		return runPilotAgentProxy(args[1:], stdout, stderr)
	case "wait":
		return runPilotAgentWait(args[1:], stderr)
	case "request":
		return runPilotAgentRequest(args[1:], stdout, stderr)
	case "version":
		fmt.Fprintln(stdout, "meshtun", version, "(as pilot-agent)")
		return 0
	case "-h", "--help", "help":
		fmt.Fprintln(stdout, pilotUsage)
		return 0
	}
	fmt.Fprintf(stderr, "pilot-agent %s: not a pilot-agent command meshtun implements (proxy sidecar, wait, request, version)\n", args[0])
	return 2
}

const pilotUsage = "usage: pilot-agent proxy sidecar [flags] | wait [flags] | request [--debug-port N] METHOD PATH [BODY] | version\n(meshtun answering to pilot-agent's name)"

// pilotFlag is how one of pilot-agent's proxy flags is taken.
type pilotFlag struct {
	value bool // takes a value (--flag=v or --flag v)
	// mapTo turns the value into meshtun agent arguments; nil: accepted
	// and not acted on.
	mapTo func(v string) ([]string, error)
	why   string // for a flag not acted on: why
}

// pilotProxyFlags are the flags of `pilot-agent proxy` that Istio's
// templates and users pass (pilot/cmd/pilot-agent/app/cmd.go and istio's
// logging options).
var pilotProxyFlags = map[string]pilotFlag{
	"domain": {value: true, mapTo: func(v string) ([]string, error) { return []string{"--domain", v}, nil }},
	"proxyLogLevel": {value: true, mapTo: func(v string) ([]string, error) {
		// "warning,misc:error": the level, then per-component overrides
		// meshtun's proxy has no components for.
		lvl, err := pilotLevel(v)
		if err != nil {
			return nil, fmt.Errorf("--proxyLogLevel: %w", err)
		}
		return []string{"--proxy-arg=--log-level=" + lvl}, nil
	}},
	"log_output_level": {value: true, mapTo: func(v string) ([]string, error) {
		// "default:info,ads:debug": the default scope's level is the agent's.
		lvl, err := pilotLevel(v)
		if err != nil {
			return nil, fmt.Errorf("--log_output_level: %w", err)
		}
		return []string{"--log-level", lvl}, nil
	}},
	"log_as_json": {mapTo: func(v string) ([]string, error) {
		if b, err := strconv.ParseBool(v); err != nil || !b {
			return nil, err
		}
		return []string{"--log-format", "json"}, nil
	}},
	"concurrency": {value: true, mapTo: func(v string) ([]string, error) {
		if n, err := strconv.Atoi(v); err != nil || n < 0 {
			return nil, fmt.Errorf("--concurrency %q: want a number of worker threads (0: one per CPU)", v)
		}
		return []string{"--proxy-arg=--concurrency=" + v}, nil
	}},
	"proxyComponentLogLevel": {value: true, why: "Envoy's per-component levels; meshtun's proxy has one level"},
	"templateFile":           {value: true, why: "an Envoy bootstrap template; meshtun renders its own bootstrap"},
	"outlierLogPath":         {value: true, why: "Envoy's outlier-detection event log"},
	"stsPort":                {value: true, why: "the STS token exchange server for third-party CAs"},
	"tokenManagerPlugin":     {value: true, why: "the STS token exchange server for third-party CAs"},
	"meshConfig":             {value: true, why: "meshtun reads mesh settings from PROXY_CONFIG and the control plane"},
	"serviceCluster":         {value: true, why: "removed from Istio; the cluster comes from the pod's labels"},
	"log_caller":             {value: true, why: "istio logging option"},
	"log_stacktrace_level":   {value: true, why: "istio logging option"},
	"log_target":             {value: true, why: "meshtun logs to stderr"},
	"log_rotate":             {value: true, why: "meshtun logs to stderr"},
	"log_rotate_max_age":     {value: true, why: "meshtun logs to stderr"},
	"log_rotate_max_backups": {value: true, why: "meshtun logs to stderr"},
	"log_rotate_max_size":    {value: true, why: "meshtun logs to stderr"},
	"vklog":                  {value: true, why: "klog verbosity of istio's Kubernetes client"},
	"ctrlz_port":             {value: true, why: "istio's ControlZ introspection"},
	"ctrlz_address":          {value: true, why: "istio's ControlZ introspection"},
}

// pilotLevel reads an istio log level list ("info", "warning,misc:error",
// "default:info,ads:debug"): the bare level or the default scope's.
func pilotLevel(v string) (string, error) {
	lvl := ""
	for _, part := range strings.Split(v, ",") {
		scope, l, scoped := strings.Cut(strings.TrimSpace(part), ":")
		switch {
		case !scoped:
			lvl = scope
		case scope == "default":
			lvl = l
		}
	}
	switch lvl {
	case "":
		return "info", nil
	case "none":
		return "off", nil
	case "trace", "debug", "info", "warn", "warning", "error", "critical", "fatal", "off":
		return lvl, nil
	}
	return "", fmt.Errorf("level %q: want trace, debug, info, warning, error, critical, fatal or none", lvl)
}

// translateProxyArgs turns `pilot-agent proxy sidecar …`'s flags into
// `meshtun agent` arguments, and lists those accepted and not acted on.
// Other flags are meshtun agent's and are passed on as they are.
func translateProxyArgs(args []string) (out, ignored []string, err error) {
	if len(args) == 0 || strings.HasPrefix(args[0], "-") {
		return nil, nil, fmt.Errorf("pilot-agent proxy: want the proxy type first (sidecar)")
	}
	switch args[0] {
	case "sidecar":
	case "router":
		return nil, nil, fmt.Errorf("pilot-agent proxy router: gateways are not something meshtun runs; only sidecar")
	default:
		return nil, nil, fmt.Errorf("pilot-agent proxy %s: unknown proxy type; want sidecar", args[0])
	}
	for i := 1; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "-") {
			return nil, nil, fmt.Errorf("pilot-agent proxy sidecar: unexpected argument %q", a)
		}
		name, val, hasVal := strings.Cut(strings.TrimLeft(a, "-"), "=")
		f, ok := pilotProxyFlags[name]
		if !ok {
			// meshtun agent's own flags (a meshtun template may add them)
			// pass through in order; the agent refuses one it does not
			// know, naming it.
			out = append(out, a)
			if !hasVal && i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") {
				i++
				out = append(out, args[i]) // its value
			}
			continue
		}
		if f.value && !hasVal {
			if i+1 >= len(args) {
				return nil, nil, fmt.Errorf("pilot-agent proxy sidecar: --%s needs a value", name)
			}
			i++
			val = args[i]
		} else if !f.value && !hasVal {
			val = "true"
		}
		if f.mapTo == nil {
			ignored = append(ignored, fmt.Sprintf("--%s=%s (%s)", name, val, f.why))
			continue
		}
		m, err := f.mapTo(val)
		if err != nil {
			return nil, nil, err
		}
		out = append(out, m...)
	}
	return out, ignored, nil
}

func runPilotAgentProxy(args []string, stdout, stderr io.Writer) int {
	out, ignored, err := translateProxyArgs(args)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 2
	}
	if len(ignored) > 0 {
		fmt.Fprintf(stderr, "pilot-agent: accepted, not acted on by meshtun: %s\n", strings.Join(ignored, "; "))
	}
	return runAgent(out, stdout, stderr)
}

// runPilotAgentWait is `pilot-agent wait` with its flags and defaults.
func runPilotAgentWait(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("pilot-agent wait", flag.ContinueOnError)
	fs.SetOutput(stderr)
	timeout := fs.Int("timeoutSeconds", 60, "maximum number of seconds to wait for the proxy to be ready")
	_ = fs.Int("requestTimeoutMillis", 500, "milliseconds to wait for one answer (meshtun bounds each request by the period plus 500 ms)")
	period := fs.Int("periodMillis", 500, "milliseconds between attempts")
	url := fs.String("url", agent.DefaultReadyURL, "URL to poll")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 || *timeout <= 0 || *period <= 0 {
		fmt.Fprintln(stderr, "pilot-agent wait: want positive --timeoutSeconds and --periodMillis and no arguments")
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(*timeout)*time.Second)
	defer cancel()
	if err := agent.Wait(ctx, *url, time.Duration(*period)*time.Millisecond); err != nil {
		fmt.Fprintf(stderr, "pilot-agent wait: timeout waiting for the proxy to become ready: %v\n", err)
		return 1
	}
	fmt.Fprintln(stderr, "pilot-agent wait: the proxy is ready")
	return 0
}

// debugPorts are the ports pilot-agent's request may reach: the proxy's
// admin, the agent's status and readiness ports, the XDS debug port.
var debugPorts = []int{15000, 15004, 15020, 15021}

// runPilotAgentRequest is `pilot-agent request [--debug-port N] METHOD
// PATH [BODY]`: the admin API by default, or another local port Istio
// allows (15020 for POST drain, 15021).
func runPilotAgentRequest(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("pilot-agent request", flag.ContinueOnError)
	fs.SetOutput(stderr)
	port := fs.Int("debug-port", 15000, "local port to send the request to (the proxy's admin by default)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if !slices.Contains(debugPorts, *port) {
		fmt.Fprintf(stderr, "pilot-agent request: debug port %d is not in the allowed list %v\n", *port, debugPorts)
		return 2
	}
	if *port == 15000 {
		return runAgentRequest(fs.Args(), stdout, stderr)
	}
	return runRequest(append([]string{"--admin-address", "127.0.0.1:" + strconv.Itoa(*port)}, fs.Args()...), stdout, stderr)
}
