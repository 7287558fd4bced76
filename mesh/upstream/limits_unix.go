//go:build unix

package upstream

import (
	"errors"
	"fmt"
	"syscall"
)

// withLimit says which limit a socket that could not be created ran into.
// Past its open-file limit the proxy refuses every new flow (each failing
// at once with UF) while the flows it has keep going; the access line's
// connection_termination_details is where an operator sees it, so it
// names the limit and its value rather than the bare errno.
func withLimit(err error) error {
	switch {
	case errors.Is(err, syscall.EMFILE):
		var lim syscall.Rlimit
		if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim) == nil {
			return fmt.Errorf("%w (the proxy's open-file limit, RLIMIT_NOFILE %d, is reached)", err, lim.Cur)
		}
		return fmt.Errorf("%w (the proxy's open-file limit, RLIMIT_NOFILE, is reached)", err)
	case errors.Is(err, syscall.ENFILE):
		return fmt.Errorf("%w (the system's open-file table is full: fs.file-max)", err)
	}
	return err
}

// limited is withLimit, warning on d.Log when err is about the fd limit.
func (d *Dialer) limited(err error) error {
	named := withLimit(err)
	if named != err {
		d.warnLimit(named)
	}
	return named
}
