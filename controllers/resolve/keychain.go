package resolve

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/url"
	"path"
	"slices"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
)

// NewKeychain returns the credentials of Kubernetes pull secrets, each given as the bytes of its
// ".dockerconfigjson" ({"auths": {"registry.test": {...}}}, type kubernetes.io/dockerconfigjson)
// or of its legacy ".dockercfg" ({"registry.test": {...}}, type kubernetes.io/dockercfg). An entry
// has "auth" (base64 of user:password) or "username" and "password"; "identitytoken" and
// "registrytoken" are honoured too.
//
// Entries are matched against a repository as kubelet matches them: a key is a host[:port] with an
// optional path prefix ("registry.test", "registry.test:5000/team", "*.registry.test"), with or
// without "https://" or "http://" and a "/v1/" or "/v2/" suffix; a "*" matches one label of the
// host; the port must be the same; the key's path must be a prefix of the repository's. Docker
// Hub's names (docker.io, index.docker.io, registry-1.docker.io) are one registry. Of several
// matching keys the most specific wins (kubelet's order: keys sorted in reverse), and of
// the same key in several secrets the first secret's. A repository that no key matches is
// accessed anonymously.
//
// Kubelet tries each matching credential in turn until one is accepted; this keychain returns one.
func NewKeychain(secrets ...[]byte) (authn.Keychain, error) {
	var kc keychain
	for i, data := range secrets {
		entries, err := parsePullSecret(data)
		if err != nil {
			return nil, fmt.Errorf("pull secret %d: %w", i+1, err)
		}
		for key, ac := range entries {
			c, err := parseCredentialKey(key)
			if err != nil {
				return nil, fmt.Errorf("pull secret %d: %w", i+1, err)
			}
			if ac == (authn.AuthConfig{}) {
				continue // nothing to send: a less specific key may have credentials
			}
			c.auth, c.secret = ac, i
			kc = append(kc, c)
		}
	}
	slices.SortStableFunc(kc, func(a, b credential) int {
		if c := strings.Compare(b.key, a.key); c != 0 {
			return c
		}
		return a.secret - b.secret
	})
	return kc, nil
}

// parsePullSecret reads the registry entries of a .dockerconfigjson or a .dockercfg.
func parsePullSecret(data []byte) (map[string]authn.AuthConfig, error) {
	var top map[string]json.RawMessage
	if err := json.Unmarshal(data, &top); err != nil {
		return nil, fmt.Errorf("not a .dockerconfigjson or .dockercfg (a JSON object): %w", err)
	}
	entries := data
	if auths, ok := top["auths"]; ok {
		entries = auths
	}
	var out map[string]authn.AuthConfig
	if err := json.Unmarshal(entries, &out); err != nil {
		return nil, fmt.Errorf("registry entries: %w", err)
	}
	return out, nil
}

// credential is one registry entry of a pull secret.
type credential struct {
	key    string // host[:port][/path], as kubelet keys it, for ordering
	host   string // hostname, maybe with "*" labels, Docker Hub folded to index.docker.io
	port   string
	path   string // "" or "/team"
	auth   authn.AuthConfig
	secret int // index of the secret it came from
}

// parseCredentialKey parses a pull secret's registry key as kubelet does.
func parseCredentialKey(key string) (credential, error) {
	raw := key
	if !strings.HasPrefix(key, "https://") && !strings.HasPrefix(key, "http://") {
		key = "https://" + key
	}
	u, err := url.Parse(key)
	if err != nil || u.Hostname() == "" {
		return credential{}, fmt.Errorf("registry key %q is not a host[:port][/path]", truncate(raw))
	}
	p := u.Path
	if strings.HasPrefix(p, "/v1/") || strings.HasPrefix(p, "/v2/") {
		p = p[3:]
	}
	if p == "/" {
		p = ""
	}
	c := credential{host: foldDockerHub(strings.ToLower(u.Hostname())), port: u.Port(), path: p}
	c.key = c.host
	if c.port != "" {
		c.key += ":" + c.port
	}
	c.key += c.path
	return c, nil
}

// matches reports whether the credential applies to a repository on registry (host[:port]) at
// repoPath ("/team/app").
func (c credential) matches(host, port, repoPath string) bool {
	if c.port != port || !strings.HasPrefix(repoPath, c.path) {
		return false
	}
	want, got := strings.Split(c.host, "."), strings.Split(host, ".")
	if len(want) != len(got) {
		return false
	}
	for i := range want {
		if ok, err := path.Match(want[i], got[i]); err != nil || !ok {
			return false
		}
	}
	return true
}

// keychain is the credentials of pull secrets, most specific first.
type keychain []credential

// Resolve implements authn.Keychain.
func (kc keychain) Resolve(target authn.Resource) (authn.Authenticator, error) {
	registry := target.RegistryStr()
	u, err := url.Parse("https://" + registry)
	if err != nil {
		return nil, fmt.Errorf("look up credentials: registry %q: %w", registry, err)
	}
	host, port := foldDockerHub(strings.ToLower(u.Hostname())), u.Port()
	repoPath := ""
	if repo, ok := target.(name.Repository); ok {
		repoPath = "/" + repo.RepositoryStr()
	}
	for _, c := range kc {
		if c.matches(host, port, repoPath) {
			return authn.FromConfig(c.auth), nil
		}
	}
	return authn.Anonymous, nil
}

// foldDockerHub names Docker Hub as go-containerregistry does.
func foldDockerHub(host string) string {
	switch host {
	case "docker.io", "index.docker.io", "registry-1.docker.io":
		return name.DefaultRegistry
	}
	return host
}

// credentialsID identifies the credentials an authenticator sends, for cache keys: a hash, so
// that secrets are not kept in keys, and "anonymous" for none.
func credentialsID(ac *authn.AuthConfig) string {
	if ac == nil || *ac == (authn.AuthConfig{}) {
		return "anonymous"
	}
	h := sha256.New()
	for _, field := range []string{ac.Username, ac.Password, ac.IdentityToken, ac.RegistryToken} {
		fmt.Fprintf(h, "%d:%s", len(field), field)
	}
	return hex.EncodeToString(h.Sum(nil))
}
