package upstream_test

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/shoal-dev/shoal/agent/upstream"
)

// tokenRegistry fronts a real registry with the Docker token flow: requests need
// "Authorization: Bearer <token>" with the repository's pull scope, else they get a 401 with a
// WWW-Authenticate challenge naming its own /token endpoint as the realm.
type tokenRegistry struct {
	srv   *httptest.Server
	proxy *httputil.ReverseProxy

	user, password string // the only credentials the token endpoint accepts
	anonymous      bool   // issue tokens without credentials
	anonymousScope bool   // anonymous tokens grant the requested scope (else nothing)
	redirectBlobs  string // if set, blob requests are redirected to this base URL

	mu       sync.Mutex
	tokens   map[string][]string // token → granted scopes
	requests []tokenRequest
}

type tokenRequest struct {
	user, service string
	scopes        []string
}

func newTokenRegistry(t *testing.T, backendHost string, configure func(*tokenRegistry)) *tokenRegistry {
	t.Helper()
	backend := &url.URL{Scheme: "http", Host: backendHost}
	tr := &tokenRegistry{proxy: httputil.NewSingleHostReverseProxy(backend), tokens: map[string][]string{}}
	if configure != nil {
		configure(tr)
	}
	tr.srv = httptest.NewServer(tr)
	t.Cleanup(tr.srv.Close)
	return tr
}

func (tr *tokenRegistry) host() string { return strings.TrimPrefix(tr.srv.URL, "http://") }

func (tr *tokenRegistry) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/token" {
		tr.serveToken(w, r)
		return
	}
	scope := ""
	if repo := repositoryOf(r.URL.Path); repo != "" {
		scope = "repository:" + repo + ":pull"
	}
	if !tr.authorized(r.Header.Get("Authorization"), scope) {
		challenge := fmt.Sprintf(`Bearer realm="%s/token",service="registry.test"`, tr.srv.URL)
		if scope != "" {
			challenge += fmt.Sprintf(`,scope="%s"`, scope)
		}
		w.Header().Set("WWW-Authenticate", challenge)
		writeOCIError(w, http.StatusUnauthorized, "UNAUTHORIZED", "authentication required")
		return
	}
	if tr.redirectBlobs != "" && strings.Contains(r.URL.Path, "/blobs/") {
		http.Redirect(w, r, tr.redirectBlobs+r.URL.Path, http.StatusTemporaryRedirect)
		return
	}
	r.Header.Del("Authorization")
	tr.proxy.ServeHTTP(w, r)
}

func (tr *tokenRegistry) serveToken(w http.ResponseWriter, r *http.Request) {
	user, password, basic := r.BasicAuth()
	q := r.URL.Query()
	tr.mu.Lock()
	defer tr.mu.Unlock()
	tr.requests = append(tr.requests, tokenRequest{user: user, service: q.Get("service"), scopes: q["scope"]})
	granted := q["scope"]
	switch {
	case basic && (user != tr.user || password != tr.password):
		writeOCIError(w, http.StatusUnauthorized, "UNAUTHORIZED", "bad credentials")
		return
	case !basic && !tr.anonymous:
		writeOCIError(w, http.StatusUnauthorized, "UNAUTHORIZED", "credentials required")
		return
	case !basic && !tr.anonymousScope:
		granted = nil
	}
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	token := hex.EncodeToString(b)
	tr.tokens[token] = granted
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{"token": token, "expires_in": 300})
}

func (tr *tokenRegistry) authorized(header, scope string) bool {
	token, ok := strings.CutPrefix(header, "Bearer ")
	if !ok {
		return false
	}
	tr.mu.Lock()
	defer tr.mu.Unlock()
	granted, ok := tr.tokens[token]
	return ok && (scope == "" || slices.Contains(granted, scope))
}

// revoke invalidates every token issued so far, as if they had expired.
func (tr *tokenRegistry) revoke() {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	clear(tr.tokens)
}

func (tr *tokenRegistry) tokenRequests() []tokenRequest {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return slices.Clone(tr.requests)
}

// repositoryOf extracts the repository from /v2/<repo>/manifests/... or /v2/<repo>/blobs/...
func repositoryOf(path string) string {
	rest, ok := strings.CutPrefix(path, "/v2/")
	if !ok {
		return ""
	}
	for _, kind := range []string{"/manifests/", "/blobs/"} {
		if i := strings.LastIndex(rest, kind); i > 0 {
			return rest[:i]
		}
	}
	return ""
}

func writeOCIError(w http.ResponseWriter, status int, code, message string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]any{"errors": []map[string]string{{"code": code, "message": message}}})
}

