package controllers_test

import (
	"fmt"
	"io"
	"log"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	shoalv1 "github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/controllers"
	"github.com/shoal-dev/shoal/controllers/resolve"
	"github.com/shoal-dev/shoal/test/kubetest"
)

// clock is a time the test moves forward.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *clock) Add(d time.Duration) { c.mu.Lock(); c.now = c.now.Add(d); c.mu.Unlock() }

// testRegistry is go-containerregistry's in-process registry on loopback, reached as
// registry.test.
type testRegistry struct{ host string }

func startRegistry(t *testing.T) *testRegistry {
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	return &testRegistry{host: strings.TrimPrefix(srv.URL, "http://")}
}

func (tr *testRegistry) push(t *testing.T, repoTag string, img remote.Taggable) string {
	t.Helper()
	ref, err := name.ParseReference(tr.host + "/" + repoTag)
	if err != nil {
		t.Fatal(err)
	}
	switch x := img.(type) {
	case v1.ImageIndex:
		err = remote.WriteIndex(ref, x)
	case v1.Image:
		err = remote.Write(ref, x)
	}
	if err != nil {
		t.Fatal(err)
	}
	digester, ok := img.(interface{ Digest() (v1.Hash, error) })
	if !ok {
		t.Fatalf("%T has no digest", img)
	}
	d, err := digester.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d.String()
}

// pushRandom pushes a random single-layer image as repoTag and returns its digest.
func (tr *testRegistry) pushRandom(t *testing.T, repoTag string) string {
	t.Helper()
	img, err := random.Image(1024, 1)
	if err != nil {
		t.Fatal(err)
	}
	return tr.push(t, repoTag, img)
}

// resolver is a resolver that reaches this registry as registry.test, with opts besides.
func (tr *testRegistry) resolver(t *testing.T, opts ...resolve.ResolverOption) *resolve.Resolver {
	t.Helper()
	r, err := resolve.New(append([]resolve.ResolverOption{resolve.WithEndpoints(map[string]string{"registry.test": "http://" + tr.host}),
		resolve.WithInsecure("registry.test")}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// platformImage is a random image whose config says its platform.
func platformImage(t *testing.T, arch string) v1.Image {
	img, err := random.Image(1024, 2)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", arch
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// multiArch is an index of a linux/amd64 and a linux/arm64 image; it returns the index and
// both manifests' digests.
func multiArch(t *testing.T) (v1.ImageIndex, string, string) {
	amd, arm := platformImage(t, "amd64"), platformImage(t, "arm64")
	idx := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: amd, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}},
		mutate.IndexAddendum{Add: arm, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64"}}},
	)
	da, _ := amd.Digest()
	dr, _ := arm.Digest()
	return idx, da.String(), dr.String()
}

// setItemsState plays the node's agent: every spec item of its NodeCache gets state.
func setItemsState(t *testing.T, c client.Client, node string, state shoalv1.ItemState, only ...string) {
	t.Helper()
	updateNodeCacheStatus(t, c, node, func(nc *shoalv1.NodeCache) {
		nc.Status.Items = nil
		for _, it := range nc.Spec.Items {
			st := shoalv1.ItemPending
			if len(only) == 0 || slices.Contains(only, it.Reference) {
				st = state
			}
			nc.Status.Items = append(nc.Status.Items, shoalv1.NodeCacheItemStatus{Reference: it.Reference, State: st, Bytes: 10, TotalBytes: 10})
		}
	})
}

// updateNodeCacheStatus writes edit's change to node's NodeCache status, again on a conflict:
// the controller may be writing the spec at the same time (its seeders change as nodes come
// and go).
func updateNodeCacheStatus(t *testing.T, c client.Client, node string, edit func(*shoalv1.NodeCache)) {
	t.Helper()
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		var nc shoalv1.NodeCache
		if err := c.Get(t.Context(), client.ObjectKey{Name: node}, &nc); err != nil {
			return err
		}
		edit(&nc)
		return c.Status().Update(t.Context(), &nc)
	})
	if err != nil {
		t.Fatal(err)
	}
}

func getPrewarm(t *testing.T, c client.Client, key client.ObjectKey) *shoalv1.Prewarm {
	var p shoalv1.Prewarm
	if err := c.Get(t.Context(), key, &p); err != nil {
		return nil
	}
	return &p
}

