package controllers

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/shoal-dev/shoal/controllers/resolve"
	"github.com/shoal-dev/shoal/internal/promreg"
	"github.com/shoal-dev/shoal/internal/pulltoken"
)

// CredentialIssuer exchanges pull secrets for what agents need to pull one repository;
// *resolve.Resolver implements it.
type CredentialIssuer interface {
	PullCredential(ctx context.Context, repository string, pullSecrets [][]byte) (resolve.Credential, error)
}

// PullTokens keeps, in Shoal's own namespace, one Secret per private repository that agents
// pull with (internal/pulltoken): a token scoped to pulling that repository, renewed halfway
// through its life for as long as something asks for it, and deleted once it has expired and
// nobody renewed it (Sweep). The pull secrets it was exchanged for never leave their namespace.
type PullTokens struct {
	// Client writes the Secrets; Reader reads them from the API server (Secrets are never
	// cached by the controller).
	Client client.Client
	Reader client.Reader
	// Namespace is Shoal's namespace, the only one whose Secrets agents may read.
	Namespace string
	Issuer    CredentialIssuer
	// Now is the clock (default time.Now).
	Now func() time.Time
	// Registerer registers the metrics (nil: not registered).
	Registerer prometheus.Registerer

	once   sync.Once
	writes *prometheus.CounterVec // by kind: token, basic
	errors prometheus.Counter

	mu    sync.Mutex
	fresh map[string]time.Time // Secret name -> when it is due for renewal, as last written or read
	holds map[string]hold      // repository -> what keeps its token renewed (Hold)
}

// hold keeps a repository's token renewed until a time, with the pull secrets it came from.
type hold struct {
	secrets [][]byte
	until   time.Time
}

// Hold keeps the token of repository renewed until the time given (the lifetime of the seeds
// that need it), with secrets, which are kept in memory only. A controller that restarts
// forgets its holds: tokens then expire, and the seeders fall back to their own credentials.
func (pt *PullTokens) Hold(repository string, secrets [][]byte, until time.Time) {
	pt.mu.Lock()
	defer pt.mu.Unlock()
	if pt.holds == nil {
		pt.holds = map[string]hold{}
	}
	if h, ok := pt.holds[repository]; ok && h.until.After(until) {
		until = h.until
	}
	pt.holds[repository] = hold{secrets: secrets, until: until}
}

// RenewHeld renews the held tokens that are due, and forgets the holds that have ended.
func (pt *PullTokens) RenewHeld(ctx context.Context) {
	now := pt.now()
	pt.mu.Lock()
	due := map[string][][]byte{}
	for repo, h := range pt.holds {
		if !now.Before(h.until) {
			delete(pt.holds, repo)
			continue
		}
		due[repo] = h.secrets
	}
	pt.mu.Unlock()
	for repo, secrets := range due {
		if _, err := pt.Ensure(ctx, repo, func() [][]byte { return secrets }); err != nil {
			log.FromContext(ctx).Info("renew a held pull token", "repository", repo, "error", err.Error())
		}
	}
}

// +kubebuilder:rbac:groups="",namespace=shoal-system,resources=secrets,verbs=get;list;create;update;delete

func (pt *PullTokens) setup() {
	pt.once.Do(func() {
		pt.writes = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "controller", Name: "pull_token_writes_total",
			Help: "Pull-token Secrets written in Shoal's namespace, new or renewed, by kind: token (scoped to one repository) or basic (a registry without tokens: its credentials).",
		}, []string{"kind"})
		pt.errors = prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "controller", Name: "pull_token_errors_total",
			Help: "Pull tokens that could not be had or written: the registry refused the exchange, or the API server the write.",
		})
		if pt.Registerer != nil {
			pt.writes = promreg.Shared(pt.Registerer, pt.writes)
			pt.errors = promreg.Shared(pt.Registerer, pt.errors)
		}
		pt.writes.WithLabelValues("token")
		pt.writes.WithLabelValues("basic")
	})
}

func (pt *PullTokens) now() time.Time {
	if pt.Now != nil {
		return pt.Now()
	}
	return time.Now()
}

// Token is the Secret Ensure keeps for a repository.
type Token struct {
	// Name is the Secret's name; "" when the registry needs no credential.
	Name string
	// RenewIn is when to call Ensure again.
	RenewIn time.Duration
	// WroteBasic is true when this call wrote basic credentials: the registry has no tokens.
	WroteBasic bool
}

