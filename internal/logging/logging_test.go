package logging

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

func TestParseLevel(t *testing.T) {
	for _, ok := range []string{"trace", "debug", "info", "warning", "warn", "error", "critical", "off", "INFO"} {
		if _, err := ParseLevel(ok); err != nil {
			t.Errorf("ParseLevel(%q): %v", ok, err)
		}
	}
	_, err := ParseLevel("verbose")
	if err == nil || !strings.Contains(err.Error(), `"verbose"`) {
		t.Fatalf("ParseLevel(verbose) error = %v, want one naming the value", err)
	}
}

func TestJSONAndLevelFilter(t *testing.T) {
	var buf bytes.Buffer
	l, err := New(Options{Level: "warn", Format: FormatJSON, Out: &buf})
	if err != nil {
		t.Fatal(err)
	}
	c := Component(l, "upstream")
	c.Info().Msg("dropped")
	c.Warn().Str("k", "v").Msg("kept")
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 1 {
		t.Fatalf("got %d lines, want 1: %q", len(lines), buf.String())
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(lines[0]), &m); err != nil {
		t.Fatal(err)
	}
	if m["message"] != "kept" || m["logger"] != "upstream" || m["k"] != "v" || m["level"] != "warn" {
		t.Fatalf("unexpected event %v", m)
	}
}

func TestBadFormat(t *testing.T) {
	if _, err := New(Options{Format: "xml"}); err == nil || !strings.Contains(err.Error(), "xml") {
		t.Fatalf("want error naming the format, got %v", err)
	}
}
