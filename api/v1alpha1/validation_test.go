package v1alpha1_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/test/kubetest"
)

const digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

// TestCRDs runs against a real kube-apiserver with the generated CRDs: each bad object must be
// rejected with a message that names what is wrong, each good one accepted with its defaults.
func TestCRDs(t *testing.T) {
	env := kubetest.Start(t)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()

	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "team"}}
	if err := env.Client.Create(ctx, ns); err != nil {
		t.Fatal(err)
	}

	t.Run("installed", func(t *testing.T) {
		want := map[string]bool{"prewarms.shoal.dev": false, "nodecaches.shoal.dev": false, "swarmseeds.shoal.dev": false, "swarmmembers.shoal.dev": false}
		for _, crd := range env.CRDs {
			if _, ok := want[crd.Name]; ok {
				want[crd.Name] = true
			}
		}
		for name, found := range want {
			if !found {
				t.Errorf("CRD %s not installed", name)
			}
		}
	})

	// kubectl get prewarm shows READY 37/40, the digest and the age: the API server's Table
	// rendering, which is what kubectl prints, has those columns by default (priority 0).
	t.Run("kubectl get prewarm columns", func(t *testing.T) {
		p := prewarm("columns", func(s *v1.PrewarmSpec) {})
		if err := env.Client.Create(ctx, p); err != nil {
			t.Fatal(err)
		}
		p.Status.Ready = "37/40"
		p.Status.References = []v1.ResolvedReference{{Reference: p.Spec.Images[0], Digest: digest}}
		if err := env.Client.Status().Update(ctx, p); err != nil {
			t.Fatal(err)
		}
		cs, err := kubernetes.NewForConfig(env.Config)
		if err != nil {
			t.Fatal(err)
		}
		raw, err := cs.RESTClient().Get().AbsPath("/apis/shoal.dev/v1alpha1/namespaces/team/prewarms/columns").
			SetHeader("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io").DoRaw(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var table metav1.Table
		if err := json.Unmarshal(raw, &table); err != nil {
			t.Fatal(err)
		}
		if len(table.Rows) != 1 {
			t.Fatalf("%d rows, want 1: %s", len(table.Rows), raw)
		}
		shown := map[string]any{}
		var names []string
		for i, c := range table.ColumnDefinitions {
			if c.Priority == 0 {
				shown[c.Name] = table.Rows[0].Cells[i]
				names = append(names, c.Name)
			}
		}
		if shown["Ready"] != "37/40" || shown["Digest"] != digest || shown["Age"] == nil {
			t.Errorf("kubectl get prewarm shows %v = %v; want Ready 37/40, Digest %s and Age", names, shown, digest)
		}
	})

	t.Run("prewarm defaults", func(t *testing.T) {
		p := prewarm("defaults", func(s *v1.PrewarmSpec) {})
		if err := env.Client.Create(ctx, p); err != nil {
			t.Fatal(err)
		}
		var got v1.Prewarm
		if err := env.Client.Get(ctx, client.ObjectKeyFromObject(p), &got); err != nil {
			t.Fatal(err)
		}
		if got.Spec.Store != v1.StorePinned || got.Spec.RuntimeImport != v1.RuntimeImportNone ||
			got.Spec.RefreshInterval == nil || got.Spec.RefreshInterval.Duration != 10*time.Minute {
			t.Errorf("defaults: store %q, runtimeImport %q, refreshInterval %v; want Pinned, None, 10m",
				got.Spec.Store, got.Spec.RuntimeImport, got.Spec.RefreshInterval)
		}
	})

	good := []struct {
		name string
		obj  client.Object
	}{
		{"prewarm by tag and digest, selector, platforms", prewarm("full", func(s *v1.PrewarmSpec) {
			s.Images = []string{"registry.test/team/app:1.4", "registry.test:5000/app@" + digest, "nginx", "registry.test/a/b:v1@" + digest}
			s.Artifacts = []string{"registry.test/models/llama:q4"}
			s.NodeSelector = &v1.NodeSelector{
				MatchLabels: map[string]v1.LabelValue{"example.com/gpu": "a100", "pool": ""},
				MatchExpressions: []v1.NodeSelectorRequirement{
					{Key: "kubernetes.io/arch", Operator: metav1.LabelSelectorOpIn, Values: []string{"amd64"}},
					{Key: "spot", Operator: metav1.LabelSelectorOpDoesNotExist},
				},
			}
			s.Platforms = []string{"linux/amd64", "linux/arm64/v8"}
			s.RefreshInterval = &metav1.Duration{Duration: time.Hour}
			s.RuntimeImport = v1.RuntimeImportPinned
			s.ImagePullSecrets = []corev1.LocalObjectReference{{Name: "pull"}}
		})},
		{"prewarm with only artifacts", prewarm("artifacts", func(s *v1.PrewarmSpec) {
			s.Images = nil
			s.Artifacts = []string{"registry.test/models/m@" + digest}
		})},
		{"nodecache", nodeCache("node-a", 3)},
		{"nodecache, full", nodeCache("node-full", v1.MaxNodeCacheItems)},
		{"swarmseed", swarmSeed("sha256-ok", func(s *v1.SwarmSeedSpec) {})},
		{"swarmmember, IPv4", swarmMember("node-a", "10.0.0.5", 7070)},
		{"swarmmember, IPv6", swarmMember("node-b", "fd00::5", 7070)},
	}
	for _, tt := range good {
		t.Run("accepts "+tt.name, func(t *testing.T) {
			if err := env.Client.Create(ctx, tt.obj); err != nil {
				t.Fatalf("rejected: %v", err)
			}
		})
	}

	bad := []struct {
		name string
		obj  client.Object
		want string // a substring the API server's message must hold
	}{
		{"no content", prewarm("empty", func(s *v1.PrewarmSpec) { s.Images = nil }),
			"a Prewarm needs at least one image or artifact"},
		{"uppercase repository", prewarm("upper", func(s *v1.PrewarmSpec) { s.Images = []string{"registry.test/Team/app:1"} }),
			"not an image reference (registry/repository:tag or registry/repository@sha256:<64 lowercase hex digits>): registry.test/Team/app:1"},
		{"short digest", prewarm("shortdigest", func(s *v1.PrewarmSpec) { s.Images = []string{"registry.test/app@sha256:abc"} }),
			"not an image reference"},
		{"path trick in artifact", prewarm("dotdot", func(s *v1.PrewarmSpec) { s.Artifacts = []string{"registry.test/../etc/passwd"} }),
			"not an artifact reference (registry/repository:tag or registry/repository@sha256:<64 lowercase hex digits>): registry.test/../etc/passwd"},
		{"scheme in reference", prewarm("scheme", func(s *v1.PrewarmSpec) { s.Images = []string{"https://registry.test/app:1"} }),
			"not an image reference"},
		{"bad operator", prewarm("op", func(s *v1.PrewarmSpec) {
			s.NodeSelector = &v1.NodeSelector{MatchExpressions: []v1.NodeSelectorRequirement{{Key: "a", Operator: "Gt", Values: []string{"1"}}}}
		}), `spec.nodeSelector.matchExpressions[0].operator: Unsupported value: "Gt"`},
		{"In without values", prewarm("novalues", func(s *v1.PrewarmSpec) {
			s.NodeSelector = &v1.NodeSelector{MatchExpressions: []v1.NodeSelectorRequirement{{Key: "a", Operator: metav1.LabelSelectorOpIn}}}
		}), "In and NotIn need at least one value"},
		{"bad label key", prewarm("badkey", func(s *v1.PrewarmSpec) {
			s.NodeSelector = &v1.NodeSelector{MatchLabels: map[string]v1.LabelValue{"not a key!": "x"}}
		}), "nodeSelector.matchLabels: a label key must be a qualified name"},
		{"bad expression key", prewarm("badexprkey", func(s *v1.PrewarmSpec) {
			s.NodeSelector = &v1.NodeSelector{MatchExpressions: []v1.NodeSelectorRequirement{{Key: "-a", Operator: metav1.LabelSelectorOpExists}}}
		}), "nodeSelector.matchExpressions: a label key must be a qualified name"},
		{"bad expression value", prewarm("badexprvalue", func(s *v1.PrewarmSpec) {
			s.NodeSelector = &v1.NodeSelector{MatchExpressions: []v1.NodeSelectorRequirement{{Key: "a", Operator: metav1.LabelSelectorOpIn, Values: []string{"a b"}}}}
		}), "nodeSelector.matchExpressions: a label value is at most 63 characters"},
		{"bad label value", prewarm("badvalue", func(s *v1.PrewarmSpec) {
			s.NodeSelector = &v1.NodeSelector{MatchLabels: map[string]v1.LabelValue{"pool": v1.LabelValue(strings.Repeat("v", 64))}}
		}), "spec.nodeSelector.matchLabels.pool: Too long: may not be more than 63 bytes"},
		{"label value with a blank", prewarm("blankvalue", func(s *v1.PrewarmSpec) {
			s.NodeSelector = &v1.NodeSelector{MatchLabels: map[string]v1.LabelValue{"pool": "a b"}}
		}), "nodeSelector.matchLabels: a label value is at most 63 characters"},
		{"refresh too often", prewarm("refresh", func(s *v1.PrewarmSpec) { s.RefreshInterval = &metav1.Duration{Duration: 10 * time.Second} }),
			"refreshInterval must be at least 1m"},
		{"unknown store policy", prewarm("store", func(s *v1.PrewarmSpec) { s.Store = "Forever" }),
			`spec.store: Unsupported value: "Forever"`},
		{"bad platform", prewarm("platform", func(s *v1.PrewarmSpec) { s.Platforms = []string{"Linux/AMD64"} }),
			"a platform is os/arch or os/arch/variant in lowercase"},
		{"nodecache item by tag", func() client.Object {
			nc := nodeCache("node-tag", 1)
			nc.Spec.Items[0].Reference = "registry.test/app:1"
			return nc
		}(), "a NodeCache item names its content by digest"},
		{"nodecache too many items", nodeCache("node-many", v1.MaxNodeCacheItems+1),
			"spec.items: Too many: 513: must have at most 512 items"},
		{"swarmseed bad blob digest", swarmSeed("sha256-baddigest", func(s *v1.SwarmSeedSpec) { s.Blobs[0].Digest = "sha256:XYZ" }),
			"spec.blobs[0].digest"},
		{"swarmseed with a tag", swarmSeed("sha256-tag", func(s *v1.SwarmSeedSpec) { s.Repository = "registry.test/app:1" }),
			"repository must be registry/name without tag or digest"},
		{"swarmmember on an unspecified address", swarmMember("node-any", "0.0.0.0", 7070),
			"ip must be an IPv4 or IPv6 address, not unspecified"},
		{"swarmmember with a host name", swarmMember("node-name", "node.example", 7070),
			"ip must be an IPv4 or IPv6 address"},
		{"swarmmember without port", swarmMember("node-port", "10.0.0.6", 0),
			"spec.port"},
		{"swarmseed without blobs", swarmSeed("sha256-noblobs", func(s *v1.SwarmSeedSpec) { s.Blobs = nil }),
			"spec.blobs"},
	}
	for _, tt := range bad {
		t.Run("rejects "+tt.name, func(t *testing.T) {
			err := env.Client.Create(ctx, tt.obj)
			if err == nil {
				t.Fatal("accepted")
			}
			if !apierrors.IsInvalid(err) {
				t.Fatalf("rejected, but not as invalid: %v", err)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("message %q\ndoes not say %q", err, tt.want)
			}
		})
	}
}

