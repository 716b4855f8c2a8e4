package controllers

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/events"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	v1 "github.com/shoal-dev/shoal/api/v1alpha1"
)

// NodeCacheReconciler keeps one NodeCache per Node, owned by it, whose spec is the content that
// the Prewarms selecting the Node ask for. It is keyed by Node: a change to a Prewarm
// reconciles the Nodes, so that nodes that stop matching release the content too.
type NodeCacheReconciler struct {
	Client   client.Client
	Recorder events.EventRecorder
	// Policy says which Prewarms may reach nodes (default: all).
	Policy Policy
}

// +kubebuilder:rbac:groups="",resources=nodes,verbs=get;list;watch
// +kubebuilder:rbac:groups=shoal.dev,resources=nodecaches,verbs=get;list;watch;create;update;patch;delete
// +kubebuilder:rbac:groups=shoal.dev,resources=prewarms,verbs=get;list;watch
// +kubebuilder:rbac:groups=events.k8s.io,resources=events,verbs=create;patch

// Reconcile writes the NodeCache of one Node.
func (r *NodeCacheReconciler) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	var node corev1.Node
	if err := r.Client.Get(ctx, req.NamespacedName, &node); err != nil {
		// A Node that is gone takes its NodeCache with it (owner reference).
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	var prewarms v1.PrewarmList
	if err := r.Client.List(ctx, &prewarms); err != nil {
		return reconcile.Result{}, err
	}
	var nc v1.NodeCache
	err := r.Client.Get(ctx, types.NamespacedName{Name: node.Name}, &nc)
	if err != nil && !apierrors.IsNotFound(err) {
		return reconcile.Result{}, err
	}
	exists := err == nil

	items, dropped := DesiredItems(&node, r.Policy.allowed(prewarms.Items), &nc)
	if dropped > 0 && r.Recorder != nil {
		r.Recorder.Eventf(&node, nil, corev1.EventTypeWarning, "TooManyItems", "Reconcile",
			"the Prewarms selecting this node ask for more than %d manifests; %d left out", v1.MaxNodeCacheItems, dropped)
	}
	if !exists {
		nc = v1.NodeCache{ObjectMeta: metav1.ObjectMeta{Name: node.Name}, Spec: v1.NodeCacheSpec{Items: items}}
		if err := controllerutil.SetControllerReference(&node, &nc, r.Client.Scheme()); err != nil {
			return reconcile.Result{}, err
		}
		if err := r.Client.Create(ctx, &nc); err != nil {
			return reconcile.Result{}, err
		}
		log.FromContext(ctx).V(1).Info("NodeCache created", "items", len(items))
		return reconcile.Result{}, nil
	}
	if equality.Semantic.DeepEqual(nc.Spec.Items, items) {
		return reconcile.Result{}, nil
	}
	nc.Spec.Items = items
	if err := r.Client.Update(ctx, &nc); err != nil {
		return reconcile.Result{}, err
	}
	log.FromContext(ctx).V(1).Info("NodeCache updated", "items", len(items))
	return reconcile.Result{}, nil
}

// SetupWithManager registers the reconciler: Nodes, the NodeCaches they own, and every
// Prewarm change for every Node (a Prewarm's selector may have stopped matching a node).
func (r *NodeCacheReconciler) SetupWithManager(mgr ctrl.Manager) error {
	return ctrl.NewControllerManagedBy(mgr).
		Named("nodecache").
		For(&corev1.Node{}).
		Owns(&v1.NodeCache{}).
		Watches(&v1.Prewarm{}, handler.EnqueueRequestsFromMapFunc(enqueueAll(r.Client, &corev1.NodeList{}))).
		Complete(r)
}

// enqueueAll returns a map function that reconciles every object of list's kind, for a change
// that may concern any of them.
func enqueueAll(c client.Client, list client.ObjectList) handler.MapFunc {
	return func(ctx context.Context, _ client.Object) []reconcile.Request {
		l, ok := list.DeepCopyObject().(client.ObjectList)
		if !ok {
			return nil
		}
		if err := c.List(ctx, l); err != nil {
			log.FromContext(ctx).Error(err, "list", "kind", fmt.Sprintf("%T", list))
			return nil
		}
		var reqs []reconcile.Request
		_ = meta.EachListItem(l, func(o runtime.Object) error {
			if obj, ok := o.(client.Object); ok {
				reqs = append(reqs, reconcile.Request{NamespacedName: client.ObjectKeyFromObject(obj)})
			}
			return nil
		})
		return reqs
	}
}

// Selects reports whether a Prewarm selects a node (a Prewarm being deleted selects none).
func Selects(p *v1.Prewarm, node *corev1.Node) bool {
	if p.DeletionTimestamp != nil {
		return false
	}
	sel, err := metav1.LabelSelectorAsSelector(p.Spec.NodeSelector.LabelSelector())
	if err != nil {
		return false // the CRD's validation keeps such selectors out
	}
	return sel.Matches(labels.Set(node.Labels))
}

