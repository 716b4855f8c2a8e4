package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/shoal-dev/shoal/test/harness"
	"github.com/shoal-dev/shoal/test/testbed"
)

// startController runs `shoal controller` against the API server until the test ends, reaching
// the testbed's registry as registry.test.
func startController(t *testing.T, tb *testbed.Testbed, kubeconfig string) {
	t.Helper()
	var log bytes.Buffer
	cmd := exec.Command(shoalBinary(t), "controller", "--kubeconfig", kubeconfig, "--leader-elect=false",
		"--metrics-addr", "0", "--health-addr", "0", "--log-level", "debug",
		"--registry-endpoint", testbed.RegistryName+"="+tb.RegistryURL())
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill() // the process this test started, by PID
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("shoal controller:\n%s", log.String())
		}
	})
}

// TestPodsPreSeedTheSwarm: pods that name a new image, bound to nodes, start the image's
// upstream fetch through the swarm before any node pulls (the test plays kubelet and waits for
// the registry to serve every layer first); the nodes' CRI pulls then complete with about one
// upstream copy of the image in all.
func TestPodsPreSeedTheSwarm(t *testing.T) {
	harness.RequireIsolation(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	arch := harness.HostPlatform().Architecture
	tb, env, kubeconfig := kubeTestbed(t, ctx, 4, func(int) map[string]string {
		return map[string]string{corev1.LabelOSStable: "linux", corev1.LabelArchStable: arch}
	}, nil, testbed.WithContainerd())
	startController(t, tb, kubeconfig)

	img, err := harness.PushImage(ctx, tb.RegistryHost(), "test/preseed:v1", harness.ImageSpec{Layers: 3, LayerSize: 16 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if err := env.Client.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "apps"}}); err != nil {
		t.Fatal(err)
	}
	for i, node := range tb.Nodes() {
		if err := env.Client.Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("app-%d", i), Namespace: "apps"},
			Spec: corev1.PodSpec{NodeName: node.Name(), Containers: []corev1.Container{
				{Name: "app", Image: img.Name(testbed.RegistryName)},
			}},
		}); err != nil {
			t.Fatal(err)
		}
	}

	// No node has pulled: the registry serves the layers only because of the pods.
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(250 * time.Millisecond) {
		sent := upstreamBytes(t, ctx, tb)
		missing := 0
		for _, l := range img.Layers {
			if sent[l] < img.Sizes[l] {
				missing++
			}
		}
		if missing == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("2 minutes after the pods were created, %d of %d layers were not fetched from the registry (sent: %v)", missing, len(img.Layers), sent)
		}
	}
	var wg sync.WaitGroup
	for _, node := range tb.Nodes() {
		wg.Go(func() {
			if _, err := node.PullImage(ctx, img.Name(testbed.RegistryName)); err != nil {
				t.Errorf("node %s: %v", node.Name(), err)
			}
		})
	}
	wg.Wait()
	sent := upstreamBytes(t, ctx, tb)
	for _, l := range img.Layers {
		if got, size := sent[l], img.Sizes[l]; float64(got) > 1.1*float64(size) {
			t.Errorf("layer %s (%d bytes): the registry sent %d bytes in all for 4 nodes, want about one copy", l, size, got)
		}
	}
	if n := agentsMetric(t, ctx, tb, "shoal_seeds_segments_prefetched_total", nil); n == 0 {
		t.Error("no agent prefetched a segment")
	}
}
