package controllers_test

import (
	"encoding/base64"
	"fmt"
	"io"
	"log"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	shoalv1 "github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/controllers"
	"github.com/shoal-dev/shoal/controllers/resolve"
	"github.com/shoal-dev/shoal/internal/pulltoken"
	"github.com/shoal-dev/shoal/test/kubetest"
	"github.com/shoal-dev/shoal/test/tokenauth"
)

// TestPrewarmPullTokens: a Prewarm with an imagePullSecret for a registry with token
// authentication gets a token scoped to its repository written into Shoal's namespace and named
// in its status and in the nodes' NodeCache items; the token is renewed halfway through its life
// and swept once it has expired unrenewed. The pull secret itself never leaves its namespace.
func TestPrewarmPullTokens(t *testing.T) {
	env := kubetest.Start(t)
	c := env.Client
	ctx := t.Context()
	ta, r, clk := startTokenRegistry(t)
	var tokens *controllers.PullTokens
	promReg := prometheus.NewRegistry()
	startManager(t, env, func(mgr ctrl.Manager) error {
		tokens = &controllers.PullTokens{Client: mgr.GetClient(), Reader: mgr.GetAPIReader(), Namespace: "shoal-system", Issuer: r, Now: clk.Now, Registerer: promReg}
		if err := (&controllers.NodeCacheReconciler{Client: mgr.GetClient()}).SetupWithManager(mgr); err != nil {
			return err
		}
		return (&controllers.PrewarmReconciler{Client: mgr.GetClient(), Resolver: controllers.RegistryResolver{R: r}, Tokens: tokens, Now: clk.Now}).SetupWithManager(mgr)
	})
	for _, ns := range []string{"team", "shoal-system"} {
		if err := c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a", Labels: map[string]string{corev1.LabelOSStable: "linux", corev1.LabelArchStable: "amd64"}}}); err != nil {
		t.Fatal(err)
	}
	createPullSecret(t, c, "team", "pull", "private.test", "puller", "s3cret")
	p := &shoalv1.Prewarm{
		ObjectMeta: metav1.ObjectMeta{Name: "app", Namespace: "team"},
		Spec: shoalv1.PrewarmSpec{Images: []string{"private.test/secret/app:1"},
			ImagePullSecrets: []corev1.LocalObjectReference{{Name: "pull"}}},
	}
	if err := c.Create(ctx, p); err != nil {
		t.Fatal(err)
	}
	secretName := pulltoken.Name("private.test/secret/app")
	token := func() pulltoken.Credential {
		var s corev1.Secret
		if err := c.Get(ctx, client.ObjectKey{Namespace: "shoal-system", Name: secretName}, &s); err != nil {
			return pulltoken.Credential{}
		}
		cred, err := pulltoken.Parse(&s)
		if err != nil {
			t.Fatal(err)
		}
		return cred
	}
	eventually(t, "a pull token named in the status and the NodeCache", func() (bool, string) {
		got := getPrewarm(t, c, client.ObjectKeyFromObject(p))
		items, nc := nodeCacheItems(t, c, "node-a")
		if got == nil || len(got.Status.References) != 1 || nc == nil || len(items) != 1 {
			return false, fmt.Sprintf("prewarm %+v, items %v", got, items)
		}
		return got.Status.References[0].PullSecretName == secretName && nc.Spec.Items[0].PullSecretName == secretName && token().Token != "",
			fmt.Sprintf("references %+v, items %+v", got.Status.References, nc.Spec.Items)
	})
	first := token()
	if !ta.Valid(first.Token, "secret/app") || ta.Valid(first.Token, "secret/other") {
		t.Errorf("the token does not let agents pull secret/app alone")
	}
	if first.Username != "" || first.Password != "" {
		t.Errorf("the Secret carries the pull secret's credentials: %+v", first)
	}

	// Past half its life, the next reconcile renews it.
	clk.Add(3 * time.Minute)
	p = getPrewarm(t, c, client.ObjectKeyFromObject(p))
	p.Annotations = map[string]string{"poke": "1"}
	if err := c.Update(ctx, p); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the token renewed", func() (bool, string) {
		cur := token()
		return cur.Token != "" && cur.Token != first.Token && ta.Valid(cur.Token, "secret/app"), fmt.Sprintf("%+v", cur)
	})

	if got := metricValue(t, promReg, "shoal_controller_pull_token_writes_total", "kind", "token"); got != 2 {
		t.Errorf("pull_token_writes_total{kind=token} = %v, want 2 (written, renewed)", got)
	}

	// Once nothing renews it and it has expired, it is swept.
	if err := tokens.Sweep(ctx); err != nil {
		t.Fatal(err)
	}
	if token().Token == "" {
		t.Fatal("a fresh token was swept")
	}
	if err := c.Delete(ctx, p); err != nil {
		t.Fatal(err)
	}
	clk.Add(time.Hour)
	if err := tokens.Sweep(ctx); err != nil {
		t.Fatal(err)
	}
	var s corev1.Secret
	if err := c.Get(ctx, client.ObjectKey{Namespace: "shoal-system", Name: secretName}, &s); !apierrors.IsNotFound(err) {
		t.Errorf("expired token not swept: %v", err)
	}
}

