package controllers

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"maps"
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
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
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
		if apierrors.IsNotFound(err) {
			return reconcile.Result{}, r.deleteOrphan(ctx, req.Name)
		}
		return reconcile.Result{}, err
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

	want := DesiredItems(&node, r.Policy.allowed(prewarms.Items), &nc, r.Policy.MaxPinnedBytesPerNode)
	if want.Dropped > 0 && r.Recorder != nil {
		r.Recorder.Eventf(&node, nil, corev1.EventTypeWarning, "TooManyItems", "Reconcile",
			"the Prewarms selecting this node ask for more than %d manifests; %d left out", v1.MaxNodeCacheItems, want.Dropped)
	}
	spec := v1.NodeCacheSpec{Items: want.Items, Refused: want.Refused, SeedGroups: want.SeedGroups}
	if !exists {
		nc = v1.NodeCache{ObjectMeta: metav1.ObjectMeta{Name: node.Name}, Spec: spec}
		if err := controllerutil.SetControllerReference(&node, &nc, r.Client.Scheme()); err != nil {
			return reconcile.Result{}, err
		}
		if err := r.Client.Create(ctx, &nc); err != nil {
			return reconcile.Result{}, err
		}
		log.FromContext(ctx).V(1).Info("NodeCache created", "items", len(spec.Items), "refused", len(spec.Refused))
		return reconcile.Result{}, nil
	}
	if equality.Semantic.DeepEqual(nc.Spec, spec) {
		return reconcile.Result{}, nil
	}
	if len(spec.Refused) > len(nc.Spec.Refused) && r.Recorder != nil {
		r.Recorder.Eventf(&node, nil, corev1.EventTypeWarning, "PinBudgetExceeded", "Reconcile",
			"the Prewarms selecting this node ask it to pin more than the %d bytes allowed per node; %d items left out (see its NodeCache's spec.refused)",
			r.Policy.MaxPinnedBytesPerNode, len(spec.Refused))
	}
	nc.Spec = spec
	if err := r.Client.Update(ctx, &nc); err != nil {
		return reconcile.Result{}, err
	}
	log.FromContext(ctx).V(1).Info("NodeCache updated", "items", len(spec.Items), "refused", len(spec.Refused))
	return reconcile.Result{}, nil
}

// deleteOrphan deletes the NodeCache of a Node that is gone. The owner reference lets the
// cluster's garbage collector do it too; doing it here does not depend on that collector (which
// some test clusters and envtest do not run), and the Prewarms' rollups stop counting the node
// at once either way. Only a NodeCache a Node controls is deleted, and only the one read (a
// Node of the same name that comes back gets a new one).
func (r *NodeCacheReconciler) deleteOrphan(ctx context.Context, name string) error {
	var nc v1.NodeCache
	if err := r.Client.Get(ctx, types.NamespacedName{Name: name}, &nc); err != nil {
		return client.IgnoreNotFound(err)
	}
	owner := metav1.GetControllerOf(&nc)
	if owner == nil || owner.Kind != "Node" || nc.DeletionTimestamp != nil {
		return nil
	}
	err := r.Client.Delete(ctx, &nc, client.Preconditions{UID: &nc.UID, ResourceVersion: &nc.ResourceVersion})
	if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
		return nil // gone already, or changed: its next event brings it back here
	}
	if err == nil {
		log.FromContext(ctx).V(1).Info("NodeCache of a removed Node deleted")
	}
	return err
}

// SetupWithManager registers the reconciler: Nodes, the NodeCaches they own, and every
// Prewarm change for every Node (a Prewarm's selector may have stopped matching a node).
func (r *NodeCacheReconciler) SetupWithManager(mgr ctrl.Manager) error {
	return ctrl.NewControllerManagedBy(mgr).
		Named("nodecache").
		For(&corev1.Node{}).
		// Of the agent's status writes (every few seconds per downloading node) only those
		// that change which items are Ready matter here: a moved tag's old digest goes once
		// the new one is Ready. Spec changes and deletions pass.
		Owns(&v1.NodeCache{}, builder.WithPredicates(predicate.Funcs{UpdateFunc: func(e event.UpdateEvent) bool {
			old, oldOK := e.ObjectOld.(*v1.NodeCache)
			cur, curOK := e.ObjectNew.(*v1.NodeCache)
			return !oldOK || !curOK || old.Generation != cur.Generation || !maps.Equal(readyItems(old), readyItems(cur))
		}})).
		Watches(&v1.Prewarm{}, handler.EnqueueRequestsFromMapFunc(enqueueAll(r.Client, &corev1.NodeList{})),
			builder.WithPredicates(predicate.Funcs{UpdateFunc: func(e event.UpdateEvent) bool {
				old, oldOK := e.ObjectOld.(*v1.Prewarm)
				cur, curOK := e.ObjectNew.(*v1.Prewarm)
				return !oldOK || !curOK || nodeInputsChanged(old, cur)
			}})).
		Complete(r)
}

