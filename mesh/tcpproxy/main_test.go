package tcpproxy

import (
	"testing"

	"github.com/meshtun/meshtun/internal/leakcheck"
)

func TestMain(m *testing.M) { leakcheck.VerifyTestMain(m) }