// writeAuthFile writes a docker config.json with basic credentials for one key.
func writeAuthFile(t *testing.T, key, user, password string) string {
	t.Helper()
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + password))
	data := fmt.Sprintf(`{"auths": {%q: {"auth": %q}}}`, key, auth)
	path := filepath.Join(t.TempDir(), "config.json")
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestBearerTokenFlow(t *testing.T) {
	host := startRegistry(t)
	image, img := pushImage(t, host, "test/app", "v1", 1)
	blob, digest := layerBytes(t, img)

	tests := []struct {
		name      string
		configure func(*tokenRegistry)
		authKey   string // key of the auth file entry, "" for no auth file
		password  string
		wantUser  string
	}{
		{
			name:      "credentials of the logical name",
			configure: func(tr *tokenRegistry) { tr.user, tr.password = "alice", "secret" },
			authKey:   "registry.test", password: "secret", wantUser: "alice",
		},
		{
			name:      "credentials under a URL key",
			configure: func(tr *tokenRegistry) { tr.user, tr.password = "alice", "secret" },
			authKey:   "https://registry.test/v1/", password: "secret", wantUser: "alice",
		},
		{
			name:      "anonymous token",
			configure: func(tr *tokenRegistry) { tr.anonymous, tr.anonymousScope = true, true },
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tr := newTokenRegistry(t, host, tt.configure)
			var opts []upstream.Option
			if tt.authKey != "" {
				opts = append(opts, upstream.WithAuthFile(writeAuthFile(t, tt.authKey, "alice", tt.password)))
			}
			c := newClient(tr.host(), opts...)
			ctx := testContext(t)

			m, err := c.Manifest(ctx, "registry.test", image.repo, image.tag, nil)
			if err != nil {
				t.Fatalf("Manifest: %v", err)
			}
			if m.Digest != image.digest {
				t.Errorf("digest = %s, want %s", m.Digest, image.digest)
			}
			if _, err := c.HeadManifest(ctx, "registry.test", image.repo, image.tag, nil); err != nil {
				t.Errorf("HeadManifest: %v", err)
			}
			body, _, err := c.Blob(ctx, "registry.test", image.repo, digest, 10, 100)
			if err != nil {
				t.Fatalf("Blob: %v", err)
			}
			got, err := io.ReadAll(body)
			body.Close()
			if err != nil || !bytes.Equal(got, blob[10:110]) {
				t.Errorf("blob range: %d bytes, %v", len(got), err)
			}

			requests := tr.tokenRequests()
			if len(requests) != 1 {
				t.Fatalf("%d token requests, want 1 (the handshake is cached): %+v", len(requests), requests)
			}
			req := requests[0]
			if req.user != tt.wantUser || req.service != "registry.test" ||
				!slices.Equal(req.scopes, []string{"repository:test/app:pull"}) {
				t.Errorf("token request = %+v, want user %q, service registry.test, scope repository:test/app:pull", req, tt.wantUser)
			}
		})
	}
}

func TestBearerTokenFailures(t *testing.T) {
	host := startRegistry(t)
	image, _ := pushImage(t, host, "test/app", "v1", 1)

	tests := []struct {
		name      string
		configure func(*tokenRegistry)
		authKey   string
		password  string
	}{
		{
			name:      "wrong password",
			configure: func(tr *tokenRegistry) { tr.user, tr.password = "alice", "secret" },
			authKey:   "registry.test", password: "guess",
		},
		{
			name:      "no credentials for a registry that demands them",
			configure: func(tr *tokenRegistry) { tr.user, tr.password = "alice", "secret" },
		},
		{
			// Credentials belong to the logical name; an entry for the endpoint's host is not used.
			name:      "credentials only under the endpoint host",
			configure: func(tr *tokenRegistry) { tr.user, tr.password = "alice", "secret" },
			authKey:   "ENDPOINT", password: "secret",
		},
		{
			name:      "anonymous token without access",
			configure: func(tr *tokenRegistry) { tr.anonymous = true },
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tr := newTokenRegistry(t, host, tt.configure)
			var opts []upstream.Option
			if tt.authKey != "" {
				key := strings.ReplaceAll(tt.authKey, "ENDPOINT", tr.host())
				opts = append(opts, upstream.WithAuthFile(writeAuthFile(t, key, "alice", tt.password)))
			}
			c := newClient(tr.host(), opts...)
			_, err := c.Manifest(testContext(t), "registry.test", image.repo, image.tag, nil)
			if !errors.Is(err, upstream.ErrUnauthorized) {
				t.Fatalf("err = %v, want ErrUnauthorized", err)
			}
			if errors.Is(err, upstream.ErrUnavailable) || errors.Is(err, upstream.ErrNotFound) {
				t.Errorf("err %v matches another kind too", err)
			}
			if !strings.Contains(err.Error(), "registry.test") || !strings.Contains(err.Error(), image.repo) {
				t.Errorf("message %q does not say which registry and repository", err)
			}
		})
	}
}

