package agent

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"syscall"

	"github.com/rs/zerolog"

	"github.com/meshtun/meshtun/agent/caclient"
	"github.com/meshtun/meshtun/agent/sds"
	"github.com/meshtun/meshtun/internal/logging"
)

// Workload identity modes (IdentityOptions.Mode).
const (
	// IdentityCA gets the certificate from istiod's CA (CA_ADDR, by default
	// the discovery address), as pilot-agent does.
	IdentityCA = "ca"
	// IdentityFiles serves the certificate an external CA mounts in
	// /etc/certs (FILE_MOUNTED_CERTS=true).
	IdentityFiles = "files"
	// IdentityNone runs no CA client and no SDS server.
	IdentityNone = "none"
)

// IdentityOptions configures the agent's workload identity: where the
// certificate comes from and the SDS socket it is served on. The CA
// client's other settings are pilot-agent's environment variables
// (caclient.OptionsFromEnv); the root and token files are Sources'.
type IdentityOptions struct {
	// Mode is IdentityCA, IdentityFiles or IdentityNone; "" decides:
	// FILE_MOUNTED_CERTS=true is files; CA_ADDR set, or a discovery address
	// on istiod's TLS port 15012, is ca (Istio's default, where every
	// sidecar talks to 15012); anything else is none, so a proxy fed by a
	// plaintext 15010 control plane that is no CA (meshtun's demo, tests)
	// does not wait for a certificate that never comes.
	Mode string
	// SocketPath is the SDS socket (default Istio's
	// ./var/run/secrets/workload-spiffe-uds/socket).
	SocketPath string
	// CertDir holds cert-chain.pem, key.pem and root-cert.pem in files
	// mode (default /etc/certs).
	CertDir string
}

// identityPlan is the identity the inputs ask for, checked at Load so a
// bad variable stops the agent before anything starts.
type identityPlan struct {
	mode string
	ca   caclient.Options
	// certChain, key and rootCert are the files-mode paths.
	certChain, key, rootCert string
	socket                   string
	// extraRoots are ProxyConfig's caCertificatesPem (meshConfig's
	// caCertificates as istiod passes them), added to ROOTCA.
	extraRoots [][]byte
}

// planIdentity decides the mode and checks its settings.
func planIdentity(o IdentityOptions, src Sources, in *Inputs) (*identityPlan, error) {
	p := &identityPlan{mode: o.Mode, socket: o.SocketPath}
	if p.socket == "" {
		p.socket = sds.DefaultSocketPath
	}
	if p.mode == "" {
		switch {
		case in.env["FILE_MOUNTED_CERTS"] == "true":
			p.mode = IdentityFiles
		case in.env["CA_ADDR"] != "" || in.XDSTLS != nil:
			p.mode = IdentityCA
		default:
			p.mode = IdentityNone
		}
	}
	for _, pem := range in.ProxyConfig.msg.GetCaCertificatesPem() {
		p.extraRoots = append(p.extraRoots, []byte(pem))
	}
	switch p.mode {
	case IdentityNone:
	case IdentityFiles:
		dir := o.CertDir
		if dir == "" {
			dir = filepath.Dir(caclient.DefaultCertChainFile)
		}
		p.certChain = filepath.Join(dir, filepath.Base(caclient.DefaultCertChainFile))
		p.key = filepath.Join(dir, filepath.Base(caclient.DefaultKeyFile))
		p.rootCert = filepath.Join(dir, filepath.Base(caclient.DefaultRootCertFile))
	case IdentityCA:
		co, err := caclient.OptionsFromEnv(func(k string) string { return in.env[k] }, in.ProxyConfig.DiscoveryAddress)
		if err != nil {
			return nil, err
		}
		co.RootFile, co.TokenFile = src.RootCertFile, src.TokenFile
		// New fills in the defaults and checks what is required (the
		// namespace and service account of the SAN).
		if _, err := caclient.New(co); err != nil {
			return nil, err
		}
		p.ca = co
	default:
		return nil, fmt.Errorf("identity mode %q: want %s, %s or %s", p.mode, IdentityCA, IdentityFiles, IdentityNone)
	}
	return p, nil
}

// identity is the running workload identity: a Source (CA client or
// mounted files) whose every new certificate goes to the SDS server.
type identity struct {
	plan   *identityPlan
	src    caclient.Source
	sds    *sds.Server
	log    zerolog.Logger
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	fed     *caclient.Identity // the last identity given to SDS
	feedErr error              // why SDS refused the last one
}

