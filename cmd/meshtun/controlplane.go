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

	"github.com/meshtun/meshtun/controlplane"
	"github.com/meshtun/meshtun/internal/logging"
)

// runControlPlane is `meshtun controlplane`: serve sidecar configuration
// over ADS from a registry file and a mesh profile (istiod's role).
// `meshtun controlplane token` mints a bearer token instead.
func runControlPlane(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "token" {
		return runControlPlaneToken(args[1:], stdout, stderr)
	}
	fs := flag.NewFlagSet("meshtun controlplane", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o controlplane.Options
	fs.StringVar(&o.RegistryFile, "registry", "", "registry of services and external hosts (YAML, see examples/registry.yaml); watched for changes. Without it only the virtual listeners and special clusters are served")
	fs.StringVar(&o.Profile, "profile", "", "mesh profile file (YAML, kind MeshConfig or IstioOperator; watched), or the name of a built-in profile ("+fmt.Sprint(controlplane.ProfileNames())+"); default: the built-in default")
	fs.StringVar(&o.XDSAddress, "xds-address", "0.0.0.0:15010", "address of the ADS gRPC server (delta and state of the world)")
	fs.StringVar(&o.APIAddress, "api-address", "127.0.0.1:15014", "address of the HTTP API used by `meshtun profile` (bearer token)")
	fs.StringVar(&o.SecureAddress, "secure-address", "0.0.0.0:15012", "address of the TLS gRPC server carrying the CA (istio.v1.auth.IstioCertificateService) and ADS, callers authenticated by bearer tokens (`meshtun controlplane token`), istiod's 15012; \"off\" to serve none")
	fs.StringVar(&o.StateDir, "state-dir", "/run/meshtun", "where the API token file ("+controlplane.TokenFileName+", mode 0600) is written at startup, and where "+controlplane.CADirName+"/ keeps the CA root (root-cert.pem: what agents trust) and the token signing key across restarts")
	fs.StringVar(&o.TrustDomain, "trust-domain", "cluster.local", "trust domain of the issued SPIFFE IDs (spiffe://<trust domain>/ns/<ns>/sa/<sa>)")
	fs.StringVar(&o.CACertsDir, "cacerts", "", "take the CA from this folder of istiod's cacerts files (ca-cert.pem, ca-key.pem, root-cert.pem, optional cert-chain.pem) instead of the root generated in the state dir")
	fs.Func("serving-name", "an extra DNS name or IP address of the secure port's certificate (repeatable); istiod.istio-system.svc and its aliases are always there", func(v string) error {
		o.ServingNames = append(o.ServingNames, v)
		return nil
	})
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

// runControlPlaneToken is `meshtun controlplane token`: print a bearer
// token for a namespace and service account, signed with the key in the
// state dir, for an agent's token file (Istio's
// ./var/run/secrets/tokens/istio-token). The control plane needs not be
// running; it accepts the token until it expires.
func runControlPlaneToken(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("meshtun controlplane token", flag.ContinueOnError)
	fs.SetOutput(stderr)
	ns := fs.String("namespace", "", "the workload's namespace (required)")
	sa := fs.String("service-account", "", "the workload's service account (required)")
	stateDir := fs.String("state-dir", "/run/meshtun", "the control plane's --state-dir (its "+controlplane.CADirName+"/ holds the signing key; created if missing)")
	ttl := fs.Duration("ttl", 30*24*time.Hour, "how long the token is accepted")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "meshtun controlplane token: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	if *ns == "" || *sa == "" {
		fmt.Fprintln(stderr, "meshtun controlplane token: --namespace and --service-account are required")
		return 2
	}
	tok, err := controlplane.MintToken(*stateDir, *ns, *sa, *ttl)
	if err != nil {
		fmt.Fprintf(stderr, "meshtun controlplane token: %v\n", err)
		return 1
	}
	fmt.Fprintln(stdout, tok)
	return 0
}
