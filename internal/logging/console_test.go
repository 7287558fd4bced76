package logging

import (
	"bytes"
	"errors"
	"io"
	"net/netip"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// consoleLines are zerolog events of every shape the proxy logs: access
// lines, fields that need quoting, numbers, booleans, and shapes the fast
// path hands to ConsoleWriter (errors, nested values, escapes, duplicates).
func consoleLines(l zerolog.Logger) {
	a := l.With().Str("logger", "access").Logger()
	a.Info().Str("transport", "tcp").Str("direction", "outbound").Time("start_time", time.Unix(1700000000, 5)).
		Int64("duration", 12).Str("downstream_remote_address", "10.77.0.2:40000").Str("upstream_cluster", "PassthroughCluster").
		Int64("bytes_received", 64).Int64("bytes_sent", -3).Str("response_flags", "-").Msg("access")
	a.Info().Str("connection_termination_details", "dial tcp 10.0.0.1:80: connect: connection refused").Str("empty", "").Msg("access")
	l.Warn().Bool("ok", true).Bool("bad", false).Float64("ratio", 1.5e-7).Interface("nothing", nil).Msg("")
	l.Debug().Str("k", "v").Msg("debug message")
	l.Trace().Msg("trace")
	l.Error().Err(errors.New("boom")).Str("a", "b").Msg("with error")
	l.Info().Strs("list", []string{"a", "b"}).Msg("array")
	l.Info().Dict("d", zerolog.Dict().Str("x", "y")).Msg("nested")
	l.Info().Str("q", "say \"hi\"\n").Msg("escaped")
	l.Info().Str("u", "ünïcode").Stringer("addr", netip.MustParseAddrPort("[fd77::2]:80")).Msg("non-ascii")
	l.Info().Str("dup", "1").Str("dup", "2").Msg("duplicate")
	l.Log().Str("no", "level").Msg("nolevel")
	l.Info().Msg("")
}

// TestConsoleWriterMatchesZerolog: every line comes out byte for byte as
// zerolog.ConsoleWriter writes it, with colours and with NO_COLOR.
func TestConsoleWriterMatchesZerolog(t *testing.T) {
	for _, noColor := range []string{"", "1"} {
		t.Setenv("NO_COLOR", noColor)
		var fast, slow bytes.Buffer
		consoleLines(zerolog.New(newConsoleWriter(&fast, time.RFC3339Nano)).With().Timestamp().Logger().Level(zerolog.TraceLevel))
		consoleLines(zerolog.New(zerolog.ConsoleWriter{Out: &slow, TimeFormat: time.RFC3339Nano}).With().Timestamp().Logger().Level(zerolog.TraceLevel))
		// The two runs' timestamps differ; compare with time blanked,
		// and the line count and the time field's position exactly.
		fl, sl := bytes.Split(fast.Bytes(), []byte("\n")), bytes.Split(slow.Bytes(), []byte("\n"))
		if len(fl) != len(sl) || len(fl) < 14 {
			t.Fatalf("NO_COLOR=%q: %d lines, ConsoleWriter %d\n%s\n---\n%s", noColor, len(fl), len(sl), fast.Bytes(), slow.Bytes())
		}
		for i := range fl {
			if f, s := blankTime(fl[i]), blankTime(sl[i]); !bytes.Equal(f, s) {
				t.Errorf("NO_COLOR=%q line %d:\n got  %q\n want %q", noColor, i, f, s)
			}
		}
	}
}

// TestConsoleWriterFastPath: the shapes the proxy writes per flow take
// the fast path (no ConsoleWriter), and the output names the time.
func TestConsoleWriterFastPath(t *testing.T) {
	w := newConsoleWriter(io.Discard, time.RFC3339Nano)
	s := &consoleScratch{}
	line := []byte(`{"level":"info","logger":"access","bytes_sent":64,"ok":true,"time":"2026-12-07T18:00:00Z","message":"access"}` + "\n")
	out, ok := w.format(line, s)
	if !ok {
		t.Fatal("an access line fell back to ConsoleWriter")
	}
	if !bytes.Contains(out, []byte("access")) || !bytes.Contains(out, []byte("64")) {
		t.Fatalf("output %q lacks the message or a field", out)
	}
	for _, bad := range []string{
		`{"level":"info","time":"2026-12-07T18:00:00Z","d":{"x":1}}`,
		`{"level":"info","time":"2026-12-07T18:00:00Z","s":"a\"b"}`,
		`{"level":"info","time":"not a time"}`,
		`{"level":"info","time":"2026-12-07T18:00:00Z"} trailing`,
		`{"level":"info","time":"2026-12-07T18:00:00Z","error":"x"}`,
	} {
		if _, ok := w.format([]byte(bad), s); ok {
			t.Errorf("fast path took %s", bad)
		}
	}
}

// blankTime replaces the RFC 3339 timestamp at the start of a console
// line (after an optional colour code) with a fixed string.
func blankTime(l []byte) []byte {
	prefix := []byte{}
	if bytes.HasPrefix(l, []byte("\x1b[90m")) {
		prefix, l = l[:5], l[5:]
	}
	sp := bytes.IndexAny(l, " \x1b")
	if sp < 0 {
		return append(prefix, l...)
	}
	if _, err := time.Parse(time.RFC3339Nano, string(l[:sp])); err != nil {
		return append(prefix, l...)
	}
	return append(append(prefix, "TIME"...), l[sp:]...)
}

func BenchmarkConsoleAccessLine(b *testing.B) {
	for _, bc := range []struct {
		name string
		w    io.Writer
	}{{"fast", newConsoleWriter(io.Discard, time.RFC3339Nano)}, {"zerolog", zerolog.ConsoleWriter{Out: io.Discard, TimeFormat: time.RFC3339Nano}}} {
		b.Run(bc.name, func(b *testing.B) {
			l := zerolog.New(bc.w).With().Timestamp().Str("logger", "access").Logger()
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				l.Info().Str("transport", "tcp").Str("direction", "outbound").Time("start_time", time.Unix(1700000000, 0)).
					Int64("duration", 0).Str("downstream_remote_address", "10.77.0.2:40000").Str("downstream_local_address", "10.77.0.1:7777").
					Str("upstream_host", "10.77.0.1:7777").Str("upstream_local_address", "10.77.0.2:40002").Str("upstream_cluster", "PassthroughCluster").
					Int64("bytes_received", 64).Int64("bytes_sent", 64).Str("response_flags", "-").Msg("access")
			}
		})
	}
}
