package controlplane

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"reflect"
	"sort"
	"strconv"
	"strings"

	"sigs.k8s.io/yaml"
)

// fieldError is a decoding or validation error at one field of a document.
// Path is the field's JSON path ("spec.outboundTrafficPolicy.mode",
// "services[1].ports[0].protocol").
type fieldError struct {
	Path string
	Msg  string
}

func (e *fieldError) Error() string {
	if e.Path == "" {
		return e.Msg
	}
	return e.Path + ": " + e.Msg
}

func fieldErr(path, format string, args ...any) *fieldError {
	return &fieldError{Path: path, Msg: fmt.Sprintf(format, args...)}
}

// decodeStrict decodes a YAML (or JSON) document into v, which may be
// pre-filled: fields the document sets overwrite, the others stay (that is
// how a profile overlays its base). Unlike a plain decode it rejects
// duplicate keys, fields v's type does not have (listing the valid ones),
// keys that differ from a field only by case, values of the wrong type,
// and values a field's own UnmarshalJSON refuses; every error is a
// *fieldError naming the path. It returns the document as generic JSON
// values too (also with a *fieldError), for callers that label paths.
func decodeStrict(data []byte, v any) (map[string]any, error) {
	doc, j, err := parseDoc(data)
	if err != nil {
		return nil, err
	}
	if err := checkValue(doc, reflect.TypeOf(v).Elem(), ""); err != nil {
		return doc, err
	}
	d := json.NewDecoder(bytes.NewReader(j))
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		// checkValue has seen every field; this is a safety net.
		return doc, &fieldError{Msg: err.Error()}
	}
	return doc, nil
}

// parseDoc converts a YAML document to JSON, rejecting duplicate keys, and
// returns it as generic values (numbers as json.Number) and as JSON.
func parseDoc(data []byte) (map[string]any, []byte, error) {
	j, err := yaml.YAMLToJSONStrict(data)
	if err != nil {
		return nil, nil, &fieldError{Msg: strings.TrimPrefix(err.Error(), "error converting YAML to JSON: ")}
	}
	var raw any
	d := json.NewDecoder(bytes.NewReader(j))
	d.UseNumber()
	if err := d.Decode(&raw); err != nil {
		return nil, nil, &fieldError{Msg: err.Error()}
	}
	if raw == nil {
		return nil, nil, &fieldError{Msg: "the document is empty"}
	}
	doc, ok := raw.(map[string]any)
	if !ok {
		return nil, nil, &fieldError{Msg: fmt.Sprintf("want a mapping at the top level, got %s", kindOf(raw))}
	}
	return doc, j, nil
}

// str reads the string at a path of a generic document ("" if absent or
// not a string: the strict decode reports wrong types).
func str(doc map[string]any, keys ...string) string {
	var v any = doc
	for _, k := range keys {
		m, ok := v.(map[string]any)
		if !ok {
			return ""
		}
		v = m[k]
	}
	s, _ := v.(string)
	return s
}

var unmarshalerType = reflect.TypeOf((*json.Unmarshaler)(nil)).Elem()

// checkValue checks the generic JSON value raw against Go type t.
func checkValue(raw any, t reflect.Type, path string) error {
	if raw == nil {
		return nil // null leaves the field as it is
	}
	if reflect.PointerTo(t).Implements(unmarshalerType) {
		b, _ := json.Marshal(raw)
		if err := reflect.New(t).Interface().(json.Unmarshaler).UnmarshalJSON(b); err != nil {
			return &fieldError{Path: path, Msg: err.Error()}
		}
		return nil
	}
	switch t.Kind() {
	case reflect.Pointer:
		return checkValue(raw, t.Elem(), path)
	case reflect.Struct:
		m, ok := raw.(map[string]any)
		if !ok {
			return fieldErr(path, "want a mapping, got %s", kindOf(raw))
		}
		fields := jsonFields(t)
		for _, k := range sortedKeys(m) {
			f, ok := fields[k]
			if !ok {
				names := make([]string, 0, len(fields))
				for n := range fields {
					names = append(names, n)
				}
				sort.Strings(names)
				return fieldErr(path, "unknown field %q; valid fields: %s", k, strings.Join(names, ", "))
			}
			if err := checkValue(m[k], f.Type, join(path, k)); err != nil {
				return err
			}
		}
	case reflect.Map:
		m, ok := raw.(map[string]any)
		if !ok {
			return fieldErr(path, "want a mapping, got %s", kindOf(raw))
		}
		for _, k := range sortedKeys(m) {
			if err := checkValue(m[k], t.Elem(), join(path, k)); err != nil {
				return err
			}
		}
	case reflect.Slice:
		s, ok := raw.([]any)
		if !ok {
			return fieldErr(path, "want a list, got %s", kindOf(raw))
		}
		for i, e := range s {
			if err := checkValue(e, t.Elem(), fmt.Sprintf("%s[%d]", path, i)); err != nil {
				return err
			}
		}
	case reflect.String:
		if _, ok := raw.(string); !ok {
			return fieldErr(path, "want a string, got %s", kindOf(raw))
		}
	case reflect.Bool:
		if _, ok := raw.(bool); !ok {
			return fieldErr(path, "want true or false, got %s", kindOf(raw))
		}
	case reflect.Int, reflect.Int32, reflect.Int64, reflect.Uint32, reflect.Uint16:
		n, ok := raw.(json.Number)
		if !ok {
			return fieldErr(path, "want a whole number, got %s", kindOf(raw))
		}
		lo, hi := intRange(t.Kind())
		i, err := strconv.ParseInt(n.String(), 10, 64)
		if err != nil || i < lo || i > hi {
			return fieldErr(path, "want a whole number from %d to %d, got %s", lo, hi, n)
		}
	default:
		return fieldErr(path, "field of unsupported type %s", t)
	}
	return nil
}

func intRange(k reflect.Kind) (int64, int64) {
	switch k {
	case reflect.Int32:
		return math.MinInt32, math.MaxInt32
	case reflect.Uint32:
		return 0, math.MaxUint32
	case reflect.Uint16:
		return 0, math.MaxUint16
	}
	return math.MinInt64, math.MaxInt64
}

// jsonFields maps the JSON names of t's fields to the fields.
func jsonFields(t reflect.Type) map[string]reflect.StructField {
	out := make(map[string]reflect.StructField, t.NumField())
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "-" {
			continue
		}
		if name == "" {
			name = f.Name
		}
		out[name] = f
	}
	return out
}

func kindOf(v any) string {
	switch x := v.(type) {
	case map[string]any:
		return "a mapping"
	case []any:
		return "a list"
	case string:
		return strconv.Quote(x)
	case json.Number:
		return "the number " + x.String()
	case bool:
		return strconv.FormatBool(x)
	}
	return fmt.Sprintf("%T", v)
}

func join(path, k string) string {
	if path == "" {
		return k
	}
	return path + "." + k
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// choiceError says that got is not one of choices.
func choiceError(got string, choices []string) error {
	return fmt.Errorf("%q is not valid; valid choices: %s", got, strings.Join(choices, ", "))
}

// asFieldError returns err as a *fieldError, if it is one.
func asFieldError(err error) (*fieldError, bool) {
	var fe *fieldError
	ok := errors.As(err, &fe)
	return fe, ok
}
