//go:build linux

package upstream

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/meshtun/meshtun/internal/xdstest"
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
	xdstest.ServeConns(t, ln, func(net.Conn) {}) // hangs up at once
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

// TestLimitWarningRateLimited: fd-limit failures give one warning per
// limitWarnEvery on the dialer's log, counting the failures since the
// last; other dial errors give none.
func TestLimitWarningRateLimited(t *testing.T) {
	defer func(v time.Duration) { limitWarnEvery = v }(limitWarnEvery)
	var buf bytes.Buffer
	d := &Dialer{Log: zerolog.New(&buf)}
	lines := func() []map[string]any {
		var out []map[string]any
		for _, l := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
			if l == "" {
				continue
			}
			var m map[string]any
			if err := json.Unmarshal([]byte(l), &m); err != nil {
				t.Fatalf("log line %q: %v", l, err)
			}
			out = append(out, m)
		}
		return out
	}
	emfile := &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("socket", syscall.EMFILE)}

	d.limited(errors.New("connection refused"))
	if n := len(lines()); n != 0 {
		t.Fatalf("%d warnings for a refused dial, want none", n)
	}
	limitWarnEvery = time.Hour
	for range 3 {
		if err := d.limited(emfile); !errors.Is(err, syscall.EMFILE) {
			t.Fatalf("limited(EMFILE) = %v, want it to wrap EMFILE", err)
		}
	}
	ls := lines()
	if len(ls) != 1 {
		t.Fatalf("%d warnings for 3 fd-limit failures within the interval, want 1:\n%s", len(ls), buf.String())
	}
	if ls[0]["level"] != "warn" || ls[0]["failed_dials"] != 1.0 || !strings.Contains(ls[0]["error"].(string), "RLIMIT_NOFILE") {
		t.Errorf("first warning %v, want level warn, failed_dials 1 and the error naming RLIMIT_NOFILE", ls[0])
	}
	limitWarnEvery = 0
	d.limited(emfile)
	ls = lines()
	if len(ls) != 2 || ls[1]["failed_dials"] != 3.0 {
		t.Fatalf("after the interval: %d warnings, the second %v, want 2 with failed_dials 3 (2 held back and this one)", len(ls), ls[len(ls)-1])
	}
}
