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
	"sort"
	"strings"
	"sync"
	"sync/atomic"
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
		out = newConsoleWriter(out, time.RFC3339Nano)
	default:
		return zerolog.Nop(), fmt.Errorf("unknown log format %q (want console or json)", o.Format)
	}
	registry.reset(lvl)
	return zerolog.New(out).With().Timestamp().Logger(), nil
}

// Component returns a child logger tagged with an Envoy-style component
// name, whose level can be changed while the process runs (the admin
// /logging endpoint).
func Component(l zerolog.Logger, name string) zerolog.Logger {
	return l.With().Str("logger", name).Logger().Hook(registry.level(name))
}

// Gate is a component's live level for a logger built elsewhere (the
// access log), which checks Allows before it builds an event. Changes
// made through SetLevel (the admin's /logging) apply at once.
type Gate struct{ c *componentLevel }

// ComponentGate registers component name, like Component, and returns
// its gate.
func ComponentGate(name string) Gate { return Gate{registry.level(name)} }

// Allows reports whether an event at lvl would be written.
func (g Gate) Allows(lvl zerolog.Level) bool { return lvl >= zerolog.Level(g.c.v.Load()) }

// Live levels. Each component has its own level; zerolog's global level is
// kept at the lowest of them, so an event below every component's level is
// dropped before it is formatted, and the per-component hook discards the
// few that pass the global level but not their component's.
var registry = levels{m: map[string]*componentLevel{}}

type levels struct {
	mu   sync.Mutex
	def  zerolog.Level
	m    map[string]*componentLevel
	init bool
}

type componentLevel struct{ v atomic.Int32 }

// Run implements zerolog.Hook.
func (c *componentLevel) Run(e *zerolog.Event, lvl zerolog.Level, _ string) {
	if lvl != zerolog.NoLevel && lvl < zerolog.Level(c.v.Load()) {
		e.Discard()
	}
}

func (r *levels) reset(def zerolog.Level) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.def, r.init = def, true
	for _, c := range r.m {
		c.v.Store(int32(def))
	}
	r.syncGlobal()
}

func (r *levels) level(name string) *componentLevel {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.init {
		r.def, r.init = zerolog.InfoLevel, true
	}
	c := r.m[name]
	if c == nil {
		c = &componentLevel{}
		c.v.Store(int32(r.def))
		r.m[name] = c
	}
	return c
}

// syncGlobal sets zerolog's global level to the lowest component level.
// Called with r.mu held.
func (r *levels) syncGlobal() {
	lowest := r.def
	for _, c := range r.m {
		lowest = min(lowest, zerolog.Level(c.v.Load()))
	}
	zerolog.SetGlobalLevel(lowest)
}

// Loggers returns every component logger's level, by name.
func Loggers() map[string]zerolog.Level {
	registry.mu.Lock()
	defer registry.mu.Unlock()
	out := make(map[string]zerolog.Level, len(registry.m))
	for n, c := range registry.m {
		out[n] = zerolog.Level(c.v.Load())
	}
	return out
}

// LoggerNames returns the component names, sorted.
func LoggerNames() []string {
	registry.mu.Lock()
	defer registry.mu.Unlock()
	out := make([]string, 0, len(registry.m))
	for n := range registry.m {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// SetLevel changes one component's level, or every component's (and the
// default for components created later) when name is "".
func SetLevel(name string, lvl zerolog.Level) error {
	registry.mu.Lock()
	defer registry.mu.Unlock()
	if name == "" {
		registry.def = lvl
		for _, c := range registry.m {
			c.v.Store(int32(lvl))
		}
	} else {
		c := registry.m[name]
		if c == nil {
			return fmt.Errorf("unknown logger %q", name)
		}
		c.v.Store(int32(lvl))
	}
	registry.syncGlobal()
	return nil
}

// LevelName is Envoy's spelling of a level.
func LevelName(l zerolog.Level) string {
	switch l {
	case zerolog.TraceLevel:
		return "trace"
	case zerolog.DebugLevel:
		return "debug"
	case zerolog.InfoLevel:
		return "info"
	case zerolog.WarnLevel:
		return "warning"
	case zerolog.ErrorLevel:
		return "error"
	case zerolog.FatalLevel, zerolog.PanicLevel:
		return "critical"
	}
	return "off"
}
