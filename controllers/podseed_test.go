package controllers

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/controllers/resolve"
)

func TestImagesToSeed(t *testing.T) {
	pod := func(mutate func(*corev1.Pod)) *corev1.Pod {
		p := &corev1.Pod{Spec: corev1.PodSpec{
			InitContainers: []corev1.Container{{Name: "init", Image: "registry.test/init:1"}},
			Containers: []corev1.Container{
				{Name: "app", Image: "registry.test/app:1"},
				{Name: "sidecar", Image: "registry.test/proxy:2"},
				{Name: "app2", Image: "registry.test/app:1"},
			},
		}}
		if mutate != nil {
			mutate(p)
		}
		return p
	}
	for _, tc := range []struct {
		name string
		pod  *corev1.Pod
		want []string
	}{
		{"each image once, init containers first", pod(nil),
			[]string{"registry.test/init:1", "registry.test/app:1", "registry.test/proxy:2"}},
		{"ephemeral containers too", pod(func(p *corev1.Pod) {
			p.Spec.EphemeralContainers = []corev1.EphemeralContainer{{EphemeralContainerCommon: corev1.EphemeralContainerCommon{Name: "debug", Image: "registry.test/debug:1"}}}
		}), []string{"registry.test/init:1", "registry.test/app:1", "registry.test/proxy:2", "registry.test/debug:1"}},
		{"a container whose image was pulled is left out", pod(func(p *corev1.Pod) {
			p.Status.InitContainerStatuses = []corev1.ContainerStatus{{Name: "init", Image: "registry.test/init:1", ImageID: "registry.test/init@sha256:aa"}}
			p.Status.ContainerStatuses = []corev1.ContainerStatus{
				{Name: "sidecar", Image: "registry.test/proxy:2", ImageID: "registry.test/proxy@sha256:bb"},
				{Name: "app", Image: "registry.test/app:1"}, // waiting to pull: no imageID
			}
		}), []string{"registry.test/app:1"}},
		{"an image one container pulled is the node's for the others too", pod(func(p *corev1.Pod) {
			p.Status.ContainerStatuses = []corev1.ContainerStatus{{Name: "app2", ImageID: "registry.test/app@sha256:cc"}}
		}), []string{"registry.test/init:1", "registry.test/proxy:2"}},
		{"no image, nothing", &corev1.Pod{Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "x"}}}}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := imagesToSeed(tc.pod); !slices.Equal(got, tc.want) {
				t.Errorf("got %q, want %q", got, tc.want)
			}
		})
	}
}

