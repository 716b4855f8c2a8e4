package controllers_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	v1 "github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/controllers"
	"github.com/shoal-dev/shoal/test/kubetest"
)

// waitFor bounds how long a test waits for the controller to converge; it only bounds a failure.
// It is longer than the controller's backoff after an API server outage (its watches retry with
// a backoff capped at 30 s).
const waitFor = 60 * time.Second

const (
	digestAmd64 = "sha256:2222222222222222222222222222222222222222222222222222222222222222"
	digestIndex = "sha256:1111111111111111111111111111111111111111111111111111111111111111"
)

var skipNameValidation = true

// startManager runs a controller manager with setup's reconcilers until the test ends or the
// returned function stops it.
func startManager(t *testing.T, env *kubetest.Env, setup func(ctrl.Manager) error) (stop func()) {
	t.Helper()
	return startManagerAt(t, env.Config, env, setup)
}

// startManagerAt is startManager reaching the API server with cfg.
func startManagerAt(t *testing.T, cfg *rest.Config, env *kubetest.Env, setup func(ctrl.Manager) error) (stop func()) {
	t.Helper()
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                 env.Scheme,
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: "0",
		// Each test runs its own manager in one process: the same controller names again.
		Controller: config.Controller{SkipNameValidation: &skipNameValidation},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := setup(mgr); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("manager: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// eventually polls cond until it holds or waitFor passes, and then fails with what it says.
func eventually(t *testing.T, what string, cond func() (bool, string)) {
	t.Helper()
	var last string
	for deadline := time.Now().Add(waitFor); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		var ok bool
		if ok, last = cond(); ok {
			return
		}
	}
	t.Fatalf("%s: not within %v: %s", what, waitFor, last)
}

func nodeCacheItems(t *testing.T, c client.Client, node string) ([]string, *v1.NodeCache) {
	var nc v1.NodeCache
	if err := c.Get(t.Context(), client.ObjectKey{Name: node}, &nc); err != nil {
		return nil, nil
	}
	var out []string
	for _, it := range nc.Spec.Items {
		out = append(out, it.Reference)
	}
	return out, &nc
}

// waitItems waits until node's NodeCache holds exactly the items want (in any order; the spec
// keeps them sorted).
func waitItems(t *testing.T, c client.Client, node string, want ...string) {
	t.Helper()
	want = slices.Sorted(slices.Values(want))
	eventually(t, "NodeCache "+node, func() (bool, string) {
		got, nc := nodeCacheItems(t, c, node)
		if nc == nil {
			return false, "no NodeCache"
		}
		return slices.Equal(got, want), fmt.Sprintf("items %v, want %v", got, want)
	})
}

func TestNodeCachesFollowNodesAndPrewarms(t *testing.T) {
	env := kubetest.Start(t)
	c := env.Client
	ctx := t.Context()
	startManager(t, env, func(mgr ctrl.Manager) error {
		return (&controllers.NodeCacheReconciler{Client: mgr.GetClient()}).SetupWithManager(mgr)
	})

	mkNode := func(name string, gpu bool) *corev1.Node {
		n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{
			corev1.LabelOSStable: "linux", corev1.LabelArchStable: "amd64",
		}}}
		if gpu {
			n.Labels["gpu"] = "true"
		}
		if err := c.Create(ctx, n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	nodeA, nodeB := mkNode("node-a", true), mkNode("node-b", false)

	t.Run("every node gets a NodeCache it owns", func(t *testing.T) {
		for _, n := range []*corev1.Node{nodeA, nodeB} {
			waitItems(t, c, n.Name)
			_, nc := nodeCacheItems(t, c, n.Name)
			if len(nc.OwnerReferences) != 1 || nc.OwnerReferences[0].UID != n.UID || nc.OwnerReferences[0].Kind != "Node" {
				t.Errorf("%s: owners %+v", n.Name, nc.OwnerReferences)
			}
		}
	})

	if err := c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "team"}}); err != nil {
		t.Fatal(err)
	}
	p := &v1.Prewarm{
		ObjectMeta: metav1.ObjectMeta{Name: "app", Namespace: "team"},
		Spec: v1.PrewarmSpec{
			Images:       []string{"registry.test/app:1"},
			NodeSelector: &v1.NodeSelector{MatchLabels: map[string]v1.LabelValue{"gpu": "true"}},
		},
	}
	if err := c.Create(ctx, p); err != nil {
		t.Fatal(err)
	}
	p.Status.References = []v1.ResolvedReference{{
		Reference: "registry.test/app:1", Repository: "registry.test/app", Tag: "1", Digest: digestIndex,
		Platforms: []v1.PlatformManifest{{Platform: "linux/amd64", Digest: digestAmd64}},
	}}
	if err := c.Status().Update(ctx, p); err != nil {
		t.Fatal(err)
	}
	item := "registry.test/app:1@" + digestAmd64

	t.Run("a resolved Prewarm reaches the nodes it selects only", func(t *testing.T) {
		waitItems(t, c, "node-a", item)
		waitItems(t, c, "node-b")
	})

	t.Run("a node that starts to match gets the content", func(t *testing.T) {
		nodeB.Labels["gpu"] = "true"
		if err := c.Update(ctx, nodeB); err != nil {
			t.Fatal(err)
		}
		waitItems(t, c, "node-b", item)
	})

	t.Run("a node that stops matching releases it", func(t *testing.T) {
		delete(nodeA.Labels, "gpu")
		if err := c.Update(ctx, nodeA); err != nil {
			t.Fatal(err)
		}
		waitItems(t, c, "node-a")
		waitItems(t, c, "node-b", item)
	})

	t.Run("a node added later gets its NodeCache", func(t *testing.T) {
		mkNode("node-c", true)
		waitItems(t, c, "node-c", item)
	})

	t.Run("a removed node takes its NodeCache with it", func(t *testing.T) {
		node := mkNode("node-d", true)
		waitItems(t, c, "node-d", item)
		if err := c.Delete(ctx, node); err != nil {
			t.Fatal(err)
		}
		// envtest runs no garbage collector: the reconciler itself deletes it.
		eventually(t, "NodeCache node-d deleted", func() (bool, string) {
			_, nc := nodeCacheItems(t, c, "node-d")
			return nc == nil, fmt.Sprintf("%+v", nc)
		})
		// A NodeCache that no Node controls is not the reconciler's to delete, even when a
		// Node of its name goes.
		other := mkNode("node-e", false)
		waitItems(t, c, "node-e")
		_, nc := nodeCacheItems(t, c, "node-e")
		nc.OwnerReferences = nil
		if err := c.Update(ctx, nc); err != nil {
			t.Fatal(err)
		}
		if err := c.Delete(ctx, other); err != nil {
			t.Fatal(err)
		}
		mkNode("node-f", false) // reconciled after node-e's removal (one worker, in order)
		waitItems(t, c, "node-f")
		if _, nc := nodeCacheItems(t, c, "node-e"); nc == nil {
			t.Errorf("a NodeCache without a Node owner was deleted with the Node of its name")
		}
	})

	t.Run("a deleted Prewarm is released everywhere", func(t *testing.T) {
		if err := c.Delete(ctx, p); err != nil {
			t.Fatal(err)
		}
		for _, n := range []string{"node-a", "node-b", "node-c"} {
			waitItems(t, c, n)
		}
	})
}

