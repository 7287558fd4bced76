package gopool

import (
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshtun/meshtun/internal/leakcheck"
)

func TestMain(m *testing.M) { leakcheck.VerifyTestMain(m) }

// TestWorkerReused: a function handed to Go after an earlier one finished
// runs on the same goroutine (the parked worker), not a new one.
func TestWorkerReused(t *testing.T) {
	first := make(chan uint64)
	Go(func() { first <- goroutineID() })
	g1 := <-first
	waitIdle(t, 1)
	second := make(chan uint64)
	Go(func() { second <- goroutineID() })
	if g2 := <-second; g2 != g1 {
		t.Errorf("second function ran on goroutine %d, want the parked worker %d", g2, g1)
	}
	waitIdle(t, 0) // the worker ends after idleFor (and the leak check at exit agrees)
}

// TestBusyWorkerNotWaitedFor: while every worker is busy, Go starts
// another goroutine at once rather than queue behind them.
func TestBusyWorkerNotWaitedFor(t *testing.T) {
	release := make(chan struct{})
	started := make(chan struct{})
	Go(func() { started <- struct{}{}; <-release })
	<-started
	done := make(chan struct{})
	Go(func() { close(done) })
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("second function waited for the busy worker")
	}
	close(release)
	waitIdle(t, 0)
}

// TestIdleBounded: at most maxIdle workers stay parked after a burst.
func TestIdleBounded(t *testing.T) {
	release := make(chan struct{})
	n := maxIdle + 8
	started := make(chan struct{}, n)
	for range n {
		Go(func() { started <- struct{}{}; <-release })
	}
	for range n {
		<-started
	}
	close(release)
	waitIdle(t, maxIdle)
	if got := Idle(); got > maxIdle {
		t.Errorf("%d idle workers, want at most %d", got, maxIdle)
	}
	waitIdle(t, 0)
}

func waitIdle(t *testing.T, want int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for Idle() != want {
		if time.Now().After(deadline) {
			t.Fatalf("%d idle workers, want %d", Idle(), want)
		}
		time.Sleep(time.Millisecond)
	}
}

func goroutineID() uint64 {
	var b [64]byte
	s := strings.TrimPrefix(string(b[:runtime.Stack(b[:], false)]), "goroutine ")
	id, _ := strconv.ParseUint(s[:strings.IndexByte(s, ' ')], 10, 64)
	return id
}
