package controllers

import (
	"fmt"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1 "github.com/shoal-dev/shoal/api/v1alpha1"
)

const (
	dIndex = "sha256:1111111111111111111111111111111111111111111111111111111111111111"
	dAmd64 = "sha256:2222222222222222222222222222222222222222222222222222222222222222"
	dArm64 = "sha256:3333333333333333333333333333333333333333333333333333333333333333"
	dModel = "sha256:4444444444444444444444444444444444444444444444444444444444444444"
	dNew   = "sha256:5555555555555555555555555555555555555555555555555555555555555555"
)

func testNode(name string, lbls map[string]string) *corev1.Node {
	l := map[string]string{corev1.LabelOSStable: "linux", corev1.LabelArchStable: "amd64"}
	for k, v := range lbls {
		l[k] = v
	}
	return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: l}}
}

// appIndex is an image resolved to an index of two platforms.
func appIndex(tag string) v1.ResolvedReference {
	return v1.ResolvedReference{
		Reference: "registry.test/app:" + tag, Repository: "registry.test/app", Tag: tag, Digest: dIndex,
		Platforms: []v1.PlatformManifest{{Platform: "linux/amd64", Digest: dAmd64}, {Platform: "linux/arm64/v8", Digest: dArm64}},
	}
}

func model() v1.ResolvedReference {
	return v1.ResolvedReference{Reference: "registry.test/models/m@" + dModel, Artifact: true, Repository: "registry.test/models/m", Digest: dModel}
}

func pw(name string, sel *v1.NodeSelector, edit func(*v1.Prewarm), refs ...v1.ResolvedReference) v1.Prewarm {
	p := v1.Prewarm{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "team"},
		Spec:       v1.PrewarmSpec{NodeSelector: sel, Store: v1.StorePinned, RuntimeImport: v1.RuntimeImportNone},
		Status:     v1.PrewarmStatus{References: refs},
	}
	if edit != nil {
		edit(&p)
	}
	return p
}

func refs(items []v1.NodeCacheItem) []string {
	var out []string
	for _, it := range items {
		out = append(out, it.Reference)
	}
	return out
}