func TestPrewarmLifecycle(t *testing.T) {
	env := kubetest.Start(t)
	c := env.Client
	ctx := t.Context()
	reg := startRegistry(t)
	idx, amd1, arm1 := multiArch(t)
	reg.push(t, "team/app:1", idx)
	model, err := random.Image(4096, 1)
	if err != nil {
		t.Fatal(err)
	}
	modelDigest := reg.push(t, "models/m:v1", model)

	clk := &clock{now: time.Unix(1_700_000_000, 0)}
	promReg := prometheus.NewRegistry()
	r := reg.resolver(t, resolve.WithClock(clk.Now))
	start := func() (stop func()) {
		return startManager(t, env, func(mgr ctrl.Manager) error {
			if err := (&controllers.NodeCacheReconciler{Client: mgr.GetClient()}).SetupWithManager(mgr); err != nil {
				return err
			}
			return (&controllers.PrewarmReconciler{Client: mgr.GetClient(), Resolver: controllers.RegistryResolver{R: r},
				Recorder: mgr.GetEventRecorder("test"), Now: clk.Now, Registerer: promReg}).SetupWithManager(mgr)
		})
	}
	stop := start()
	// restart stops the controller and starts another, as a new leader would be: it has only
	// the objects to go on.
	restart := func() {
		stop()
		stop = start()
	}

	for _, n := range []struct {
		name, arch string
		gpu        bool
	}{{"node-a", "amd64", true}, {"node-b", "arm64", true}, {"node-c", "amd64", false}} {
		node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n.name, Labels: map[string]string{
			corev1.LabelOSStable: "linux", corev1.LabelArchStable: n.arch,
		}}}
		if n.gpu {
			node.Labels["gpu"] = "true"
		}
		if err := c.Create(ctx, node); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "team"}}); err != nil {
		t.Fatal(err)
	}
	p := &shoalv1.Prewarm{
		ObjectMeta: metav1.ObjectMeta{Name: "app", Namespace: "team"},
		Spec: shoalv1.PrewarmSpec{
			Images:       []string{"registry.test/team/app:1"},
			Artifacts:    []string{"registry.test/models/m:v1"},
			NodeSelector: &shoalv1.NodeSelector{MatchLabels: map[string]shoalv1.LabelValue{"gpu": "true"}},
		},
	}
	if err := c.Create(ctx, p); err != nil {
		t.Fatal(err)
	}
	key := client.ObjectKeyFromObject(p)
	appA, appB := "registry.test/team/app:1@"+amd1, "registry.test/team/app:1@"+arm1
	modelItem := "registry.test/models/m:v1@" + modelDigest

	t.Run("resolved and fanned out to the selected nodes, each its own platform", func(t *testing.T) {
		waitItems(t, c, "node-a", appA, modelItem)
		waitItems(t, c, "node-b", appB, modelItem)
		waitItems(t, c, "node-c")
		eventually(t, "status", func() (bool, string) {
			p := getPrewarm(t, c, key)
			ok := p != nil && p.Status.Ready == "0/2" && len(p.Status.References) == 2 &&
				meta.IsStatusConditionTrue(p.Status.Conditions, controllers.ConditionProgressing) &&
				p.Status.ObservedGeneration == p.Generation && slices.Contains(p.Finalizers, controllers.Finalizer)
			return ok, fmt.Sprintf("%+v", p)
		})
	})

	t.Run("READY 2/2 once the agents hold it", func(t *testing.T) {
		setItemsState(t, c, "node-a", shoalv1.ItemReady)
		setItemsState(t, c, "node-b", shoalv1.ItemReady)
		eventually(t, "Ready", func() (bool, string) {
			p := getPrewarm(t, c, key)
			return p.Status.Ready == "2/2" && meta.IsStatusConditionTrue(p.Status.Conditions, controllers.ConditionReady) &&
				!meta.IsStatusConditionTrue(p.Status.Conditions, controllers.ConditionProgressing) &&
				p.Status.BytesReady == 40, fmt.Sprintf("%+v", p.Status)
		})
		if n := gaugeValue(t, promReg, "shoal_controller_prewarm_nodes", "ready"); n != 2 {
			t.Errorf("shoal_controller_prewarm_nodes{state=ready} = %v, want 2", n)
		}
	})

	t.Run("a node added to the selection and removed again", func(t *testing.T) {
		node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-d", Labels: map[string]string{
			corev1.LabelOSStable: "linux", corev1.LabelArchStable: "amd64", "gpu": "true",
		}}}
		if err := c.Create(ctx, node); err != nil {
			t.Fatal(err)
		}
		waitItems(t, c, "node-d", appA, modelItem)
		waitReady := func(want string, desired int32) {
			t.Helper()
			eventually(t, "READY "+want, func() (bool, string) {
				p := getPrewarm(t, c, key)
				return p.Status.Ready == want && p.Status.Nodes.Desired == desired, fmt.Sprintf("%+v", p.Status)
			})
		}
		waitReady("2/3", 3)
		if err := c.Delete(ctx, node); err != nil {
			t.Fatal(err)
		}
		waitReady("2/2", 2)
		eventually(t, "node-d's NodeCache deleted", func() (bool, string) {
			_, nc := nodeCacheItems(t, c, "node-d")
			return nc == nil, fmt.Sprintf("%+v", nc)
		})
	})

	t.Run("a failing node is reported with its reason", func(t *testing.T) {
		updateNodeCacheStatus(t, c, "node-b", func(nc *shoalv1.NodeCache) {
			nc.Status.Items[0].State, nc.Status.Items[0].Reason, nc.Status.Items[0].Message = shoalv1.ItemFailed, shoalv1.ReasonStoreFull, "no space"
		})
		eventually(t, "Degraded", func() (bool, string) {
			p := getPrewarm(t, c, key)
			return p.Status.Nodes.Failed == 1 && len(p.Status.FailingNodes) == 1 &&
				p.Status.FailingNodes[0] == shoalv1.NodeFailure{Node: "node-b", Reason: shoalv1.ReasonStoreFull, Message: "no space"} &&
				meta.IsStatusConditionTrue(p.Status.Conditions, controllers.ConditionDegraded), fmt.Sprintf("%+v", p.Status)
		})
		setItemsState(t, c, "node-b", shoalv1.ItemReady)
	})

	_, amd2, arm2 := func() (v1.ImageIndex, string, string) {
		idx2, a, b := multiArch(t)
		reg.push(t, "team/app:1", idx2)
		return idx2, a, b
	}()
	appA2, appB2 := "registry.test/team/app:1@"+amd2, "registry.test/team/app:1@"+arm2

	t.Run("a moved tag: the old digest stays until the new one is ready", func(t *testing.T) {
		clk.Add(11 * time.Minute) // past the default refreshInterval and the resolver's tag TTL
		// Nudge a reconcile now rather than when the real-time requeue falls due.
		p := getPrewarm(t, c, key)
		p.Annotations = map[string]string{"test/nudge": "1"}
		if err := c.Update(ctx, p); err != nil {
			t.Fatal(err)
		}
		waitItems(t, c, "node-a", appA, appA2, modelItem)
		waitItems(t, c, "node-b", appB, appB2, modelItem)
		// A new controller in the middle of the move keeps both digests: it has the status.
		restart()
		p = getPrewarm(t, c, key)
		p.Annotations["test/nudge"] = "2"
		if err := c.Update(ctx, p); err != nil {
			t.Fatal(err)
		}
		eventually(t, "the new controller's reconcile", func() (bool, string) {
			p := getPrewarm(t, c, key)
			return p.Status.ObservedGeneration == p.Generation, fmt.Sprintf("%+v", p.Status)
		})
		waitItems(t, c, "node-a", appA, appA2, modelItem)
		waitItems(t, c, "node-b", appB, appB2, modelItem)
		setItemsState(t, c, "node-a", shoalv1.ItemReady, appA2, modelItem)
		waitItems(t, c, "node-a", appA2, modelItem)
		waitItems(t, c, "node-b", appB, appB2, modelItem) // not ready there yet
		setItemsState(t, c, "node-b", shoalv1.ItemReady, appB2, modelItem)
		waitItems(t, c, "node-b", appB2, modelItem)
	})

	t.Run("deleted, with a controller restart: every node releases it", func(t *testing.T) {
		stop()
		if err := c.Delete(ctx, getPrewarm(t, c, key)); err != nil {
			t.Fatal(err)
		}
		stop = start()
		waitItems(t, c, "node-a")
		waitItems(t, c, "node-b")
		eventually(t, "Prewarm gone", func() (bool, string) {
			p := getPrewarm(t, c, key)
			return p == nil, fmt.Sprintf("%+v", p)
		})
	})
}

