package proxy

import (
	"log"
	"net"
	"os"
	"strconv"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/rs/zerolog"
)

// ListenAdmin opens the admin listener: the bootstrap's admin address (an
// IP socket or a Unix domain socket, a stale socket file of a previous run
// removed), Istio's 127.0.0.1:15000 when unset. Capture never takes port
// 15000 inbound, and loopback is not reachable from outside the pod.
func ListenAdmin(a *corev3.Address) (net.Listener, error) {
	if p := a.GetPipe(); p != nil {
		if fi, err := os.Lstat(p.GetPath()); err == nil && fi.Mode()&os.ModeSocket != 0 {
			os.Remove(p.GetPath())
		}
		return net.Listen("unix", p.GetPath())
	}
	addr := "127.0.0.1:15000"
	if sa := a.GetSocketAddress(); sa != nil {
		addr = net.JoinHostPort(sa.GetAddress(), strconv.Itoa(int(sa.GetPortValue())))
	}
	return net.Listen("tcp", addr)
}

// adminErrorLog is the admin server's net/http ErrorLog: its lines (an
// accept failing with EMFILE at the fd limit, retried with back-off)
// become warnings on l, in the proxy's log format, instead of plain text
// in the middle of JSON lines.
func adminErrorLog(l zerolog.Logger) *log.Logger {
	return log.New(warnWriter{l}, "", 0)
}

type warnWriter struct{ l zerolog.Logger }

func (w warnWriter) Write(p []byte) (int, error) {
	w.l.Warn().Msg(strings.TrimSpace(string(p)))
	return len(p), nil
}
