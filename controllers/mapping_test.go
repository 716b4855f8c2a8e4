package controllers

import (
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/event"

	v1 "github.com/shoal-dev/shoal/api/v1alpha1"
)

// A NodeCache's change reaches the Prewarms that select its node and those being deleted;
// one whose Node is gone reaches them all.
func TestPrewarmsOfNodeCache(t *testing.T) {
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	if err := v1.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	gpuOnly := &v1.NodeSelector{MatchLabels: map[string]v1.LabelValue{"gpu": "true"}}
	selectsGPU, selectsAll, deleting := pw("gpu", gpuOnly, nil), pw("all", nil, nil), pw("deleting", gpuOnly, func(p *v1.Prewarm) {
		now := metav1.Now()
		p.DeletionTimestamp, p.Finalizers = &now, []string{Finalizer}
	})
	c := fake.NewClientBuilder().WithScheme(scheme).WithObjects(
		testNode("plain", nil), testNode("gpu-node", map[string]string{"gpu": "true"}),
		&selectsGPU, &selectsAll, &deleting,
	).Build()
	names := func(node string) []string {
		var out []string
		for _, r := range prewarmsOfNodeCache(c)(t.Context(), &v1.NodeCache{ObjectMeta: metav1.ObjectMeta{Name: node}}) {
			out = append(out, r.Name)
		}
		slices.Sort(out)
		return out
	}
	for node, want := range map[string][]string{
		"plain":    {"all", "deleting"},
		"gpu-node": {"all", "deleting", "gpu"},
		"gone":     {"all", "deleting", "gpu"},
	} {
		if got := names(node); !slices.Equal(got, want) {
			t.Errorf("NodeCache %s reconciles %v, want %v", node, got, want)
		}
	}
}

// Only a Node's labels and Ready condition matter to the Prewarms' rollups.
func TestNodeChangesSelection(t *testing.T) {
	base := testNode("a", nil)
	base.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue}}
	for _, tc := range []struct {
		name string
		edit func(n *corev1.Node)
		want bool
	}{
		{"heartbeat only", func(n *corev1.Node) {
			n.Status.Conditions[0].LastHeartbeatTime = metav1.Now()
			n.Status.Images = []corev1.ContainerImage{{Names: []string{"x"}}}
		}, false},
		{"a label", func(n *corev1.Node) { n.Labels["gpu"] = "true" }, true},
		{"not Ready", func(n *corev1.Node) { n.Status.Conditions[0].Status = corev1.ConditionUnknown }, true},
	} {
		cur := base.DeepCopy()
		tc.edit(cur)
		var oldObj, curObj client.Object = base, cur
		if got := nodeChangesSelection.Update(event.UpdateEvent{ObjectOld: oldObj, ObjectNew: curObj}); got != tc.want {
			t.Errorf("%s: passes %v, want %v", tc.name, got, tc.want)
		}
	}
}