func prewarm(name string, edit func(*v1.PrewarmSpec)) *v1.Prewarm {
	p := &v1.Prewarm{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "team"},
		Spec:       v1.PrewarmSpec{Images: []string{"registry.test/team/app:1.4"}},
	}
	edit(&p.Spec)
	return p
}

func nodeCache(name string, items int) *v1.NodeCache {
	nc := &v1.NodeCache{ObjectMeta: metav1.ObjectMeta{Name: name}}
	for i := range items {
		nc.Spec.Items = append(nc.Spec.Items, v1.NodeCacheItem{
			Reference: fmt.Sprintf("registry.test/team/app%d:v1@%s", i, digest),
			Pin:       true,
		})
	}
	return nc
}

func swarmSeed(name string, edit func(*v1.SwarmSeedSpec)) *v1.SwarmSeed {
	s := &v1.SwarmSeed{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: v1.SwarmSeedSpec{
			Repository: "registry.test/team/app",
			Manifest:   digest,
			Blobs:      []v1.SeedBlob{{Digest: digest, Size: 1 << 20}},
		},
	}
	edit(&s.Spec)
	return s
}

func swarmMember(name, ip string, port int32) *v1.SwarmMember {
	return &v1.SwarmMember{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec:       v1.SwarmMemberSpec{IP: ip, Port: port, ProtocolVersion: 2, AgentVersion: "v0.1.0"},
	}
}
