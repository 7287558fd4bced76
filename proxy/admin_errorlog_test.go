package proxy

import (
	"bytes"
	"encoding/json"
	"testing"

	"github.com/rs/zerolog"
)

// TestAdminErrorLogIsJSONWarning: what net/http reports for the admin
// server (an accept failing at the fd limit) is a warning in the proxy's
// own format, one line per report.
func TestAdminErrorLogIsJSONWarning(t *testing.T) {
	var buf bytes.Buffer
	l := adminErrorLog(zerolog.New(&buf).With().Str("logger", "admin").Logger())
	l.Printf("http: Accept error: %v; retrying in %v", "accept4: too many open files", "5ms")
	var m map[string]string
	if err := json.Unmarshal(bytes.TrimSpace(buf.Bytes()), &m); err != nil {
		t.Fatalf("admin error log line %q is not one JSON object: %v", buf.String(), err)
	}
	want := "http: Accept error: accept4: too many open files; retrying in 5ms"
	if m["level"] != "warn" || m["logger"] != "admin" || m["message"] != want {
		t.Errorf("admin error log line %v, want level warn, logger admin, message %q", m, want)
	}
}
