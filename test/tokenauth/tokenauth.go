// Package tokenauth puts the Docker registry token authentication in front of a registry
// handler, for tests of what pulls with tokens: /token issues short-lived tokens for one
// repository's pull scope to a client with the right basic credentials, and /v2/ answers only
// requests that carry an unexpired token for the repository they touch. It is the protocol of
// Docker Hub, GHCR and Harbor, with opaque tokens instead of JWTs.
package tokenauth

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"
)

// Server wraps a registry handler with token authentication.
type Server struct {
	inner          http.Handler
	user, password string
	lifetime       time.Duration
	// Realm is the token endpoint's absolute URL (http://host:port/token); set it once the
	// server listens.
	Realm string

	mu     sync.Mutex
	tokens map[string]grant
	issued int
}

type grant struct {
	repo    string
	expires time.Time
}

// New returns a Server in front of inner that issues tokens living lifetime to user:password.
func New(inner http.Handler, user, password string, lifetime time.Duration) *Server {
	return &Server{inner: inner, user: user, password: password, lifetime: lifetime, tokens: map[string]grant{}}
}

// Issued counts the tokens issued so far.
func (s *Server) Issued() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.issued
}

// Valid reports whether token is one the server issued for repo and has not expired.
func (s *Server) Valid(token, repo string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	g, ok := s.tokens[token]
	return ok && g.repo == repo && time.Now().Before(g.expires)
}

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/token" {
		s.token(w, r)
		return
	}
	repo := repository(r.URL.Path)
	auth := r.Header.Get("Authorization")
	token, ok := strings.CutPrefix(auth, "Bearer ")
	if !ok || repo == "" || !s.Valid(token, repo) {
		challenge := fmt.Sprintf(`Bearer realm=%q,service="tokenauth"`, s.Realm)
		if repo != "" {
			challenge += fmt.Sprintf(`,scope="repository:%s:pull"`, repo)
		}
		w.Header().Set("WWW-Authenticate", challenge)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		_, _ = w.Write([]byte(`{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`))
		return
	}
	s.inner.ServeHTTP(w, r)
}

// token issues a token for the one repository of the pull scope asked for.
func (s *Server) token(w http.ResponseWriter, r *http.Request) {
	user, password, ok := r.BasicAuth()
	scope := r.URL.Query().Get("scope")
	repo, _, _ := strings.Cut(strings.TrimPrefix(scope, "repository:"), ":")
	if !ok || user != s.user || password != s.password || !strings.HasPrefix(scope, "repository:") || !strings.HasSuffix(scope, ":pull") {
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	token := hex.EncodeToString(b)
	s.mu.Lock()
	s.tokens[token] = grant{repo: repo, expires: time.Now().Add(s.lifetime)}
	s.issued++
	s.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{"token": token, "expires_in": int(s.lifetime / time.Second), "issued_at": time.Now().UTC().Format(time.RFC3339)})
}

// repository is the repository a /v2/<name>/(manifests|blobs|tags)/… path names; "" for /v2/.
func repository(path string) string {
	rest, ok := strings.CutPrefix(path, "/v2/")
	if !ok {
		return ""
	}
	for _, sep := range []string{"/manifests/", "/blobs/", "/tags/"} {
		if i := strings.LastIndex(rest, sep); i > 0 {
			return rest[:i]
		}
	}
	return ""
}
