package caclient

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/rs/zerolog"
)

// Istio's file-mounted certificate paths (FILE_MOUNTED_CERTS,
// https://github.com/istio/istio/blob/master/pkg/security/security.go).
const (
	DefaultCertChainFile = "/etc/certs/cert-chain.pem"
	DefaultKeyFile       = "/etc/certs/key.pem"
	DefaultRootCertFile  = "/etc/certs/root-cert.pem"
)

// FileSource serves certificates an external CA writes to files,
// re-reading them when they change (size, mtime or inode, by polling:
// no inotify needed, and a Kubernetes secret volume's symlink swap is
// seen too since os.Stat follows links).
type FileSource struct {
	publisher
	CertChainFile, KeyFile, RootCertFile string
	// Interval between checks (default 5 s).
	Interval time.Duration
	Log      zerolog.Logger
	seen     [3]fileStamp
}

type fileStamp struct {
	size  int64
	mtime time.Time
	ino   any
}

// Load reads the files once; an error names the file. Run calls it on
// every change.
func (f *FileSource) Load() error {
	f.defaults()
	chainPEM, err := os.ReadFile(f.CertChainFile)
	if err != nil {
		return f.failed(fmt.Errorf("certificate chain: %w", err))
	}
	keyPEM, err := os.ReadFile(f.KeyFile)
	if err != nil {
		return f.failed(fmt.Errorf("key: %w", err))
	}
	rootPEM, err := os.ReadFile(f.RootCertFile)
	if err != nil {
		return f.failed(fmt.Errorf("root certificate: %w", err))
	}
	chain := splitPEM(chainPEM)
	if len(splitPEM(rootPEM)) == 0 {
		return f.failed(fmt.Errorf("root certificate %s: no PEM CERTIFICATE", f.RootCertFile))
	}
	id, err := newIdentity(f.CertChainFile, chain, keyPEM, rootPEM, time.Now())
	if err != nil {
		return f.failed(fmt.Errorf("%v (key %s)", err, f.KeyFile))
	}
	if cur := f.Current(); cur != nil && bytes.Equal(cur.ChainPEM, id.ChainPEM) && bytes.Equal(cur.KeyPEM, id.KeyPEM) && bytes.Equal(cur.RootPEM, id.RootPEM) {
		f.publisher.fail(nil)
		return nil
	}
	f.publish(id)
	f.Log.Info().Str("identity", id.SPIFFEID).Str("serial", id.Serial).Time("expires", id.NotAfter).
		Str("cert_chain", f.CertChainFile).Msg("file-mounted certificate loaded")
	return nil
}

func (f *FileSource) failed(err error) error {
	f.publisher.fail(err)
	return err
}

func (f *FileSource) defaults() {
	if f.CertChainFile == "" {
		f.CertChainFile = DefaultCertChainFile
	}
	if f.KeyFile == "" {
		f.KeyFile = DefaultKeyFile
	}
	if f.RootCertFile == "" {
		f.RootCertFile = DefaultRootCertFile
	}
	if f.Interval <= 0 {
		f.Interval = 5 * time.Second
	}
}

// Run loads the files, then polls them until ctx is done. A bad change is
// logged and in Err, and the previous certificate keeps serving (the files
// are often written one by one: the next poll sees them whole).
func (f *FileSource) Run(ctx context.Context) {
	f.defaults()
	f.seen = f.stamps()
	if err := f.Load(); err != nil {
		f.Log.Warn().Err(err).Msg("file-mounted certificate")
	}
	t := time.NewTicker(f.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if s := f.stamps(); s != f.seen {
			f.seen = s
			if err := f.Load(); err != nil {
				f.Log.Warn().Err(err).Msg("file-mounted certificate change rejected")
			}
		}
	}
}

func (f *FileSource) stamps() (out [3]fileStamp) {
	for i, p := range []string{f.CertChainFile, f.KeyFile, f.RootCertFile} {
		if fi, err := os.Stat(filepath.Clean(p)); err == nil {
			out[i] = fileStamp{size: fi.Size(), mtime: fi.ModTime(), ino: inode(fi)}
		}
	}
	return out
}
