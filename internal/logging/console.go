package logging

import (
	"bytes"
	"io"
	"os"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/rs/zerolog"
)

// consoleWriter writes zerolog's JSON lines in the console format,
// byte for byte what zerolog.ConsoleWriter{TimeFormat: timeFormat} writes,
// without its generic path: ConsoleWriter decodes every line into a
// map[string]any with encoding/json and formats each part through fmt —
// about 23 µs and 167 allocations for one access line, which at the
// default level every flow and every logged HTTP request pays. This one
// scans the flat object in place. Lines it does not take on (nested
// values, escaped strings, duplicate keys, caller or error fields, levels
// or timestamps it does not know) go to the ConsoleWriter unchanged.
type consoleWriter struct {
	out        io.Writer
	timeFormat string
	slow       zerolog.ConsoleWriter
}

func newConsoleWriter(out io.Writer, timeFormat string) *consoleWriter {
	return &consoleWriter{out: out, timeFormat: timeFormat,
		slow: zerolog.ConsoleWriter{Out: out, TimeFormat: timeFormat}}
}

// consoleField is one key/value of a line; the slices point into the line.
type consoleField struct {
	key, val []byte
	str      bool // val is the content of a JSON string
}

type consoleScratch struct {
	fields []consoleField
	buf    []byte
}

var consolePool = sync.Pool{New: func() any { return &consoleScratch{buf: make([]byte, 0, 512)} }}

// ANSI colours, as zerolog's console writer uses them.
const (
	colorCyan     = 36
	colorBold     = 1
	colorDarkGray = 90
)

func (w *consoleWriter) Write(p []byte) (int, error) {
	s := consolePool.Get().(*consoleScratch)
	defer consolePool.Put(s)
	line, ok := w.format(p, s)
	if !ok {
		return w.slow.Write(p)
	}
	if _, err := w.out.Write(line); err != nil {
		return 0, err
	}
	return len(p), nil
}

// format renders p into s.buf, or reports false for a line the fast path
// does not render exactly as ConsoleWriter would.
func (w *consoleWriter) format(p []byte, s *consoleScratch) ([]byte, bool) {
	fields, ok := scanFlatObject(p, s.fields[:0])
	s.fields = fields
	if !ok {
		return nil, false
	}
	var lvl, ts, msg []byte
	var haveTime bool
	n := 0
	for _, f := range fields {
		switch string(f.key) {
		case zerolog.LevelFieldName:
			if !f.str {
				return nil, false
			}
			lvl = f.val
		case zerolog.TimestampFieldName:
			if !f.str {
				return nil, false
			}
			ts, haveTime = f.val, true
		case zerolog.MessageFieldName:
			if !f.str {
				return nil, false
			}
			msg = f.val
		case zerolog.CallerFieldName, zerolog.ErrorFieldName:
			return nil, false
		default:
			fields[n] = f
			n++
		}
	}
	fields = fields[:n]
	slices.SortFunc(fields, func(a, b consoleField) int { return bytes.Compare(a.key, b.key) })
	for i := 1; i < len(fields); i++ {
		if bytes.Equal(fields[i-1].key, fields[i].key) {
			return nil, false // a map keeps the last: leave it to ConsoleWriter
		}
	}
	if !haveTime || lvl == nil {
		return nil, false
	}
	level, err := zerolog.ParseLevel(string(lvl))
	if err != nil {
		return nil, false
	}
	short, ok := zerolog.FormattedLevels[level]
	if !ok {
		return nil, false
	}
	t, err := time.ParseInLocation(zerolog.TimeFieldFormat, string(ts), time.Local)
	if err != nil {
		return nil, false
	}
	noColor := os.Getenv("NO_COLOR") != ""

	b := s.buf[:0]
	b = colorStart(b, colorDarkGray, noColor)
	b = t.In(time.Local).AppendFormat(b, w.timeFormat)
	b = colorEnd(b, colorDarkGray, noColor)
	b = append(b, ' ')
	b = colorStart(b, zerolog.LevelColors[level], noColor)
	b = append(b, short...)
	b = colorEnd(b, zerolog.LevelColors[level], noColor)
	if len(msg) > 0 {
		bold := 0
		switch string(lvl) {
		case zerolog.LevelInfoValue, zerolog.LevelWarnValue, zerolog.LevelErrorValue, zerolog.LevelFatalValue, zerolog.LevelPanicValue:
			bold = colorBold
		}
		b = append(b, ' ')
		b = colorStart(b, bold, noColor)
		b = append(b, msg...)
		b = colorEnd(b, bold, noColor)
	}
	if len(fields) > 0 {
		b = append(b, ' ')
	}
	for i, f := range fields {
		b = colorStart(b, colorCyan, noColor)
		b = append(b, f.key...)
		b = append(b, '=')
		b = colorEnd(b, colorCyan, noColor)
		if f.str && needsQuote(f.val) {
			b = strconv.AppendQuote(b, string(f.val))
		} else {
			b = append(b, f.val...)
		}
		if i < len(fields)-1 {
			b = append(b, ' ')
		}
	}
	b = append(b, '\n')
	s.buf = b
	return b, true
}