func TestPodCacheTransformKeepsOnlyWhatSeedingReads(t *testing.T) {
	deleted := metav1.NewTime(time.Unix(1_700_000_100, 0))
	big := strings.Repeat("x", 4096)
	full := &corev1.Pod{
		TypeMeta: metav1.TypeMeta{Kind: "Pod", APIVersion: "v1"},
		ObjectMeta: metav1.ObjectMeta{
			Name: "web-1", Namespace: "team", UID: "u-1", ResourceVersion: "42", Generation: 3,
			CreationTimestamp: metav1.NewTime(time.Unix(1_700_000_000, 0)), DeletionTimestamp: &deleted,
			Labels:          map[string]string{"app": "web"},
			Annotations:     map[string]string{"kubectl.kubernetes.io/last-applied-configuration": big},
			ManagedFields:   []metav1.ManagedFieldsEntry{{Manager: "kubectl", Operation: metav1.ManagedFieldsOperationApply}},
			OwnerReferences: []metav1.OwnerReference{{Kind: "ReplicaSet", Name: "web", UID: "rs"}},
		},
		Spec: corev1.PodSpec{
			NodeName:         "node-a",
			NodeSelector:     map[string]string{"gpu": "true"},
			ImagePullSecrets: []corev1.LocalObjectReference{{Name: "pull"}},
			Volumes:          []corev1.Volume{{Name: "cfg", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: big}}}}},
			InitContainers:   []corev1.Container{{Name: "init", Image: "registry.test/init:1", Command: []string{big}}},
			Containers: []corev1.Container{{
				Name: "app", Image: "registry.test/app:1",
				Env:          []corev1.EnvVar{{Name: "BIG", Value: big}},
				VolumeMounts: []corev1.VolumeMount{{Name: "cfg", MountPath: "/etc/cfg"}},
			}},
			EphemeralContainers: []corev1.EphemeralContainer{{EphemeralContainerCommon: corev1.EphemeralContainerCommon{
				Name: "debug", Image: "registry.test/debug:1", Args: []string{big},
			}}},
			Tolerations: []corev1.Toleration{{Key: "gpu", Operator: corev1.TolerationOpExists}},
		},
		Status: corev1.PodStatus{
			Phase:                 corev1.PodPending,
			Conditions:            []corev1.PodCondition{{Type: corev1.PodScheduled, Status: corev1.ConditionTrue, Message: big}},
			InitContainerStatuses: []corev1.ContainerStatus{{Name: "init", Image: "registry.test/init:1", ImageID: "registry.test/init@sha256:aa", RestartCount: 2}},
			ContainerStatuses: []corev1.ContainerStatus{{
				Name: "app", Image: "registry.test/app:1",
				State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "ContainerCreating", Message: big}},
			}},
			EphemeralContainerStatuses: []corev1.ContainerStatus{{Name: "debug", Image: "registry.test/debug:1"}},
			PodIPs:                     []corev1.PodIP{{IP: "10.0.0.1"}},
		},
	}
	want := &corev1.Pod{
		TypeMeta: full.TypeMeta,
		ObjectMeta: metav1.ObjectMeta{
			Name: "web-1", Namespace: "team", UID: "u-1", ResourceVersion: "42",
			CreationTimestamp: full.CreationTimestamp, DeletionTimestamp: &deleted,
		},
		Spec: corev1.PodSpec{
			NodeName:            "node-a",
			NodeSelector:        map[string]string{"gpu": "true"},
			ImagePullSecrets:    []corev1.LocalObjectReference{{Name: "pull"}},
			InitContainers:      []corev1.Container{{Name: "init", Image: "registry.test/init:1"}},
			Containers:          []corev1.Container{{Name: "app", Image: "registry.test/app:1"}},
			EphemeralContainers: []corev1.EphemeralContainer{{EphemeralContainerCommon: corev1.EphemeralContainerCommon{Name: "debug", Image: "registry.test/debug:1"}}},
		},
		Status: corev1.PodStatus{
			Phase:                      corev1.PodPending,
			InitContainerStatuses:      []corev1.ContainerStatus{{Name: "init", Image: "registry.test/init:1", ImageID: "registry.test/init@sha256:aa"}},
			ContainerStatuses:          []corev1.ContainerStatus{{Name: "app", Image: "registry.test/app:1"}},
			EphemeralContainerStatuses: []corev1.ContainerStatus{{Name: "debug", Image: "registry.test/debug:1"}},
		},
	}
	before := full.DeepCopy()
	out, err := PodCacheTransform(full)
	if err != nil {
		t.Fatal(err)
	}
	got, ok := out.(*corev1.Pod)
	if !ok {
		t.Fatalf("transform returned %T", out)
	}
	if !equality.Semantic.DeepEqual(got, want) {
		t.Errorf("stripped pod:\n%+v\nwant:\n%+v", got, want)
	}
	if !slices.Equal(imagesToSeed(got), imagesToSeed(full)) {
		t.Errorf("images to seed changed: %q, from the full pod %q", imagesToSeed(got), imagesToSeed(full))
	}
	if !equality.Semantic.DeepEqual(full, before) {
		t.Error("the transform changed the pod it was given")
	}
	fullJSON, _ := json.Marshal(full)
	gotJSON, _ := json.Marshal(got)
	if len(gotJSON)*10 > len(fullJSON) {
		t.Errorf("stripped pod is %d bytes of JSON, the full one %d: want less than a tenth", len(gotJSON), len(fullJSON))
	}

	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n", Annotations: map[string]string{"a": big}}}
	if out, err := PodCacheTransform(node); err != nil || out != any(node) {
		t.Errorf("a Node came back as %v, %v: want it unchanged", out, err)
	}
}

