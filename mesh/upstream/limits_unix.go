//go:build unix

package upstream

import (
	"errors"
	"fmt"
	"sync"
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

// reserveBase is the descriptor ReserveFD duplicates: /dev/null, opened
// once; -1 when it cannot be.
var reserveBase = sync.OnceValue(func() int {
	fd, err := syscall.Open("/dev/null", syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return -1
	}
	return fd
})

// ReserveFD holds one file descriptor for an upstream socket about to be
// dialed, for a flow that is accepted before its upstream connects
// (optimistic accept): such a flow cannot be refused any more, so it must
// not be the one that finds the open-file limit reached. ok is false when
// no descriptor is left (then the caller dials first, and the flow is
// refused as every flow past the limit is). The caller releases the
// descriptor (ReleaseFD) right before its dial creates the socket, which
// then takes its place.
func ReserveFD() (fd int, ok bool) {
	base := reserveBase()
	if base < 0 {
		return -1, false
	}
	r, _, e := syscall.Syscall(syscall.SYS_FCNTL, uintptr(base), syscall.F_DUPFD_CLOEXEC, 0)
	if e != 0 {
		return -1, false
	}
	return int(r), true
}

// ReleaseFD gives back a descriptor ReserveFD held.
func ReleaseFD(fd int) {
	if fd >= 0 {
		syscall.Close(fd)
	}
}