// startIdentity opens the SDS socket and starts the source; nil when the
// plan is none. An SDS socket another server answers on is an error.
//
// control marks the CA client's sockets so they bypass capture.
func startIdentity(p *identityPlan, control func(network, address string, c syscall.RawConn) error, root zerolog.Logger) (*identity, error) {
	if p == nil || p.mode == IdentityNone {
		return nil, nil
	}
	log := logging.Component(root, "identity")
	srv, err := sds.New(sds.Options{SocketPath: p.socket, Log: logging.Component(root, "sds")})
	if err != nil {
		return nil, fmt.Errorf("SDS: %w", err)
	}
	id := &identity{plan: p, sds: srv, log: log}
	var run func(context.Context)
	switch p.mode {
	case IdentityCA:
		co := p.ca
		co.Log = logging.Component(root, "caclient")
		co.Control = control
		c, err := caclient.New(co)
		if err != nil {
			srv.Close()
			return nil, err
		}
		id.src, run = c, c.Run
		log.Info().Str("ca", co.Addr).Str("spiffe_id", c.SPIFFEID()).Str("sds", srv.Path()).Msg("workload identity from the CA")
	case IdentityFiles:
		f := &caclient.FileSource{CertChainFile: p.certChain, KeyFile: p.key, RootCertFile: p.rootCert,
			Log: logging.Component(root, "certfiles")}
		id.src, run = f, f.Run
		log.Info().Str("cert_chain", f.CertChainFile).Str("sds", srv.Path()).Msg("workload identity from mounted files")
	}
	ctx, cancel := context.WithCancel(context.Background())
	id.cancel = cancel
	// Subscribed before the source runs: its first certificate is not missed.
	ch, unsub := id.src.Subscribe()
	id.wg.Add(2)
	go func() {
		defer id.wg.Done()
		run(ctx)
	}()
	go func() {
		defer id.wg.Done()
		defer unsub()
		id.feed()
		for {
			select {
			case <-ctx.Done():
				return
			case <-ch:
				id.feed()
			}
		}
	}()
	return id, nil
}

// feed gives SDS the source's current identity, once per identity. The
// trust bundle is pilot-agent's: the issued chain's root (or the mounted
// root-cert.pem) plus ProxyConfig's caCertificatesPem.
func (id *identity) feed() {
	cur := id.src.Current()
	id.mu.Lock()
	same := cur == nil || cur == id.fed
	id.mu.Unlock()
	if same {
		return // none yet, or expired: SDS keeps the last, readiness says why
	}
	var roots []byte
	var err error
	if id.plan.mode == IdentityFiles {
		roots, err = sds.TrustBundle(cur.RootPEM, append([][]byte{cur.RootPEM}, id.plan.extraRoots...)...)
	} else {
		roots, err = sds.TrustBundle(cur.ChainPEM, id.plan.extraRoots...)
	}
	if err == nil {
		err = id.sds.Update(sds.Identity{ChainPEM: cur.ChainPEM, KeyPEM: cur.KeyPEM, RootsPEM: roots, Expire: cur.NotAfter})
	}
	id.mu.Lock()
	id.fed, id.feedErr = cur, err
	id.mu.Unlock()
	if err != nil {
		id.log.Error().Err(err).Str("serial", cur.Serial).Msg("workload certificate not served")
		return
	}
	id.log.Info().Str("spiffe_id", cur.SPIFFEID).Str("serial", cur.Serial).Time("not_after", cur.NotAfter).
		Msg("workload certificate served over SDS")
}

// notReady says why the pod cannot be ready for want of its identity,
// nil once SDS serves a certificate. The secret is named, and the
// source's last error says why (the CA rejected the token, which file).
func (id *identity) notReady() error {
	if id == nil {
		return nil
	}
	if id.src.Current() == nil {
		verb := "issued"
		if id.plan.mode == IdentityFiles {
			verb = "loaded"
		}
		if err := id.src.Err(); err != nil {
			return fmt.Errorf("secret %s not %s yet: %w", sds.WorkloadCert, verb, err)
		}
		return fmt.Errorf("secret %s not %s yet", sds.WorkloadCert, verb)
	}
	id.mu.Lock()
	err := id.feedErr
	id.mu.Unlock()
	if err != nil {
		return fmt.Errorf("secret %s not served: %w", sds.WorkloadCert, err)
	}
	if _, ok := id.sds.Current(); !ok {
		return fmt.Errorf("secret %s not served yet", sds.WorkloadCert)
	}
	return nil
}

// stop ends the source and closes the SDS socket.
func (id *identity) stop() error {
	if id == nil {
		return nil
	}
	id.cancel()
	id.wg.Wait()
	return errors.Join(id.sds.Close())
}