// TestControllerRestartLosesNothing stops the controller, changes what it must act on while it
// is down, and starts another: the new one converges from the objects alone (the reconcilers
// keep no state that matters), and nothing is duplicated.
func TestControllerRestartLosesNothing(t *testing.T) {
	env := kubetest.Start(t)
	c := env.Client
	ctx := t.Context()
	setup := func(mgr ctrl.Manager) error {
		return (&controllers.NodeCacheReconciler{Client: mgr.GetClient()}).SetupWithManager(mgr)
	}
	stop := startManager(t, env, setup)
	gpu := map[string]string{corev1.LabelOSStable: "linux", corev1.LabelArchStable: "amd64", "gpu": "true"}
	for _, n := range []string{"node-a", "node-b"} {
		node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n, Labels: map[string]string{corev1.LabelOSStable: "linux", corev1.LabelArchStable: "amd64"}}}
		if n == "node-a" {
			node.Labels = gpu
		}
		if err := c.Create(ctx, node); err != nil {
			t.Fatal(err)
		}
	}
	item := createGPUPrewarm(t, c)
	waitItems(t, c, "node-a", item)
	waitItems(t, c, "node-b")

	stop()
	// While no controller runs: node-b starts to match, node-a stops, a node joins.
	var nodeA, nodeB corev1.Node
	if err := c.Get(ctx, client.ObjectKey{Name: "node-a"}, &nodeA); err != nil {
		t.Fatal(err)
	}
	if err := c.Get(ctx, client.ObjectKey{Name: "node-b"}, &nodeB); err != nil {
		t.Fatal(err)
	}
	delete(nodeA.Labels, "gpu")
	nodeB.Labels["gpu"] = "true"
	for _, n := range []*corev1.Node{&nodeA, &nodeB} {
		if err := c.Update(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-c", Labels: gpu}}); err != nil {
		t.Fatal(err)
	}

	startManager(t, env, setup)
	waitItems(t, c, "node-a")
	waitItems(t, c, "node-b", item)
	waitItems(t, c, "node-c", item)
	var list v1.NodeCacheList
	if err := c.List(ctx, &list); err != nil {
		t.Fatal(err)
	}
	if len(list.Items) != 3 {
		t.Errorf("%d NodeCaches for 3 nodes", len(list.Items))
	}
}