// TestPrewarmHeldUntilNodesRelease: a deleted Prewarm stays, with its finalizer, while a
// NodeCache still asks for content that only it wanted, and goes once that item is out. Only
// the Prewarm reconciler runs, so the NodeCache changes only when the test says.
func TestPrewarmHeldUntilNodesRelease(t *testing.T) {
	env := kubetest.Start(t)
	c := env.Client
	ctx := t.Context()
	reg := startRegistry(t)
	digest := reg.pushRandom(t, "team/app:1")
	r := reg.resolver(t)
	startManager(t, env, func(mgr ctrl.Manager) error {
		return (&controllers.PrewarmReconciler{Client: mgr.GetClient(), Resolver: controllers.RegistryResolver{R: r}}).SetupWithManager(mgr)
	})
	if err := c.Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a", Labels: map[string]string{
		corev1.LabelOSStable: "linux", corev1.LabelArchStable: "amd64"}}}); err != nil {
		t.Fatal(err)
	}
	if err := c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "team"}}); err != nil {
		t.Fatal(err)
	}
	p := &shoalv1.Prewarm{ObjectMeta: metav1.ObjectMeta{Name: "app", Namespace: "team"},
		Spec: shoalv1.PrewarmSpec{Artifacts: []string{"registry.test/team/app:1"}}}
	if err := c.Create(ctx, p); err != nil {
		t.Fatal(err)
	}
	key := client.ObjectKeyFromObject(p)
	eventually(t, "resolved, with the finalizer", func() (bool, string) {
		p := getPrewarm(t, c, key)
		return p != nil && len(p.Status.References) == 1 && p.Status.References[0].Digest == digest &&
			slices.Contains(p.Finalizers, controllers.Finalizer), fmt.Sprintf("%+v", p)
	})
	// What the NodeCache reconciler would have written for node-a.
	nc := &shoalv1.NodeCache{ObjectMeta: metav1.ObjectMeta{Name: "node-a"},
		Spec: shoalv1.NodeCacheSpec{Items: []shoalv1.NodeCacheItem{{Reference: "registry.test/team/app:1@" + digest, Pin: true}}}}
	if err := c.Create(ctx, nc); err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(ctx, getPrewarm(t, c, key)); err != nil {
		t.Fatal(err)
	}
	// The reconciler looks again every 2 s while it waits; over three such rounds the
	// Prewarm must still be there.
	for deadline := time.Now().Add(6 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		p := getPrewarm(t, c, key)
		if p == nil || p.DeletionTimestamp == nil || !slices.Contains(p.Finalizers, controllers.Finalizer) {
			t.Fatalf("the Prewarm was let go while node-a's NodeCache still asks for its content: %+v", p)
		}
	}
	nc.Spec.Items = nil
	if err := c.Update(ctx, nc); err != nil {
		t.Fatal(err)
	}
	eventually(t, "Prewarm gone once node-a released it", func() (bool, string) {
		p := getPrewarm(t, c, key)
		return p == nil, fmt.Sprintf("%+v", p)
	})
}

