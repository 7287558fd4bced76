package httpconn

import (
	"testing"

	"github.com/meshtun/meshtun/internal/leakcheck"
)

// TestMain fails the package when a test leaves a goroutine behind: a
// connection Serve did not end, a pool sweeper Close did not stop.
func TestMain(m *testing.M) { leakcheck.VerifyTestMain(m) }
