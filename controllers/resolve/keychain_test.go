package resolve

import (
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
)

// userFor returns the user name the keychain sends for repository, "" for anonymous.
func userFor(t *testing.T, kc authn.Keychain, repository string) string {
	t.Helper()
	repo, err := name.NewRepository(repository)
	if err != nil {
		t.Fatal(err)
	}
	auth, err := kc.Resolve(repo)
	if err != nil {
		t.Fatal(err)
	}
	ac, err := auth.Authorization()
	if err != nil {
		t.Fatal(err)
	}
	return ac.Username
}

func TestKeychainMatchesAsKubelet(t *testing.T) {
	tests := []struct {
		name    string
		secrets [][]byte
		repo    string
		want    string // user, "" for anonymous
	}{
		{"host", [][]byte{dockerConfigJSON("registry.test", "u", "p")}, "registry.test/team/app", "u"},
		{"https scheme and /v1/", [][]byte{dockerConfigJSON("https://registry.test/v1/", "u", "p")}, "registry.test/app", "u"},
		{"http scheme and /v2/", [][]byte{dockerConfigJSON("http://registry.test/v2/", "u", "p")}, "registry.test/app", "u"},
		{"host case", [][]byte{dockerConfigJSON("Registry.Test", "u", "p")}, "registry.test/app", "u"},
		{"other host", [][]byte{dockerConfigJSON("other.test", "u", "p")}, "registry.test/app", ""},
		{"port must match", [][]byte{dockerConfigJSON("registry.test:5000", "u", "p")}, "registry.test/app", ""},
		{"port", [][]byte{dockerConfigJSON("registry.test:5000", "u", "p")}, "registry.test:5000/app", "u"},
		{"no port in key, port in reference", [][]byte{dockerConfigJSON("registry.test", "u", "p")}, "registry.test:5000/app", ""},
		{"path prefix", [][]byte{dockerConfigJSON("registry.test/team", "u", "p")}, "registry.test/team/app", "u"},
		{"path prefix elsewhere", [][]byte{dockerConfigJSON("registry.test/team", "u", "p")}, "registry.test/other/app", ""},
		{"glob label", [][]byte{dockerConfigJSON("*.registry.test", "u", "p")}, "eu.registry.test/app", "u"},
		{"glob matches one label only", [][]byte{dockerConfigJSON("*.registry.test", "u", "p")}, "a.eu.registry.test/app", ""},
		{"glob does not match the bare domain", [][]byte{dockerConfigJSON("*.registry.test", "u", "p")}, "registry.test/app", ""},
		{"Docker Hub as docker.io, short reference", [][]byte{dockerConfigJSON("docker.io", "u", "p")}, "nginx", "u"},
		{"Docker Hub legacy key", [][]byte{dockerConfigJSON("https://index.docker.io/v1/", "u", "p")}, "docker.io/library/nginx", "u"},
		{"Docker Hub as registry-1", [][]byte{dockerConfigJSON("registry-1.docker.io", "u", "p")}, "team/app", "u"},
		{"most specific path wins", [][]byte{
			dockerConfigJSON("registry.test", "general", "p"),
			dockerConfigJSON("registry.test/team", "team", "p"),
		}, "registry.test/team/app", "team"},
		{"less specific when the path does not apply", [][]byte{
			dockerConfigJSON("registry.test/team", "team", "p"),
			dockerConfigJSON("registry.test", "general", "p"),
		}, "registry.test/other", "general"},
		{"same key: first secret wins", [][]byte{
			dockerConfigJSON("registry.test", "first", "p"),
			dockerConfigJSON("https://registry.test", "second", "p"),
		}, "registry.test/app", "first"},
		{"legacy dockercfg", [][]byte{dockerCfg("registry.test", "u", "p")}, "registry.test/app", "u"},
		{"username and password fields", [][]byte{[]byte(`{"auths":{"registry.test":{"username":"u","password":"p"}}}`)}, "registry.test/app", "u"},
		{"empty entry is skipped for a less specific one", [][]byte{[]byte(`{"auths":{"registry.test/team":{},"registry.test":{"username":"u","password":"p"}}}`)}, "registry.test/team/app", "u"},
		{"no secrets", nil, "registry.test/app", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			kc, err := NewKeychain(tt.secrets...)
			if err != nil {
				t.Fatal(err)
			}
			if got := userFor(t, kc, tt.repo); got != tt.want {
				t.Errorf("user %q for %s, want %q", got, tt.repo, tt.want)
			}
		})
	}
}

func TestKeychainRefusesMalformedSecrets(t *testing.T) {
	for _, secret := range []string{
		`not json`,
		`["a list"]`,
		`{"auths": ["a list"]}`,
		`{"auths": {"registry.test": {"auth": "not base64!"}}}`,
		`{"auths": {"registry.test": {"auth": "bm9jb2xvbg=="}}}`, // "nocolon"
		`{"registry.test": "not an object"}`,
		`{"auths": {"https://": {"username": "u", "password": "p"}}}`,
	} {
		if _, err := NewKeychain([]byte(`{}`), []byte(secret)); err == nil || !strings.Contains(err.Error(), "pull secret 2") {
			t.Errorf("NewKeychain(%s) = %v, want an error naming pull secret 2", secret, err)
		}
	}
}

func TestCredentialsID(t *testing.T) {
	a := credentialsID(&authn.AuthConfig{Username: "a", Password: "bc"})
	b := credentialsID(&authn.AuthConfig{Username: "ab", Password: "c"})
	if a == b {
		t.Error("credentials that concatenate alike have the same ID")
	}
	if credentialsID(nil) != "anonymous" || credentialsID(&authn.AuthConfig{}) != "anonymous" {
		t.Error("no credentials is not anonymous")
	}
	if strings.Contains(a, "bc") {
		t.Error("the ID holds the password")
	}
}
