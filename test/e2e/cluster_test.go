package e2e

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/shoal-dev/shoal/agent/criruntime"
	"github.com/shoal-dev/shoal/test/cluster"
	"github.com/shoal-dev/shoal/test/harness"
)

// chartDir is the chart under test, from test/e2e.
var chartDir = filepath.Join("..", "..", "charts", "shoal")

// newCluster starts a local cluster of n real kubelets with Shoal installed from the chart
// (with the chart values set, beyond the cluster's own), its image built from the binary under
// test, and stops it when the test ends.
func newCluster(t *testing.T, ctx context.Context, n int, set []string, opts ...cluster.Option) *cluster.Cluster {
	t.Helper()
	return newClusterWith(t, ctx, n, set, nil, opts...)
}

// newClusterWith is newCluster that calls before, if not nil, between starting the cluster and
// installing Shoal.
func newClusterWith(t *testing.T, ctx context.Context, n int, set []string, before func(*cluster.Cluster), opts ...cluster.Option) *cluster.Cluster {
	t.Helper()
	logger := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	c, err := cluster.New(ctx, n, append([]cluster.Option{cluster.WithLogger(logger)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			dumpCluster(t, c)
		}
		if err := c.Close(); err != nil {
			t.Errorf("close cluster: %v", err)
		}
	})
	if before != nil {
		before(c)
	}
	if _, err := c.PushShoalImage(ctx, shoalBinary(t), "e2e"); err != nil {
		t.Fatal(err)
	}
	if out, err := c.InstallShoal(ctx, chartDir, "e2e", set...); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	// helm --wait counts a DaemonSet ready with maxUnavailable of its pods not ready yet: every
	// agent must be.
	waitDaemonSetReady(t, ctx, c, cluster.ReleaseNamespace, "shoal-agent", int32(n))
	return c
}

// dumpCluster logs what a failed test needs: pods, events, and the agents' and kubelets' log tails.
func dumpCluster(t *testing.T, c *cluster.Cluster) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, args := range [][]string{{"get", "nodes,pods", "-A", "-o", "wide"}, {"get", "events", "-A", "--sort-by=.lastTimestamp"}} {
		out, _ := c.Kubectl(ctx, args...)
		t.Logf("kubectl %s:\n%s", strings.Join(args, " "), out)
	}
	out, _ := c.Kubectl(ctx, "logs", "-n", cluster.ReleaseNamespace, "-l", "app.kubernetes.io/name=shoal", "--tail=30", "--prefix", "--all-containers")
	t.Logf("Shoal logs:\n%s", out)
	for _, n := range c.Nodes() {
		data, _ := os.ReadFile(filepath.Join(n.Dir(), "kubelet.log"))
		lines := strings.Split(string(data), "\n")
		if len(lines) > 20 {
			lines = lines[len(lines)-20:]
		}
		t.Logf("kubelet %s:\n%s", n.Name(), strings.Join(lines, "\n"))
	}
}

// TestHelmInstallOnRealCluster installs the chart into a cluster of real kubelets, each with
// containerd 2.x, and rolls a new image out to every node as a DaemonSet: every agent becomes
// Ready, every pod runs, and the registry sends about one copy of the image, not one per node.
// A Prewarm then pins another image in every node's containerd, and helm uninstall's hook
// restores each node's hosts.toml byte for byte and releases those pins (the image stays).
func TestHelmInstallOnRealCluster(t *testing.T) {
	harness.RequireIsolation(t)
	// containerd 2.x, the runtime of current Kubernetes releases, on three nodes; Debian's 1.6 on
	// two (it cannot pin: the pre-warmed image is imported, and Shoal's label still released).
	for _, tc := range []struct {
		name  string
		nodes int32
		opts  []cluster.Option
	}{
		{"containerd 2", 3, nil},
		{"containerd 1.6", 2, []cluster.Option{cluster.WithContainerdBinary(harness.DefaultContainerdBinary)}},
	} {
		t.Run(tc.name, func(t *testing.T) { helmInstallOnRealCluster(t, tc.nodes, tc.opts...) })
	}
}

