package e2e

import (
	"context"
	"encoding/base64"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	shoalv1 "github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/controllers"
	"github.com/shoal-dev/shoal/internal/pulltoken"
	"github.com/shoal-dev/shoal/test/harness"
	"github.com/shoal-dev/shoal/test/testbed"
)

// TestPrewarmOnSelectedNodes: a Prewarm of an image and a 100 MiB OCI artifact for 3 of 4
// testbed nodes (by label), with runtime import, goes Ready 3/3; the 3 agents hold the content
// pinned and their containerd 2.x has the image pinned (CRI), the 4th has nothing and seeded
// nothing, and the registry sent about one copy of each blob in all.
func TestPrewarmOnSelectedNodes(t *testing.T) {
	harness.RequireIsolation(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	containerd2, err := harness.Containerd2Binary()
	if err != nil {
		t.Fatal(err)
	}
	arch := harness.HostPlatform().Architecture
	// A store large enough that the default share leaves room for the content pinned.
	tb, env, kubeconfig := kubeTestbed(t, ctx, 4, func(i int) map[string]string {
		labels := map[string]string{corev1.LabelOSStable: "linux", corev1.LabelArchStable: arch}
		if i < 3 {
			labels["pool"] = "gpu"
		}
		return labels
	}, []string{"--cache-size", "1Gi"}, testbed.WithContainerdBinary(containerd2))
	startController(t, tb, kubeconfig)

	img, err := harness.PushImage(ctx, tb.RegistryHost(), "test/prewarm:v1", harness.ImageSpec{Layers: 3, LayerSize: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	// An OCI artifact (artifactType, the empty config, a weights layer), not an image.
	model, err := harness.PushArtifact(ctx, tb.RegistryHost(), "models/big:v1", 100<<20, 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := env.Client.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "ml"}}); err != nil {
		t.Fatal(err)
	}
	p := &shoalv1.Prewarm{
		ObjectMeta: metav1.ObjectMeta{Name: "warm", Namespace: "ml"},
		Spec: shoalv1.PrewarmSpec{
			Images:        []string{img.Name(testbed.RegistryName)},
			Artifacts:     []string{model.Name(testbed.RegistryName)},
			NodeSelector:  &shoalv1.NodeSelector{MatchLabels: map[string]shoalv1.LabelValue{"pool": "gpu"}},
			RuntimeImport: shoalv1.RuntimeImportPinned,
		},
	}
	if err := env.Client.Create(ctx, p); err != nil {
		t.Fatal(err)
	}
	waitPrewarmReady(t, ctx, env.Client, p, "3/3")

	var content int64
	for _, im := range []*harness.Image{img, model} {
		for _, size := range im.Sizes {
			content += size
		}
	}
	var seeded float64 // upstream bytes the selected nodes fetched as seeders
	for i, node := range tb.Nodes() {
		pinned, err := node.Agent().Metric(ctx, "shoal_store_pinned_bytes", nil)
		if err != nil {
			t.Fatalf("node %s: %v", node.Name(), err)
		}
		switch {
		case i < 3 && pinned < float64(content):
			t.Errorf("node %s (selected): %.0f bytes pinned, want the content's %d at least", node.Name(), pinned, content)
		case i == 3 && pinned != 0:
			t.Errorf("node %s (not selected): %.0f bytes pinned, want none", node.Name(), pinned)
		}
		fetched, err := node.Agent().Metric(ctx, "shoal_swarm_fetched_bytes_total", map[string]string{"source": "upstream"})
		if err != nil {
			t.Fatalf("node %s: %v", node.Name(), err)
		}
		if i < 3 {
			seeded += fetched
			continue
		}
		// The selected nodes seed the content for each other: the 4th spent no disk on it,
		// neither in its store nor as a seeder of a segment.
		for _, m := range []struct {
			name   string
			labels map[string]string
		}{{"shoal_store_bytes", nil}, {"shoal_swarm_fetched_bytes_total", map[string]string{"source": "upstream"}}} {
			v, err := node.Agent().Metric(ctx, m.name, m.labels)
			if err != nil {
				t.Fatalf("node %s: %v", node.Name(), err)
			}
			if v != 0 {
				t.Errorf("node %s (not selected): %s = %.0f, want 0", node.Name(), m.name, v)
			}
		}
	}
	if seeded < float64(content) {
		t.Errorf("the selected nodes fetched %.0f bytes from upstream as seeders, want the content's %d at least", seeded, content)
	}
	// In the runtime: the image by digest, pinned, on the selected nodes only; the artifact is
	// not an image and stays in the store.
	imageRef := testbed.RegistryName + "/" + img.Repo + "@" + img.Digest.String()
	for i, node := range tb.Nodes() {
		// As kubelet's image garbage collector sees them: CRI ListImages.
		images, err := node.Containerd().CRI().ListImages(ctx)
		if err != nil {
			t.Fatalf("node %s: %v", node.Name(), err)
		}
		var listed *runtimeapi.Image
		for _, im := range images {
			if slices.Contains(im.GetRepoDigests(), imageRef) {
				listed = im
			}
		}
		switch {
		case i < 3 && (listed == nil || !listed.GetPinned()):
			t.Errorf("node %s (selected): CRI ListImages has %v for %s, want it pinned", node.Name(), listed, imageRef)
		case i == 3 && listed != nil:
			t.Errorf("node %s (not selected): the runtime has %s", node.Name(), imageRef)
		}
	}
	sent := upstreamBytes(t, ctx, tb)
	for _, im := range []*harness.Image{img, model} {
		for _, l := range im.Layers {
			if got, size := sent[l], im.Sizes[l]; float64(got) > 1.1*float64(size) {
				t.Errorf("layer %s (%d bytes): the registry sent %d bytes for 3 nodes, want about one copy", l, size, got)
			}
		}
	}
}

// TestPrewarmPrivateImage: the registry demands credentials that only a pull secret in the
// Prewarm's namespace holds, and the agents have none of their own. The registry has no
// tokens (basic authentication), so the controller passes the secret's credentials for it in a
// Secret of Shoal's namespace named after the repository; the agents find it there, and the
// Prewarm goes Ready on every node with about one upstream copy.
func TestPrewarmPrivateImage(t *testing.T) {
	harness.RequireIsolation(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	arch := harness.HostPlatform().Architecture
	tb, env, kubeconfig := kubeTestbed(t, ctx, 3, func(int) map[string]string {
		return map[string]string{corev1.LabelOSStable: "linux", corev1.LabelArchStable: arch}
	}, []string{"--cache-size", "1Gi"}, testbed.WithRegistryAuth("puller", "s3cret"))
	startController(t, tb, kubeconfig)
	img, err := harness.PushImage(ctx, tb.RegistryHost(), "private/app:v1", harness.ImageSpec{Layers: 2, LayerSize: 8 << 20}, tb.Registry().Auth())
	if err != nil {
		t.Fatal(err)
	}
	for _, ns := range []string{"shoal-system", "team"} {
		if err := env.Client.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
			t.Fatal(err)
		}
	}
	auth := base64.StdEncoding.EncodeToString([]byte("puller:s3cret"))
	if err := env.Client.Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "pull", Namespace: "team"},
		Type:       corev1.SecretTypeDockerConfigJson,
		Data:       map[string][]byte{corev1.DockerConfigJsonKey: fmt.Appendf(nil, `{"auths":{%q:{"auth":%q}}}`, testbed.RegistryName, auth)},
	}); err != nil {
		t.Fatal(err)
	}
	p := &shoalv1.Prewarm{
		ObjectMeta: metav1.ObjectMeta{Name: "private", Namespace: "team"},
		Spec: shoalv1.PrewarmSpec{Images: []string{img.Name(testbed.RegistryName)},
			ImagePullSecrets: []corev1.LocalObjectReference{{Name: "pull"}}},
	}
	if err := env.Client.Create(ctx, p); err != nil {
		t.Fatal(err)
	}
	last := waitPrewarmReady(t, ctx, env.Client, p, "3/3")
	var s corev1.Secret
	name := pulltoken.Name(testbed.RegistryName + "/private/app")
	if err := env.Client.Get(ctx, client.ObjectKey{Namespace: "shoal-system", Name: name}, &s); err != nil {
		t.Fatalf("no pull credentials in Shoal's namespace: %v", err)
	}
	if cred, err := pulltoken.Parse(&s); err != nil || cred.Username != "puller" || cred.Token != "" {
		t.Errorf("Secret %s: %+v, %v; want the basic credentials (the registry has no tokens)", name, cred, err)
	}
	if got := last.References[0].PullSecretName; got != name {
		t.Errorf("status names pull secret %q, want %q", got, name)
	}
	sent := upstreamBytes(t, ctx, tb)
	for _, l := range img.Layers {
		if got, size := sent[l], img.Sizes[l]; float64(got) > 1.1*float64(size) {
			t.Errorf("layer %s (%d bytes): the registry sent %d bytes for 3 nodes, want about one copy", l, size, got)
		}
	}
}