// Ensure makes the Secret for repository hold a credential with at least half its life left,
// exchanging pullSecrets for a new one when needed.
//
// pullSecrets is called only when a new credential must be issued: reading the pull secrets
// costs API requests that a credential still fresh does not need, and so does the Secret
// itself, which is read only once the renewal remembered from the last call is due.
func (pt *PullTokens) Ensure(ctx context.Context, repository string, pullSecrets func() [][]byte) (tok Token, err error) {
	pt.setup()
	defer func() {
		if err != nil {
			pt.errors.Inc()
		}
	}()
	now := pt.now()
	name := pulltoken.Name(repository)
	pt.mu.Lock()
	due, known := pt.fresh[name]
	pt.mu.Unlock()
	if known && now.Before(due) {
		return Token{Name: name, RenewIn: due.Sub(now)}, nil
	}
	var have corev1.Secret
	err = pt.Reader.Get(ctx, types.NamespacedName{Namespace: pt.Namespace, Name: name}, &have)
	exists := err == nil
	switch {
	case apierrors.IsNotFound(err):
	case err != nil:
		return Token{}, err
	default:
		if c, err := pulltoken.Parse(&have); err == nil && now.Before(c.RefreshAt()) {
			pt.remember(name, c.RefreshAt())
			return Token{Name: name, RenewIn: c.RefreshAt().Sub(now)}, nil
		}
	}
	cred, err := pt.Issuer.PullCredential(ctx, repository, pullSecrets())
	if err != nil {
		return Token{}, err
	}
	if cred.None() {
		return Token{}, nil
	}
	c := pulltoken.Credential{Repository: repository, Token: cred.Token, Username: cred.Username, Password: cred.Password,
		Issued: now, Expires: cred.Expires}
	want, err := pulltoken.Secret(pt.Namespace, c)
	if err != nil {
		return Token{}, err
	}
	if exists {
		have.Type, have.Data, have.Labels, have.Annotations = want.Type, want.Data, want.Labels, want.Annotations
		err = pt.Client.Update(ctx, &have)
	} else {
		err = pt.Client.Create(ctx, want)
	}
	if err != nil {
		return Token{}, fmt.Errorf("write pull token %s/%s: %w", pt.Namespace, name, err)
	}
	kind := "token"
	if cred.Basic() {
		kind = "basic"
	}
	pt.writes.WithLabelValues(kind).Inc()
	log.FromContext(ctx).Info("pull token written", "repository", repository, "secret", name, "kind", kind, "expires", cred.Expires)
	pt.remember(name, c.RefreshAt())
	return Token{Name: name, RenewIn: max(c.RefreshAt().Sub(now), time.Second), WroteBasic: cred.Basic()}, nil
}

func (pt *PullTokens) remember(name string, due time.Time) {
	pt.mu.Lock()
	defer pt.mu.Unlock()
	if pt.fresh == nil {
		pt.fresh = map[string]time.Time{}
	}
	pt.fresh[name] = due
}

// sweepGrace is how long an expired pull token is kept before Sweep deletes it.
const sweepGrace = 10 * time.Minute

// Sweep deletes the pull-token Secrets that expired more than ten minutes ago: nothing has
// renewed them, so nothing needs them.
func (pt *PullTokens) Sweep(ctx context.Context) error {
	var list corev1.SecretList
	if err := pt.Reader.List(ctx, &list, client.InNamespace(pt.Namespace), client.HasLabels{pulltoken.Label}); err != nil {
		return err
	}
	now := pt.now()
	for i := range list.Items {
		s := &list.Items[i]
		c, err := pulltoken.Parse(s)
		if err == nil && now.Before(c.Expires.Add(sweepGrace)) {
			continue
		}
		if err := pt.Client.Delete(ctx, s); client.IgnoreNotFound(err) != nil {
			return err
		}
		pt.mu.Lock()
		delete(pt.fresh, s.Name)
		pt.mu.Unlock()
		log.FromContext(ctx).Info("expired pull token deleted", "secret", s.Name)
	}
	return nil
}

// Intervals of Run.
const (
	renewInterval = 30 * time.Second
	sweepInterval = 5 * time.Minute
)

// Run renews the held tokens every 30 s and sweeps expired ones every 5 minutes until ctx
// ends; the leader's manager runs it (manager.RunnableFunc).
func (pt *PullTokens) Run(ctx context.Context) error {
	renew := time.NewTicker(renewInterval)
	defer renew.Stop()
	sweep := time.NewTicker(sweepInterval)
	defer sweep.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-renew.C:
			pt.RenewHeld(ctx)
		case <-sweep.C:
			if err := pt.Sweep(ctx); err != nil {
				log.FromContext(ctx).Error(err, "sweep pull tokens")
			}
		}
	}
}