func colorStart(b []byte, c int, noColor bool) []byte {
	if noColor || c == 0 {
		return b
	}
	b = append(b, "\x1b["...)
	b = strconv.AppendInt(b, int64(c), 10)
	return append(b, 'm')
}

func colorEnd(b []byte, c int, noColor bool) []byte {
	if noColor || c == 0 {
		return b
	}
	return append(b, "\x1b[0m"...)
}

// needsQuote is ConsoleWriter's rule for quoting a string value.
func needsQuote(s []byte) bool {
	for _, c := range s {
		if c < 0x20 || c > 0x7e || c == ' ' || c == '\\' || c == '"' {
			return true
		}
	}
	return false
}

// scanFlatObject splits a one-line JSON object whose values are strings
// without escapes, numbers, true, false or null. Anything else (nested
// values, escapes, trailing bytes but the newline) reports false.
func scanFlatObject(p []byte, fields []consoleField) ([]consoleField, bool) {
	i := skipSpace(p, 0)
	if i >= len(p) || p[i] != '{' {
		return fields, false
	}
	i = skipSpace(p, i+1)
	if i < len(p) && p[i] == '}' {
		return fields, skipSpace(p, i+1) == len(p)
	}
	for {
		key, j, ok := scanString(p, i)
		if !ok {
			return fields, false
		}
		j = skipSpace(p, j)
		if j >= len(p) || p[j] != ':' {
			return fields, false
		}
		j = skipSpace(p, j+1)
		if j >= len(p) {
			return fields, false
		}
		f := consoleField{key: key}
		switch c := p[j]; {
		case c == '"':
			f.val, j, ok = scanString(p, j)
			f.str = true
		case c == '-' || (c >= '0' && c <= '9'):
			k := j
			for k < len(p) && (p[k] == '-' || p[k] == '+' || p[k] == '.' || p[k] == 'e' || p[k] == 'E' || (p[k] >= '0' && p[k] <= '9')) {
				k++
			}
			f.val, j = p[j:k], k
		case bytes.HasPrefix(p[j:], []byte("true")):
			f.val, j = p[j:j+4], j+4
		case bytes.HasPrefix(p[j:], []byte("false")):
			f.val, j = p[j:j+5], j+5
		case bytes.HasPrefix(p[j:], []byte("null")):
			f.val, j = p[j:j+4], j+4
		default:
			return fields, false // object or array
		}
		if !ok {
			return fields, false
		}
		fields = append(fields, f)
		j = skipSpace(p, j)
		if j >= len(p) {
			return fields, false
		}
		switch p[j] {
		case ',':
			i = skipSpace(p, j+1)
		case '}':
			return fields, skipSpace(p, j+1) == len(p)
		default:
			return fields, false
		}
	}
}

// scanString returns the content of the JSON string at p[i] and the index
// after its closing quote; false for an escape or a missing quote.
func scanString(p []byte, i int) ([]byte, int, bool) {
	if i >= len(p) || p[i] != '"' {
		return nil, i, false
	}
	for k := i + 1; k < len(p); k++ {
		switch p[k] {
		case '"':
			return p[i+1 : k], k + 1, true
		case '\\':
			return nil, i, false
		}
	}
	return nil, i, false
}

func skipSpace(p []byte, i int) int {
	for i < len(p) && (p[i] == ' ' || p[i] == '\n' || p[i] == '\r' || p[i] == '\t') {
		i++
	}
	return i
}