// nodeInputsChanged reports whether a Prewarm update changes what any NodeCache must hold:
// its spec, the resolved references (with their pull secrets), the seeders, or its deletion.
// The status writes that only roll the nodes up, one per NodeCache change on a busy
// Prewarm, would otherwise reconcile every Node each time.
func nodeInputsChanged(old, cur *v1.Prewarm) bool {
	return old.Generation != cur.Generation ||
		!old.DeletionTimestamp.Equal(cur.DeletionTimestamp) ||
		!equality.Semantic.DeepEqual(old.Status.References, cur.Status.References) ||
		!slices.Equal(old.Status.Seeders, cur.Status.Seeders)
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

// Desired is what a node's NodeCache should say.
type Desired struct {
	// Items is the content the node must hold.
	Items []v1.NodeCacheItem
	// Refused is pinned content left out by the per-node budget.
	Refused []v1.RefusedItem
	// Dropped counts the items left out past MaxNodeCacheItems.
	Dropped int
	// SeedGroups are the groups the items name.
	SeedGroups []v1.SeedGroup
}

// DesiredItems is the spec of a node's NodeCache: one item per manifest that a Prewarm
// selecting the node has resolved for it, sorted by reference, merged (pinned if any Prewarm
// pins it), and at most MaxNodeCacheItems of them (Dropped counts the rest). An item of
// current whose tag moved stays until the node holds the new digest, so that a node never
// goes without the content in between.
//
// budget (0 = none) bounds the bytes of the pinned items: they get it in a stable order, so
// that a new Prewarm never pushes out content a node was given before: first the items current
// has, then by the age of the oldest Prewarm asking for them, then by reference. Pinned items
// past the budget are Refused. Items kept while their tag moves, and items not pinned, are
// not counted.
func DesiredItems(node *corev1.Node, prewarms []v1.Prewarm, current *v1.NodeCache, budget int64) Desired {
	type wanted struct {
		item   v1.NodeCacheItem
		bytes  int64
		oldest *v1.Prewarm
	}
	byRef := map[string]*wanted{}
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
			for _, m := range manifestsOf(&ref, p.Spec.Platforms, platform) {
				it := v1.NodeCacheItem{
					Reference:      itemReference(ref.Repository, ref.Tag, m.Digest),
					Pin:            p.Spec.Store != v1.StoreCached,
					RuntimeImport:  !ref.Artifact && p.Spec.RuntimeImport == v1.RuntimeImportPinned,
					PullSecretName: ref.PullSecretName,
				}
				have := byRef[it.Reference]
				if have == nil {
					byRef[it.Reference] = &wanted{item: it, bytes: m.Size, oldest: p}
					continue
				}
				have.item.Pin = have.item.Pin || it.Pin
				have.item.PullSecretName = cmp.Or(have.item.PullSecretName, it.PullSecretName)
				have.item.RuntimeImport = have.item.RuntimeImport || it.RuntimeImport
				if olderPrewarm(p, have.oldest) {
					have.oldest = p
				}
			}
		}
	}

	var out Desired
	if budget > 0 {
		given := map[string]bool{}
		if current != nil {
			for _, it := range current.Spec.Items {
				given[it.Reference] = true
			}
		}
		var pinned []*wanted
		for _, w := range byRef {
			if w.item.Pin {
				pinned = append(pinned, w)
			}
		}
		slices.SortFunc(pinned, func(a, b *wanted) int {
			if ga, gb := given[a.item.Reference], given[b.item.Reference]; ga != gb {
				if ga {
					return -1
				}
				return 1
			}
			if olderPrewarm(a.oldest, b.oldest) {
				return -1
			}
			if olderPrewarm(b.oldest, a.oldest) {
				return 1
			}
			return cmp.Compare(a.item.Reference, b.item.Reference)
		})
		var used int64
		for _, w := range pinned {
			if used+w.bytes > budget {
				out.Refused = append(out.Refused, v1.RefusedItem{Reference: w.item.Reference, Bytes: w.bytes, BudgetBytes: budget})
				delete(byRef, w.item.Reference)
				continue
			}
			used += w.bytes
		}
		slices.SortFunc(out.Refused, func(a, b v1.RefusedItem) int { return cmp.Compare(a.Reference, b.Reference) })
		if len(out.Refused) > v1.MaxNodeCacheItems {
			out.Refused = out.Refused[:v1.MaxNodeCacheItems]
		}
	}

	// Seed groups: each item is seeded by the seeders of the oldest Prewarm asking for it, the
	// same choice on every node that Prewarm selects.
	groups := map[string][]string{}
	if current != nil {
		for _, g := range current.Spec.SeedGroups {
			groups[g.Name] = g.Nodes // for items kept while their tag moves
		}
	}
	items := make(map[string]*v1.NodeCacheItem, len(byRef))
	for ref, w := range byRef {
		if nodes := w.oldest.Status.Seeders; len(nodes) > 0 {
			w.item.SeedGroup = SeedGroupName(nodes)
			groups[w.item.SeedGroup] = nodes
		}
		items[ref] = &w.item
	}
	keepSuperseded(items, current)
	out.Items = make([]v1.NodeCacheItem, 0, len(items))
	for _, it := range items {
		out.Items = append(out.Items, *it)
	}
	slices.SortFunc(out.Items, func(a, b v1.NodeCacheItem) int { return cmp.Compare(a.Reference, b.Reference) })
	if len(out.Items) > v1.MaxNodeCacheItems {
		out.Dropped = len(out.Items) - v1.MaxNodeCacheItems
		out.Items = out.Items[:v1.MaxNodeCacheItems]
	}
	out.SeedGroups = seedGroups(out.Items, groups)
	return out
}