// TestNodeCacheBudget: with a per-node budget, the reconciler writes what fits into the
// NodeCache and the rest into its spec.refused.
func TestNodeCacheBudget(t *testing.T) {
	env := kubetest.Start(t)
	c := env.Client
	ctx := t.Context()
	startManager(t, env, func(mgr ctrl.Manager) error {
		return (&controllers.NodeCacheReconciler{Client: mgr.GetClient(), Policy: controllers.Policy{MaxPinnedBytesPerNode: 1000}}).SetupWithManager(mgr)
	})
	if err := c.Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a", Labels: map[string]string{corev1.LabelOSStable: "linux", corev1.LabelArchStable: "amd64"}}}); err != nil {
		t.Fatal(err)
	}
	if err := c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "team"}}); err != nil {
		t.Fatal(err)
	}
	for _, x := range []struct {
		name, digest string
		size         int64
	}{{"small", digestAmd64, 400}, {"big", digestIndex, 800}} {
		p := &v1.Prewarm{ObjectMeta: metav1.ObjectMeta{Name: x.name, Namespace: "team"}, Spec: v1.PrewarmSpec{Images: []string{"registry.test/" + x.name + ":1"}}}
		if err := c.Create(ctx, p); err != nil {
			t.Fatal(err)
		}
		p.Status.References = []v1.ResolvedReference{{Reference: "registry.test/" + x.name + ":1", Repository: "registry.test/" + x.name, Tag: "1", Digest: x.digest, Size: x.size}}
		if err := c.Status().Update(ctx, p); err != nil {
			t.Fatal(err)
		}
		if x.name == "small" {
			waitItems(t, c, "node-a", "registry.test/small:1@"+digestAmd64)
		}
	}
	eventually(t, "big refused", func() (bool, string) {
		items, nc := nodeCacheItems(t, c, "node-a")
		if nc == nil {
			return false, "no NodeCache"
		}
		want := []v1.RefusedItem{{Reference: "registry.test/big:1@" + digestIndex, Bytes: 800, BudgetBytes: 1000}}
		return slices.Equal(items, []string{"registry.test/small:1@" + digestAmd64}) && slices.Equal(nc.Spec.Refused, want),
			fmt.Sprintf("items %v, refused %+v", items, nc.Spec.Refused)
	})
}

// createGPUPrewarm creates namespace team and in it a Prewarm of registry.test/app:1 for the
// nodes labelled gpu=true, resolved as the Prewarm reconciler would have (to digestAmd64), and
// returns the NodeCache item it asks for.
func createGPUPrewarm(t *testing.T, c client.Client) string {
	t.Helper()
	ctx := t.Context()
	if err := c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "team"}}); err != nil {
		t.Fatal(err)
	}
	p := &v1.Prewarm{
		ObjectMeta: metav1.ObjectMeta{Name: "app", Namespace: "team"},
		Spec:       v1.PrewarmSpec{Images: []string{"registry.test/app:1"}, NodeSelector: &v1.NodeSelector{MatchLabels: map[string]v1.LabelValue{"gpu": "true"}}},
	}
	if err := c.Create(ctx, p); err != nil {
		t.Fatal(err)
	}
	p.Status.References = []v1.ResolvedReference{{Reference: "registry.test/app:1", Repository: "registry.test/app", Tag: "1", Digest: digestAmd64}}
	if err := c.Status().Update(ctx, p); err != nil {
		t.Fatal(err)
	}
	return "registry.test/app:1@" + digestAmd64
}