func TestDesiredItems(t *testing.T) {
	gpu := &v1.NodeSelector{MatchLabels: map[string]v1.LabelValue{"gpu": "true"}}
	tests := []struct {
		name     string
		node     *corev1.Node
		prewarms []v1.Prewarm
		want     []v1.NodeCacheItem
	}{{
		name:     "the node's own platform of an index, and an artifact",
		node:     testNode("a", nil),
		prewarms: []v1.Prewarm{pw("p", nil, nil, appIndex("1"), model())},
		want: []v1.NodeCacheItem{
			{Reference: "registry.test/app:1@" + dAmd64, Pin: true},
			{Reference: "registry.test/models/m@" + dModel, Pin: true},
		},
	}, {
		name:     "an arm64 node gets the arm64/v8 manifest",
		node:     testNode("a", map[string]string{corev1.LabelArchStable: "arm64"}),
		prewarms: []v1.Prewarm{pw("p", nil, nil, appIndex("1"))},
		want:     []v1.NodeCacheItem{{Reference: "registry.test/app:1@" + dArm64, Pin: true}},
	}, {
		name: "platforms listed in the Prewarm, on any node",
		node: testNode("a", nil),
		prewarms: []v1.Prewarm{pw("p", nil, func(p *v1.Prewarm) { p.Spec.Platforms = []string{"linux/arm64", "linux/amd64"} },
			appIndex("1"))},
		want: []v1.NodeCacheItem{
			{Reference: "registry.test/app:1@" + dAmd64, Pin: true},
			{Reference: "registry.test/app:1@" + dArm64, Pin: true},
		},
	}, {
		name:     "a node the selector does not match gets nothing",
		node:     testNode("a", nil),
		prewarms: []v1.Prewarm{pw("p", gpu, nil, appIndex("1"))},
		want:     []v1.NodeCacheItem{},
	}, {
		name: "a Prewarm being deleted selects no node",
		node: testNode("a", nil),
		prewarms: []v1.Prewarm{pw("p", nil, func(p *v1.Prewarm) {
			p.DeletionTimestamp = &metav1.Time{Time: time.Unix(1, 0)}
		}, appIndex("1"))},
		want: []v1.NodeCacheItem{},
	}, {
		name: "two Prewarms: pinned wins over cached, runtime import only for images",
		node: testNode("a", map[string]string{"gpu": "true"}),
		prewarms: []v1.Prewarm{
			pw("cached", nil, func(p *v1.Prewarm) { p.Spec.Store = v1.StoreCached }, appIndex("1"), model()),
			pw("pinned", gpu, func(p *v1.Prewarm) { p.Spec.RuntimeImport = v1.RuntimeImportPinned }, appIndex("1"), model()),
		},
		want: []v1.NodeCacheItem{
			{Reference: "registry.test/app:1@" + dAmd64, Pin: true, RuntimeImport: true},
			{Reference: "registry.test/models/m@" + dModel, Pin: true},
		},
	}, {
		name:     "unresolved references are left out",
		node:     testNode("a", nil),
		prewarms: []v1.Prewarm{pw("p", nil, nil, v1.ResolvedReference{Reference: "registry.test/app:1", Error: "boom"})},
		want:     []v1.NodeCacheItem{},
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := DesiredItems(tt.node, tt.prewarms, nil, 0)
			if d.Dropped != 0 || len(d.Refused) != 0 {
				t.Errorf("dropped %d, refused %v", d.Dropped, d.Refused)
			}
			if got := d.Items; !slices.Equal(got, tt.want) {
				t.Errorf("items\n%v\nwant\n%v", got, tt.want)
			}
		})
	}
}

// A tag that moves keeps the old digest on the node until the new one is ready there.
func TestDesiredItemsTagMoved(t *testing.T) {
	node := testNode("a", nil)
	moved := appIndex("1")
	moved.Platforms = []v1.PlatformManifest{{Platform: "linux/amd64", Digest: dNew}}
	prewarms := []v1.Prewarm{pw("p", nil, nil, moved)}
	oldRef, newRef := "registry.test/app:1@"+dAmd64, "registry.test/app:1@"+dNew
	current := &v1.NodeCache{Spec: v1.NodeCacheSpec{Items: []v1.NodeCacheItem{
		{Reference: oldRef, Pin: true},
		{Reference: "registry.test/gone:2@" + dModel, Pin: true}, // no Prewarm wants it any more
	}}}

	got := DesiredItems(node, prewarms, current, 0).Items
	if want := []string{oldRef, newRef}; !slices.Equal(refs(got), want) {
		t.Errorf("new digest not ready: items %v, want %v (old kept, released one gone)", refs(got), want)
	}

	current.Status.Items = []v1.NodeCacheItemStatus{{Reference: newRef, State: v1.ItemFetching}}
	got = DesiredItems(node, prewarms, current, 0).Items
	if want := []string{oldRef, newRef}; !slices.Equal(refs(got), want) {
		t.Errorf("new digest fetching: items %v, want %v", refs(got), want)
	}

	current.Status.Items = []v1.NodeCacheItemStatus{{Reference: newRef, State: v1.ItemReady}}
	got = DesiredItems(node, prewarms, current, 0).Items
	if want := []string{newRef}; !slices.Equal(refs(got), want) {
		t.Errorf("new digest ready: items %v, want %v", refs(got), want)
	}
}