func helmInstallOnRealCluster(t *testing.T, nodes int32, opts ...cluster.Option) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c := newCluster(t, ctx, int(nodes), nil, append(opts, cluster.WithHelmTimeout(time.Minute))...)

	img, err := c.PushWorkloadImage(ctx, "demo/app:v1", 2, 16<<20)
	if err != nil {
		t.Fatal(err)
	}
	var size int64
	for _, s := range img.Sizes {
		size += s
	}
	before, err := c.Testbed().RegistryTraffic()
	if err != nil {
		t.Fatal(err)
	}
	rollout := workloadDaemonSet("app", img.Name(cluster.RegistryName))
	if _, err := c.Client().AppsV1().DaemonSets("default").Create(ctx, rollout, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitDaemonSetReady(t, ctx, c, "default", "app", nodes)
	after, err := c.Testbed().RegistryTraffic()
	if err != nil {
		t.Fatal(err)
	}
	sent := after.Sub(before).Sent
	t.Logf("registry sent %d bytes for an image of %d bytes on %d nodes", sent, size, nodes)
	if float64(sent) > 1.5*float64(size) {
		t.Errorf("registry sent %.2f copies of the image to %d nodes; want about one", float64(sent)/float64(size), nodes)
	}
	// Busy serving the rollout, no agent was taken for wedged.
	for _, p := range agentPods(t, ctx, c) {
		if r := p.Status.ContainerStatuses[0].RestartCount; r != 0 {
			t.Errorf("agent %s on %s restarted %d times during the rollout", p.Name, p.Spec.NodeName, r)
		}
	}

	warm, err := c.PushWorkloadImage(ctx, "demo/warm:v1", 1, 4<<20)
	if err != nil {
		t.Fatal(err)
	}
	warmRef := cluster.RegistryName + "/" + warm.Repo + "@" + warm.Digest.String()
	if err := c.PrewarmPinned(ctx, "warm", warmRef, 2*time.Minute); err != nil {
		t.Fatal(err)
	}
	for _, n := range c.Nodes() {
		if got, _ := os.ReadFile(n.RegistryHostsFile()); bytes.Equal(got, c.InitialHostsTOML()) {
			t.Fatalf("%s: hosts.toml for %s has no mirror while the agent runs:\n%s", n.Name(), cluster.RegistryName, got)
		}
		if pins := shoalPins(t, ctx, n); len(pins) != 1 {
			t.Fatalf("%s: Shoal's pins in containerd = %v, want the pre-warmed image", n.Name(), pins)
		}
	}

	if out, err := c.Helm(ctx, "uninstall", "shoal", "--namespace", cluster.ReleaseNamespace, "--wait", "--timeout", "3m"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	for _, n := range c.Nodes() {
		if got, err := os.ReadFile(n.RegistryHostsFile()); err != nil || !bytes.Equal(got, c.InitialHostsTOML()) {
			t.Errorf("%s: hosts.toml after uninstall (%v):\n%s\nwant the node's own:\n%s", n.Name(), err, got, c.InitialHostsTOML())
		}
		if pins := shoalPins(t, ctx, n); len(pins) != 0 {
			t.Errorf("%s: Shoal's pins left in containerd after uninstall: %v", n.Name(), pins)
		}
		if st, err := n.Containerd().CRI().ImageStatus(ctx, warmRef); err != nil || st == nil {
			t.Errorf("%s: the pre-warmed image is gone after uninstall (%v); unpinning must not remove it", n.Name(), err)
		}
	}
	left, err := c.Client().AppsV1().DaemonSets(cluster.ReleaseNamespace).List(ctx, metav1.ListOptions{})
	if err != nil || len(left.Items) != 0 {
		t.Errorf("DaemonSets left in %s after uninstall (the hook's included): %d (%v)", cluster.ReleaseNamespace, len(left.Items), err)
	}
}

// shoalPins lists the images Shoal pinned in the node's containerd.
func shoalPins(t *testing.T, ctx context.Context, n *cluster.Node) []string {
	t.Helper()
	rt, err := criruntime.Dial(n.Containerd().Socket(), "")
	if err != nil {
		t.Fatal(err)
	}
	defer rt.Close()
	pins, err := rt.PinnedByOwner(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return pins
}

// agentPods lists the agents' pods by node name.
func agentPods(t *testing.T, ctx context.Context, c *cluster.Cluster) map[string]corev1.Pod {
	t.Helper()
	list, err := c.Client().CoreV1().Pods(cluster.ReleaseNamespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=agent"})
	if err != nil {
		t.Fatal(err)
	}
	pods := map[string]corev1.Pod{}
	for _, p := range list.Items {
		if len(p.Status.ContainerStatuses) == 1 {
			pods[p.Spec.NodeName] = p
		}
	}
	return pods
}

func workloadDaemonSet(name, image string) *appsv1.DaemonSet {
	labels := map[string]string{"app": name}
	return &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: appsv1.DaemonSetSpec{
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					Containers: []corev1.Container{{Name: name, Image: image}},
				},
			},
		},
	}
}

func waitDaemonSetReady(t *testing.T, ctx context.Context, c *cluster.Cluster, ns, name string, want int32) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	var last string
	for {
		ds, err := c.Client().AppsV1().DaemonSets(ns).Get(ctx, name, metav1.GetOptions{})
		if err == nil {
			last = fmt.Sprintf("%d/%d ready", ds.Status.NumberReady, ds.Status.DesiredNumberScheduled)
			if ds.Status.NumberReady == want && ds.Status.DesiredNumberScheduled == want {
				return
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("DaemonSet %s/%s: %s, want %d: %v", ns, name, last, want, ctx.Err())
		case <-time.After(250 * time.Millisecond):
		}
	}
}
