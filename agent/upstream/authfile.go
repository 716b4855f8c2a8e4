package upstream

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
)

// AuthFileKeychain returns a keychain that reads credentials from a docker config.json
// ({"auths": {"registry.test": {"auth": "base64(user:pass)"}}}; also "username"/"password",
// "identitytoken", "registrytoken"). The file is read on every lookup, so a rotated Kubernetes
// Secret is picked up without a restart; lookups are rare because authenticated transports are
// cached. Credential helpers ("credsStore", "credHelpers") are not run: an agent must not execute
// programs named by a file. A registry without an entry is anonymous.
//
// Keys are matched against the logical registry name: "registry.test/team/app", then
// "registry.test/team", then "registry.test"; a key may carry a scheme ("https://registry.test/v1/").
// Docker Hub is found under any of its names (docker.io, index.docker.io, https://index.docker.io/v1/).
func AuthFileKeychain(path string) authn.Keychain { return authFile{path: path} }

type authFile struct{ path string }

func (a authFile) Resolve(target authn.Resource) (authn.Authenticator, error) {
	data, err := os.ReadFile(a.path)
	if err != nil {
		return nil, fmt.Errorf("read registry auth file: %w", err)
	}
	var cfg struct {
		Auths map[string]authn.AuthConfig `json:"auths"`
	}
	if err := json.Unmarshal(data, &cfg); err != nil {
		return nil, fmt.Errorf("parse registry auth file %s: %w", a.path, err)
	}
	byKey := make(map[string]authn.AuthConfig, len(cfg.Auths))
	for key, ac := range cfg.Auths {
		byKey[normalizeAuthKey(key)] = ac
	}
	for _, key := range authKeys(target) {
		if ac, ok := byKey[key]; ok && ac != (authn.AuthConfig{}) {
			return authn.FromConfig(ac), nil
		}
	}
	return authn.Anonymous, nil
}

// authKeys lists the keys to try for a target, most specific first.
func authKeys(target authn.Resource) []string {
	registry := target.RegistryStr()
	if isDockerHub(registry) {
		registry = "docker.io"
	}
	var keys []string
	repo := strings.TrimPrefix(target.String(), target.RegistryStr())
	for repo = strings.Trim(repo, "/"); repo != ""; {
		keys = append(keys, registry+"/"+repo)
		i := strings.LastIndexByte(repo, '/')
		if i < 0 {
			break
		}
		repo = repo[:i]
	}
	return append(keys, registry)
}

// normalizeAuthKey drops a scheme and the legacy "/v1/" suffix, and folds Docker Hub's names.
func normalizeAuthKey(key string) string {
	if _, rest, ok := strings.Cut(key, "://"); ok {
		key = rest
	}
	key = strings.TrimSuffix(strings.TrimSuffix(key, "/"), "/v1")
	host, path, _ := strings.Cut(key, "/")
	if isDockerHub(host) {
		host = "docker.io"
	}
	if path != "" {
		return host + "/" + path
	}
	return host
}
