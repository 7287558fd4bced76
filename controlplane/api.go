package controlplane

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"

	"github.com/rs/zerolog"
)

// The control plane's HTTP API (127.0.0.1:15014 by default, istiod's
// monitoring port), for `meshtun profile`:
//
//	GET  /ready        200 "ready"                       (no token)
//	GET  /v1/profile   the profile in force, YAML
//	POST /v1/profile   apply a profile document (YAML); 200 with the new
//	                   profile and X-Meshtun-Version, or 400 with the reason
//	                   (nothing changes)
//	GET  /v1/status    version, rejections, connected nodes (JSON)
//
// Every /v1 request needs "Authorization: Bearer <token>", the token the
// control plane writes to its state directory at startup (mode 0600).

// TokenFileName is the token file's name in the state directory.
const TokenFileName = "controlplane.token"

// VersionHeader carries the configuration version a POST put in force.
const VersionHeader = "X-Meshtun-Version"

// maxProfileBytes bounds a POSTed profile.
const maxProfileBytes = 1 << 20

// newToken returns a random bearer token.
func newToken() (string, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return hex.EncodeToString(b), nil
}

// writeTokenFile writes token to dir/controlplane.token, readable by its
// owner only, replacing any previous one atomically. It creates dir (0700)
// if needed and returns the file's path.
func writeTokenFile(dir, token string) (string, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("state dir: %w", err)
	}
	f, err := os.CreateTemp(dir, ".token-*") // mode 0600
	if err != nil {
		return "", fmt.Errorf("token file: %w", err)
	}
	defer os.Remove(f.Name()) // no-op after the rename
	err = f.Chmod(0o600)
	if err == nil {
		_, err = f.WriteString(token + "\n")
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	path := filepath.Join(dir, TokenFileName)
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		return "", fmt.Errorf("token file: %w", err)
	}
	return path, nil
}

// ReadTokenFile reads the API token a control plane wrote at startup
// (TokenFileName in its state directory).
func ReadTokenFile(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return "", fmt.Errorf("%s: empty token file", path)
	}
	return tok, nil
}

// API is the HTTP API over a Server.
type API struct {
	Server *Server
	Token  string
	Log    zerolog.Logger
}

// Handler routes the API.
func (a *API) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /ready", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ready\n") })
	mux.Handle("GET /v1/profile", a.auth(a.getProfile))
	mux.Handle("POST /v1/profile", a.auth(a.postProfile))
	mux.Handle("PUT /v1/profile", a.auth(a.postProfile))
	mux.Handle("GET /v1/status", a.auth(a.status))
	return mux
}

// auth admits requests carrying the bearer token; others get 401.
func (a *API) auth(h http.HandlerFunc) http.Handler {
	want := []byte(a.Token)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || a.Token == "" || subtle.ConstantTimeCompare([]byte(strings.TrimSpace(got)), want) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="meshtun-controlplane"`)
			msg := "missing bearer token"
			if ok {
				msg = "wrong bearer token"
			}
			a.Log.Warn().Str("path", r.URL.Path).Str("remote", r.RemoteAddr).Msg("API request refused: " + msg)
			http.Error(w, msg+" (see the control plane's --state-dir/"+TokenFileName+")", http.StatusUnauthorized)
			return
		}
		h(w, r)
	})
}

func (a *API) getProfile(w http.ResponseWriter, _ *http.Request) {
	a.writeProfile(w, a.Server.Profile(), a.Server.currentVersion())
}

func (a *API) writeProfile(w http.ResponseWriter, p *Profile, version string) {
	b, err := MarshalProfile(p)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/yaml")
	w.Header().Set(VersionHeader, version)
	w.Write(b)
}

func (a *API) postProfile(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxProfileBytes))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			http.Error(w, fmt.Sprintf("profile larger than %d bytes", maxProfileBytes), http.StatusRequestEntityTooLarge)
			return
		}
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	source := r.URL.Query().Get("source")
	if source == "" {
		source = "profile"
	}
	p, err := ParseProfile(source, body)
	if err != nil {
		a.Server.rejectProfile(err)
		a.Log.Warn().Err(err).Msg("profile rejected; the previous one stays in force")
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	v := a.Server.setProfile(p)
	a.Log.Info().Str("profile", p.Metadata.Name).Str("source", source).Str("version", v).
		Str("outbound_traffic_policy", string(p.Spec.OutboundTrafficPolicy.Mode)).Msg("profile applied")
	a.writeProfile(w, p, v)
}

func (a *API) status(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(a.Server.status())
}