// waitPrewarmReady waits until p's status says ready (e.g. "3/3") and Ready, and returns the
// status; it fails the test after 4 minutes.
func waitPrewarmReady(t *testing.T, ctx context.Context, c client.Client, p *shoalv1.Prewarm, ready string) shoalv1.PrewarmStatus {
	t.Helper()
	for deadline := time.Now().Add(4 * time.Minute); ; time.Sleep(500 * time.Millisecond) {
		var got shoalv1.Prewarm
		if err := c.Get(ctx, client.ObjectKeyFromObject(p), &got); err != nil {
			t.Fatal(err)
		}
		if got.Status.Ready == ready && meta.IsStatusConditionTrue(got.Status.Conditions, controllers.ConditionReady) {
			return got.Status
		}
		if time.Now().After(deadline) {
			t.Fatalf("Prewarm not Ready %s within 4 minutes: %+v", ready, got.Status)
		}
	}
}

// TestPrewarmOnContainerd16: containerd 1.6 cannot pin images. A Prewarm with runtime import
// on a node running it goes Ready with the image imported, and both the NodeCache item
// ("imported, not pinned") and the Prewarm's Ready condition (ReadyNotPinned) say that it is
// not pinned; CRI lists the image unpinned.
func TestPrewarmOnContainerd16(t *testing.T) {
	harness.RequireIsolation(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	arch := harness.HostPlatform().Architecture
	tb, env, kubeconfig := kubeTestbed(t, ctx, 1, func(int) map[string]string {
		return map[string]string{corev1.LabelOSStable: "linux", corev1.LabelArchStable: arch}
	}, []string{"--cache-size", "1Gi"}, testbed.WithContainerd())
	startController(t, tb, kubeconfig)
	img, err := harness.PushImage(ctx, tb.RegistryHost(), "test/old-runtime:v1", harness.ImageSpec{Layers: 1, LayerSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if err := env.Client.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "apps"}}); err != nil {
		t.Fatal(err)
	}
	p := &shoalv1.Prewarm{
		ObjectMeta: metav1.ObjectMeta{Name: "warm", Namespace: "apps"},
		Spec:       shoalv1.PrewarmSpec{Images: []string{img.Name(testbed.RegistryName)}, RuntimeImport: shoalv1.RuntimeImportPinned},
	}
	if err := env.Client.Create(ctx, p); err != nil {
		t.Fatal(err)
	}
	st := waitPrewarmReady(t, ctx, env.Client, p, "1/1")
	if c := meta.FindStatusCondition(st.Conditions, controllers.ConditionReady); c.Reason != "ReadyNotPinned" {
		t.Errorf("Ready condition %s: %s; want ReadyNotPinned", c.Reason, c.Message)
	}
	node := tb.Nodes()[0]
	var nc shoalv1.NodeCache
	if err := env.Client.Get(ctx, client.ObjectKey{Name: node.Name()}, &nc); err != nil {
		t.Fatal(err)
	}
	if len(nc.Status.Items) != 1 || nc.Status.Items[0].Runtime != shoalv1.RuntimeImported ||
		!strings.Contains(nc.Status.Items[0].Message, "not pinned") {
		t.Errorf("NodeCache status items %+v; want one, runtime Imported, saying it is not pinned", nc.Status.Items)
	}
	imageRef := testbed.RegistryName + "/" + img.Repo + "@" + img.Digest.String()
	images, err := node.Containerd().CRI().ListImages(ctx)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, im := range images {
		if slices.Contains(im.GetRepoDigests(), imageRef) {
			found = true
			if im.GetPinned() {
				t.Errorf("containerd 1.6 lists %s pinned", imageRef)
			}
		}
	}
	if !found {
		t.Errorf("containerd does not list %s", imageRef)
	}
}
