package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/shoal-dev/shoal/test/cluster"
	"github.com/shoal-dev/shoal/test/harness"
	"github.com/shoal-dev/shoal/test/testbed"
)

// clusterStory is the Kubernetes part of the demo: a cluster of real kubelets, each node with
// its own containerd 2.x, on network namespaces behind a shaped bridge; Shoal installed from
// charts/shoal with helm, its image built here without Docker; then a new image rolled out to
// every node as a DaemonSet, which the agents swarm, so the registry sends about one copy; and
// a Prewarm that gets another image onto every node, pinned, before any pod asks for it.
func clusterStory(ctx context.Context, out io.Writer, cfg config, bin string) error {
	fmt.Fprintf(out, "\n--- Kubernetes: %d nodes (kubelet v1.37 + containerd 2.x each; links %d Mbit/s, registry %d Mbit/s) ---\n",
		cfg.nodes, cfg.rateMbit, 4*cfg.rateMbit)
	start := time.Now()
	opts := []cluster.Option{cluster.WithTestbed(
		testbed.WithNodeRate(testbed.Rate(cfg.rateMbit)*testbed.Mbit),
		testbed.WithRegistryRate(testbed.Rate(4*cfg.rateMbit)*testbed.Mbit))}
	if cfg.keep {
		opts = append(opts, cluster.WithKeepDir())
	}
	c, err := cluster.New(ctx, cfg.nodes, opts...)
	if err != nil {
		return err
	}
	defer c.Close()
	fmt.Fprintf(out, "cluster up: API server %s, %d nodes Ready in %.1fs\n", c.APIServerURL(), cfg.nodes, time.Since(start).Seconds())

	start = time.Now()
	if _, err := c.PushShoalImage(ctx, bin, "demo"); err != nil {
		return err
	}
	chart, err := filepath.Abs(filepath.Join("charts", "shoal"))
	if err != nil {
		return err
	}
	if out, err := c.InstallShoal(ctx, chart, "demo"); err != nil {
		return fmt.Errorf("%w\n%s", err, out)
	}
	fmt.Fprintf(out, "helm install shoal charts/shoal: controller and %d agents ready in %.1fs\n\n", cfg.nodes, time.Since(start).Seconds())
	kubectl(ctx, out, c, "get", "pods", "-n", cluster.ReleaseNamespace, "-o", "wide")

	img, err := c.PushWorkloadImage(ctx, "demo/app:v2", cfg.layers, cfg.layerMiB<<20)
	if err != nil {
		return err
	}
	ref := img.Name(cluster.RegistryName)
	fmt.Fprintf(out, "\nrolling out %s (%s) to every node as a DaemonSet...\n\n", ref, mib(img.BlobBytes()))
	before, err := registryBlobBytes(ctx, c, img)
	if err != nil {
		return err
	}
	ready, took, err := rollout(ctx, c, "app", ref)
	if err != nil {
		return err
	}
	after, err := registryBlobBytes(ctx, c, img)
	if err != nil {
		return err
	}
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "NODE\tPOD RUNNING AFTER\tFROM PEERS\tFETCHED UPSTREAM")
	var peerBytes float64
	for _, n := range c.Nodes() {
		m, err := n.AgentMetrics(ctx)
		if err != nil {
			return err
		}
		peer := m.Value("shoal_swarm_peer_bytes_total", nil)
		up := m.Value("shoal_swarm_fetched_bytes_total", map[string]string{"source": "upstream"})
		peerBytes += peer
		when := "not running"
		if d, ok := ready[n.Name()]; ok {
			when = fmt.Sprintf("%.1fs", d.Seconds())
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", n.Name(), when, mib(int64(peer)), mib(int64(up)))
	}
	if err := w.Flush(); err != nil {
		return err
	}
	sent := after - before
	copies := float64(sent) / float64(img.BlobBytes())
	fmt.Fprintf(out, "\nall %d pods running after %.1fs; the registry sent %s for %d nodes: %.2f copies; peers exchanged %s\n",
		len(ready), took.Seconds(), mib(sent), cfg.nodes, copies, mib(int64(peerBytes)))

	warm, err := c.PushWorkloadImage(ctx, "demo/model-server:v1", 2, cfg.layerMiB<<20)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "\npre-warming %s (%s) on every node with a Prewarm, imported into containerd and pinned...\n\n", warm.Name(cluster.RegistryName), mib(warm.BlobBytes()))
	prewarmTook, err := prewarm(ctx, c, warm.Name(cluster.RegistryName))
	if err != nil {
		return err
	}
	kubectl(ctx, out, c, "get", "prewarm", "-A")
	fmt.Fprintf(out, "\nready on every node in %.1fs, before any pod asked for it\n\n", prewarmTook.Seconds())
	pinned := 0
	for _, n := range c.Nodes() {
		// The agent imports the digest the Prewarm resolved, by digest.
		byDigest := cluster.RegistryName + "/" + warm.Repo + "@" + warm.Digest.String()
		if st, err := n.Containerd().CRI().ImageStatus(ctx, byDigest); err == nil && st.GetPinned() {
			pinned++
		}
	}

	verdict := func(pass bool, what string) bool {
		mark := "PASS"
		if !pass {
			mark = "FAIL"
		}
		fmt.Fprintf(out, "%s  %s\n", mark, what)
		return pass
	}
	ok := verdict(len(ready) == cfg.nodes, fmt.Sprintf("the new image runs on all %d nodes", cfg.nodes))
	ok = verdict(copies <= 1.25, "the registry sent about one copy of the image, not one per node") && ok
	ok = verdict(pinned == cfg.nodes, fmt.Sprintf("the pre-warmed image is in containerd on all %d nodes, pinned (kubelet's image GC keeps it)", cfg.nodes)) && ok
	if !ok {
		return fmt.Errorf("the Kubernetes part of the demo failed")
	}
	return nil
}