func TestAuthenticationCache(t *testing.T) {
	host := startRegistry(t)
	app, _ := pushImage(t, host, "test/app", "v1", 1)
	other, _ := pushImage(t, host, "test/other", "v1", 1)
	anonymous := func(tr *tokenRegistry) { tr.anonymous, tr.anonymousScope = true, true }

	t.Run("one handshake per repository", func(t *testing.T) {
		tr := newTokenRegistry(t, host, anonymous)
		c := newClient(tr.host())
		for range 3 {
			for _, p := range []pushed{app, other} {
				if _, err := c.Manifest(testContext(t), "registry.test", p.repo, p.tag, nil); err != nil {
					t.Fatal(err)
				}
			}
		}
		var scopes []string
		for _, r := range tr.tokenRequests() {
			scopes = append(scopes, r.scopes...)
		}
		slices.Sort(scopes)
		if want := []string{"repository:test/app:pull", "repository:test/other:pull"}; !slices.Equal(scopes, want) {
			t.Errorf("token scopes requested: %v, want %v", scopes, want)
		}
	})

	t.Run("concurrent requests share one handshake", func(t *testing.T) {
		tr := newTokenRegistry(t, host, anonymous)
		c := newClient(tr.host())
		var wg sync.WaitGroup
		errs := make(chan error, 20)
		for range 20 {
			wg.Go(func() {
				_, err := c.Manifest(testContext(t), "registry.test", app.repo, app.tag, nil)
				errs <- err
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Error(err)
			}
		}
		if n := len(tr.tokenRequests()); n != 1 {
			t.Errorf("%d token requests, want 1", n)
		}
	})

	t.Run("no cache", func(t *testing.T) {
		tr := newTokenRegistry(t, host, anonymous)
		c := newClient(tr.host(), upstream.WithAuthCacheTTL(0))
		for range 3 {
			if _, err := c.Manifest(testContext(t), "registry.test", app.repo, app.tag, nil); err != nil {
				t.Fatal(err)
			}
		}
		if n := len(tr.tokenRequests()); n != 3 {
			t.Errorf("%d token requests, want 3", n)
		}
	})

	t.Run("expired token is refreshed on 401", func(t *testing.T) {
		tr := newTokenRegistry(t, host, anonymous)
		c := newClient(tr.host())
		if _, err := c.Manifest(testContext(t), "registry.test", app.repo, app.tag, nil); err != nil {
			t.Fatal(err)
		}
		tr.revoke()
		if _, err := c.Manifest(testContext(t), "registry.test", app.repo, app.tag, nil); err != nil {
			t.Fatalf("after the token expired: %v", err)
		}
		if n := len(tr.tokenRequests()); n != 2 {
			t.Errorf("%d token requests, want 2", n)
		}
	})
}

func TestBlobRedirect(t *testing.T) {
	host := startRegistry(t)
	image, img := pushImage(t, host, "test/app", "v1", 1)
	blob, digest := layerBytes(t, img)

	// "Object storage": another host that serves the blob (from the registry, unauthenticated)
	// and records the Authorization headers it was sent.
	var mu sync.Mutex
	var seen []string
	backend := httputil.NewSingleHostReverseProxy(&url.URL{Scheme: "http", Host: host})
	storage := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.Header.Get("Authorization"))
		mu.Unlock()
		backend.ServeHTTP(w, r)
	}))
	t.Cleanup(storage.Close)
	tr := newTokenRegistry(t, host, func(tr *tokenRegistry) {
		tr.user, tr.password = "alice", "secret"
		tr.redirectBlobs = storage.URL
	})
	c := newClient(tr.host(), upstream.WithAuthFile(writeAuthFile(t, "registry.test", "alice", "secret")))
	ctx := testContext(t)

	for _, r := range []struct{ offset, length int64 }{{0, -1}, {100, 1000}} {
		body, total, err := c.Blob(ctx, "registry.test", image.repo, digest, r.offset, r.length)
		if err != nil {
			t.Fatalf("Blob(%d, %d): %v", r.offset, r.length, err)
		}
		got, err := io.ReadAll(body)
		body.Close()
		want := blob[r.offset:]
		if r.length > 0 {
			want = want[:r.length]
		}
		if err != nil || !bytes.Equal(got, want) || total != int64(len(blob)) {
			t.Errorf("Blob(%d, %d) = %d bytes of %d, %v", r.offset, r.length, len(got), total, err)
		}
	}
	if size, err := c.HeadBlob(ctx, "registry.test", image.repo, digest); err != nil || size != int64(len(blob)) {
		t.Errorf("HeadBlob = %d, %v", size, err)
	}

	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 3 {
		t.Errorf("storage saw %d requests, want 3", len(seen))
	}
	for _, auth := range seen {
		if auth != "" {
			t.Errorf("the registry's Authorization header %q was sent to the redirect target", auth)
		}
	}
}
