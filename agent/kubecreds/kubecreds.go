// Package kubecreds is the agent's keychain for private repositories in Kubernetes: the pull
// tokens the controller writes into Shoal's own namespace, one Secret per repository named after
// it (internal/pulltoken, docs/security.md). Any agent that fetches a repository's blobs, a node
// that holds them or a seeder of their segments, finds its token by name with one GET; it never
// lists or watches Secrets, and reads no namespace but Shoal's.
//
// The pull path must not wait on the API server: a lookup is bounded (LookupTimeout), an
// answer is remembered (a token until shortly before it expires, its absence for a while), and
// after the API server failed to answer, none is asked for a while; the agent then pulls with
// its other credentials, as it would without this keychain.
package kubecreds

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/shoal-dev/shoal/agent/upstream"
	"github.com/shoal-dev/shoal/internal/pulltoken"
)

// The agent reads the pull tokens in Shoal's namespace, by name; config/rbac/agent holds it to
// that namespace (a Role, not a ClusterRole).
// +kubebuilder:rbac:groups="",namespace=shoal-system,resources=secrets,verbs=get

// Bounds of the keychain.
const (
	// LookupTimeout bounds one GET of a token.
	LookupTimeout = 2 * time.Second
	// MissingTTL is how long a repository without a token is not looked up again.
	MissingTTL = 30 * time.Second
	// OutageTTL is how long no lookup is made after the API server failed to answer one.
	OutageTTL = 30 * time.Second
	// expiryMargin: a token is used no closer than this to its expiry.
	expiryMargin = 30 * time.Second
)

// Keychain finds pull tokens in a namespace; see the package documentation.
type Keychain struct {
	secrets   func(ctx context.Context, name string) (*corev1.Secret, error)
	namespace string
	log       *slog.Logger
	now       func() time.Time

	lookups *prometheus.CounterVec // by result

	mu        sync.Mutex
	known     map[string]entry // by Secret name
	downUntil time.Time        // no lookups before this: the API server did not answer
}

type entry struct {
	auth  authn.Authenticator // nil: no token for the repository
	until time.Time
}

// Results of a lookup, the result label of shoal_kubecreds_lookups_total.
const (
	lookupFound   = "found"
	lookupMissing = "missing" // no Secret, or an expired or malformed one
	lookupError   = "error"   // the API server did not answer
)

// New returns a keychain reading Secrets of namespace through restCfg; nothing is contacted
// before the first lookup. It is a prometheus.Collector of its metrics.
func New(restCfg *rest.Config, namespace string, log *slog.Logger) (*Keychain, error) {
	if namespace == "" {
		return nil, errors.New("kubecreds: no namespace")
	}
	cs, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		return nil, fmt.Errorf("kubecreds: %w", err)
	}
	get := func(ctx context.Context, name string) (*corev1.Secret, error) {
		return cs.CoreV1().Secrets(namespace).Get(ctx, name, metav1.GetOptions{})
	}
	return newKeychain(get, namespace, log, time.Now), nil
}

// Describe implements prometheus.Collector.
func (k *Keychain) Describe(ch chan<- *prometheus.Desc) { k.lookups.Describe(ch) }

// Collect implements prometheus.Collector.
func (k *Keychain) Collect(ch chan<- prometheus.Metric) { k.lookups.Collect(ch) }

func newKeychain(get func(context.Context, string) (*corev1.Secret, error), namespace string, log *slog.Logger, now func() time.Time) *Keychain {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	lookups := prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "shoal", Subsystem: "kubecreds", Name: "lookups_total",
		Help: "Pull-token lookups in Shoal's namespace (API requests; answers remembered are not counted), by result: found, missing, error.",
	}, []string{"result"})
	for _, r := range []string{lookupFound, lookupMissing, lookupError} {
		lookups.WithLabelValues(r)
	}
	return &Keychain{secrets: get, namespace: namespace, log: log, now: now, known: map[string]entry{}, lookups: lookups}
}

// Resolve implements authn.Keychain.
func (k *Keychain) Resolve(target authn.Resource) (authn.Authenticator, error) {
	return k.ResolveContext(context.Background(), target)
}

// ResolveContext implements authn.ContextKeychain: the token for target's repository, or
// authn.Anonymous when there is none (or the API server cannot say), so that the next keychain
// is asked.
func (k *Keychain) ResolveContext(ctx context.Context, target authn.Resource) (authn.Authenticator, error) {
	name := pulltoken.Name(target.String())
	now := k.now()
	k.mu.Lock()
	e, ok := k.known[name]
	down := now.Before(k.downUntil)
	k.mu.Unlock()
	if ok && now.Before(e.until) {
		return orAnonymous(e.auth), nil
	}
	if down {
		return authn.Anonymous, nil
	}
	ctx, cancel := context.WithTimeout(ctx, LookupTimeout)
	defer cancel()
	s, err := k.secrets(ctx, name)
	switch {
	case apierrors.IsNotFound(err):
		k.lookups.WithLabelValues(lookupMissing).Inc()
		k.remember(name, entry{until: now.Add(MissingTTL)})
		return authn.Anonymous, nil
	case err != nil:
		k.lookups.WithLabelValues(lookupError).Inc()
		k.mu.Lock()
		k.downUntil = now.Add(OutageTTL)
		k.mu.Unlock()
		k.log.Warn("pull token lookup failed; pulling without it for a while", "repository", target.String(),
			"secret", k.namespace+"/"+name, "retry_in", OutageTTL, "error", err)
		return authn.Anonymous, nil
	}
	c, err := pulltoken.Parse(s)
	if err != nil {
		k.lookups.WithLabelValues(lookupMissing).Inc()
		k.log.Warn("malformed pull token", "secret", k.namespace+"/"+name, "error", err)
		k.remember(name, entry{until: now.Add(MissingTTL)})
		return authn.Anonymous, nil
	}
	until := c.Expires.Add(-expiryMargin)
	if !now.Before(until) {
		k.lookups.WithLabelValues(lookupMissing).Inc()
		k.remember(name, entry{until: now.Add(MissingTTL)}) // expired: nobody renews it
		return authn.Anonymous, nil
	}
	k.lookups.WithLabelValues(lookupFound).Inc()
	auth := &token{Authenticator: authn.FromConfig(authn.AuthConfig{RegistryToken: c.Token, Username: c.Username, Password: c.Password}), until: until}
	k.remember(name, entry{auth: auth, until: until})
	return auth, nil
}

func (k *Keychain) remember(name string, e entry) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.known[name] = e
}

func orAnonymous(a authn.Authenticator) authn.Authenticator {
	if a == nil {
		return authn.Anonymous
	}
	return a
}

// token is a pull token, which the upstream client uses until it expires.
type token struct {
	authn.Authenticator
	until time.Time
}

var _ upstream.Expiring = (*token)(nil)

// Expires implements upstream.Expiring.
func (t *token) Expires() time.Time { return t.until }
