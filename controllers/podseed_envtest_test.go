package controllers_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/interceptor"
	"sigs.k8s.io/controller-runtime/pkg/config"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	shoalv1 "github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/controllers"
	"github.com/shoal-dev/shoal/controllers/resolve"
	"github.com/shoal-dev/shoal/internal/pulltoken"
	"github.com/shoal-dev/shoal/test/kubetest"
)

// privateRegistry is go-containerregistry's in-process registry on loopback that answers only
// requests with these Basic credentials, reached as private.test.
type privateRegistry struct {
	host           string
	user, password string
}

func startPrivateRegistry(t *testing.T, user, password string) *privateRegistry {
	inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if u, p, ok := r.BasicAuth(); !ok || u != user || p != password {
			w.Header().Set("WWW-Authenticate", `Basic realm="private.test"`)
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusUnauthorized)
			_, _ = io.WriteString(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`)
			return
		}
		inner.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return &privateRegistry{host: strings.TrimPrefix(srv.URL, "http://"), user: user, password: password}
}

func (pr *privateRegistry) push(t *testing.T, repoTag string, img v1.Image) string {
	t.Helper()
	ref, err := name.ParseReference(pr.host + "/" + repoTag)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img, remote.WithAuth(&authn.Basic{Username: pr.user, Password: pr.password})); err != nil {
		t.Fatal(err)
	}
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d.String()
}

// seeder is a controller manager running the pod seeding reconcilers, with its own metrics
// and a count of the SwarmSeed creates its pod reconciler sent.
type seeder struct {
	metrics *prometheus.Registry
	creates atomic.Int64
	stop    func()
}

// withoutWatch makes the manager's client a client.WithWatch, which the interceptor wraps.
type withoutWatch struct{ client.Client }

func (withoutWatch) Watch(context.Context, client.ObjectList, ...client.ListOption) (watch.Interface, error) {
	return nil, errors.New("not watched through this client")
}

// startSeeder starts a manager that strips pods in its cache, as `shoal controller` does. With
// staleSeeds its pod reconciler finds no SwarmSeed when it reads one, as when its cache has
// not caught up.
func startSeeder(t *testing.T, env *kubetest.Env, r controllers.ImageResolver, clk *clock, staleSeeds bool, opts ...func(mgr ctrl.Manager, r *controllers.PodSeedReconciler)) *seeder {
	t.Helper()
	mgr, err := ctrl.NewManager(env.Config, ctrl.Options{
		Scheme:                 env.Scheme,
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: "0",
		Controller:             config.Controller{SkipNameValidation: &skipNameValidation},
		Cache: cache.Options{ByObject: map[client.Object]cache.ByObject{
			&corev1.Pod{}: {Transform: controllers.PodCacheTransform},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	s := &seeder{metrics: prometheus.NewRegistry()}
	funcs := interceptor.Funcs{
		Create: func(ctx context.Context, c client.WithWatch, obj client.Object, opts ...client.CreateOption) error {
			if _, ok := obj.(*shoalv1.SwarmSeed); ok {
				s.creates.Add(1)
			}
			return c.Create(ctx, obj, opts...)
		},
	}
	if staleSeeds {
		funcs.Get = func(ctx context.Context, c client.WithWatch, key client.ObjectKey, obj client.Object, opts ...client.GetOption) error {
			if _, ok := obj.(*shoalv1.SwarmSeed); ok {
				return apierrors.NewNotFound(shoalv1.GroupVersion.WithResource("swarmseeds").GroupResource(), key.Name)
			}
			return c.Get(ctx, key, obj, opts...)
		}
	}
	rec := &controllers.PodSeedReconciler{
		Client:     interceptor.NewClient(withoutWatch{mgr.GetClient()}, funcs),
		Resolver:   r,
		Registerer: s.metrics,
		Now:        clk.Now,
	}
	for _, o := range opts {
		o(mgr, rec)
	}
	if err := rec.SetupWithManager(mgr); err != nil {
		t.Fatal(err)
	}
	if err := (&controllers.SwarmSeedTTLReconciler{Client: mgr.GetClient(), Registerer: s.metrics, Now: clk.Now}).SetupWithManager(mgr); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	stopped := false
	s.stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			t.Errorf("manager: %v", err)
		}
	}
	t.Cleanup(s.stop)
	return s
}

// metric is the value of a counter, or the sample count of a histogram, with these label
// values ("name=value"); 0 when it has none yet.
func (s *seeder) metric(t *testing.T, metricName string, lbls ...string) float64 {
	t.Helper()
	families, err := s.metrics.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != metricName {
			continue
		}
	next:
		for _, m := range f.GetMetric() {
			for _, l := range lbls {
				k, v, _ := strings.Cut(l, "=")
				if !slices.ContainsFunc(m.GetLabel(), func(lp *dto.LabelPair) bool { return lp.GetName() == k && lp.GetValue() == v }) {
					continue next
				}
			}
			if h := m.GetHistogram(); h != nil {
				return float64(h.GetSampleCount())
			}
			return m.GetCounter().GetValue()
		}
	}
	return 0
}

// waitPods waits until the seeder has dealt with n pending pods in all.
func (s *seeder) waitPods(t *testing.T, n int) {
	t.Helper()
	eventually(t, "pods dealt with", func() (bool, string) {
		got := s.metric(t, "shoal_controller_seed_pods_total")
		return got >= float64(n), fmt.Sprintf("%v of %d", got, n)
	})
}

func listSeeds(t *testing.T, c client.Client) map[string]shoalv1.SwarmSeed {
	t.Helper()
	var list shoalv1.SwarmSeedList
	if err := c.List(t.Context(), &list); err != nil {
		t.Fatal(err)
	}
	out := map[string]shoalv1.SwarmSeed{}
	for _, s := range list.Items {
		out[s.Name] = s
	}
	return out
}

// blobsOf is what a SwarmSeed of img must list: its config, then its layers.
func blobsOf(t *testing.T, img v1.Image) []shoalv1.SeedBlob {
	t.Helper()
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	out := []shoalv1.SeedBlob{{Digest: m.Config.Digest.String(), Size: m.Config.Size}}
	for _, l := range m.Layers {
		out = append(out, shoalv1.SeedBlob{Digest: l.Digest.String(), Size: l.Size})
	}
	return out
}

func indexImage(t *testing.T, idx v1.ImageIndex, digest string) v1.Image {
	t.Helper()
	h, err := v1.NewHash(digest)
	if err != nil {
		t.Fatal(err)
	}
	img, err := idx.Image(h)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// checkSeed fails unless the SwarmSeed of manifest exists with exactly these repository and blobs.
func checkSeed(t *testing.T, seeds map[string]shoalv1.SwarmSeed, repository, manifest string, blobs []shoalv1.SeedBlob) {
	t.Helper()
	s, ok := seeds[controllers.SwarmSeedName(manifest, 0)]
	if !ok {
		t.Errorf("no SwarmSeed for %s@%s", repository, manifest)
		return
	}
	if s.Spec.Repository != repository || s.Spec.Manifest != manifest || !slices.Equal(s.Spec.Blobs, blobs) || s.Spec.PullSecretName != "" {
		t.Errorf("SwarmSeed %s: %+v, want repository %s, manifest %s, blobs %v", s.Name, s.Spec, repository, manifest, blobs)
	}
}

func TestPodSeeding(t *testing.T) {
	env := kubetest.Start(t)
	c := env.Client
	ctx := t.Context()

	pub := startRegistry(t)
	app := platformImage(t, "amd64")
	appDigest := pub.push(t, "team/app:1", app)
	multi, multiAmd, multiArm := multiArch(t)
	pub.push(t, "team/multi:1", multi)
	bound, boundAmd, boundArm := multiArch(t)
	pub.push(t, "team/bound:1", bound)
	initImg := platformImage(t, "amd64") // a single manifest, for another platform than its node's
	initDigest := pub.push(t, "team/init:1", initImg)
	priv := startPrivateRegistry(t, "puller", "s3cret")
	secretImg := platformImage(t, "amd64")
	secretDigest := priv.push(t, "secret/app:1", secretImg)

	resolver, err := resolve.New(
		resolve.WithEndpoints(map[string]string{"registry.test": "http://" + pub.host, "private.test": "http://" + priv.host}),
		resolve.WithInsecure("registry.test", "private.test"))
	if err != nil {
		t.Fatal(err)
	}
	// The API server stamps creationTimestamp with the real time; the controller's clock starts
	// there and moves only when the test says.
	clk := &clock{now: time.Now()}

	for name, arch := range map[string]string{"node-amd": "amd64", "node-arm": "arm64"} {
		node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{
			corev1.LabelOSStable: "linux", corev1.LabelArchStable: arch,
		}}}
		if err := c.Create(ctx, node); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "team"}}); err != nil {
		t.Fatal(err)
	}
	pods := 0
	// mkPod creates a pod; the test plays the scheduler by setting nodeName (no kubelet runs).
	mkPod := func(t *testing.T, name, node, image, initImage string, secrets ...string) {
		t.Helper()
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "team"},
			Spec: corev1.PodSpec{
				NodeName:   node,
				Containers: []corev1.Container{{Name: "app", Image: image}},
			},
		}
		if initImage != "" {
			pod.Spec.InitContainers = []corev1.Container{{Name: "init", Image: initImage}}
		}
		for _, s := range secrets {
			pod.Spec.ImagePullSecrets = append(pod.Spec.ImagePullSecrets, corev1.LocalObjectReference{Name: s})
		}
		if err := c.Create(ctx, pod); err != nil {
			t.Fatal(err)
		}
		pods++
	}

	s := startSeeder(t, env, resolver, clk, false)
	top := t

	t.Run("50 pods of one image: exactly one SwarmSeed create, with the manifest's config and layers", func(t *testing.T) {
		for i := range 50 {
			node := ""
			if i%2 == 0 {
				node = "node-amd"
			}
			mkPod(t, fmt.Sprintf("app-%d", i), node, "registry.test/team/app:1", "")
		}
		s.waitPods(t, pods)
		if n := s.creates.Load(); n != 1 {
			t.Errorf("%d SwarmSeed creates, want 1", n)
		}
		seeds := listSeeds(t, c)
		if len(seeds) != 1 {
			t.Errorf("%d SwarmSeeds, want 1", len(seeds))
		}
		checkSeed(t, seeds, "registry.test/team/app", appDigest, blobsOf(t, app))
		// Once for the bound pods (node-amd's platform), once for the others (the cluster's).
		if n := s.metric(t, "shoal_controller_seed_images_resolved_total"); n != 2 {
			t.Errorf("%v resolutions, want 2: one per image and set of platforms", n)
		}
		if n := s.metric(t, "shoal_controller_swarmseeds_created_total"); n != 1 {
			t.Errorf("created counter %v, want 1", n)
		}
		if n, want := s.metric(t, "shoal_controller_seed_blobs_total"), len(blobsOf(t, app)); n != float64(want) {
			t.Errorf("seeded blobs counter %v, want %d: the manifest's config and layers", n, want)
		}
		if n := s.metric(t, "shoal_controller_seed_latency_seconds"); n != 1 {
			t.Errorf("latency histogram has %v samples, want 1", n)
		}
	})

	t.Run("an unbound pod of a multi-arch image: one SwarmSeed per platform of the cluster's nodes", func(t *testing.T) {
		before := s.creates.Load()
		mkPod(t, "multi", "", "registry.test/team/multi:1", "")
		s.waitPods(t, pods)
		seeds := listSeeds(t, c)
		checkSeed(t, seeds, "registry.test/team/multi", multiAmd, blobsOf(t, indexImage(t, multi, multiAmd)))
		checkSeed(t, seeds, "registry.test/team/multi", multiArm, blobsOf(t, indexImage(t, multi, multiArm)))
		if n := s.creates.Load() - before; n != 2 {
			t.Errorf("%d creates, want 2", n)
		}
	})

	t.Run("a bound pod: its node's platform only, and its init container's single manifest whatever its platform", func(t *testing.T) {
		before := s.creates.Load()
		mkPod(t, "bound", "node-arm", "registry.test/team/bound:1", "registry.test/team/init:1")
		s.waitPods(t, pods)
		seeds := listSeeds(t, c)
		checkSeed(t, seeds, "registry.test/team/bound", boundArm, blobsOf(t, indexImage(t, bound, boundArm)))
		checkSeed(t, seeds, "registry.test/team/init", initDigest, blobsOf(t, initImg))
		if _, ok := seeds[controllers.SwarmSeedName(boundAmd, 0)]; ok {
			t.Error("the amd64 manifest was seeded for a pod on an arm64 node")
		}
		if n := s.creates.Load() - before; n != 2 {
			t.Errorf("%d creates, want 2", n)
		}
	})

	t.Run("a private image: not seeded without a pull secret, retried after a growing delay; seeded with one", func(t *testing.T) {
		const image = "private.test/secret/app:1"
		// failures adds a pending pod of the image without a pull secret, and checks how many
		// resolutions have failed in all.
		failures := func(t *testing.T, pod string, want float64, why string) {
			t.Helper()
			mkPod(t, pod, "node-amd", image, "")
			s.waitPods(t, pods)
			if n := s.metric(t, "shoal_controller_seed_resolve_failures_total", "reason=unauthorized"); n != want {
				t.Errorf("pod %s: %v unauthorized failures, want %v: %s", pod, n, want, why)
			}
		}
		failures(t, "private-anonymous", 1, "the first pod resolves")
		if _, ok := listSeeds(t, c)[controllers.SwarmSeedName(secretDigest, 0)]; ok {
			t.Fatal("seeded without credentials")
		}
		// The n-th failure in a row waits a random delay in [d/2, d], d = 5 s·2^(n-1).
		failures(t, "private-anonymous-2", 1, "a second pod at once is left alone")
		clk.Add(5 * time.Second)
		failures(t, "private-anonymous-3", 2, "the first failure waits at most 5 s")
		clk.Add(5 * time.Second)
		failures(t, "private-anonymous-4", 2, "the second failure waits more than 5 s")
		clk.Add(5 * time.Second)
		failures(t, "private-anonymous-5", 3, "the second failure waits at most 10 s")

		createPullSecret(t, c, "team", "pull", "private.test", priv.user, priv.password)
		mkPod(t, "private", "node-amd", image, "", "pull")
		s.waitPods(t, pods)
		checkSeed(t, listSeeds(t, c), "private.test/secret/app", secretDigest, blobsOf(t, secretImg))
	})

	manifests := 6 // app, multi ×2, bound, init, private
	if got := listSeeds(t, c); len(got) != manifests {
		t.Fatalf("%d SwarmSeeds before the restart, want %d", len(got), manifests)
	}
	blobs := 0
	for _, img := range []v1.Image{app, indexImage(t, multi, multiAmd), indexImage(t, multi, multiArm),
		indexImage(t, bound, boundArm), initImg, secretImg} {
		blobs += len(blobsOf(t, img))
	}
	if n := s.metric(t, "shoal_controller_seed_blobs_total"); n != float64(blobs) {
		t.Errorf("seeded blobs counter %v, want %d: the blobs of the %d SwarmSeeds created", n, blobs, manifests)
	}

	t.Run("a restarted controller writes no duplicate: a create refused as AlreadyExists is success", func(t *testing.T) {
		before := listSeeds(t, c)
		s.stop()
		// The new controller's reads of SwarmSeeds find none, so every manifest is created again.
		// It runs until the whole test ends.
		s = startSeeder(top, env, resolver, clk, true)
		s.waitPods(t, pods)
		if n := s.creates.Load(); n != int64(manifests) {
			t.Errorf("%d creates, want %d: one per manifest, the first refusal remembered", n, manifests)
		}
		if n := s.metric(t, "shoal_controller_swarmseeds_created_total"); n != 0 {
			t.Errorf("created counter %v, want 0", n)
		}
		if n := s.metric(t, "shoal_controller_seed_blobs_total"); n != 0 {
			t.Errorf("seeded blobs counter %v, want 0: the SwarmSeeds were there", n)
		}
		after := listSeeds(t, c)
		if len(after) != len(before) {
			t.Errorf("%d SwarmSeeds, had %d", len(after), len(before))
		}
		for name, b := range before {
			if a, ok := after[name]; !ok || a.UID != b.UID {
				t.Errorf("SwarmSeed %s was replaced or removed", name)
			}
		}
	})

	t.Run("SwarmSeeds are deleted TTL after their creation, by the controller's clock", func(t *testing.T) {
		// A reconciler with no memory, as after a restart, goes by creationTimestamp.
		ttl := &controllers.SwarmSeedTTLReconciler{Client: c, Now: clk.Now}
		seeds := listSeeds(t, c)
		for name, seed := range seeds {
			res, err := ttl.Reconcile(ctx, reconcile.Request{NamespacedName: types.NamespacedName{Name: name}})
			want := seed.CreationTimestamp.Add(controllers.DefaultSeedTTL).Sub(clk.Now())
			if err != nil || want <= 0 || res.RequeueAfter != want {
				t.Errorf("%s: %+v, %v: want a requeue in %v, when its TTL is up", name, res, err, want)
			}
		}
		if got := listSeeds(t, c); len(got) != len(seeds) {
			t.Fatalf("%d SwarmSeeds left of %d before their TTL", len(got), len(seeds))
		}

		clk.Add(2 * controllers.DefaultSeedTTL)
		for name, seed := range seeds {
			// Nudge the controller now rather than when its real-time requeue falls due.
			seed.Annotations = map[string]string{"test/nudge": "1"}
			if err := c.Update(ctx, &seed); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
		}
		eventually(t, "SwarmSeeds deleted", func() (bool, string) {
			got, deleted := listSeeds(t, c), s.metric(t, "shoal_controller_swarmseeds_deleted_total")
			return len(got) == 0 && deleted == float64(len(seeds)), fmt.Sprintf("%d left, deleted counter %v", len(got), deleted)
		})
	})
}

// TestPodPullTokenLivesAsLongAsItsSwarmSeed: the pull token a SwarmSeed names is renewed until
// the SwarmSeed falls due for deletion, which SwarmSeedTTLReconciler reckons from its creation
// time on the API server, and no longer. Here the controller's clock starts two minutes behind
// the API server's, as a resolution that takes that long (or a skewed clock) puts the
// SwarmSeed's creation after the reconcile began.
func TestPodPullTokenLivesAsLongAsItsSwarmSeed(t *testing.T) {
	env := kubetest.Start(t)
	c := env.Client
	ctx := t.Context()
	_, r, clk := startTokenRegistry(t)
	clk.Add(-2 * time.Minute)
	tokens := seedPrivatePod(t, env, r, clk)
	secretName := pulltoken.Name("private.test/secret/app")
	var seed shoalv1.SwarmSeed
	eventually(t, "a SwarmSeed naming the pull token", func() (bool, string) {
		seeds := listSeeds(t, c)
		for _, s := range seeds {
			if s.Spec.PullSecretName == secretName {
				seed = s
				return true, ""
			}
		}
		return false, fmt.Sprintf("%+v", seeds)
	})
	read := func() string { return readPullToken(t, c, secretName).Token }
	first := read()

	// Half a minute before the SwarmSeed falls due, it still exists, and its token, long due
	// for renewal, is renewed.
	expires := seed.CreationTimestamp.Add(controllers.DefaultSeedTTL)
	clk.Add(expires.Add(-30 * time.Second).Sub(clk.Now()))
	ttl := &controllers.SwarmSeedTTLReconciler{Client: c, Now: clk.Now}
	res, err := ttl.Reconcile(ctx, reconcile.Request{NamespacedName: types.NamespacedName{Name: seed.Name}})
	if err != nil || res.RequeueAfter <= 0 {
		t.Fatalf("the SwarmSeed is due for deletion already: %+v, %v", res, err)
	}
	tokens.RenewHeld(ctx)
	second := read()
	if second == first {
		t.Error("the token of a SwarmSeed that still exists was not renewed")
	}

	// Once the SwarmSeed is due for deletion, the token is left to expire.
	clk.Add(6 * time.Minute) // past the deletion, and past half the life of the renewed token
	tokens.RenewHeld(ctx)
	if read() != second {
		t.Error("the token was renewed after its SwarmSeed's time was up")
	}
}
