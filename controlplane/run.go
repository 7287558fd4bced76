package controlplane

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/meshtun/meshtun/internal/adminguard"
)

// Options configure a control plane.
type Options struct {
	// RegistryFile is watched; "" serves an empty registry.
	RegistryFile string
	// Profile is a profile file (watched), or the name of a built-in
	// profile; "" is the built-in default.
	Profile string
	// XDSAddress serves ADS (default 0.0.0.0:15010), APIAddress the HTTP
	// API (default 127.0.0.1:15014).
	XDSAddress, APIAddress string
	// SecureAddress serves ADS and the CA (CreateCertificate) over TLS
	// with bearer tokens, istiod's 15012 (default 0.0.0.0:15012; "off":
	// not served).
	SecureAddress string
	// TrustDomain of issued SPIFFE IDs (default cluster.local).
	TrustDomain string
	// CACertsDir, if set, holds the CA as istiod's cacerts (ca-cert.pem,
	// ca-key.pem, root-cert.pem, cert-chain.pem); else a root is generated
	// once in StateDir/ca.
	CACertsDir string
	// ServingNames are extra DNS names or IPs of the TLS port's
	// certificate, besides istiod's istiod.istio-system.svc names.
	ServingNames []string
	// StateDir receives the API token file, and keeps the CA (CADirName).
	StateDir     string
	PollInterval time.Duration
	Log          zerolog.Logger
	// Ready, if set, is called once the listeners are up.
	Ready func(xds, api net.Addr, tokenFile string)
	// SecureReady, if set, is called before Ready with the TLS port's
	// address and the root file its clients must trust.
	SecureReady func(addr net.Addr, rootFile string)
}

// Run loads the files, writes the API token, serves ADS and the API and
// watches the files until ctx is done. Invalid files at the start are an
// error; later, an invalid change is rejected and the previous
// configuration keeps serving.
func Run(ctx context.Context, o Options) error {
	if o.XDSAddress == "" {
		o.XDSAddress = "0.0.0.0:15010"
	}
	if o.APIAddress == "" {
		o.APIAddress = "127.0.0.1:15014"
	}
	if o.SecureAddress == "" {
		o.SecureAddress = "0.0.0.0:15012"
	}
	if o.TrustDomain == "" {
		o.TrustDomain = "cluster.local"
	}
	var srv *Server
	reg := EmptyRegistry()
	var regWatch, profWatch *watcher
	if o.RegistryFile != "" {
		regWatch = &watcher{Path: o.RegistryFile, Interval: o.PollInterval, Log: o.Log,
			Apply: func(data []byte) error {
				r, err := parseRegistry(o.RegistryFile, data)
				if err != nil {
					return err
				}
				if srv == nil {
					reg = r
				} else {
					srv.setRegistry(r)
				}
				return nil
			},
		}
		if err := regWatch.Load(); err != nil {
			return fmt.Errorf("registry: %w", err)
		}
	}
	profile, _ := BuiltinProfile(DefaultProfileName)
	if o.Profile != "" {
		if p, err := BuiltinProfile(o.Profile); err == nil {
			profile = p
		} else {
			profWatch = &watcher{Path: o.Profile, Interval: o.PollInterval, Log: o.Log,
				Apply: func(data []byte) error {
					p, err := ParseProfile(o.Profile, data)
					if err != nil {
						return err
					}
					if srv == nil {
						profile = p
					} else {
						srv.setProfile(p)
					}
					return nil
				},
			}
			if err := profWatch.Load(); err != nil {
				return fmt.Errorf("profile: %w", err)
			}
		}
	}
	srv = NewServer(reg, profile, o.Log)
	srv.setTrustDomain(o.TrustDomain)
	if regWatch != nil {
		regWatch.Reject = srv.rejectRegistry
	}
	if profWatch != nil {
		profWatch.Reject = srv.rejectProfile
	}

	token, err := newToken()
	if err != nil {
		return err
	}
	tokenFile, err := writeTokenFile(o.StateDir, token)
	if err != nil {
		return err
	}
	defer os.Remove(tokenFile)

	var secure []grpcPort
	var sec *secureConfig
	if o.SecureAddress != "off" {
		if sec, err = newSecure(o); err != nil {
			return fmt.Errorf("CA: %w", err)
		}
		lis, err := net.Listen("tcp", o.SecureAddress)
		if err != nil {
			return fmt.Errorf("--secure-address: %w", err)
		}
		secure = append(secure, grpcPort{lis: lis, opts: sec.opts, register: sec.ca.Register})
	}
	closeSecure := func() {
		for _, p := range secure {
			p.lis.Close()
		}
	}
	xdsLis, err := net.Listen("tcp", o.XDSAddress)
	if err != nil {
		closeSecure()
		return fmt.Errorf("--xds-address: %w", err)
	}
	apiLis, err := net.Listen("tcp", o.APIAddress)
	if err != nil {
		xdsLis.Close()
		closeSecure()
		return fmt.Errorf("--api-address: %w", err)
	}
	api := &API{Server: srv, Token: token, Log: o.Log}
	hs := &http.Server{Handler: adminguard.Wrap(api.Handler(), adminguard.Options{}), ReadHeaderTimeout: 10 * time.Second}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errc := make(chan error, 2)
	wg.Add(2)
	go func() {
		defer wg.Done()
		if err := srv.serve(ctx, xdsLis, secure...); err != nil {
			errc <- fmt.Errorf("xds: %w", err)
		}
	}()
	go func() {
		defer wg.Done()
		if err := hs.Serve(apiLis); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errc <- fmt.Errorf("api: %w", err)
		}
	}()
	for _, w := range []*watcher{regWatch, profWatch} {
		if w != nil {
			wg.Add(1)
			go func() { defer wg.Done(); w.Run(ctx) }()
		}
	}
	o.Log.Info().Str("xds_address", xdsLis.Addr().String()).Str("api_address", apiLis.Addr().String()).
		Str("token_file", tokenFile).Str("version", srv.currentVersion()).Int("hosts", len(reg.hosts)).
		Str("profile", profile.Metadata.Name).Msg("control plane ready")
	if sec != nil {
		o.Log.Info().Str("secure_address", secure[0].lis.Addr().String()).Str("root_cert", sec.roots).
			Str("trust_domain", o.TrustDomain).Msg("CA and ADS over TLS ready (bearer tokens: meshtun controlplane token)")
		if o.SecureReady != nil {
			o.SecureReady(secure[0].lis.Addr(), sec.roots)
		}
	}
	if o.Ready != nil {
		o.Ready(xdsLis.Addr(), apiLis.Addr(), tokenFile)
	}
	select {
	case <-ctx.Done():
		err = nil
	case err = <-errc:
	}
	cancel()
	sctx, scancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer scancel()
	hs.Shutdown(sctx)
	wg.Wait()
	return err
}