// TestPrewarmPullSecrets: a Prewarm of a private image resolves with its imagePullSecret, read
// from its namespace, and says Unauthorized without one.
func TestPrewarmPullSecrets(t *testing.T) {
	env := kubetest.Start(t)
	c := env.Client
	ctx := t.Context()
	priv := startPrivateRegistry(t, "puller", "s3cret")
	img, err := random.Image(1024, 1)
	if err != nil {
		t.Fatal(err)
	}
	digest := priv.push(t, "secret/app:1", img)
	r, err := resolve.New(resolve.WithEndpoints(map[string]string{"private.test": "http://" + priv.host}),
		resolve.WithInsecure("private.test"))
	if err != nil {
		t.Fatal(err)
	}
	startManager(t, env, func(mgr ctrl.Manager) error {
		return (&controllers.PrewarmReconciler{Client: mgr.GetClient(), Resolver: controllers.RegistryResolver{R: r}}).SetupWithManager(mgr)
	})
	if err := c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "team"}}); err != nil {
		t.Fatal(err)
	}
	createPullSecret(t, c, "team", "pull", "private.test", priv.user, priv.password)
	for _, tc := range []struct {
		name    string
		secrets []corev1.LocalObjectReference
	}{{"with", []corev1.LocalObjectReference{{Name: "pull"}}}, {"without", nil}} {
		p := &shoalv1.Prewarm{
			ObjectMeta: metav1.ObjectMeta{Name: tc.name, Namespace: "team"},
			Spec:       shoalv1.PrewarmSpec{Images: []string{"private.test/secret/app:1"}, ImagePullSecrets: tc.secrets},
		}
		if err := c.Create(ctx, p); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "resolved with the secret", func() (bool, string) {
		p := getPrewarm(t, c, client.ObjectKey{Namespace: "team", Name: "with"})
		return p != nil && len(p.Status.References) == 1 && p.Status.References[0].Digest == digest, fmt.Sprintf("%+v", p)
	})
	eventually(t, "unauthorized without it", func() (bool, string) {
		p := getPrewarm(t, c, client.ObjectKey{Namespace: "team", Name: "without"})
		return p != nil && len(p.Status.References) == 1 && p.Status.References[0].Digest == "" &&
			strings.Contains(strings.ToLower(p.Status.References[0].Error), "unauthorized") &&
			meta.IsStatusConditionTrue(p.Status.Conditions, controllers.ConditionDegraded), fmt.Sprintf("%+v", p)
	})
}

