package proxy

import (
	"bytes"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// lockedBuffer is a log sink written from several goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  *bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// TestSignals: the proxy's signals are sorted from the start of the
// run. SIGHUPs before anyone reads them queue one reload (not lost, not
// many), a SIGTERM behind them is not lost; during the drain a SIGHUP is
// ignored and only a second SIGTERM/SIGINT ends it early.
func TestSignals(t *testing.T) {
	in := make(chan os.Signal, 8)
	s := startSignals(in)
	defer s.Stop()
	for i := 0; i < 5; i++ {
		in <- syscall.SIGHUP
	}
	in <- syscall.SIGTERM
	select {
	case sig := <-s.term:
		if sig != syscall.SIGTERM {
			t.Fatalf("term %v, want SIGTERM", sig)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the SIGTERM behind the SIGHUPs was lost")
	}
	select {
	case <-s.reload:
	default:
		t.Fatal("SIGHUPs received before the reader: no reload pending")
	}
	select {
	case <-s.reload:
		t.Fatal("5 SIGHUPs queued more than one reload")
	default:
	}

	var logs bytes.Buffer
	log := zerolog.New(&lockedBuffer{b: &logs}) // the drain watch logs from its goroutine
	ctx, wait := s.awaitDrainEnd(time.Minute, log)
	in <- syscall.SIGHUP
	time.Sleep(100 * time.Millisecond)
	if ctx.Err() != nil {
		t.Fatal("a SIGHUP ended the drain")
	}
	in <- syscall.SIGINT
	select {
	case <-ctx.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("a second signal did not end the drain")
	}
	wait()
	if got := logs.String(); !strings.Contains(got, "SIGHUP while draining: ignored") || !strings.Contains(got, "second signal: ending the drain now") {
		t.Errorf("drain log:\n%s", got)
	}
	// A drain that runs to its deadline ends there.
	ctx, wait = s.awaitDrainEnd(50*time.Millisecond, log)
	select {
	case <-ctx.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the drain did not end at its deadline")
	}
	wait()
}