// kubectl prints the output of kubectl args, indented.
func kubectl(ctx context.Context, out io.Writer, c *cluster.Cluster, args ...string) {
	text, err := c.Kubectl(ctx, args...)
	if err != nil {
		fmt.Fprintf(out, "  kubectl %s: %v\n", strings.Join(args, " "), err)
		return
	}
	fmt.Fprintf(out, "$ kubectl %s\n%s", strings.Join(args, " "), text)
}

// registryBlobBytes is what the registry has sent so far of img's blobs.
func registryBlobBytes(ctx context.Context, c *cluster.Cluster, img *harness.Image) (int64, error) {
	reg := c.Testbed().Registry()
	if err := reg.Sync(ctx); err != nil {
		return 0, err
	}
	reqs, err := reg.Requests()
	if err != nil {
		return 0, err
	}
	blobs := map[v1.Hash]bool{}
	for _, b := range img.Blobs() {
		blobs[b] = true
	}
	var sent int64
	for h, n := range harness.BlobBytes(reqs) {
		if blobs[h] {
			sent += n
		}
	}
	return sent, nil
}

// rollout creates a DaemonSet of image and returns, per node, when its pod was first seen
// running, and when the last one was.
func rollout(ctx context.Context, c *cluster.Cluster, name, image string) (map[string]time.Duration, time.Duration, error) {
	labels := map[string]string{"app": name}
	ds := &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: appsv1.DaemonSetSpec{
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: name, Image: image}}},
			},
		},
	}
	start := time.Now()
	if _, err := c.Client().AppsV1().DaemonSets("default").Create(ctx, ds, metav1.CreateOptions{}); err != nil {
		return nil, 0, err
	}
	ready := map[string]time.Duration{}
	deadline := time.Now().Add(3 * time.Minute)
	for len(ready) < len(c.Nodes()) {
		if time.Now().After(deadline) {
			return ready, 0, fmt.Errorf("rollout: %d of %d pods running after 3m", len(ready), len(c.Nodes()))
		}
		pods, err := c.Client().CoreV1().Pods("default").List(ctx, metav1.ListOptions{LabelSelector: "app=" + name})
		if err != nil {
			return ready, 0, err
		}
		for _, p := range pods.Items {
			if _, seen := ready[p.Spec.NodeName]; !seen && p.Status.Phase == corev1.PodRunning {
				ready[p.Spec.NodeName] = time.Since(start)
			}
		}
		select {
		case <-ctx.Done():
			return ready, 0, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return ready, time.Since(start), nil
}

// prewarm applies a Prewarm of image for every node and waits until it is Ready on all.
func prewarm(ctx context.Context, c *cluster.Cluster, image string) (time.Duration, error) {
	manifest := fmt.Sprintf(`apiVersion: shoal.dev/v1alpha1
kind: Prewarm
metadata:
  name: model-server
  namespace: default
spec:
  images: [%q]
  runtimeImport: Pinned
`, image)
	f, err := os.CreateTemp("", "prewarm-*.yaml")
	if err != nil {
		return 0, err
	}
	defer os.Remove(f.Name())
	if _, err := f.WriteString(manifest); err != nil {
		return 0, err
	}
	f.Close()
	start := time.Now()
	if out, err := c.Kubectl(ctx, "apply", "-f", f.Name()); err != nil {
		return 0, fmt.Errorf("%w\n%s", err, out)
	}
	if out, err := c.Kubectl(ctx, "wait", "prewarm/model-server", "--for=condition=Ready", "--timeout=3m"); err != nil {
		return 0, fmt.Errorf("%w\n%s", err, out)
	}
	return time.Since(start), nil
}
