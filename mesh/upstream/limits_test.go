//go:build linux

package upstream

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// TestDialAtFileLimit: with the process at its open-file limit, a dial
// fails at once with EMFILE (errors.Is still finds it) and the error names
// the limit and its value; once an fd is free the same dial succeeds.
// Nothing else in this test binary runs meanwhile (no t.Parallel).
func TestDialAtFileLimit(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	dst := ln.Addr().(*net.TCPAddr).AddrPort()
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	// Every fd below the limit taken, then the limit set just above them.
	lim := syscall.Rlimit{Cur: uint64(len(fds)) + 8, Max: old.Max}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	defer syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old)
	var held []*os.File
	defer func() {
		for _, f := range held {
			f.Close()
		}
	}()
	for {
		f, err := os.Open("/dev/null")
		if err != nil {
			if !errors.Is(err, syscall.EMFILE) {
				t.Fatalf("filling the fd table: %v", err)
			}
			break
		}
		held = append(held, f)
	}

	d := &Dialer{}
	_, err = d.DialTCP(context.Background(), dst, netip.Addr{})
	if !errors.Is(err, syscall.EMFILE) {
		t.Fatalf("DialTCP at the limit: %v, want EMFILE", err)
	}
	if want := "RLIMIT_NOFILE " + strconv.FormatUint(lim.Cur, 10); !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "too many open files") {
		t.Errorf("DialTCP at the limit: %q, want it to name %q and the errno", err, want)
	}
	if _, err := d.DialUDP(context.Background(), dst); !errors.Is(err, syscall.EMFILE) || !strings.Contains(err.Error(), "RLIMIT_NOFILE") {
		t.Errorf("DialUDP at the limit: %v, want EMFILE naming RLIMIT_NOFILE", err)
	}

	held[len(held)-1].Close()
	held = held[:len(held)-1]
	c, err := d.DialTCP(context.Background(), dst, netip.Addr{})
	if err != nil {
		t.Fatalf("DialTCP with an fd free: %v", err)
	}
	c.Close()
}

// TestWithLimitPassesOtherErrors: an error that is not about fds comes
// back unchanged.
func TestWithLimitPassesOtherErrors(t *testing.T) {
	e := errors.New("connection refused")
	if got := withLimit(e); got != e {
		t.Errorf("withLimit(%v) = %v, want it unchanged", e, got)
	}
	if got := withLimit(syscall.ENFILE); !errors.Is(got, syscall.ENFILE) || !strings.Contains(got.Error(), "fs.file-max") {
		t.Errorf("withLimit(ENFILE) = %v", got)
	}
}
