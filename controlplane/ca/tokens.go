package ca

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// TokenKeyFile is the token signing key's file in the state folder
// (an ed25519 seed, base64, mode 0600).
const TokenKeyFile = "token-key"

// tokenPrefix versions the token format, so a token from another issuer
// (a Kubernetes JWT, a typo) is told apart from a tampered one.
const tokenPrefix = "mt1."

// Identity is an authenticated caller: a Kubernetes-style namespace and
// service account.
type Identity struct {
	Namespace      string `json:"ns"`
	ServiceAccount string `json:"sa"`
}

// SPIFFE is the identity's SPIFFE ID in trustDomain, the one SAN of the
// certificates it gets (Istio's spiffe://<td>/ns/<ns>/sa/<sa>).
func (id Identity) SPIFFE(trustDomain string) string {
	return "spiffe://" + trustDomain + "/ns/" + id.Namespace + "/sa/" + id.ServiceAccount
}

type tokenClaims struct {
	Identity
	IssuedAt  int64 `json:"iat"`
	ExpiresAt int64 `json:"exp"`
}

// Tokens mints and checks bearer tokens: "mt1.<claims>.<signature>", the
// claims base64url JSON (namespace, service account, issue and expiry
// times), signed with ed25519. Stateless on purpose: any token signed by
// the key and not expired is good, so minting needs no running server
// (`meshtun controlplane token` reads the key from the state folder).
type Tokens struct {
	key ed25519.PrivateKey
	now func() time.Time
}

// LoadTokens reads the signing key from dir, generating it (0600) on the
// first start.
func LoadTokens(dir string) (*Tokens, error) {
	path := filepath.Join(dir, TokenKeyFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		seed := make([]byte, ed25519.SeedSize)
		if _, err := rand.Read(seed); err != nil {
			return nil, err
		}
		if err := writeFileAtomic(path, []byte(base64.StdEncoding.EncodeToString(seed)+"\n"), 0o600); err != nil {
			return nil, fmt.Errorf("token key: %w", err)
		}
		return &Tokens{key: ed25519.NewKeyFromSeed(seed), now: time.Now}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("token key: %w", err)
	}
	seed, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(b)))
	if err != nil || len(seed) != ed25519.SeedSize {
		return nil, fmt.Errorf("token key %s: not a base64 ed25519 seed of %d bytes", path, ed25519.SeedSize)
	}
	return &Tokens{key: ed25519.NewKeyFromSeed(seed), now: time.Now}, nil
}

// Mint returns a token for id valid for ttl.
func (t *Tokens) Mint(id Identity, ttl time.Duration) (string, error) {
	if err := validName("namespace", id.Namespace); err != nil {
		return "", err
	}
	if err := validName("service account", id.ServiceAccount); err != nil {
		return "", err
	}
	if ttl <= 0 {
		return "", fmt.Errorf("token ttl %v: must be positive", ttl)
	}
	now := t.now()
	claims, err := json.Marshal(tokenClaims{Identity: id, IssuedAt: now.Unix(), ExpiresAt: now.Add(ttl).Unix()})
	if err != nil {
		return "", err
	}
	payload := tokenPrefix + base64.RawURLEncoding.EncodeToString(claims)
	return payload + "." + base64.RawURLEncoding.EncodeToString(ed25519.Sign(t.key, []byte(payload))), nil
}

// Verify checks the token's signature and expiry and returns its identity.
// The error says why, for the server's log; callers only ever see
// istiod's "request authenticate failure".
func (t *Tokens) Verify(token string) (Identity, error) {
	if !strings.HasPrefix(token, tokenPrefix) {
		return Identity{}, errors.New("not a meshtun token (want mt1.<claims>.<signature>)")
	}
	i := strings.LastIndexByte(token, '.')
	payload, sigText := token[:i], token[i+1:]
	sig, err := base64.RawURLEncoding.DecodeString(sigText)
	if err != nil || !ed25519.Verify(t.key.Public().(ed25519.PublicKey), []byte(payload), sig) {
		return Identity{}, errors.New("bad token signature")
	}
	raw, err := base64.RawURLEncoding.DecodeString(payload[len(tokenPrefix):])
	if err != nil {
		return Identity{}, errors.New("bad token claims encoding")
	}
	var c tokenClaims
	if err := json.Unmarshal(raw, &c); err != nil {
		return Identity{}, fmt.Errorf("bad token claims: %v", err)
	}
	if now := t.now(); now.Unix() >= c.ExpiresAt {
		return Identity{}, fmt.Errorf("token of ns %q sa %q expired at %s", c.Namespace, c.ServiceAccount, time.Unix(c.ExpiresAt, 0).UTC().Format(time.RFC3339))
	}
	if validName("namespace", c.Namespace) != nil || validName("service account", c.ServiceAccount) != nil {
		return Identity{}, errors.New("token without a valid namespace and service account")
	}
	return c.Identity, nil
}

// validName accepts Kubernetes DNS-label-ish names: a SPIFFE path segment
// must not carry '/', and an empty one would name nobody.
func validName(what, s string) error {
	if s == "" {
		return fmt.Errorf("%s: empty", what)
	}
	if len(s) > 253 {
		return fmt.Errorf("%s %q: longer than 253 characters", what, s)
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '.') {
			return fmt.Errorf("%s %q: only lower-case letters, digits, '-' and '.' are allowed", what, s)
		}
	}
	return nil
}

// writeFileAtomic writes data to path (creating its directory, 0700) via a
// rename, so a crash never leaves half a key.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+"-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	err = f.Chmod(mode)
	if err == nil {
		_, err = f.Write(data)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	return err
}
