package main

import (
	"context"
	"fmt"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/shoal-dev/shoal/api/v1alpha1"
)

// prewarmResult is the Prewarm phase: -prewarms Prewarms, each of one image, select every
// node; then every node's agent (played by the benchmark) reports its items Ready, one status
// write per node at -rate, and the controller rolls the nodes up into every Prewarm. What it
// costs the controller is what grows with nodes × Prewarms if each status write reaches every
// Prewarm, or each Prewarm's status write every Node.
type prewarmResult struct {
	Nodes        int `json:"nodes"`
	Prewarms     int `json:"prewarms"`
	StatusWrites int `json:"status_writes"`
	// Settled is from the Prewarms' creation until every NodeCache asks for every Prewarm's
	// item and the controller's queues are empty.
	Settled float64 `json:"settled_s"`
	// Writes is how long the status writes took; Converged from the last one until every
	// Prewarm said READY nodes/nodes and the queues were empty.
	Writes    float64 `json:"writes_s"`
	Converged float64 `json:"converged_s"`
	// Reconciles and CPU are from the first status write until converged.
	Reconciles    map[string]float64 `json:"reconciles"`
	ControllerCPU float64            `json:"controller_cpu_s"`
	APIServerCPU  float64            `json:"apiserver_cpu_s"`
	Requests      requests           `json:"requests"`
	PeakRSS       int64              `json:"controller_peak_rss_bytes"`
}

// prewarmPhase runs the Prewarm phase against a fresh controller.
func (b *bench) prewarmPhase(ctx context.Context, round int) (*prewarmResult, error) {
	log := b.log.With("phase", "prewarm", "prewarms", b.cfg.prewarms)
	const ns = "prewarm"
	if err := b.admin.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
		return nil, fmt.Errorf("create namespace %s: %w", ns, err)
	}
	ctrl, stopCtrl, err := b.startController(round, log)
	if err != nil {
		return nil, err
	}
	defer stopCtrl()
	if err := ctrl.waitReady(ctx); err != nil {
		return nil, err
	}
	if err := b.waitSettled(ctx, ctrl); err != nil {
		return nil, err
	}

	created := time.Now()
	for i := range b.cfg.prewarms {
		p := &v1alpha1.Prewarm{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("prewarm-%03d", i), Namespace: ns},
			// Cached: the per-node pin budget plays no part here.
			Spec: v1alpha1.PrewarmSpec{Images: []string{b.images[i].Ref}, Store: v1alpha1.StoreCached},
		}
		if err := b.admin.Create(ctx, p); err != nil {
			return nil, fmt.Errorf("create Prewarm %s: %w", p.Name, err)
		}
	}
	if err := b.waitNodeCaches(ctx, ctrl); err != nil {
		return nil, err
	}
	res := &prewarmResult{Nodes: b.cfg.nodes, Prewarms: b.cfg.prewarms, Settled: time.Since(created).Seconds()}
	log.Info("NodeCaches hold every Prewarm's item", "settled_s", round1(res.Settled))

	before, cpu0, err := b.snapshot(ctx, ctrl)
	if err != nil {
		return nil, err
	}
	audit0, err := auditSize(b.auditLog)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	interval := time.Duration(float64(time.Second) / b.cfg.rate)
	err = parallel(ctx, b.cfg.nodes, b.cfg.concurrency, func(ctx context.Context, i int) error {
		// Node i reports at start + i·interval, as agents finishing one after the other would.
		select {
		case <-time.After(time.Until(start.Add(time.Duration(i) * interval))):
		case <-ctx.Done():
			return ctx.Err()
		}
		return b.reportReady(ctx, nodeName(i))
	})
	if err != nil {
		return nil, fmt.Errorf("status writes: %w", err)
	}
	written := time.Now()
	res.StatusWrites, res.Writes = b.cfg.nodes, written.Sub(start).Seconds()
	log.Info("every node reported its items Ready", "seconds", round1(res.Writes))
	if err := b.waitPrewarmsReady(ctx, ctrl); err != nil {
		return nil, err
	}
	res.Converged = time.Since(written).Seconds()
	after, cpu1, err := b.snapshot(ctx, ctrl)
	if err != nil {
		return nil, err
	}
	if res.PeakRSS, err = peakRSS(ctrl.pid()); err != nil {
		return nil, err
	}
	time.Sleep(time.Second) // the audit log's last events
	if res.Requests, err = readAudit(b.auditLog, audit0, -1); err != nil {
		return nil, err
	}
	res.Reconciles = map[string]float64{}
	for name, n := range sumBy(after, "controller_runtime_reconcile_total", "controller") {
		res.Reconciles[name] = n - sumBy(before, "controller_runtime_reconcile_total", "controller")[name]
	}
	res.ControllerCPU, res.APIServerCPU = cpu1.controller-cpu0.controller, cpu1.apiserver-cpu0.apiserver
	log.Info("every Prewarm Ready on every node", "converged_s", round1(res.Converged), "reconciles", res.Reconciles,
		"controller_cpu_s", round1(res.ControllerCPU))
	return res, nil
}

