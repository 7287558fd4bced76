// Package leakcheck is the goroutine-leak check the packages with
// long-lived goroutines (netstack, mesh, httpconn, cluster, xdsclient, proxy)
// run after their tests, as grpc-go's grpctest.Tester does: a test that
// leaves a goroutine behind fails the package, so a Close that forgets a
// goroutine is caught where it is written, not as a slow leak in a pod.
package leakcheck

import (
	"testing"

	"go.uber.org/goleak"
)

// ignored are goroutines owned by libraries for the life of the process,
// not by the code under test. Add one only with the reason it is not a leak.
var ignored = []goleak.Option{
	// net/http's DefaultTransport keeps idle keep-alive connections of
	// tests that used http.Get; they are closed by CloseIdleConnections, not
	// by the code under test.
	goleak.IgnoreTopFunction("net/http.(*persistConn).writeLoop"),
	goleak.IgnoreTopFunction("net/http.(*persistConn).readLoop"),
}

// VerifyTestMain runs the package's tests, then fails if goroutines started
// by them are still running (after a grace period for ones that are
// stopping). Call it from TestMain.
func VerifyTestMain(m *testing.M, extra ...goleak.Option) {
	goleak.VerifyTestMain(m, append(append([]goleak.Option(nil), ignored...), extra...)...)
}