func blob(i int) v1alpha1.SeedBlob {
	return v1alpha1.SeedBlob{Digest: fmt.Sprintf("sha256:%064x", i), Size: int64(i)}
}

func TestSwarmSeedNamesAndParts(t *testing.T) {
	manifest := "sha256:" + strings.Repeat("ab", 32)
	for _, tc := range []struct {
		blobs     int
		wantParts []int // blobs in each part
	}{
		{blobs: 3, wantParts: []int{3}},
		{blobs: v1alpha1.MaxSeedBlobs, wantParts: []int{v1alpha1.MaxSeedBlobs}},
		{blobs: v1alpha1.MaxSeedBlobs + 1, wantParts: []int{v1alpha1.MaxSeedBlobs, 1}},
		{blobs: 2*v1alpha1.MaxSeedBlobs + 10, wantParts: []int{v1alpha1.MaxSeedBlobs, v1alpha1.MaxSeedBlobs, 10}},
		{blobs: 0, wantParts: nil},
	} {
		t.Run(fmt.Sprintf("%d blobs", tc.blobs), func(t *testing.T) {
			var blobs []v1alpha1.SeedBlob
			for i := range tc.blobs {
				blobs = append(blobs, blob(i))
			}
			seeds := swarmSeeds("registry.test/team/app", manifest, blobs)
			if len(seeds) != len(tc.wantParts) {
				t.Fatalf("%d SwarmSeeds, want %d", len(seeds), len(tc.wantParts))
			}
			var all []v1alpha1.SeedBlob
			for i, s := range seeds {
				wantName := "sha256-" + strings.Repeat("ab", 32)
				if i > 0 {
					wantName += fmt.Sprintf("-%d", i)
				}
				if s.Name != wantName || s.Name != SwarmSeedName(manifest, i) {
					t.Errorf("part %d named %q, want %q", i, s.Name, wantName)
				}
				if errs := validation.IsDNS1123Subdomain(s.Name); len(errs) > 0 {
					t.Errorf("part %d: %q is not an object name: %v", i, s.Name, errs)
				}
				if s.Spec.Repository != "registry.test/team/app" || s.Spec.Manifest != manifest || len(s.Spec.Blobs) != tc.wantParts[i] {
					t.Errorf("part %d: %s %s with %d blobs, want %d", i, s.Spec.Repository, s.Spec.Manifest, len(s.Spec.Blobs), tc.wantParts[i])
				}
				all = append(all, s.Spec.Blobs...)
			}
			if !slices.Equal(all, blobs) {
				t.Error("the parts together are not the blobs, in order")
			}
		})
	}
	if seeds := swarmSeeds("registry.test/app", "sha512:"+strings.Repeat("a", 128), []v1alpha1.SeedBlob{blob(1)}); seeds != nil {
		t.Errorf("a sha512 manifest got SwarmSeeds %v, which the CRD refuses", seeds)
	}
}

