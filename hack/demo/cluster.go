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
		cfg.nodes, cfg.rateMbit, cfg.regMbit)
	start := time.Now()
	opts := []cluster.Option{cluster.WithTestbed(
		testbed.WithNodeRate(testbed.Rate(cfg.rateMbit)*testbed.Mbit),
		testbed.WithRegistryRate(testbed.Rate(cfg.regMbit)*testbed.Mbit))}
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
	fmt.Fprintf(out, "\nrolling out %s (%s) to every node: a Deployment of %d replicas, one per node...\n\n",
		img.Name(cluster.RegistryName), mib(img.BlobBytes()), cfg.nodes)
	with, err := measureRollout(ctx, out, c, "app", img, true)
	if err != nil {
		return err
	}

	warm, err := c.PushWorkloadImage(ctx, "demo/model-server:v1", 2, cfg.layerMiB<<20)
	if err != nil {
		return err
	}
	warmRef := cluster.RegistryName + "/" + warm.Repo + "@" + warm.Digest.String()
	fmt.Fprintf(out, "\npre-warming %s (%s) on every node with a Prewarm, imported into containerd and pinned...\n\n", warm.Name(cluster.RegistryName), mib(warm.BlobBytes()))
	prewarmTook, err := prewarm(ctx, c, warm.Name(cluster.RegistryName))
	if err != nil {
		return err
	}
	kubectl(ctx, out, c, "get", "prewarm", "-A")
	fmt.Fprintf(out, "\nready on every node in %.1fs, before any pod asked for it\n", prewarmTook.Seconds())
	pinned := 0
	for _, n := range c.Nodes() {
		// The agent imports the digest the Prewarm resolved, by digest.
		if st, err := n.Containerd().CRI().ImageStatus(ctx, warmRef); err == nil && st.GetPinned() {
			pinned++
		}
	}

	fmt.Fprintf(out, "\nhelm uninstall shoal: the hook restores every node's hosts.toml and releases Shoal's pins...\n")
	start = time.Now()
	if text, err := c.Helm(ctx, "uninstall", "shoal", "--namespace", cluster.ReleaseNamespace, "--wait", "--timeout", "3m"); err != nil {
		return fmt.Errorf("%w\n%s", err, text)
	}
	restored := 0
	for _, n := range c.Nodes() {
		if got, err := os.ReadFile(n.RegistryHostsFile()); err == nil && string(got) == string(c.InitialHostsTOML()) {
			restored++
		}
	}
	fmt.Fprintf(out, "uninstalled in %.1fs; hosts.toml as before the install on %d of %d nodes\n", time.Since(start).Seconds(), restored, cfg.nodes)

	plain, err := c.PushWorkloadImage(ctx, "demo/app:v3", cfg.layers, cfg.layerMiB<<20)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "\nfor comparison, the same rollout without Shoal: %s (%s), every node pulls from the registry...\n\n", plain.Name(cluster.RegistryName), mib(plain.BlobBytes()))
	without, err := measureRollout(ctx, out, c, "app-without-shoal", plain, false)
	if err != nil {
		return err
	}

	fmt.Fprintln(out)
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "ROLLOUT\tALL PODS RUNNING AFTER\tREGISTRY SENT\tCOPIES OF THE IMAGE")
	for _, r := range []struct {
		name string
		m    rolloutResult
	}{{"with Shoal", with}, {"without Shoal", without}} {
		fmt.Fprintf(w, "%s\t%.1fs\t%s\t%.2f\n", r.name, r.m.took.Seconds(), mib(r.m.registrySent), r.m.copies)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(out)

	verdict := func(pass bool, what string) bool {
		mark := "PASS"
		if !pass {
			mark = "FAIL"
		}
		fmt.Fprintf(out, "%s  %s\n", mark, what)
		return pass
	}
	ok := verdict(with.running == cfg.nodes, fmt.Sprintf("with Shoal, the new image runs on all %d nodes", cfg.nodes))
	ok = verdict(with.copies <= 1.25, "with Shoal, the registry sent about one copy of the image, not one per node") && ok
	ok = verdict(pinned == cfg.nodes, fmt.Sprintf("the pre-warmed image is in containerd on all %d nodes, pinned (kubelet's image GC keeps it)", cfg.nodes)) && ok
	ok = verdict(restored == cfg.nodes, "helm uninstall left every node's hosts.toml as it was before the install") && ok
	ok = verdict(without.running == cfg.nodes, fmt.Sprintf("without Shoal, pulls go straight to the registry and work (%.2f copies)", without.copies)) && ok
	if !ok {
		return fmt.Errorf("the Kubernetes part of the demo failed")
	}
	return nil
}

// rolloutResult is what one rollout cost.
type rolloutResult struct {
	running      int
	took         time.Duration
	registrySent int64
	copies       float64
}

