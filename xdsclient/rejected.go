package xdsclient

import (
	"errors"
	"fmt"
	"strings"
)

// ResourceError says that one resource of an update is invalid, and why.
// TypeURL is one of ClusterType, EndpointType, ListenerType, RouteType (or
// SecretType, from a SecretApplier).
type ResourceError struct {
	TypeURL string
	Name    string
	Err     error
}

func (e ResourceError) Error() string {
	noun := e.TypeURL
	if k, ok := kindOf(e.TypeURL); ok {
		noun = kinds[k].noun
	}
	return fmt.Sprintf("%s %q: %v", noun, e.Name, e.Err)
}

func (e ResourceError) Unwrap() error { return e.Err }

// ResourceErrors is what an Applier returns when it can name the resources
// that make an update invalid: every one of them, not only the first. The
// client then applies the update without them, as Envoy and gRFC A46 do:
// each rejected resource keeps its last accepted version (a new one stays
// absent), the valid ones are applied, and the response is NACKed with all
// the errors as error_detail. An Applier that cannot name the culprit
// returns any other error, and the whole update is rejected.
type ResourceErrors []ResourceError

func (es ResourceErrors) Error() string {
	parts := make([]string, len(es))
	for i, e := range es {
		parts[i] = e.Error()
	}
	return strings.Join(parts, "; ")
}

// AsResourceErrors returns the ResourceErrors err holds, if any.
func AsResourceErrors(err error) (ResourceErrors, bool) {
	var es ResourceErrors
	if errors.As(err, &es) && len(es) > 0 {
		return es, true
	}
	return nil, false
}
