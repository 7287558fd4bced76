// Package bootstrap reads an Envoy v3 Bootstrap (JSON or YAML), the file
// `meshtun proxy --bootstrap` starts from, as Envoy's `-c` does.
//
// Parsing is strict like Envoy's: an unknown field is an error naming the
// file and the field. A typed_config whose type meshtun does not know
// (Istio's telemetry filters, WASM plugins) is not an error here: it is
// kept as an xds.type.v3.TypedStruct carrying the original type URL, so
// the listener builder can decide whether to skip it and the admin dump
// can still show it.
package bootstrap

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	_ "github.com/cncf/xds/go/xds/type/v3" // TypedStruct, the wrapper for unknown types
	bootstrapv3 "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/reflect/protoregistry"
	"sigs.k8s.io/yaml"

	// Extension types a sidecar bootstrap or xDS push names in typed_config.
	_ "github.com/cncf/xds/go/udpa/type/v1"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/http_inspector/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/original_dst/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
)

// TypedStructURL is the type URL unknown typed configs are wrapped in.
const TypedStructURL = "type.googleapis.com/xds.type.v3.TypedStruct"

// Load reads and validates the bootstrap at path.
func Load(path string) (*bootstrapv3.Bootstrap, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("bootstrap: %w", err)
	}
	yamlish := !strings.EqualFold(filepath.Ext(path), ".json")
	return Parse(data, path, yamlish)
}

// Parse decodes data (named name in errors). YAML is accepted when yamlish
// is true; JSON is YAML, so a .yaml file holding JSON works too.
func Parse(data []byte, name string, yamlish bool) (*bootstrapv3.Bootstrap, error) {
	js := data
	if yamlish {
		var err error
		if js, err = yaml.YAMLToJSON(data); err != nil {
			return nil, fmt.Errorf("bootstrap %s: not valid YAML: %w", name, err)
		}
	}
	js, err := wrapUnknownTypes(js)
	if err != nil {
		return nil, fmt.Errorf("bootstrap %s: not valid JSON: %w", name, err)
	}
	var b bootstrapv3.Bootstrap
	if err := protojson.Unmarshal(js, &b); err != nil {
		return nil, fmt.Errorf("bootstrap %s: %w", name, err)
	}
	if err := b.ValidateAll(); err != nil {
		return nil, fmt.Errorf("bootstrap %s: %w", name, err)
	}
	return &b, nil
}

// wrapUnknownTypes rewrites every JSON object whose "@type" names a message
// this binary does not link into a TypedStruct holding the original URL
// and fields, so that protojson can decode the rest of the document.
func wrapUnknownTypes(js []byte) ([]byte, error) {
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.UseNumber()
	var doc any
	if err := dec.Decode(&doc); err != nil {
		return nil, err
	}
	if dec.More() {
		return nil, errors.New("trailing data after the document")
	}
	changed := false
	doc = walk(doc, &changed)
	if !changed {
		return js, nil
	}
	return json.Marshal(doc)
}

func walk(v any, changed *bool) any {
	switch t := v.(type) {
	case map[string]any:
		for k, c := range t {
			t[k] = walk(c, changed)
		}
		url, ok := t["@type"].(string)
		if !ok {
			return t
		}
		full := url[strings.LastIndexByte(url, '/')+1:]
		if _, err := protoregistry.GlobalTypes.FindMessageByURL(url); err == nil || full == "" {
			return t
		}
		*changed = true
		fields := make(map[string]any, len(t)-1)
		for k, c := range t {
			if k != "@type" {
				fields[k] = c
			}
		}
		return map[string]any{"@type": TypedStructURL, "type_url": url, "value": fields}
	case []any:
		for i, c := range t {
			t[i] = walk(c, changed)
		}
	}
	return v
}
