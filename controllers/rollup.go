package controllers

import (
	"cmp"
	"fmt"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1 "github.com/shoal-dev/shoal/api/v1alpha1"
)

// maxFailingNodes bounds Prewarm.status.failingNodes (the CRD's limit).
const maxFailingNodes = 10

// AgentGrace is how long a selected node may go without a Shoal agent before it counts as
// failed (AgentUnavailable) rather than pending: its NodeCache has existed that long with no
// status from an agent, or the Node has been not Ready that long. It covers an agent's
// start-up, including the pull of its own image on a new node.
const AgentGrace = 5 * time.Minute

// Condition types and reasons of a Prewarm.
const (
	ConditionReady       = "Ready"
	ConditionProgressing = "Progressing"
	ConditionDegraded    = "Degraded"
)

// Rollup computes the node part of a Prewarm's status from the nodes it selects and their
// NodeCaches (by node name; a node without one counts as pending): the counts, the bytes held,
// up to ten failing nodes, the Ready string and the three conditions. It changes status in
// place and keeps the conditions' transition times when their status did not change. It
// returns when a pending node without an agent passes AgentGrace, so that the caller looks
// again then (0: no such node).
func Rollup(p *v1.Prewarm, nodes []*corev1.Node, caches map[string]*v1.NodeCache, now metav1.Time) (recheck time.Duration) {
	st := &p.Status
	st.Nodes = v1.NodeCounts{}
	st.BytesReady = 0
	st.FailingNodes = nil
	var failing []v1.NodeFailure
	unpinned := 0 // ready nodes whose runtime holds an image it could not pin
	for _, node := range nodes {
		if !Selects(p, node) {
			continue
		}
		st.Nodes.Desired++
		state := nodeState(p, node, caches[node.Name])
		st.BytesReady += state.bytesReady
		if !state.ready && state.failure == nil {
			var wait time.Duration
			state.failure, wait = agentUnavailable(node, caches[node.Name], now.Time)
			recheck = minPositive(recheck, wait)
		}
		switch {
		case state.failure != nil:
			st.Nodes.Failed++
			failing = append(failing, *state.failure)
		case state.ready:
			st.Nodes.Ready++
			if state.unpinned {
				unpinned++
			}
		}
	}
	slices.SortFunc(failing, func(a, b v1.NodeFailure) int { return cmp.Compare(a.Node, b.Node) })
	if len(failing) > maxFailingNodes {
		failing = failing[:maxFailingNodes]
	}
	st.FailingNodes = failing
	st.Ready = fmt.Sprintf("%d/%d", st.Nodes.Ready, st.Nodes.Desired)

	var unresolved []string
	for _, r := range st.References {
		if r.Digest == "" {
			unresolved = append(unresolved, r.Reference)
		}
	}
	if len(st.References) < len(p.Spec.Images)+len(p.Spec.Artifacts) {
		unresolved = append(unresolved, "(not resolved yet)")
	}
	pending := st.Nodes.Desired - st.Nodes.Ready - st.Nodes.Failed
	set := func(typ string, ok bool, reason, msg string) {
		status := metav1.ConditionFalse
		if ok {
			status = metav1.ConditionTrue
		}
		meta.SetStatusCondition(&st.Conditions, metav1.Condition{
			Type: typ, Status: status, Reason: reason, Message: msg,
			ObservedGeneration: p.Generation, LastTransitionTime: now,
		})
	}
	switch {
	case len(unresolved) > 0:
		set(ConditionReady, false, "Unresolved", fmt.Sprintf("%d of the references are not resolved", len(unresolved)))
	case st.Nodes.Desired == 0:
		set(ConditionReady, false, "NoNodes", "the node selector matches no node")
	case st.Nodes.Ready == st.Nodes.Desired && unpinned > 0:
		set(ConditionReady, true, "ReadyNotPinned", fmt.Sprintf(
			"%d nodes hold the content; on %d of them the runtime imported the images but cannot pin them (containerd 1.6), so kubelet's image garbage collection may remove them",
			st.Nodes.Ready, unpinned))
	case st.Nodes.Ready == st.Nodes.Desired:
		set(ConditionReady, true, "AllNodesReady", fmt.Sprintf("%d nodes hold the content", st.Nodes.Ready))
	default:
		set(ConditionReady, false, "NodesNotReady", fmt.Sprintf("%d of %d nodes hold the content", st.Nodes.Ready, st.Nodes.Desired))
	}
	if pending > 0 || len(unresolved) > 0 {
		set(ConditionProgressing, true, "Fetching", fmt.Sprintf("%d nodes are fetching", pending))
	} else {
		set(ConditionProgressing, false, "Done", "no node is fetching")
	}
	switch {
	case st.Nodes.Failed > 0:
		set(ConditionDegraded, true, "NodesFailed", fmt.Sprintf("%d nodes failed; first: %s: %s", st.Nodes.Failed, failing[0].Node, failing[0].Reason))
	case resolveErrors(st.References) > 0:
		set(ConditionDegraded, true, "ResolveFailed", fmt.Sprintf("%d references cannot be resolved", resolveErrors(st.References)))
	default:
		set(ConditionDegraded, false, "NoFailures", "no node and no reference failed")
	}
	return recheck
}

