package xdsclient

import (
	"context"
	"fmt"
	"os"
	"strings"

	"google.golang.org/grpc/credentials"
)

// fileCreds sends a FileMetadata header on every stream, the file re-read
// each time: a projected service-account token is rotated on disk, and a
// new stream (a reconnection) must carry the current one, as pilot-agent's
// token provider re-reads istio-token on every call.
type fileCreds struct{ m FileMetadata }

var _ credentials.PerRPCCredentials = fileCreds{}

func (f fileCreds) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	b, err := os.ReadFile(f.m.File)
	if err != nil {
		// The stream fails with this error, naming the file, rather than
		// going out without the token and being refused for a reason the
		// log would not explain.
		return nil, fmt.Errorf("xDS token: %w", err)
	}
	key := f.m.Key
	if key == "" {
		key = "authorization"
	}
	return map[string]string{strings.ToLower(key): f.m.Prefix + strings.TrimSpace(string(b))}, nil
}

// RequireTransportSecurity keeps a token off a plaintext connection.
func (fileCreds) RequireTransportSecurity() bool { return true }
