package controllers_test

import (
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/controllers"
	"github.com/shoal-dev/shoal/test/kubetest"
)

// outageFor is how long TestControllerRecoversFromAPIServerOutage keeps the API server away.
const outageFor = 15 * time.Second

// TestControllerRecoversFromAPIServerOutage cuts the whole controller (every reconciler of
// `shoal controller`) off the API server, its connections closed and new ones refused, while
// the objects it acts on change; then lets it back. Without a restart it catches up with every
// change from the objects alone: the NodeCaches follow the nodes, the Prewarm's status counts
// the nodes it selects now, and a pod created during the outage gets its image seeded.
func TestControllerRecoversFromAPIServerOutage(t *testing.T) {
	env := kubetest.Start(t)
	c := env.Client
	ctx := t.Context()
	reg := startRegistry(t)
	app := platformImage(t, "amd64")
	appDigest := reg.push(t, "team/app:1", app)
	podDigest := reg.pushRandom(t, "team/web:1")
	r := reg.resolver(t)

	outage, cfg := kubetest.NewOutage(t, env)
	startManagerAt(t, cfg, env, func(mgr ctrl.Manager) error {
		if err := (&controllers.NodeCacheReconciler{Client: mgr.GetClient()}).SetupWithManager(mgr); err != nil {
			return err
		}
		if err := (&controllers.PrewarmReconciler{Client: mgr.GetClient(), Resolver: controllers.RegistryResolver{R: r}}).SetupWithManager(mgr); err != nil {
			return err
		}
		if err := (&controllers.PodSeedReconciler{Client: mgr.GetClient(), Resolver: r}).SetupWithManager(mgr); err != nil {
			return err
		}
		return (&controllers.SwarmSeedTTLReconciler{Client: mgr.GetClient()}).SetupWithManager(mgr)
	})
	node := func(name string, gpu bool) *corev1.Node {
		n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{corev1.LabelOSStable: "linux", corev1.LabelArchStable: "amd64"}}}
		if gpu {
			n.Labels["gpu"] = "true"
		}
		return n
	}
	if err := c.Create(ctx, node("node-a", true)); err != nil {
		t.Fatal(err)
	}
	if err := c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "team"}}); err != nil {
		t.Fatal(err)
	}
	p := &v1.Prewarm{
		ObjectMeta: metav1.ObjectMeta{Name: "app", Namespace: "team"},
		Spec: v1.PrewarmSpec{Images: []string{"registry.test/team/app:1"},
			NodeSelector: &v1.NodeSelector{MatchLabels: map[string]v1.LabelValue{"gpu": "true"}}},
	}
	if err := c.Create(ctx, p); err != nil {
		t.Fatal(err)
	}
	item := "registry.test/team/app:1@" + appDigest
	waitItems(t, c, "node-a", item)
	prewarmNodes := func(want v1.NodeCounts) {
		t.Helper()
		eventually(t, "Prewarm nodes", func() (bool, string) {
			got := getPrewarm(t, c, client.ObjectKeyFromObject(p))
			return got != nil && got.Status.Nodes == want, fmt.Sprintf("%+v", got)
		})
	}
	prewarmNodes(v1.NodeCounts{Desired: 1})

	outage.Down()
	// While the controller cannot reach the API server: two nodes join the selection, node-a
	// leaves it, and a pod is scheduled.
	for _, n := range []string{"node-b", "node-c"} {
		if err := c.Create(ctx, node(n, true)); err != nil {
			t.Fatal(err)
		}
	}
	var nodeA corev1.Node
	if err := c.Get(ctx, client.ObjectKey{Name: "node-a"}, &nodeA); err != nil {
		t.Fatal(err)
	}
	delete(nodeA.Labels, "gpu")
	if err := c.Update(ctx, &nodeA); err != nil {
		t.Fatal(err)
	}
	if err := c.Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "team"},
		Spec:       corev1.PodSpec{NodeName: "node-b", Containers: []corev1.Container{{Name: "web", Image: "registry.test/team/web:1"}}},
	}); err != nil {
		t.Fatal(err)
	}
	// Long enough for the informers' re-lists to fail several times and back off.
	time.Sleep(outageFor)
	if err := outage.Up(); err != nil {
		t.Fatal(err)
	}

	waitItems(t, c, "node-a")
	waitItems(t, c, "node-b", item)
	waitItems(t, c, "node-c", item)
	prewarmNodes(v1.NodeCounts{Desired: 2})
	eventually(t, "the pod's image seeded", func() (bool, string) {
		var seed v1.SwarmSeed
		err := c.Get(ctx, client.ObjectKey{Name: controllers.SwarmSeedName(podDigest, 0)}, &seed)
		return err == nil && seed.Spec.Manifest == podDigest, fmt.Sprint(err)
	})
}
