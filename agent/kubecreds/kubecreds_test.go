package kubecreds

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/shoal-dev/shoal/agent/upstream"
	"github.com/shoal-dev/shoal/internal/pulltoken"
	"github.com/shoal-dev/shoal/test/kubetest"
	"github.com/shoal-dev/shoal/test/tokenauth"
)

// TestPullWithTheControllersToken: an agent's upstream client with this keychain pulls a
// private repository with the token in Shoal's namespace, and is refused without it.
func TestPullWithTheControllersToken(t *testing.T) {
	env := kubetest.Start(t)
	ctx := t.Context()
	ta, srv := tokenRegistry(t, env, 5*time.Minute, "secret/app", "secret/other")
	// The controller's part: a token for secret/app only.
	tok := tokenFor(t, ta, srv.URL, "secret/app")
	s, err := pulltoken.Secret("shoal-system", pulltoken.Credential{Repository: "private.test/secret/app", Token: tok,
		Issued: time.Now(), Expires: time.Now().Add(5 * time.Minute)})
	if err != nil {
		t.Fatal(err)
	}
	if err := env.Client.Create(ctx, s); err != nil {
		t.Fatal(err)
	}

	kc, err := New(env.Config, "shoal-system", nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := prometheus.NewPedanticRegistry().Register(kc); err != nil {
		t.Fatal(err)
	}
	up := upstreamAt(t, srv.URL, kc)
	if _, err := up.Manifest(ctx, "private.test", "secret/app", "1", nil); err != nil {
		t.Errorf("with the token: %v", err)
	}
	if _, err := up.Manifest(ctx, "private.test", "secret/other", "1", nil); !errors.Is(err, upstream.ErrUnauthorized) {
		t.Errorf("without a token: %v, want unauthorized", err)
	}
	for result, want := range map[string]float64{lookupFound: 1, lookupMissing: 1, lookupError: 0} {
		if got := testutil.ToFloat64(kc.lookups.WithLabelValues(result)); got != want {
			t.Errorf("lookups{result=%s} = %v, want %v", result, got, want)
		}
	}
}

// TestRenewedTokenIsPickedUp: a download that outlives its first pull token goes on with the
// one the controller renews in the same Secret. The registry's tokens live 5 s here while the
// Secret says 35 s, so the keychain drops the first after 5 s (30 s before the Secret says it
// expires) and reads the Secret again; the registry refuses the first token by then.
func TestRenewedTokenIsPickedUp(t *testing.T) {
	env := kubetest.Start(t)
	ctx := t.Context()
	// Long enough for the first request to come before the keychain drops the first token
	// on a busy machine.
	const lifetime = 5 * time.Second
	ta, srv := tokenRegistry(t, env, lifetime, "secret/app")
	secret := func(tok string, issued time.Time) *corev1.Secret {
		s, err := pulltoken.Secret("shoal-system", pulltoken.Credential{Repository: "private.test/secret/app", Token: tok,
			Issued: issued, Expires: issued.Add(expiryMargin + lifetime)})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	tok1 := tokenFor(t, ta, srv.URL, "secret/app")
	first := time.Now() // after the registry issued tok1: it dies before first + lifetime
	if err := env.Client.Create(ctx, secret(tok1, first)); err != nil {
		t.Fatal(err)
	}
	kc, err := New(env.Config, "shoal-system", nil)
	if err != nil {
		t.Fatal(err)
	}
	up := upstreamAt(t, srv.URL, kc)
	if _, err := up.Manifest(ctx, "private.test", "secret/app", "1", nil); err != nil {
		t.Fatalf("with the first token: %v", err)
	}

	// The controller renews the token in the same Secret once the first is dead.
	time.Sleep(time.Until(first.Add(lifetime + 100*time.Millisecond)))
	if ta.Valid(tok1, "secret/app") {
		t.Fatal("the first token still works: the case below proves nothing")
	}
	tok2 := tokenFor(t, ta, srv.URL, "secret/app")
	s := secret(tok2, time.Now())
	var cur corev1.Secret
	if err := env.Client.Get(ctx, client.ObjectKeyFromObject(s), &cur); err != nil {
		t.Fatal(err)
	}
	cur.Data = s.Data
	cur.Annotations = s.Annotations
	if err := env.Client.Update(ctx, &cur); err != nil {
		t.Fatal(err)
	}
	if _, err := up.Manifest(ctx, "private.test", "secret/app", "1", nil); err != nil {
		t.Errorf("after the renewal: %v", err)
	}
	if got := testutil.ToFloat64(kc.lookups.WithLabelValues(lookupFound)); got != 2 {
		t.Errorf("lookups{result=found} = %v, want 2 (the first token, then the renewed one)", got)
	}
}

// tokenRegistry starts a registry behind token authentication whose tokens live lifetime,
// holding an image as <repo>:1 for each of repos, and creates Shoal's namespace, where the
// controller's pull tokens go.
func tokenRegistry(t *testing.T, env *kubetest.Env, lifetime time.Duration, repos ...string) (*tokenauth.Server, *httptest.Server) {
	t.Helper()
	inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	ta := tokenauth.New(inner, "puller", "s3cret", lifetime)
	srv := httptest.NewServer(ta)
	t.Cleanup(srv.Close)
	ta.Realm = srv.URL + "/token"
	push := httptest.NewServer(inner)
	t.Cleanup(push.Close)
	img, err := random.Image(512, 1)
	if err != nil {
		t.Fatal(err)
	}
	for _, repo := range repos {
		tag, err := name.NewTag(strings.TrimPrefix(push.URL, "http://")+"/"+repo+":1", name.Insecure)
		if err != nil {
			t.Fatal(err)
		}
		if err := remote.Write(tag, img); err != nil {
			t.Fatal(err)
		}
	}
	if err := env.Client.Create(t.Context(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shoal-system"}}); err != nil {
		t.Fatal(err)
	}
	return ta, srv
}

// upstreamAt is an upstream client that sends every registry's requests to url, with kc's
// credentials.
func upstreamAt(t *testing.T, url string, kc *Keychain) *upstream.Client {
	t.Helper()
	endpoint, err := upstream.ParseEndpoint(url)
	if err != nil {
		t.Fatal(err)
	}
	up := upstream.New(upstream.WithKeychain(kc), upstream.WithEndpointResolver(func(string) (upstream.Endpoint, error) { return endpoint, nil }))
	t.Cleanup(up.CloseIdleConnections)
	return up
}

// tokenFor asks the token server for a pull token of repo, as the controller would.
func tokenFor(t *testing.T, ta *tokenauth.Server, url, repo string) string {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, url+"/token?service=tokenauth&scope=repository:"+repo+":pull", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.SetBasicAuth("puller", "s3cret")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var body struct {
		Token string `json:"token"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil || !ta.Valid(body.Token, repo) {
		t.Fatalf("token for %s: %+v, %v", repo, body, err)
	}
	return body.Token
}

func notFound(name string) error {
	return apierrors.NewNotFound(schema.GroupResource{Resource: "secrets"}, name)
}

func TestKeychainBoundsTheAPIServersPart(t *testing.T) {
	repo := name.MustParseReference("private.test/secret/app:1").Context()
	now := time.Unix(1_700_000_000, 0)
	clock := func() time.Time { return now }
	secret, err := pulltoken.Secret("shoal-system", pulltoken.Credential{Repository: repo.String(), Token: "t0k",
		Issued: now, Expires: now.Add(5 * time.Minute)})
	if err != nil {
		t.Fatal(err)
	}
	var gets atomic.Int32
	var fail atomic.Bool
	get := func(ctx context.Context, n string) (*corev1.Secret, error) {
		gets.Add(1)
		if fail.Load() {
			<-ctx.Done() // a wedged API server
			return nil, ctx.Err()
		}
		if n != secret.Name {
			return nil, notFound(n)
		}
		return secret, nil
	}
	kc := newKeychain(get, "shoal-system", nil, clock)

	auth, err := kc.Resolve(repo)
	if err != nil {
		t.Fatal(err)
	}
	ac, err := auth.Authorization()
	if err != nil || ac.RegistryToken != "t0k" {
		t.Fatalf("authorization %+v, %v; want the token", ac, err)
	}
	if x, ok := auth.(upstream.Expiring); !ok || !x.Expires().Equal(now.Add(5*time.Minute-expiryMargin)) {
		t.Errorf("the token does not say it expires 30 s before the Secret's expiry")
	}
	if _, _ = kc.Resolve(repo); gets.Load() != 1 {
		t.Errorf("%d GETs for two lookups of a fresh token, want 1", gets.Load())
	}
	other := name.MustParseReference("private.test/public/app:1").Context()
	if a, _ := kc.Resolve(other); a != authn.Anonymous {
		t.Errorf("no Secret: %v, want anonymous", a)
	}
	// The API server wedges: a lookup gives up within LookupTimeout, and none follows for a while.
	fail.Store(true)
	now = now.Add(10 * time.Minute)
	start := time.Now()
	if a, _ := kc.Resolve(repo); a != authn.Anonymous {
		t.Errorf("API server wedged: %v, want anonymous", a)
	}
	if took := time.Since(start); took > 2*LookupTimeout {
		t.Errorf("a lookup took %v with the API server wedged", took)
	}
	n := gets.Load()
	if _, _ = kc.Resolve(other); gets.Load() != n {
		t.Errorf("a lookup went to the API server right after it failed")
	}
}
