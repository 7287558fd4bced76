package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/meshtun/meshtun/controlplane"
	"github.com/meshtun/meshtun/internal/logging"
)

// runControlPlane is `meshtun controlplane`: serve sidecar configuration
// over ADS from a registry file and a mesh profile (istiod's role).
func runControlPlane(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("meshtun controlplane", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o controlplane.Options
	fs.StringVar(&o.RegistryFile, "registry", "", "registry of services and external hosts (YAML, see examples/registry.yaml); watched for changes. Without it only the virtual listeners and special clusters are served")
	fs.StringVar(&o.Profile, "profile", "", "mesh profile file (YAML, kind MeshConfig or IstioOperator; watched), or the name of a built-in profile ("+fmt.Sprint(controlplane.ProfileNames())+"); default: the built-in default")
	fs.StringVar(&o.XDSAddress, "xds-address", "0.0.0.0:15010", "address of the ADS gRPC server (delta and state of the world)")
	fs.StringVar(&o.APIAddress, "api-address", "127.0.0.1:15014", "address of the HTTP API used by `meshtun profile` (bearer token)")
	fs.StringVar(&o.StateDir, "state-dir", "/run/meshtun", "where the API token file ("+controlplane.TokenFileName+", mode 0600) is written at startup")
	logLevel := fs.String("log-level", "info", "trace, debug, info, warning, error, critical or off")
	logFormat := fs.String("log-format", "console", "console or json")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "meshtun controlplane: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	log, err := logging.New(logging.Options{Level: *logLevel, Format: logging.Format(*logFormat), Out: stderr})
	if err != nil {
		fmt.Fprintf(stderr, "meshtun controlplane: %v\n", err)
		return 2
	}
	o.Log = logging.Component(log, "controlplane")
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := controlplane.Run(ctx, o); err != nil {
		fmt.Fprintf(stderr, "meshtun controlplane: %v\n", err)
		return 1
	}
	return 0
}
