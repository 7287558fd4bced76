// Command meshtun is a service-mesh sidecar proxy that captures a pod's
// traffic through a TUN device and a userspace TCP/IP stack.
//
// Each subcommand lives in its own file; this one only dispatches. The
// logic is in the packages: proxy (the proxy process), tun (capture),
// netstack (flow termination), mesh (what a flow becomes).
package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

type command struct {
	name, summary string
	run           func(args []string, stdout, stderr io.Writer) int
}

var commands = []command{
	{"proxy", "capture the pod's traffic and proxy every flow", runProxy},
	{"agent", "run capture and the supervised proxy from the injector's environment (pilot-agent)", runAgent},
	{"request", "send a request to the local admin API and print the body (pilot-agent request)", runRequest},
	{"controlplane", "serve sidecar configuration over ADS from a registry and a mesh profile (istiod)", runControlPlane},
	{"profile", "list, dump or apply mesh profiles (istioctl profile dump / istioctl apply)", runProfile},
	{"version", "print the version", func(_ []string, stdout, _ io.Writer) int { fmt.Fprintln(stdout, "meshtun", version); return 0 }},
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: meshtun <command> [flags]\n\ncommands:")
	for _, c := range commands {
		fmt.Fprintf(w, "  %-10s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "\nRun 'meshtun <command> -h' for a command's flags.")
}

func main() {
	// Under the name pilot-agent (the image links it so), Istio's
	// injection template drives the binary with pilot-agent's argv.
	if filepath.Base(os.Args[0]) == "pilot-agent" {
		os.Exit(runPilotAgent(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stdout)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	for _, c := range commands {
		if c.name == args[0] {
			return c.run(args[1:], stdout, stderr)
		}
	}
	fmt.Fprintf(stderr, "meshtun: unknown command %q\n", args[0])
	usage(stderr)
	return 2
}
