package resolve

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

// DefaultBasicLifetime is how long credentials passed on for a basic-auth registry are kept
// before the controller writes them again (and how long after the last need they go).
const DefaultBasicLifetime = 10 * time.Minute

// defaultTokenLifetime is what a token response without expires_in means (the Docker token
// specification's default).
const defaultTokenLifetime = time.Minute

// Credential is what agents get to pull one repository: a bearer token scoped to pulling it,
// or, from a registry that only does basic authentication, the credentials themselves.
type Credential struct {
	// Token is a registry token (sent as "Authorization: Bearer").
	Token string
	// Username and Password are basic credentials, set only when the registry offers no token.
	Username, Password string
	// Expires is when the token stops working, or when basic credentials are to be written
	// again.
	Expires time.Time
}

// None reports whether the registry needs nothing: it answers anonymously, or the pull
// secrets have nothing for it.
func (c Credential) None() bool { return c.Token == "" && c.Username == "" }

// Basic reports whether c is basic credentials rather than a token.
func (c Credential) Basic() bool { return c.Username != "" }

// PullCredential exchanges the pull secrets' credentials for repository (registry/path) for
// what agents need to pull it, and nothing more: a token scoped to repository:<path>:pull
// from a registry with token authentication; the credentials themselves from one with basic
// authentication only (there is nothing narrower to give); nothing from a registry that
// answers anonymously or when the secrets hold nothing for it.
func (r *Resolver) PullCredential(ctx context.Context, repository string, pullSecrets [][]byte) (Credential, error) {
	var opts []name.Option
	if registry, err := normalizeRegistry(strings.SplitN(repository, "/", 2)[0]); err == nil && r.transport.insecure[registry] {
		opts = append(opts, name.Insecure)
	}
	repo, err := name.NewRepository(repository, opts...)
	if err != nil {
		return Credential{}, fmt.Errorf("repository %q: %w", repository, err)
	}
	kc, err := NewKeychain(pullSecrets...)
	if err != nil {
		return Credential{}, err
	}
	auth, err := authn.Resolve(ctx, kc, repo)
	if err != nil {
		return Credential{}, fmt.Errorf("credentials for %s: %w", repo, err)
	}
	if auth == authn.Anonymous {
		return Credential{}, nil
	}
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	challenge, err := transport.Ping(ctx, repo.Registry, r.transport)
	if err != nil {
		return Credential{}, fmt.Errorf("ask %s how it authenticates: %w", repo.Registry, err)
	}
	now := r.now()
	switch strings.ToLower(challenge.Scheme) {
	case "bearer":
		tok, err := transport.Exchange(ctx, repo.Registry, auth, r.transport, []string{repo.Scope(transport.PullScope)}, challenge)
		if err != nil {
			return Credential{}, fmt.Errorf("exchange credentials for a pull token of %s: %w", repo, err)
		}
		token := tok.Token
		if token == "" {
			token = tok.AccessToken
		}
		if token == "" {
			return Credential{}, fmt.Errorf("%s sent no token for %s", repo.Registry, repo)
		}
		lifetime := time.Duration(tok.ExpiresIn) * time.Second
		if lifetime <= 0 {
			lifetime = defaultTokenLifetime
		}
		return Credential{Token: token, Expires: now.Add(lifetime)}, nil
	case "basic":
		ac, err := authn.Authorization(ctx, auth)
		if err != nil {
			return Credential{}, fmt.Errorf("credentials for %s: %w", repo, err)
		}
		if ac.Username == "" {
			return Credential{}, fmt.Errorf("%s only does basic authentication and the pull secret has no user name for it", repo.Registry)
		}
		return Credential{Username: ac.Username, Password: ac.Password, Expires: now.Add(DefaultBasicLifetime)}, nil
	}
	return Credential{}, nil // anonymous
}
