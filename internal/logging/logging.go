// Package logging builds meshtun's zerolog loggers.
//
// Every component logs through a child of one root logger carrying a
// "logger" field (Envoy's component loggers: "main", "upstream", "conn_handler",
// …), so an operator can filter by component. Nothing on a per-packet path
// logs; per-flow access lines are emitted once, when a flow ends.
package logging

import (
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/rs/zerolog"
)

// Format names the output encoding of the log.
type Format string

const (
	// FormatConsole is human-readable, one line per event.
	FormatConsole Format = "console"
	// FormatJSON is one JSON object per line, for log collectors and tests.
	FormatJSON Format = "json"
)

// Options selects the encoding and the minimum level.
type Options struct {
	Level  string // trace, debug, info, warn, error (Envoy's "warning" and "critical" are accepted too)
	Format Format
	Out    io.Writer // os.Stderr when nil
}

// ParseLevel maps a level name, including Envoy's spellings, to a zerolog level.
func ParseLevel(s string) (zerolog.Level, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "trace":
		return zerolog.TraceLevel, nil
	case "debug":
		return zerolog.DebugLevel, nil
	case "info", "":
		return zerolog.InfoLevel, nil
	case "warn", "warning":
		return zerolog.WarnLevel, nil
	case "error":
		return zerolog.ErrorLevel, nil
	case "critical", "fatal":
		return zerolog.FatalLevel, nil
	case "off", "disabled":
		return zerolog.Disabled, nil
	}
	return zerolog.NoLevel, fmt.Errorf("unknown log level %q (want trace, debug, info, warning, error, critical or off)", s)
}

// New returns the root logger described by o.
func New(o Options) (zerolog.Logger, error) {
	lvl, err := ParseLevel(o.Level)
	if err != nil {
		return zerolog.Nop(), err
	}
	out := o.Out
	if out == nil {
		out = os.Stderr
	}
	switch o.Format {
	case FormatJSON:
	case FormatConsole, "":
		out = zerolog.ConsoleWriter{Out: out, TimeFormat: time.RFC3339Nano}
	default:
		return zerolog.Nop(), fmt.Errorf("unknown log format %q (want console or json)", o.Format)
	}
	return zerolog.New(out).Level(lvl).With().Timestamp().Logger(), nil
}

// Component returns a child logger tagged with an Envoy-style component name.
func Component(l zerolog.Logger, name string) zerolog.Logger {
	return l.With().Str("logger", name).Logger()
}