// NodePlatform is a node's os/arch from its well-known labels ("" when it has none).
func NodePlatform(node *corev1.Node) string {
	os, arch := node.Labels[corev1.LabelOSStable], node.Labels[corev1.LabelArchStable]
	if os == "" || arch == "" {
		return ""
	}
	return os + "/" + arch
}

// DesiredItems is the spec of a node's NodeCache: one item per manifest that a Prewarm
// selecting the node has resolved for it, sorted by reference, merged (pinned if any Prewarm
// pins it), and at most MaxNodeCacheItems of them (dropped counts the rest). An item of
// current whose tag moved stays until the node holds the new digest, so that a node never
// goes without the content in between.
func DesiredItems(node *corev1.Node, prewarms []v1.Prewarm, current *v1.NodeCache) (items []v1.NodeCacheItem, dropped int) {
	byRef := map[string]*v1.NodeCacheItem{}
	add := func(it v1.NodeCacheItem) {
		if have := byRef[it.Reference]; have != nil {
			have.Pin = have.Pin || it.Pin
			have.RuntimeImport = have.RuntimeImport || it.RuntimeImport
			return
		}
		byRef[it.Reference] = &it
	}
	platform := NodePlatform(node)
	for i := range prewarms {
		p := &prewarms[i]
		if !Selects(p, node) {
			continue
		}
		for _, ref := range p.Status.References {
			if ref.Digest == "" || ref.Repository == "" {
				continue // not resolved (yet)
			}
			for _, digest := range manifestsFor(&ref, p.Spec.Platforms, platform) {
				add(v1.NodeCacheItem{
					Reference:     itemReference(ref.Repository, ref.Tag, digest),
					Pin:           p.Spec.Store != v1.StoreCached,
					RuntimeImport: !ref.Artifact && p.Spec.RuntimeImport == v1.RuntimeImportPinned,
				})
			}
		}
	}
	keepSuperseded(byRef, current)

	items = make([]v1.NodeCacheItem, 0, len(byRef))
	for _, it := range byRef {
		items = append(items, *it)
	}
	slices.SortFunc(items, func(a, b v1.NodeCacheItem) int { return cmp.Compare(a.Reference, b.Reference) })
	if len(items) > v1.MaxNodeCacheItems {
		dropped = len(items) - v1.MaxNodeCacheItems
		items = items[:v1.MaxNodeCacheItems]
	}
	return items, dropped
}

// keepSuperseded adds to byRef each item of current whose repository and tag are still wanted
// at another digest that the node does not hold yet.
func keepSuperseded(byRef map[string]*v1.NodeCacheItem, current *v1.NodeCache) {
	if current == nil {
		return
	}
	ready := map[string]bool{}
	for _, st := range current.Status.Items {
		ready[st.Reference] = st.State == v1.ItemReady
	}
	wanted := map[string][]string{} // repository:tag -> references wanted
	for ref := range byRef {
		if name, _, ok := strings.Cut(ref, "@"); ok && hasTag(name) {
			wanted[name] = append(wanted[name], ref)
		}
	}
	for _, old := range current.Spec.Items {
		if byRef[old.Reference] != nil {
			continue
		}
		name, _, _ := strings.Cut(old.Reference, "@")
		refs := wanted[name]
		if len(refs) == 0 {
			continue // nothing replaces it: released
		}
		if !slices.ContainsFunc(refs, func(r string) bool { return ready[r] }) {
			it := old
			byRef[old.Reference] = &it
		}
	}
}

// hasTag reports whether a reference without digest ends in a tag (a colon after the last
// slash: a registry's port comes before it).
func hasTag(name string) bool {
	return strings.Contains(name[strings.LastIndex(name, "/")+1:], ":")
}

// manifestsFor returns the manifest digests of ref that a node of platform must hold: the
// reference's own digest when it names a single manifest (or an artifact), the manifests of
// the platforms the Prewarm lists, or else the one of the node's own platform.
func manifestsFor(ref *v1.ResolvedReference, want []string, platform string) []string {
	if len(ref.Platforms) == 0 {
		return []string{ref.Digest}
	}
	if len(want) == 0 {
		if platform == "" {
			return nil
		}
		want = []string{platform}
	}
	var digests []string
	for _, w := range want {
		if d := matchPlatform(ref.Platforms, w); d != "" && !slices.Contains(digests, d) {
			digests = append(digests, d)
		}
	}
	return digests
}

// matchPlatform finds the manifest of platform want (os/arch[/variant]) among ms: an exact
// match first, else, when want has no variant, the first of the same os and arch.
func matchPlatform(ms []v1.PlatformManifest, want string) string {
	for _, m := range ms {
		if m.Platform == want {
			return m.Digest
		}
	}
	if strings.Count(want, "/") == 1 {
		for _, m := range ms {
			if strings.HasPrefix(m.Platform, want+"/") {
				return m.Digest
			}
		}
	}
	return ""
}

func itemReference(repository, tag, digest string) string {
	if tag != "" {
		return fmt.Sprintf("%s:%s@%s", repository, tag, digest)
	}
	return repository + "@" + digest
}
