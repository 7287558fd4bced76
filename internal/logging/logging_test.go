package logging

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/rs/zerolog"
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

func TestLiveLevels(t *testing.T) {
	var buf bytes.Buffer
	l, err := New(Options{Level: "info", Format: FormatJSON, Out: &buf})
	if err != nil {
		t.Fatal(err)
	}
	a, b := Component(l, "alpha"), Component(l, "beta")
	a.Debug().Msg("a-debug-dropped")
	if err := SetLevel("alpha", zerolog.DebugLevel); err != nil {
		t.Fatal(err)
	}
	a.Debug().Msg("a-debug-kept")
	b.Debug().Msg("b-debug-dropped")
	if err := SetLevel("", zerolog.ErrorLevel); err != nil {
		t.Fatal(err)
	}
	a.Warn().Msg("a-warn-dropped")
	b.Error().Msg("b-error-kept")
	a.Log().Msg("a-nolevel-kept")
	if err := SetLevel("gamma", zerolog.DebugLevel); err == nil || !strings.Contains(err.Error(), "gamma") {
		t.Fatalf("unknown logger: err = %v", err)
	}
	out := buf.String()
	for _, want := range []string{"a-debug-kept", "b-error-kept", "a-nolevel-kept"} {
		if !strings.Contains(out, want) {
			t.Errorf("missing %s in %s", want, out)
		}
	}
	for _, bad := range []string{"dropped"} {
		if strings.Contains(out, bad) {
			t.Errorf("unexpected %s in %s", bad, out)
		}
	}
	if got := Loggers()["alpha"]; got != zerolog.ErrorLevel {
		t.Errorf("alpha level = %v", got)
	}
	if LevelName(zerolog.WarnLevel) != "warning" {
		t.Error("LevelName(warn)")
	}
}

// TestComponentGate: a logger built elsewhere follows its component's live
// level through the gate, both ways, and is not turned on by another
// component's change (zerolog's global level drops to the lowest).
func TestComponentGate(t *testing.T) {
	var buf bytes.Buffer
	root, err := New(Options{Level: "warn", Format: FormatJSON, Out: &buf})
	if err != nil {
		t.Fatal(err)
	}
	g := ComponentGate("gated")
	// As the access log uses it: the gate is asked before an event is built.
	info := func(msg string) {
		if g.Allows(zerolog.InfoLevel) {
			root.Info().Msg(msg)
		}
	}
	_ = Component(root, "other")
	if g.Allows(zerolog.InfoLevel) {
		t.Fatal("gate allows info at --log-level warn")
	}
	if err := SetLevel("other", zerolog.DebugLevel); err != nil {
		t.Fatal(err)
	}
	info("hidden")
	if g.Allows(zerolog.InfoLevel) || strings.Contains(buf.String(), "hidden") {
		t.Fatalf("another component's level turned the gated logger on: %q", buf.String())
	}
	if err := SetLevel("gated", zerolog.InfoLevel); err != nil {
		t.Fatal(err)
	}
	info("shown")
	if !g.Allows(zerolog.InfoLevel) || !strings.Contains(buf.String(), "shown") {
		t.Fatalf("gate at info: %q", buf.String())
	}
	if _, ok := Loggers()["gated"]; !ok {
		t.Error("the gated component is not listed (/logging)")
	}
}
