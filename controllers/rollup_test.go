package controllers

import (
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1 "github.com/shoal-dev/shoal/api/v1alpha1"
)

func cacheWith(items ...v1.NodeCacheItemStatus) *v1.NodeCache {
	return &v1.NodeCache{Status: v1.NodeCacheStatus{Items: items}}
}

func TestRollup(t *testing.T) {
	now := metav1.NewTime(time.Unix(1000, 0))
	app := "registry.test/app:1@" + dAmd64
	nodes := []*corev1.Node{
		testNode("ready", nil), testNode("fetching", nil), testNode("failed", nil), testNode("nocache", nil),
		testNode("riscv", map[string]string{corev1.LabelArchStable: "riscv64"}),
		testNode("other", map[string]string{"pool": "b"}),
	}
	p := pw("p", &v1.NodeSelector{MatchExpressions: []v1.NodeSelectorRequirement{
		{Key: "pool", Operator: metav1.LabelSelectorOpDoesNotExist},
	}}, nil, appIndex("1"))
	p.Spec.Images = []string{"registry.test/app:1"}
	caches := map[string]*v1.NodeCache{
		"ready":    cacheWith(v1.NodeCacheItemStatus{Reference: app, State: v1.ItemReady, Bytes: 100, TotalBytes: 100}),
		"fetching": cacheWith(v1.NodeCacheItemStatus{Reference: app, State: v1.ItemFetching, Bytes: 40, TotalBytes: 100}),
		"failed":   cacheWith(v1.NodeCacheItemStatus{Reference: app, State: v1.ItemFailed, Reason: v1.ReasonStoreFull, Message: "disk full"}),
	}
	Rollup(&p, nodes, caches, now)

	st := p.Status
	if want := (v1.NodeCounts{Desired: 5, Ready: 1, Failed: 2}); st.Nodes != want {
		t.Errorf("nodes %+v, want %+v", st.Nodes, want)
	}
	if st.Ready != "1/5" || st.BytesReady != 100 {
		t.Errorf("ready %q, bytes %d; want 1/5, 100", st.Ready, st.BytesReady)
	}
	want := []v1.NodeFailure{
		{Node: "failed", Reason: v1.ReasonStoreFull, Message: "disk full"},
		{Node: "riscv", Reason: v1.ReasonPlatformUnavailable, Message: `registry.test/app:1 has no manifest for "linux/riscv64"`},
	}
	if fmt.Sprint(st.FailingNodes) != fmt.Sprint(want) {
		t.Errorf("failing nodes %+v\nwant %+v", st.FailingNodes, want)
	}
	for typ, status := range map[string]metav1.ConditionStatus{
		ConditionReady: metav1.ConditionFalse, ConditionProgressing: metav1.ConditionTrue, ConditionDegraded: metav1.ConditionTrue,
	} {
		if c := meta.FindStatusCondition(st.Conditions, typ); c == nil || c.Status != status {
			t.Errorf("condition %s = %+v, want %s", typ, c, status)
		}
	}

	// Everyone ready: Ready, not progressing, not degraded; the transition time moves only
	// for the conditions that changed.
	for _, n := range []string{"fetching", "failed", "nocache"} {
		caches[n] = caches["ready"]
	}
	later := metav1.NewTime(now.Add(time.Minute))
	Rollup(&p, nodes[:4], caches, later)
	if p.Status.Ready != "4/4" || p.Status.Nodes.Failed != 0 || len(p.Status.FailingNodes) != 0 {
		t.Errorf("all ready: %q, %+v, failing %v", p.Status.Ready, p.Status.Nodes, p.Status.FailingNodes)
	}
	if c := meta.FindStatusCondition(p.Status.Conditions, ConditionReady); c.Status != metav1.ConditionTrue || !c.LastTransitionTime.Equal(&later) {
		t.Errorf("Ready %+v, want True since %v", c, later)
	}
	if c := meta.FindStatusCondition(p.Status.Conditions, ConditionDegraded); c.Status != metav1.ConditionFalse {
		t.Errorf("Degraded %+v, want False", c)
	}
}

func TestRollupRuntimeImport(t *testing.T) {
	app := "registry.test/app:1@" + dAmd64
	p := pw("p", nil, func(p *v1.Prewarm) { p.Spec.RuntimeImport = v1.RuntimeImportPinned }, appIndex("1"))
	p.Spec.Images = []string{"registry.test/app:1"}
	nodes := []*corev1.Node{testNode("a", nil)}
	for runtime, ready := range map[v1.RuntimeState]bool{"": false, v1.RuntimeNotImported: false, v1.RuntimeImported: true, v1.RuntimePinned: true} {
		caches := map[string]*v1.NodeCache{"a": cacheWith(v1.NodeCacheItemStatus{Reference: app, State: v1.ItemReady, Runtime: runtime})}
		Rollup(&p, nodes, caches, metav1.Now())
		if got := p.Status.Nodes.Ready == 1; got != ready {
			t.Errorf("runtime %q: ready %v, want %v", runtime, got, ready)
		}
		// Imported but not pinned (containerd 1.6) is ready, and the Ready condition says so.
		c := meta.FindStatusCondition(p.Status.Conditions, ConditionReady)
		if wantNotPinned := runtime == v1.RuntimeImported; (c.Reason == "ReadyNotPinned") != wantNotPinned {
			t.Errorf("runtime %q: Ready condition %s: %s", runtime, c.Reason, c.Message)
		}
	}
}

