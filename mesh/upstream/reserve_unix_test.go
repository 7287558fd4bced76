//go:build unix

package upstream

import (
	"syscall"
	"testing"
)

// fdOpen reports whether fd is an open descriptor.
func fdOpen(fd int) bool {
	_, _, e := syscall.Syscall(syscall.SYS_FCNTL, uintptr(fd), syscall.F_GETFD, 0)
	return e == 0
}

// TestReserveFD: a reservation is an open descriptor until released; with
// the open-file limit reached there is none to take, and the caller is
// told so (it then dials first, and the flow is refused).
func TestReserveFD(t *testing.T) {
	fd, ok := ReserveFD()
	if !ok || !fdOpen(fd) {
		t.Fatalf("ReserveFD = %d, %v; want an open descriptor", fd, ok)
	}
	ReleaseFD(fd)
	if fdOpen(fd) {
		t.Fatalf("descriptor %d still open after ReleaseFD", fd)
	}

	// fd was the lowest free descriptor: a limit of fd leaves none.
	var saved syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &saved); err != nil {
		t.Fatal(err)
	}
	lim := saved
	lim.Cur = uint64(fd)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatalf("setrlimit NOFILE %d: %v", fd, err)
	}
	got, ok := ReserveFD()
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &saved); err != nil {
		t.Fatalf("restoring RLIMIT_NOFILE: %v", err)
	}
	if ok {
		ReleaseFD(got)
		t.Fatalf("ReserveFD at the open-file limit = %d, true; want false", got)
	}
}
