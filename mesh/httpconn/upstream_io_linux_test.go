//go:build linux

package httpconn

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/meshtun/meshtun/internal/rawsock"
)

// TestRawSockIO: a plaintext upstream connection of the h1 transport (read
// and written with raw system calls by cluster.UpstreamConn) behaves as
// net.TCPConn: all
// of a write larger than one call's bound arrives, reads wait for data
// (the poller), the peer's FIN reads io.EOF, a deadline (the exchange's
// kill) unblocks a waiting read with a timeout *net.OpError "read", and
// the bytes count as the cluster's upstream_cx_rx/tx_bytes_total.
func TestRawSockIO(t *testing.T) {
	pc, server, cl := dialPooled(t)
	var rw io.ReadWriter = pc
	rx0, tx0 := clusterStat(t, cl, "upstream_cx_rx_bytes_total"), clusterStat(t, cl, "upstream_cx_tx_bytes_total")

	// A write of several calls' worth, read whole by the peer.
	out := bytes.Repeat([]byte("0123456789abcdef"), (3*rawsock.WriteChunk+100)/16)
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(io.LimitReader(server, int64(len(out))))
		got <- b
	}()
	if n, err := rw.Write(out); n != len(out) || err != nil {
		t.Fatalf("Write: %d, %v; want %d, nil", n, err, len(out))
	}
	if b := <-got; !bytes.Equal(b, out) {
		t.Fatalf("the peer read %d bytes, not the %d written", len(b), len(out))
	}

	// A read waits for the peer's bytes.
	go func() {
		time.Sleep(20 * time.Millisecond)
		server.Write([]byte("pong"))
	}()
	buf := make([]byte, 16)
	if n, err := rw.Read(buf); string(buf[:n]) != "pong" || err != nil {
		t.Fatalf("Read: %q, %v; want \"pong\", nil", buf[:n], err)
	}
	if rx, tx := clusterStat(t, cl, "upstream_cx_rx_bytes_total")-rx0, clusterStat(t, cl, "upstream_cx_tx_bytes_total")-tx0; rx != 4 || tx != uint64(len(out)) {
		t.Errorf("counted rx %d tx %d, want 4 and %d", rx, tx, len(out))
	}

	// The kill of a cancelled exchange (a deadline in the past) unblocks a
	// waiting read.
	go func() {
		time.Sleep(20 * time.Millisecond)
		pc.SetDeadline(time.Unix(1, 0))
	}()
	_, err := rw.Read(buf)
	var oe *net.OpError
	if !errors.As(err, &oe) || oe.Op != "read" || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Read after the deadline: %v, want a *net.OpError \"read\" with os.ErrDeadlineExceeded", err)
	}
	pc.SetDeadline(time.Time{})

	// The peer's FIN is io.EOF, as net.TCPConn's Read returns it.
	server.Close()
	if n, err := rw.Read(buf); n != 0 || err != io.EOF {
		t.Fatalf("Read after the peer's close: %d, %v; want 0, io.EOF", n, err)
	}
}