func TestDesiredItemsBounded(t *testing.T) {
	var many []v1.ResolvedReference
	for i := range v1.MaxNodeCacheItems + 3 {
		r := model()
		r.Repository = "registry.test/models/m" + string(rune('a'+i%26)) + string(rune('a'+i/26%26))
		many = append(many, r)
	}
	d := DesiredItems(testNode("a", nil), []v1.Prewarm{pw("p", nil, nil, many...)}, nil, 0)
	if len(d.Items) != v1.MaxNodeCacheItems || d.Dropped != 3 {
		t.Errorf("%d items, %d dropped; want %d and 3", len(d.Items), d.Dropped, v1.MaxNodeCacheItems)
	}
}

// The per-node budget bounds pinned bytes: older Prewarms first, content the node was given
// before never pushed out by a newer Prewarm, cached content not counted.
func TestDesiredItemsBudget(t *testing.T) {
	sized := func(repo, digest string, size int64) v1.ResolvedReference {
		return v1.ResolvedReference{Reference: repo + "@" + digest, Repository: repo, Digest: digest, Size: size}
	}
	at := func(sec int64) func(*v1.Prewarm) {
		return func(p *v1.Prewarm) { p.CreationTimestamp = metav1.Time{Time: time.Unix(sec, 0)} }
	}
	big, small := sized("registry.test/big", dModel, 600), sized("registry.test/small", dNew, 300)
	indexed := appIndex("1")
	indexed.Platforms[0].Size = 200 // the amd64 manifest this node takes
	indexed.Platforms[1].Size = 5000
	older := pw("older", nil, at(1), big)
	newer := pw("newer", nil, at(2), small, indexed)
	node := testNode("a", nil)

	d := DesiredItems(node, []v1.Prewarm{newer, older}, nil, 1000)
	// older's 600 first, then newer's by reference: app (200) fits, small (300) does not.
	if want := []string{"registry.test/app:1@" + dAmd64, "registry.test/big@" + dModel}; !slices.Equal(refs(d.Items), want) {
		t.Errorf("items %v, want %v", refs(d.Items), want)
	}
	if want := []v1.RefusedItem{{Reference: "registry.test/small@" + dNew, Bytes: 300, BudgetBytes: 1000}}; !slices.Equal(d.Refused, want) {
		t.Errorf("refused %v, want %v", d.Refused, want)
	}

	// The node was given small before: small keeps its room, then the older Prewarm's big
	// one fits, and app no longer does.
	current := &v1.NodeCache{Spec: v1.NodeCacheSpec{Items: []v1.NodeCacheItem{{Reference: "registry.test/small@" + dNew, Pin: true}}}}
	d = DesiredItems(node, []v1.Prewarm{newer, older}, current, 1000)
	if want := []string{"registry.test/big@" + dModel, "registry.test/small@" + dNew}; !slices.Equal(refs(d.Items), want) {
		t.Errorf("with small given before: items %v, want %v", refs(d.Items), want)
	}
	if len(d.Refused) != 1 || d.Refused[0].Reference != "registry.test/app:1@"+dAmd64 {
		t.Errorf("with small given before: refused %v, want app", d.Refused)
	}

	// Cached content costs no pinned bytes.
	cached := pw("cached", nil, func(p *v1.Prewarm) { at(0)(p); p.Spec.Store = v1.StoreCached }, sized("registry.test/huge", dIndex, 1<<40))
	d = DesiredItems(node, []v1.Prewarm{cached, older}, nil, 1000)
	if len(d.Items) != 2 || len(d.Refused) != 0 {
		t.Errorf("a cached item and one within the budget: items %v, refused %v", refs(d.Items), d.Refused)
	}
}

func TestHasTag(t *testing.T) {
	for name, want := range map[string]bool{
		"registry.test/app:1":      true,
		"registry.test:5000/app":   false,
		"registry.test:5000/app:1": true,
		"app":                      false,
	} {
		if got := hasTag(name); got != want {
			t.Errorf("hasTag(%q) = %v, want %v", name, got, want)
		}
	}
}

