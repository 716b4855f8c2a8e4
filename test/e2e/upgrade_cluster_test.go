package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apimeta "k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/shoal-dev/shoal/agent"
	"github.com/shoal-dev/shoal/agent/nodecache"
	shoalv1 "github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/controllers"

	"github.com/shoal-dev/shoal/test/cluster"
	"github.com/shoal-dev/shoal/test/harness"
)

// TestHelmUpgradeWithTLSRegistry runs the chart against a registry served over HTTPS with a
// private CA (the chart's registryCAConfigMap for Shoal, the nodes' own hosts.toml for
// containerd): a rollout goes through the agents with about one copy from the registry. Then
// helm upgrade changes the agents (a new image tag and flags) while every node keeps pulling
// new images through CRI: the DaemonSet rolls one node at a time, and no pull fails, whether the
// old agent, the new one or the registry itself (fallback) answers it.
func TestHelmUpgradeWithTLSRegistry(t *testing.T) {
	harness.RequireIsolation(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	const nodes = 2
	// The agent on the second node reads a containerd configuration that discards layers (a
	// copy: its containerd runs as usual), which its preflight must report.
	discarding := func(c *cluster.Cluster) {
		path := filepath.Join(c.Nodes()[1].Dir(), "etc-containerd", "config.toml")
		cfg, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		const images = "[plugins.\"io.containerd.cri.v1.images\"]\n"
		if !strings.Contains(string(cfg), images) {
			t.Fatalf("%s has no %s", path, images)
		}
		cfg = []byte(strings.Replace(string(cfg), images, images+"  discard_unpacked_layers = true\n", 1))
		if err := os.WriteFile(path, cfg, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	c := newClusterWith(t, ctx, nodes, nil, discarding, cluster.WithRegistryTLS(), cluster.WithHelmTimeout(time.Minute))
	checkPreflight(t, ctx, c, map[string]string{c.Nodes()[0].Name(): "", c.Nodes()[1].Name(): agent.ReasonDiscardUnpackedLayers})

	img, err := c.PushWorkloadImage(ctx, "test/tls-app:v1", 2, 8<<20)
	if err != nil {
		t.Fatal(err)
	}
	before, err := c.Testbed().RegistryTraffic()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Client().AppsV1().DaemonSets("default").Create(ctx, workloadDaemonSet("tls-app", img.Name(cluster.RegistryName)), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitDaemonSetReady(t, ctx, c, "default", "tls-app", nodes)
	after, err := c.Testbed().RegistryTraffic()
	if err != nil {
		t.Fatal(err)
	}
	var served float64
	for _, n := range c.Nodes() {
		m, err := n.AgentMetrics(ctx)
		if err != nil {
			t.Fatal(err)
		}
		served += m.Value("shoal_mirror_bytes_total", nil)
	}
	size := float64(img.BlobBytes())
	if served < float64(nodes)*size {
		t.Errorf("the agents served %.0f bytes to containerd for %d pulls of %.0f: the pulls bypassed Shoal (TLS to the registry failed?)", served, nodes, size)
	}
	if sent := float64(after.Sub(before).Sent); sent > 1.5*size {
		t.Errorf("the registry sent %.2f copies over TLS for %d nodes; want about one", sent/size, nodes)
	}

	// Pull fresh images on every node, one after another, until the upgrade is over.
	if _, err := c.PushShoalImage(ctx, shoalBinary(t), "e2e-next"); err != nil {
		t.Fatal(err)
	}
	const maxPulls = 40
	var pending []*harness.Image
	for i := range maxPulls {
		im, err := c.PushWorkloadImage(ctx, fmt.Sprintf("test/during-upgrade:v%d", i), 1, 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		pending = append(pending, im)
	}
	stop := make(chan struct{})
	var mu sync.Mutex
	var pulls int
	var failures []error
	var wg sync.WaitGroup
	for i, n := range c.Nodes() {
		wg.Go(func() {
			for j := i; j < len(pending); j += nodes {
				select {
				case <-stop:
					return
				default:
				}
				pctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
				_, err := n.Containerd().CRI().PullImage(pctx, pending[j].Name(cluster.RegistryName))
				cancel()
				mu.Lock()
				pulls++
				if err != nil {
					failures = append(failures, fmt.Errorf("%s: %w", n.Name(), err))
				}
				mu.Unlock()
				time.Sleep(500 * time.Millisecond)
			}
		})
	}
	ds, err := c.Client().AppsV1().DaemonSets(cluster.ReleaseNamespace).Get(ctx, "shoal-agent", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	out, err := c.InstallShoal(ctx, chartDir, "e2e-next", "agent.extraArgs={--log-format=json}")
	close(stop)
	wg.Wait()
	if err != nil {
		t.Fatalf("helm upgrade: %v\n%s", err, out)
	}
	for _, f := range failures {
		t.Errorf("pull during the upgrade: %v", f)
	}
	upgraded, err := c.Client().AppsV1().DaemonSets(cluster.ReleaseNamespace).Get(ctx, "shoal-agent", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if upgraded.Generation == ds.Generation || upgraded.Status.UpdatedNumberScheduled != nodes {
		t.Errorf("agents not rolled: generation %d → %d, %d of %d updated", ds.Generation, upgraded.Generation, upgraded.Status.UpdatedNumberScheduled, nodes)
	}
	if pulls < nodes {
		t.Errorf("only %d pulls ran during the upgrade: it proves nothing", pulls)
	}
	t.Logf("%d pulls during the upgrade, %d failed", pulls, len(failures))
}

// checkPreflight waits until each node's NodeCache reports the agent's preflight: the condition
// ContainerdConfigured True where want names no reason, else False with that reason and a
// Warning event with it on the Node.
func checkPreflight(t *testing.T, ctx context.Context, c *cluster.Cluster, want map[string]string) {
	t.Helper()
	scheme, err := controllers.Scheme()
	if err != nil {
		t.Fatal(err)
	}
	dyn, err := client.New(c.RESTConfig(), client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(time.Minute)
	for node, reason := range want {
		for {
			var nc shoalv1.NodeCache
			err := dyn.Get(ctx, client.ObjectKey{Name: node}, &nc)
			cond := apimeta.FindStatusCondition(nc.Status.Conditions, nodecache.ConditionContainerdConfigured)
			if err == nil && cond != nil {
				switch {
				case reason == "" && cond.Status != metav1.ConditionTrue:
					t.Errorf("%s: %s = %s (%s: %s), want True", node, cond.Type, cond.Status, cond.Reason, cond.Message)
				case reason != "" && (cond.Status != metav1.ConditionFalse || cond.Reason != reason):
					t.Errorf("%s: %s = %s (%s), want False with %s", node, cond.Type, cond.Status, cond.Reason, reason)
				}
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: no %s condition in its NodeCache (%v)", node, nodecache.ConditionContainerdConfigured, err)
			}
			time.Sleep(250 * time.Millisecond)
		}
		if reason == "" {
			continue
		}
		events, err := c.Client().CoreV1().Events(metav1.NamespaceDefault).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.kind=Node,involvedObject.name=" + node + ",reason=" + reason})
		if err != nil || len(events.Items) == 0 || events.Items[0].Type != corev1.EventTypeWarning {
			t.Errorf("%s: no Warning event %s on the Node (%v)", node, reason, err)
		}
	}
}