// agentUnavailable says whether a node that does not hold a Prewarm's content yet has no
// agent to fetch it: its NodeCache has waited AgentGrace for an agent's first status, or the
// Node has not been Ready for AgentGrace. Otherwise it returns how long until the first of
// those would hold (0: neither can). Times it cannot know (no creation time, no Ready
// condition) never make a node fail.
func agentUnavailable(node *corev1.Node, nc *v1.NodeCache, now time.Time) (*v1.NodeFailure, time.Duration) {
	var wait time.Duration
	if c := readyCondition(node); c != nil && c.Status != corev1.ConditionTrue && !c.LastTransitionTime.IsZero() {
		if wait = c.LastTransitionTime.Add(AgentGrace).Sub(now); wait <= 0 {
			return &v1.NodeFailure{Node: node.Name, Reason: v1.ReasonAgentUnavailable,
				Message: fmt.Sprintf("the node has not been Ready since %s", c.LastTransitionTime.UTC().Format(time.RFC3339))}, 0
		}
	}
	if nc == nil || nc.Status.AgentVersion != "" || nc.Status.ObservedGeneration != 0 || nc.CreationTimestamp.IsZero() {
		return nil, wait
	}
	if left := nc.CreationTimestamp.Add(AgentGrace).Sub(now); left > 0 {
		return nil, minPositive(wait, left)
	}
	return &v1.NodeFailure{Node: node.Name, Reason: v1.ReasonAgentUnavailable,
		Message: fmt.Sprintf("no Shoal agent has reported on this node for %s: is the agent DaemonSet running there?", AgentGrace)}, 0
}

func resolveErrors(refs []v1.ResolvedReference) int {
	n := 0
	for _, r := range refs {
		if r.Error != "" {
			n++
		}
	}
	return n
}

type nodeRollup struct {
	ready      bool
	bytesReady int64
	failure    *v1.NodeFailure
	unpinned   bool // an image the Prewarm asks to pin in the runtime is there, not pinned
}

// nodeState is how far one selected node is with a Prewarm's content: ready when every item
// the Prewarm asks of it is Ready there (and, with runtime import, in the runtime), failed
// when one of them failed.
func nodeState(p *v1.Prewarm, node *corev1.Node, nc *v1.NodeCache) nodeRollup {
	status := map[string]*v1.NodeCacheItemStatus{}
	refused := map[string]*v1.RefusedItem{}
	if nc != nil {
		for i := range nc.Status.Items {
			status[nc.Status.Items[i].Reference] = &nc.Status.Items[i]
		}
		for i := range nc.Spec.Refused {
			refused[nc.Spec.Refused[i].Reference] = &nc.Spec.Refused[i]
		}
	}
	out := nodeRollup{ready: true}
	platform := NodePlatform(node)
	wanted := 0
	for _, ref := range p.Status.References {
		if ref.Digest == "" {
			out.ready = false
			continue
		}
		digests := manifestsFor(&ref, p.Spec.Platforms, platform)
		if len(digests) == 0 && len(ref.Platforms) > 0 {
			out.failure = &v1.NodeFailure{Node: node.Name, Reason: v1.ReasonPlatformUnavailable,
				Message: fmt.Sprintf("%s has no manifest for %q", ref.Reference, platform)}
			out.ready = false
			continue
		}
		for _, d := range digests {
			wanted++
			item := itemReference(ref.Repository, ref.Tag, d)
			st := status[item]
			switch {
			case st == nil && refused[item] != nil:
				out.ready = false
				if out.failure == nil {
					out.failure = &v1.NodeFailure{Node: node.Name, Reason: v1.ReasonPinLimitExceeded, Message: fmt.Sprintf(
						"%s (%d bytes) would take the node past the %d bytes that Prewarms may pin per node", item, refused[item].Bytes, refused[item].BudgetBytes)}
				}
			case st == nil:
				out.ready = false
			case st.State == v1.ItemFailed:
				out.ready = false
				if out.failure == nil {
					out.failure = &v1.NodeFailure{Node: node.Name, Reason: cmp.Or(st.Reason, v1.ReasonFetchStalled), Message: st.Message}
				}
			case st.State == v1.ItemReady:
				if !ref.Artifact && p.Spec.RuntimeImport == v1.RuntimeImportPinned {
					switch st.Runtime {
					case v1.RuntimePinned:
					case v1.RuntimeImported:
						out.unpinned = true
					default:
						out.ready = false
					}
				}
				out.bytesReady += st.TotalBytes
			default:
				out.ready = false
			}
		}
	}
	if wanted == 0 {
		out.ready = false
	}
	return out
}
