package controllers

import (
	"context"
	"maps"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	v1 "github.com/shoal-dev/shoal/api/v1alpha1"
)

// prewarmsOfNodeCache maps a NodeCache to the Prewarms its changes concern: those that
// select its node, whose rollup counts it, and those being deleted, whose release waits for
// it. An agent writes its NodeCache's status every few seconds while it downloads; reconciling
// every Prewarm for each write would cost O(Prewarms × nodes) per write. A NodeCache whose Node
// is gone concerns every Prewarm (the Node's removal reaches them too).
func prewarmsOfNodeCache(c client.Client) handler.MapFunc {
	all := enqueueAll(c, &v1.PrewarmList{})
	return func(ctx context.Context, obj client.Object) []reconcile.Request {
		var node corev1.Node
		if err := c.Get(ctx, types.NamespacedName{Name: obj.GetName()}, &node); err != nil {
			return all(ctx, obj)
		}
		var prewarms v1.PrewarmList
		if err := c.List(ctx, &prewarms); err != nil {
			log.FromContext(ctx).Error(err, "list Prewarms")
			return nil
		}
		var reqs []reconcile.Request
		for i := range prewarms.Items {
			p := &prewarms.Items[i]
			if p.DeletionTimestamp != nil || Selects(p, &node) {
				reqs = append(reqs, reconcile.Request{NamespacedName: client.ObjectKeyFromObject(p)})
			}
		}
		return reqs
	}
}

// nodeChangesSelection passes the Node events a Prewarm's rollup depends on: a node added or
// removed, its labels (what selects it, its platform) and its Ready condition (AgentGrace).
// The status updates kubelet makes for other reasons pass by.
var nodeChangesSelection = predicate.Funcs{UpdateFunc: func(e event.UpdateEvent) bool {
	old, oldOK := e.ObjectOld.(*corev1.Node)
	cur, curOK := e.ObjectNew.(*corev1.Node)
	if !oldOK || !curOK {
		return true
	}
	return !maps.Equal(old.Labels, cur.Labels) || nodeReady(old) != nodeReady(cur)
}}

// readyCondition is a Node's Ready condition, nil without one.
func readyCondition(n *corev1.Node) *corev1.NodeCondition {
	for i := range n.Status.Conditions {
		if n.Status.Conditions[i].Type == corev1.NodeReady {
			return &n.Status.Conditions[i]
		}
	}
	return nil
}

// nodeReady is the status of a Node's Ready condition ("" without one).
func nodeReady(n *corev1.Node) corev1.ConditionStatus {
	if c := readyCondition(n); c != nil {
		return c.Status
	}
	return ""
}