// seedGroups returns the groups the items name, at most MaxSeedGroups of them (by name); items
// naming one left out name none, and any member seeds them.
func seedGroups(items []v1.NodeCacheItem, groups map[string][]string) []v1.SeedGroup {
	var names []string
	for _, it := range items {
		if it.SeedGroup != "" && groups[it.SeedGroup] != nil && !slices.Contains(names, it.SeedGroup) {
			names = append(names, it.SeedGroup)
		}
	}
	slices.Sort(names)
	if len(names) > v1.MaxSeedGroups {
		names = names[:v1.MaxSeedGroups]
	}
	for i := range items {
		if !slices.Contains(names, items[i].SeedGroup) {
			items[i].SeedGroup = ""
		}
	}
	var out []v1.SeedGroup
	for _, n := range names {
		out = append(out, v1.SeedGroup{Name: n, Nodes: slices.Clone(groups[n])})
	}
	return out
}

// SeedGroupName names a seed group after its nodes, so that a group whose nodes change gets a
// new name, and the items naming it change with it.
func SeedGroupName(nodes []string) string {
	sum := sha256.Sum256([]byte(strings.Join(nodes, "\n")))
	return "g-" + hex.EncodeToString(sum[:8])
}

// ChooseSeeders returns the seeders of a Prewarm among the nodes it selects: at most
// MaxPrewarmSeeders of them, the highest by rendezvous hash of the Prewarm's UID and the node's
// name (so that a node joining or leaving the selection changes the choice by at most one),
// sorted by name.
func ChooseSeeders(p *v1.Prewarm, nodes []*corev1.Node) []string {
	type ranked struct {
		name   string
		weight uint64
	}
	var rs []ranked
	for _, n := range nodes {
		if Selects(p, n) {
			sum := sha256.Sum256([]byte(string(p.UID) + "/" + n.Name))
			rs = append(rs, ranked{n.Name, binary.BigEndian.Uint64(sum[:8])})
		}
	}
	slices.SortFunc(rs, func(a, b ranked) int {
		if c := cmp.Compare(b.weight, a.weight); c != 0 {
			return c
		}
		return cmp.Compare(a.name, b.name)
	})
	var out []string
	for _, r := range rs[:min(len(rs), v1.MaxPrewarmSeeders)] {
		out = append(out, r.name)
	}
	slices.Sort(out)
	return out
}

// olderPrewarm reports whether a was created before b (by name when created together).
func olderPrewarm(a, b *v1.Prewarm) bool {
	if !a.CreationTimestamp.Equal(&b.CreationTimestamp) {
		return a.CreationTimestamp.Before(&b.CreationTimestamp)
	}
	if a.Namespace != b.Namespace {
		return a.Namespace < b.Namespace
	}
	return a.Name < b.Name
}

// readyItems is the set of a NodeCache's items its agent reports Ready.
func readyItems(nc *v1.NodeCache) map[string]bool {
	out := map[string]bool{}
	for _, st := range nc.Status.Items {
		if st.State == v1.ItemReady {
			out[st.Reference] = true
		}
	}
	return out
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

// manifest is one manifest a node must hold and the bytes it stands for (itself and its blobs).
type manifest struct {
	Digest string
	Size   int64
}

// manifestsOf is manifestsFor with each manifest's size.
func manifestsOf(ref *v1.ResolvedReference, want []string, platform string) []manifest {
	var out []manifest
	for _, d := range manifestsFor(ref, want, platform) {
		size := ref.Size
		for _, m := range ref.Platforms {
			if m.Digest == d {
				size = m.Size
				break
			}
		}
		out = append(out, manifest{Digest: d, Size: size})
	}
	return out
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