func TestSeedBlobs(t *testing.T) {
	hash := func(i int) v1.Hash { return v1.Hash{Algorithm: "sha256", Hex: fmt.Sprintf("%064x", i)} }
	m := resolve.Manifest{Blobs: []v1.Descriptor{
		{MediaType: types.OCIConfigJSON, Digest: hash(1), Size: 100},
		{MediaType: types.OCILayer, Digest: hash(2), Size: 2000},
		{MediaType: types.OCILayer, Digest: hash(2), Size: 2000}, // the same layer twice
		{MediaType: types.DockerForeignLayer, Digest: hash(3), Size: 3000, URLs: []string{"https://example/layer"}},
		{MediaType: types.OCILayer, Digest: v1.Hash{Algorithm: "sha512", Hex: strings.Repeat("a", 128)}, Size: 4},
		{MediaType: types.DockerLayer, Digest: hash(4), Size: 0},
	}}
	want := []v1alpha1.SeedBlob{
		{Digest: hash(1).String(), Size: 100},
		{Digest: hash(2).String(), Size: 2000},
		{Digest: hash(4).String(), Size: 0},
	}
	if got := seedBlobs(m); !slices.Equal(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
}

func TestPodPlatforms(t *testing.T) {
	node := func(name, arch string, lbls ...string) corev1.Node {
		n := corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{}}}
		if arch != "" {
			n.Labels[corev1.LabelOSStable], n.Labels[corev1.LabelArchStable] = "linux", arch
		}
		for _, l := range lbls {
			k, v, _ := strings.Cut(l, "=")
			n.Labels[k] = v
		}
		return n
	}
	nodes := []corev1.Node{node("a", "arm64"), node("b", "amd64", "gpu=true"), node("c", "amd64"), node("d", "")}
	for _, tc := range []struct {
		name     string
		selector map[string]string
		nodes    []corev1.Node
		want     []string
	}{
		{"every node's platform, once each, sorted", nil, nodes, []string{"linux/amd64", "linux/arm64"}},
		{"a nodeSelector narrows them", map[string]string{"gpu": "true"}, nodes, []string{"linux/amd64"}},
		{"a nodeSelector on the arch label", map[string]string{corev1.LabelArchStable: "arm64"}, nodes, []string{"linux/arm64"}},
		{"a nodeSelector no node matches: all of them", map[string]string{"gpu": "h100"}, nodes, []string{"linux/amd64", "linux/arm64"}},
		{"no node says its platform: none, which is every platform", nil, []corev1.Node{node("d", "")}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pod := &corev1.Pod{Spec: corev1.PodSpec{NodeSelector: tc.selector}}
			if got := podPlatforms(pod, tc.nodes); !slices.Equal(got, tc.want) {
				t.Errorf("got %q, want %q", got, tc.want)
			}
		})
	}
}

func TestRecent(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	s := newRecent(2)

	if !s.claim("a", t0, t0.Add(time.Minute)) {
		t.Fatal("a first claim was refused")
	}
	if s.claim("a", t0.Add(59*time.Second), t0.Add(2*time.Minute)) {
		t.Error("a second claim within the minute succeeded")
	}
	if !s.has("a", t0.Add(59*time.Second)) || s.has("a", t0.Add(time.Minute)) {
		t.Error("a is not held exactly until its deadline")
	}
	if !s.claim("a", t0.Add(time.Minute), t0.Add(2*time.Minute)) {
		t.Error("an expired key could not be claimed again")
	}
	s.forget("a")
	if s.has("a", t0) {
		t.Error("a forgotten key is still held")
	}

	s.add("x", t0.Add(time.Hour))
	s.add("y", t0.Add(time.Hour))
	s.add("z", t0.Add(time.Hour))
	if s.has("x", t0) || !s.has("y", t0) || !s.has("z", t0) {
		t.Error("a full set did not forget the oldest key, and only it")
	}
	if s.order.Len() != 2 || len(s.entries) != 2 {
		t.Errorf("%d entries in a set of 2", s.order.Len())
	}
}

func TestFailureLabel(t *testing.T) {
	for reason, want := range map[v1alpha1.FailureReason]string{
		v1alpha1.ReasonUnauthorized:        "unauthorized",
		v1alpha1.ReasonNotFound:            "not_found",
		v1alpha1.ReasonPlatformUnavailable: "platform_unavailable",
		v1alpha1.ReasonResolveFailed:       "failed",
	} {
		if got := failureLabel(&resolve.Error{Reference: "x", Reason: reason, Err: fmt.Errorf("boom")}); got != want {
			t.Errorf("%s: %q, want %q", reason, got, want)
		}
	}
}
