package xdsclient

import (
	"testing"

	"github.com/meshtun/meshtun/internal/leakcheck"
)

// TestMain fails the package if a test leaves a goroutine behind: the client's
// stream, receive loop and timers must all end with Run.
func TestMain(m *testing.M) { leakcheck.VerifyTestMain(m) }