// TestPodPullTokens: a pending pod with a pull secret for a token registry gets its SwarmSeed
// with a pull token, which is renewed while the seed lives and left to expire after.
func TestPodPullTokens(t *testing.T) {
	env := kubetest.Start(t)
	c := env.Client
	ctx := t.Context()
	ta, r, clk := startTokenRegistry(t)
	tokens := seedPrivatePod(t, env, r, clk)
	secretName := pulltoken.Name("private.test/secret/app")
	eventually(t, "a SwarmSeed naming the pull token", func() (bool, string) {
		seeds := listSeeds(t, c)
		for _, s := range seeds {
			if s.Spec.PullSecretName == secretName {
				return true, ""
			}
		}
		return false, fmt.Sprintf("%+v", seeds)
	})
	read := func() pulltoken.Credential { return readPullToken(t, c, secretName) }
	first := read()
	if !ta.Valid(first.Token, "secret/app") {
		t.Fatal("the token does not pull secret/app")
	}
	// Within the seed's lifetime, a due token is renewed; after it, no longer.
	clk.Add(3 * time.Minute)
	tokens.RenewHeld(ctx)
	second := read()
	if second.Token == first.Token {
		t.Error("a held token past half its life was not renewed")
	}
	clk.Add(controllers.DefaultSeedTTL)
	tokens.RenewHeld(ctx)
	if read().Token != second.Token {
		t.Error("a token was renewed after the seeds that needed it were gone")
	}
}

// startTokenRegistry serves private.test with token authentication (tokens for puller:s3cret,
// living 5 minutes) and secret/app:1 in it, and returns it with a resolver that reaches it and
// the resolver's clock.
func startTokenRegistry(t *testing.T) (*tokenauth.Server, *resolve.Resolver, *clock) {
	t.Helper()
	inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	ta := tokenauth.New(inner, "puller", "s3cret", 5*time.Minute)
	ta.Realm = "http://private.test/token"
	srv := httptest.NewServer(ta)
	t.Cleanup(srv.Close)
	pushSrv := httptest.NewServer(inner) // pushes bypass the tokens, which only pull
	t.Cleanup(pushSrv.Close)
	img, err := random.Image(1024, 1)
	if err != nil {
		t.Fatal(err)
	}
	tag, err := name.NewTag(strings.TrimPrefix(pushSrv.URL, "http://")+"/secret/app:1", name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(tag, img); err != nil {
		t.Fatal(err)
	}
	clk := &clock{now: time.Now()}
	r, err := resolve.New(resolve.WithEndpoints(map[string]string{"private.test": srv.URL}), resolve.WithInsecure("private.test"), resolve.WithClock(clk.Now))
	if err != nil {
		t.Fatal(err)
	}
	return ta, r, clk
}

// createPullSecret creates a kubernetes.io/dockerconfigjson Secret with one registry's
// credentials.
func createPullSecret(t *testing.T, c client.Client, namespace, secretName, registry, user, password string) {
	t.Helper()
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + password))
	if err := c.Create(t.Context(), &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: secretName, Namespace: namespace},
		Type:       corev1.SecretTypeDockerConfigJson,
		Data:       map[string][]byte{corev1.DockerConfigJsonKey: fmt.Appendf(nil, `{"auths":{%q:{"auth":%q}}}`, registry, auth)},
	}); err != nil {
		t.Fatal(err)
	}
}

// seedPrivatePod starts the pod seeding reconcilers with pull tokens issued by r, and creates a
// pending pod of private.test/secret/app:1 in namespace team with the pull secret that reaches
// it; it returns the reconciler's PullTokens.
func seedPrivatePod(t *testing.T, env *kubetest.Env, r *resolve.Resolver, clk *clock) *controllers.PullTokens {
	t.Helper()
	c, ctx := env.Client, t.Context()
	var tokens *controllers.PullTokens
	startSeeder(t, env, r, clk, false, func(mgr ctrl.Manager, rec *controllers.PodSeedReconciler) {
		tokens = &controllers.PullTokens{Client: mgr.GetClient(), Reader: mgr.GetAPIReader(), Namespace: "shoal-system", Issuer: r, Now: clk.Now}
		rec.Tokens = tokens
		rec.APIReader = mgr.GetAPIReader()
	})
	for _, ns := range []string{"team", "shoal-system"} {
		if err := c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
			t.Fatal(err)
		}
	}
	createPullSecret(t, c, "team", "pull", "private.test", "puller", "s3cret")
	if err := c.Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "app", Namespace: "team"},
		Spec: corev1.PodSpec{
			Containers:       []corev1.Container{{Name: "app", Image: "private.test/secret/app:1"}},
			ImagePullSecrets: []corev1.LocalObjectReference{{Name: "pull"}},
		},
	}); err != nil {
		t.Fatal(err)
	}
	return tokens
}

// readPullToken is the credential in pull token Secret name of Shoal's namespace; it must be
// there.
func readPullToken(t *testing.T, c client.Client, name string) pulltoken.Credential {
	t.Helper()
	var s corev1.Secret
	if err := c.Get(t.Context(), client.ObjectKey{Namespace: "shoal-system", Name: name}, &s); err != nil {
		t.Fatal(err)
	}
	cred, err := pulltoken.Parse(&s)
	if err != nil {
		t.Fatal(err)
	}
	return cred
}