// TestPrewarmOutsideTheAllowedNamespaces: a Prewarm in a namespace the policy does not list
// reaches no node, touches no registry, and says why; one in an allowed namespace proceeds.
func TestPrewarmOutsideTheAllowedNamespaces(t *testing.T) {
	env := kubetest.Start(t)
	c := env.Client
	ctx := t.Context()
	reg := startRegistry(t)
	digest := reg.pushRandom(t, "team/app:1")
	reg.pushRandom(t, "team/other:1")
	r := reg.resolver(t)
	policy := controllers.Policy{Namespaces: []string{"allowed"}}
	startManager(t, env, func(mgr ctrl.Manager) error {
		if err := (&controllers.NodeCacheReconciler{Client: mgr.GetClient(), Policy: policy}).SetupWithManager(mgr); err != nil {
			return err
		}
		return (&controllers.PrewarmReconciler{Client: mgr.GetClient(), Resolver: controllers.RegistryResolver{R: r}, Policy: policy}).SetupWithManager(mgr)
	})
	if err := c.Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}}); err != nil {
		t.Fatal(err)
	}
	for _, ns := range []string{"allowed", "other"} {
		if err := c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
			t.Fatal(err)
		}
		ref := map[string]string{"allowed": "registry.test/team/app:1", "other": "registry.test/team/other:1"}[ns]
		if err := c.Create(ctx, &shoalv1.Prewarm{
			ObjectMeta: metav1.ObjectMeta{Name: "app", Namespace: ns},
			Spec:       shoalv1.PrewarmSpec{Artifacts: []string{ref}},
		}); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "refused", func() (bool, string) {
		p := getPrewarm(t, c, client.ObjectKey{Namespace: "other", Name: "app"})
		cond := meta.FindStatusCondition(p.Status.Conditions, controllers.ConditionDegraded)
		return cond != nil && cond.Status == metav1.ConditionTrue && cond.Reason == "NamespaceNotAllowed" &&
			len(p.Status.References) == 0, fmt.Sprintf("%+v", p.Status)
	})
	// Only the allowed one's content reaches the node.
	waitItems(t, c, "node-a", "registry.test/team/app:1@"+digest)
}

// gaugeValue is the value of the series of gauge name whose state label is state in reg.
func gaugeValue(t *testing.T, reg *prometheus.Registry, name, state string) float64 {
	t.Helper()
	return metricValue(t, reg, name, "state", state)
}

// metricValue is the value of the counter or gauge name's series with label=value.
func metricValue(t *testing.T, reg *prometheus.Registry, name, label, value string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == label && l.GetValue() == value {
					if m.GetCounter() != nil {
						return m.GetCounter().GetValue()
					}
					return m.GetGauge().GetValue()
				}
			}
		}
	}
	t.Fatalf("no series of %s with %s=%s", name, label, value)
	return 0
}
