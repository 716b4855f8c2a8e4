package upstream_test

import (
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"

	"github.com/shoal-dev/shoal/agent/upstream"
)

func TestAuthFileKeychain(t *testing.T) {
	type entry struct{ key, user string }
	tests := []struct {
		name    string
		entries []entry
		target  string // repository in name.Repository syntax
		want    string // user, "" for anonymous
	}{
		{"plain host", []entry{{"registry.test", "alice"}}, "registry.test/app", "alice"},
		{"URL key", []entry{{"https://registry.test", "alice"}}, "registry.test/app", "alice"},
		{"host with port", []entry{{"registry.test:5000", "alice"}, {"registry.test", "bob"}}, "registry.test:5000/app", "alice"},
		{"most specific namespace wins", []entry{{"registry.test", "alice"}, {"registry.test/team", "bob"}}, "registry.test/team/app", "bob"},
		{"namespace does not match a prefix of a name", []entry{{"registry.test/te", "bob"}}, "registry.test/team/app", ""},
		{"docker hub legacy key", []entry{{"https://index.docker.io/v1/", "alice"}}, "docker.io/library/alpine", "alice"},
		{"docker hub short key", []entry{{"docker.io", "alice"}}, "index.docker.io/library/alpine", "alice"},
		{"other registry", []entry{{"registry.test", "alice"}}, "ghcr.io/app", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			auths := map[string]any{}
			for _, e := range tt.entries {
				auths[e.key] = map[string]string{"username": e.user, "password": "pw"}
			}
			data, _ := json.Marshal(map[string]any{"auths": auths})
			path := filepath.Join(t.TempDir(), "config.json")
			if err := os.WriteFile(path, data, 0o600); err != nil {
				t.Fatal(err)
			}
			repo, err := name.NewRepository(tt.target)
			if err != nil {
				t.Fatal(err)
			}
			auth, err := upstream.AuthFileKeychain(path).Resolve(repo)
			if err != nil {
				t.Fatal(err)
			}
			cfg, err := authn.Authorization(t.Context(), auth)
			if err != nil {
				t.Fatal(err)
			}
			if cfg.Username != tt.want {
				t.Errorf("user = %q, want %q", cfg.Username, tt.want)
			}
		})
	}

	t.Run("unreadable file", func(t *testing.T) {
		repo, _ := name.NewRepository("registry.test/app")
		if _, err := upstream.AuthFileKeychain(filepath.Join(t.TempDir(), "missing.json")).Resolve(repo); err == nil {
			t.Error("no error for a missing auth file")
		}
	})

	for name, content := range map[string]string{"broken": "{not json", "missing": ""} {
		t.Run(name+" file fails the request as unauthorized", func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "config.json")
			if content != "" {
				if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			host := fakeRegistry(t, func(w http.ResponseWriter, r *http.Request) {})
			_, err := newClient(host, upstream.WithAuthFile(path)).Manifest(testContext(t), "registry.test", "test/app", "v1", nil)
			if !errors.Is(err, upstream.ErrUnauthorized) || !strings.Contains(err.Error(), path) {
				t.Errorf("err = %v, want ErrUnauthorized naming %s", err, path)
			}
		})
	}
}