func TestRollupUnresolved(t *testing.T) {
	p := pw("p", nil, nil)
	p.Spec.Images = []string{"registry.test/app:1"}
	Rollup(&p, []*corev1.Node{testNode("a", nil)}, nil, metav1.Now())
	c := meta.FindStatusCondition(p.Status.Conditions, ConditionReady)
	if c == nil || c.Status != metav1.ConditionFalse || c.Reason != "Unresolved" {
		t.Errorf("Ready %+v, want False/Unresolved", c)
	}
	if p.Status.Ready != "0/1" {
		t.Errorf("ready %q", p.Status.Ready)
	}
}

// Content the per-node budget refused makes the node fail PinLimitExceeded, saying how much.
func TestRollupRefusedByBudget(t *testing.T) {
	app := "registry.test/app:1@" + dAmd64
	p := pw("p", nil, nil, appIndex("1"))
	nc := cacheWith()
	nc.Spec.Refused = []v1.RefusedItem{{Reference: app, Bytes: 300, BudgetBytes: 1000}}
	Rollup(&p, []*corev1.Node{testNode("a", nil)}, map[string]*v1.NodeCache{"a": nc}, metav1.NewTime(time.Unix(1000, 0)))
	want := []v1.NodeFailure{{Node: "a", Reason: v1.ReasonPinLimitExceeded,
		Message: app + " (300 bytes) would take the node past the 1000 bytes that Prewarms may pin per node"}}
	if fmt.Sprint(p.Status.FailingNodes) != fmt.Sprint(want) || p.Status.Nodes.Failed != 1 {
		t.Errorf("failing nodes %+v (failed %d)\nwant %+v", p.Status.FailingNodes, p.Status.Nodes.Failed, want)
	}
}

// A selected node whose agent never reported, or which has not been Ready, for AgentGrace
// fails AgentUnavailable; before that it is pending, and Rollup says when to look again.
func TestRollupAgentUnavailable(t *testing.T) {
	app := "registry.test/app:1@" + dAmd64
	created := time.Unix(10_000, 0)
	noAgent := &v1.NodeCache{ObjectMeta: metav1.ObjectMeta{CreationTimestamp: metav1.NewTime(created)}}
	withAgent := noAgent.DeepCopy()
	withAgent.Status = v1.NodeCacheStatus{AgentVersion: "v1", Items: []v1.NodeCacheItemStatus{{Reference: app, State: v1.ItemFetching}}}
	notReady := func(name string, since time.Time) *corev1.Node {
		n := testNode(name, nil)
		n.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionUnknown, LastTransitionTime: metav1.NewTime(since)}}
		return n
	}
	readyCache := cacheWith(v1.NodeCacheItemStatus{Reference: app, State: v1.ItemReady, TotalBytes: 1})
	readyCache.Status.AgentVersion = "v1"

	for _, tc := range []struct {
		name        string
		node        *corev1.Node
		nc          *v1.NodeCache
		after       time.Duration
		wantFailed  bool
		wantRecheck time.Duration
	}{
		{"no agent yet", testNode("a", nil), noAgent, time.Minute, false, AgentGrace - time.Minute},
		{"no agent for the grace", testNode("a", nil), noAgent, AgentGrace, true, 0},
		{"an agent that reported", testNode("a", nil), withAgent, time.Hour, false, 0},
		{"no NodeCache yet", testNode("a", nil), nil, time.Hour, false, 0},
		{"node not Ready for a while", notReady("a", created), withAgent, 2 * time.Minute, false, AgentGrace - 2*time.Minute},
		{"node not Ready for the grace", notReady("a", created), withAgent, AgentGrace + time.Second, true, 0},
		{"node not Ready but the content is there", notReady("a", created), readyCache, time.Hour, false, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := pw("p", nil, nil, appIndex("1"))
			p.Spec.Images = []string{"registry.test/app:1"}
			caches := map[string]*v1.NodeCache{}
			if tc.nc != nil {
				caches["a"] = tc.nc
			}
			recheck := Rollup(&p, []*corev1.Node{tc.node}, caches, metav1.NewTime(created.Add(tc.after)))
			failed := len(p.Status.FailingNodes) == 1 && p.Status.FailingNodes[0].Reason == v1.ReasonAgentUnavailable && p.Status.Nodes.Failed == 1
			if failed != tc.wantFailed || recheck != tc.wantRecheck {
				t.Errorf("failed %v (failing %+v), recheck %v; want failed %v, recheck %v",
					failed, p.Status.FailingNodes, recheck, tc.wantFailed, tc.wantRecheck)
			}
		})
	}
}
