// Package pulltoken is the format of the Secrets through which the controller hands agents what
// they need to pull one private repository (docs/security.md): a short-lived token scoped to
// pulling it, or, from a registry with basic authentication only, the credentials themselves.
// There is one Secret per repository in Shoal's own namespace, named after the repository, so
// that any agent that fetches the repository's blobs (a node that holds it, a seeder of its
// segments) finds it without being told.
package pulltoken

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
)

// Labels and annotations of a pull-token Secret.
const (
	// Label marks the Secrets of this package, for listing them.
	Label = "shoal.dev/pull-token"
	// RepositoryAnnotation names the repository, for people.
	RepositoryAnnotation = "shoal.dev/repository"
	// IssuedAnnotation and ExpiresAnnotation bound the credential's life (RFC 3339).
	IssuedAnnotation  = "shoal.dev/issued-at"
	ExpiresAnnotation = "shoal.dev/expires-at"
)

// Name is the Secret's name for repository (registry/path): the same on the controller and on
// every agent, whatever the spelling of Docker Hub's name.
func Name(repository string) string {
	sum := sha256.Sum256([]byte(Canonical(repository)))
	return "shoal-pull-" + hex.EncodeToString(sum[:])[:32]
}

// Canonical folds a repository's registry to one spelling: lower case, and docker.io for every
// name of Docker Hub.
func Canonical(repository string) string {
	registry, path, ok := strings.Cut(repository, "/")
	if !ok {
		return repository
	}
	registry = strings.ToLower(registry)
	switch registry {
	case "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com":
		registry = "docker.io"
	}
	return registry + "/" + path
}

// Credential is a Secret's content.
type Credential struct {
	// Repository is the repository it is for.
	Repository string
	// Token is a registry token; Username and Password basic credentials (set only when the
	// registry offers no token).
	Token, Username, Password string
	// Issued and Expires bound its life.
	Issued, Expires time.Time
}

// Secret returns the Secret, in namespace, that carries c: a kubernetes.io/dockerconfigjson
// Secret whose one entry is for the repository's registry.
func Secret(namespace string, c Credential) (*corev1.Secret, error) {
	registry, _, _ := strings.Cut(Canonical(c.Repository), "/")
	entry := map[string]string{}
	switch {
	case c.Token != "":
		entry["registrytoken"] = c.Token
	case c.Username != "":
		entry["auth"] = base64.StdEncoding.EncodeToString([]byte(c.Username + ":" + c.Password))
	default:
		return nil, errors.New("pull token: no token and no credentials")
	}
	data, err := json.Marshal(map[string]any{"auths": map[string]any{registry: entry}})
	if err != nil {
		return nil, err
	}
	s := &corev1.Secret{Type: corev1.SecretTypeDockerConfigJson, Data: map[string][]byte{corev1.DockerConfigJsonKey: data}}
	s.Name, s.Namespace = Name(c.Repository), namespace
	s.Labels = map[string]string{Label: "true"}
	s.Annotations = map[string]string{
		RepositoryAnnotation: Canonical(c.Repository),
		IssuedAnnotation:     c.Issued.UTC().Format(time.RFC3339),
		ExpiresAnnotation:    c.Expires.UTC().Format(time.RFC3339),
	}
	return s, nil
}

// Parse reads a Secret written by Secret.
func Parse(s *corev1.Secret) (Credential, error) {
	c := Credential{Repository: s.Annotations[RepositoryAnnotation]}
	var err error
	if c.Issued, err = time.Parse(time.RFC3339, s.Annotations[IssuedAnnotation]); err != nil {
		return Credential{}, fmt.Errorf("pull token %s: %s: %w", s.Name, IssuedAnnotation, err)
	}
	if c.Expires, err = time.Parse(time.RFC3339, s.Annotations[ExpiresAnnotation]); err != nil {
		return Credential{}, fmt.Errorf("pull token %s: %s: %w", s.Name, ExpiresAnnotation, err)
	}
	var cfg struct {
		Auths map[string]struct {
			Auth          string `json:"auth"`
			RegistryToken string `json:"registrytoken"`
		} `json:"auths"`
	}
	if err := json.Unmarshal(s.Data[corev1.DockerConfigJsonKey], &cfg); err != nil {
		return Credential{}, fmt.Errorf("pull token %s: %w", s.Name, err)
	}
	if len(cfg.Auths) != 1 {
		return Credential{}, fmt.Errorf("pull token %s: %d registry entries, want 1", s.Name, len(cfg.Auths))
	}
	for _, e := range cfg.Auths {
		if e.RegistryToken != "" {
			c.Token = e.RegistryToken
			return c, nil
		}
		raw, err := base64.StdEncoding.DecodeString(e.Auth)
		if err != nil {
			return Credential{}, fmt.Errorf("pull token %s: auth: %w", s.Name, err)
		}
		user, password, ok := strings.Cut(string(raw), ":")
		if !ok || user == "" {
			return Credential{}, fmt.Errorf("pull token %s: auth is not user:password", s.Name)
		}
		c.Username, c.Password = user, password
	}
	return c, nil
}

// RefreshAt is when a credential should be replaced: halfway through its life, so that an
// agent that reads it at any moment has at least half of it left.
func (c Credential) RefreshAt() time.Time {
	return c.Issued.Add(c.Expires.Sub(c.Issued) / 2)
}