// measureRollout rolls img out as a Deployment with one replica per node, printing progress
// each second (with Shoal: what each node's agent has delivered to containerd) and, with
// Shoal, a table of where each node's bytes came from.
func measureRollout(ctx context.Context, out io.Writer, c *cluster.Cluster, name string, img *harness.Image, shoal bool) (rolloutResult, error) {
	var r rolloutResult
	before, err := registryBlobBytes(ctx, c, img)
	if err != nil {
		return r, err
	}
	var metricsBefore []harness.Metrics
	if shoal {
		for _, n := range c.Nodes() {
			m, err := n.AgentMetrics(ctx)
			if err != nil {
				return r, err
			}
			metricsBefore = append(metricsBefore, m)
		}
	}
	progress := func(elapsed time.Duration, running map[string]time.Duration) {
		var line strings.Builder
		fmt.Fprintf(&line, "  %5.1fs", elapsed.Seconds())
		for i, n := range c.Nodes() {
			state := ""
			switch _, ok := running[n.Name()]; {
			case ok:
				state = "running"
			case shoal:
				m, err := n.AgentMetrics(ctx)
				if err != nil {
					state = "?"
					break
				}
				state = mib(int64(m.Value("shoal_mirror_bytes_total", nil) - metricsBefore[i].Value("shoal_mirror_bytes_total", nil)))
			default:
				state = "pulling"
			}
			fmt.Fprintf(&line, "   %s %-12s", n.Name(), state)
		}
		fmt.Fprintln(out, strings.TrimRight(line.String(), " "))
	}
	running, took, err := rollout(ctx, c, name, img.Name(cluster.RegistryName), progress)
	if err != nil {
		return r, err
	}
	after, err := registryBlobBytes(ctx, c, img)
	if err != nil {
		return r, err
	}
	r = rolloutResult{running: len(running), took: took, registrySent: after - before}
	r.copies = float64(r.registrySent) / float64(img.BlobBytes())
	if !shoal {
		return r, nil
	}
	fmt.Fprintln(out)
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "NODE\tPOD RUNNING AFTER\tFROM ITS STORE\tFROM PEERS\tFROM UPSTREAM")
	for i, n := range c.Nodes() {
		m, err := n.AgentMetrics(ctx)
		if err != nil {
			return r, err
		}
		delta := func(name string, labels map[string]string) int64 {
			return int64(m.Value(name, labels) - metricsBefore[i].Value(name, labels))
		}
		local := delta("shoal_mirror_bytes_total", map[string]string{"source": "local"})
		peer := delta("shoal_swarm_peer_bytes_total", nil)
		up := delta("shoal_swarm_fetched_bytes_total", map[string]string{"source": "upstream"}) + delta("shoal_mirror_bytes_total", map[string]string{"source": "upstream"})
		when := "not running"
		if d, ok := running[n.Name()]; ok {
			when = fmt.Sprintf("%.1fs", d.Seconds())
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", n.Name(), when, mib(local), mib(peer), mib(up))
	}
	if err := w.Flush(); err != nil {
		return r, err
	}
	fmt.Fprintf(out, "\nthe registry sent %s for %d nodes: %.2f copies of the image\n", mib(r.registrySent), len(c.Nodes()), r.copies)
	return r, nil
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

// rollout creates a Deployment of image with one replica per node (spread by hostname) and
// returns, per node, when its pod was first seen running, and when the last one was; progress
// is called about once a second meanwhile.
func rollout(ctx context.Context, c *cluster.Cluster, name, image string, progress func(time.Duration, map[string]time.Duration)) (map[string]time.Duration, time.Duration, error) {
	labels := map[string]string{"app": name}
	replicas := int32(len(c.Nodes()))
	d := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: appsv1.DeploymentSpec{
			Replicas: &replicas,
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					Containers: []corev1.Container{{Name: name, Image: image}},
					TopologySpreadConstraints: []corev1.TopologySpreadConstraint{{
						MaxSkew: 1, TopologyKey: corev1.LabelHostname, WhenUnsatisfiable: corev1.DoNotSchedule,
						LabelSelector: &metav1.LabelSelector{MatchLabels: labels},
					}},
				},
			},
		},
	}
	start := time.Now()
	if _, err := c.Client().AppsV1().Deployments("default").Create(ctx, d, metav1.CreateOptions{}); err != nil {
		return nil, 0, err
	}
	running := map[string]time.Duration{}
	deadline := start.Add(3 * time.Minute)
	nextReport := start.Add(time.Second)
	for len(running) < len(c.Nodes()) {
		if time.Now().After(deadline) {
			return running, 0, fmt.Errorf("rollout: %d of %d pods running after 3m", len(running), len(c.Nodes()))
		}
		pods, err := c.Client().CoreV1().Pods("default").List(ctx, metav1.ListOptions{LabelSelector: "app=" + name})
		if err != nil {
			return running, 0, err
		}
		for _, p := range pods.Items {
			if _, seen := running[p.Spec.NodeName]; !seen && p.Status.Phase == corev1.PodRunning {
				running[p.Spec.NodeName] = time.Since(start)
			}
		}
		if time.Now().After(nextReport) && len(running) < len(c.Nodes()) {
			progress(time.Since(start), running)
			nextReport = nextReport.Add(time.Second)
		}
		select {
		case <-ctx.Done():
			return running, 0, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return running, time.Since(start), nil
}

// prewarm applies a Prewarm of image for every node and waits until it is Ready on all.
func prewarm(ctx context.Context, c *cluster.Cluster, image string) (time.Duration, error) {
	start := time.Now()
	if err := c.PrewarmPinned(ctx, "model-server", image, 3*time.Minute); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}
