package netstack

import (
	"testing"

	"github.com/meshtun/meshtun/internal/leakcheck"
)

// TestMain fails the package if a test leaves a goroutine behind: every
// stack, forwarder and link endpoint a test opens must stop on Close.
func TestMain(m *testing.M) { leakcheck.VerifyTestMain(m) }