// Seeders: at most 8 selected nodes, stable as nodes come and go; items carry the oldest
// Prewarm's as a seed group named after its nodes.
func TestSeeders(t *testing.T) {
	var nodes []*corev1.Node
	for i := range 20 {
		nodes = append(nodes, testNode(fmt.Sprintf("node-%02d", i), map[string]string{"gpu": fmt.Sprint(i%2 == 0)}))
	}
	gpu := &v1.NodeSelector{MatchLabels: map[string]v1.LabelValue{"gpu": "true"}}
	p := pw("p", gpu, func(p *v1.Prewarm) { p.UID = "uid-1" }, appIndex("1"))
	seeders := ChooseSeeders(&p, nodes)
	if len(seeders) != v1.MaxPrewarmSeeders || !slices.IsSorted(seeders) {
		t.Fatalf("seeders %v: want %d, sorted", seeders, v1.MaxPrewarmSeeders)
	}
	for _, s := range seeders {
		var n int
		if _, err := fmt.Sscanf(s, "node-%d", &n); err != nil || n%2 != 0 {
			t.Errorf("seeder %s is not selected", s)
		}
	}
	// A node leaving the selection changes the choice by at most one.
	gone := seeders[0]
	var rest []*corev1.Node
	for _, n := range nodes {
		if n.Name != gone {
			rest = append(rest, n)
		}
	}
	after := ChooseSeeders(&p, rest)
	if kept := len(slices.DeleteFunc(slices.Clone(after), func(s string) bool { return !slices.Contains(seeders, s) })); kept != len(seeders)-1 {
		t.Errorf("after %s left: %v, from %v: %d kept, want %d", gone, after, seeders, kept, len(seeders)-1)
	}

	p.Status.Seeders = seeders
	d := DesiredItems(nodes[0], []v1.Prewarm{p}, nil, 0)
	want := []v1.SeedGroup{{Name: SeedGroupName(seeders), Nodes: seeders}}
	if len(d.Items) != 1 || d.Items[0].SeedGroup != want[0].Name || fmt.Sprint(d.SeedGroups) != fmt.Sprint(want) {
		t.Errorf("items %+v, groups %+v; want the item in group %+v", d.Items, d.SeedGroups, want)
	}
	if SeedGroupName(seeders) == SeedGroupName(after) {
		t.Error("two groups of different nodes share a name")
	}
}

// Only updates that change what a node must hold reconcile the Nodes; a Prewarm's rollup of
// its nodes (counts, conditions, bytes) does not.
func TestNodeInputsChanged(t *testing.T) {
	base := pw("p", nil, nil, appIndex("1"))
	base.Generation = 1
	base.Status.Seeders = []string{"a", "b"}
	for _, tc := range []struct {
		name string
		edit func(p *v1.Prewarm)
		want bool
	}{
		{"nothing", func(*v1.Prewarm) {}, false},
		{"rollup only", func(p *v1.Prewarm) {
			p.Status.Ready, p.Status.Nodes.Ready, p.Status.BytesReady = "3/4", 3, 300
			p.Status.Conditions = []metav1.Condition{{Type: ConditionReady, Status: metav1.ConditionFalse}}
		}, false},
		{"spec", func(p *v1.Prewarm) { p.Generation = 2 }, true},
		{"deleted", func(p *v1.Prewarm) { now := metav1.Now(); p.DeletionTimestamp = &now }, true},
		{"a tag moved", func(p *v1.Prewarm) { p.Status.References[0].Digest = dAmd64 }, true},
		{"a pull token", func(p *v1.Prewarm) { p.Status.References[0].PullSecretName = "tok" }, true},
		{"seeders", func(p *v1.Prewarm) { p.Status.Seeders = []string{"a", "c"} }, true},
	} {
		cur := base.DeepCopy()
		tc.edit(cur)
		if got := nodeInputsChanged(&base, cur); got != tc.want {
			t.Errorf("%s: changed %v, want %v", tc.name, got, tc.want)
		}
	}
}