// reportReady writes what node's agent would once it holds every item of its NodeCache.
func (b *bench) reportReady(ctx context.Context, node string) error {
	var nc v1alpha1.NodeCache
	if err := b.admin.Get(ctx, client.ObjectKey{Name: node}, &nc); err != nil {
		return err
	}
	nc.Status = v1alpha1.NodeCacheStatus{AgentVersion: "scalebench", ObservedGeneration: nc.Generation,
		Ready: fmt.Sprintf("%d/%d", len(nc.Spec.Items), len(nc.Spec.Items))}
	for _, it := range nc.Spec.Items {
		nc.Status.Items = append(nc.Status.Items, v1alpha1.NodeCacheItemStatus{Reference: it.Reference, State: v1alpha1.ItemReady, Bytes: 1, TotalBytes: 1})
	}
	return b.admin.Status().Update(ctx, &nc)
}

// waitNodeCaches waits until every NodeCache asks for one item per Prewarm and the controller
// has nothing queued.
func (b *bench) waitNodeCaches(ctx context.Context, ctrl *controllerProcess) error {
	return b.poll(ctx, ctrl, func(ctx context.Context) (bool, string, error) {
		var caches v1alpha1.NodeCacheList
		if err := b.admin.List(ctx, &caches); err != nil {
			return false, "", err
		}
		full := 0
		for _, nc := range caches.Items {
			if len(nc.Spec.Items) >= b.cfg.prewarms {
				full++
			}
		}
		return full >= b.cfg.nodes, fmt.Sprintf("%d of %d NodeCaches hold every Prewarm's item", full, b.cfg.nodes), nil
	})
}

// waitPrewarmsReady waits until every Prewarm counts every node ready and the controller has
// nothing queued.
func (b *bench) waitPrewarmsReady(ctx context.Context, ctrl *controllerProcess) error {
	want := fmt.Sprintf("%d/%d", b.cfg.nodes, b.cfg.nodes)
	return b.poll(ctx, ctrl, func(ctx context.Context) (bool, string, error) {
		var list v1alpha1.PrewarmList
		if err := b.admin.List(ctx, &list); err != nil {
			return false, "", err
		}
		ready := 0
		for _, p := range list.Items {
			if p.Status.Ready == want {
				ready++
			}
		}
		return ready >= b.cfg.prewarms, fmt.Sprintf("%d of %d Prewarms READY %s", ready, b.cfg.prewarms, want), nil
	})
}

// poll checks done every 250 ms until it holds with the controller's queues empty.
func (b *bench) poll(ctx context.Context, ctrl *controllerProcess, done func(context.Context) (bool, string, error)) error {
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		ok, state, err := done(ctx)
		if err != nil {
			return err
		}
		if ok {
			m, err := ctrl.scrape(ctx)
			if err != nil {
				return err
			}
			if m.Value("workqueue_depth", nil) == 0 {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting: %s: %w", state, ctx.Err())
		case <-ctrl.done:
			return ctrl.exitError()
		case <-tick.C:
		}
	}
}

// prewarmMarkdown renders the Prewarm phase's section.
func prewarmMarkdown(date string, args []string, r *prewarmResult) string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "Measured %s with `go run ./hack/scalebench %s`.\n\n", date, strings.Join(args, " "))
	sb.WriteString("| nodes | Prewarms | NodeCache status writes | writes took | then all Prewarms READY after | reconciles (prewarm / nodecache) | controller CPU | API server CPU | controller API writes | controller peak RSS |\n")
	sb.WriteString("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
	fmt.Fprintf(&sb, "| %s | %d | %s | %s | %s | %s / %s | %s | %s | %s | %s |\n",
		thousands(r.Nodes), r.Prewarms, thousands(r.StatusWrites), secs(r.Writes), secs(r.Converged),
		thousands(int(r.Reconciles["prewarm"])), thousands(int(r.Reconciles["nodecache"])),
		secs(r.ControllerCPU), secs(r.APIServerCPU), thousands(r.Requests.writes()), size(r.PeakRSS))
	return sb.String()
}
