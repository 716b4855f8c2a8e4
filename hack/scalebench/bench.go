package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	"github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/test/harness"
	"github.com/shoal-dev/shoal/test/kubeenv"
	"github.com/shoal-dev/shoal/test/testbed"
)

// bench is the cluster the rounds share: the registry and its images, the API server, the
// Nodes, and the controller's credentials.
type bench struct {
	cfg  config
	log  *slog.Logger
	dir  string
	bin  string
	reg  *registryServer
	env  *kubeenv.Env
	pids map[string]int // kube-apiserver and etcd

	images    []image
	manifests map[string]int // digest of a manifest to seed -> index in images
	admin     client.WithWatch
	core      kubernetes.Interface // protobuf, no client-side rate limit
	auditLog  string
	userKube  string // the controller's kubeconfig file
	startup   *startup
	ctrl      *controllerProcess // the running one, if any
	ctrlMu    sync.Mutex
	platforms map[string]int // nodes by platform
}

// startup is what the first controller's start cost: its NodeCaches are written then.
type startup struct {
	Nodes int `json:"nodes"`
	// Ready is from the process's start to /readyz answering (caches synced).
	Ready float64 `json:"ready_s"`
	// Settled is from the process's start to one NodeCache per Node and every work queue empty.
	Settled  float64  `json:"settled_s"`
	Requests requests `json:"requests"`
	PeakHeap int64    `json:"peak_heap_inuse_bytes"`
}

// newBench pushes the images, starts the API server and creates the Nodes. What it started is
// stopped by close, also when it fails part way.
func newBench(ctx context.Context, log *slog.Logger, cfg config, dir, bin string) (*bench, error) {
	b := &bench{cfg: cfg, log: log, dir: dir, bin: bin, manifests: map[string]int{}, platforms: map[string]int{}}
	var err error
	if b.reg, err = startRegistry(); err != nil {
		return b, err
	}
	log.Info("pushing images", "images", cfg.images, "index_every", cfg.indexEvery, "registry", b.reg.host)
	if b.images, err = pushImages(ctx, b.reg.host, cfg); err != nil {
		return b, err
	}
	for i, img := range b.images {
		for d := range img.Seeded {
			b.manifests[d] = i
		}
	}

	b.auditLog = filepath.Join(dir, "audit.log")
	policy := filepath.Join(dir, "audit-policy.yaml")
	if err := os.WriteFile(policy, []byte(auditPolicy), 0o644); err != nil {
		return b, err
	}
	log.Info("starting kube-apiserver and etcd", "assets", kubeenv.AssetsDir())
	// An address of its own to advertise: in a network namespace with loopback only, the API
	// server finds no default route to take one from.
	b.env, err = kubeenv.Start(kubeenv.Options{ListenAddress: "127.0.0.1", APIServerFlags: map[string]string{
		"audit-log-path":    b.auditLog,
		"audit-policy-file": policy,
		// Loopback is no address to publish in the kubernetes Service's endpoints.
		"endpoint-reconciler-type": "none",
	}})
	if err != nil {
		return b, err
	}
	if b.pids, err = childrenNamed("kube-apiserver", "etcd"); err != nil {
		return b, err
	}
	if err := b.clients(); err != nil {
		return b, err
	}
	if err := b.controllerUser(ctx); err != nil {
		return b, err
	}
	return b, b.createNodes(ctx)
}

// clients makes the benchmark's own clients, without client-side rate limits: the pace is
// the benchmark's.
func (b *bench) clients() error {
	cfg := rest.CopyConfig(b.env.Config)
	cfg.QPS, cfg.Burst = -1, 0
	var err error
	if b.admin, err = client.NewWithWatch(cfg, client.Options{Scheme: b.env.Scheme}); err != nil {
		return fmt.Errorf("client: %w", err)
	}
	pb := rest.CopyConfig(cfg)
	pb.ContentType = k8sruntime.ContentTypeProtobuf
	pb.AcceptContentTypes = k8sruntime.ContentTypeProtobuf + "," + k8sruntime.ContentTypeJSON
	if b.core, err = kubernetes.NewForConfig(pb); err != nil {
		return fmt.Errorf("client: %w", err)
	}
	return nil
}

// controllerUser provisions the controller's own user, bound to the ClusterRole that
// `make manifests` generates, so that its requests stand apart in the audit log and its RBAC
// is the one that ships.
func (b *bench) controllerUser(ctx context.Context) error {
	rbacDir := filepath.Join(kubeenv.CRDDir(), "..", "..", "rbac")
	data, err := os.ReadFile(filepath.Join(rbacDir, "controller", "role.yaml"))
	if errors.Is(err, os.ErrNotExist) {
		data, err = os.ReadFile(filepath.Join(rbacDir, "role.yaml")) // before the agent had a role too
	}
	if err != nil {
		return fmt.Errorf("controller's ClusterRole: %w", err)
	}
	var role rbacv1.ClusterRole
	if err := yaml.Unmarshal(data, &role); err != nil {
		return fmt.Errorf("controller's ClusterRole: %w", err)
	}
	binding := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: role.Name},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: role.Name},
		Subjects:   []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.UserKind, Name: controllerUser}},
	}
	if err := b.admin.Create(ctx, &role); err != nil {
		return fmt.Errorf("create ClusterRole %s: %w", role.Name, err)
	}
	if err := b.admin.Create(ctx, binding); err != nil {
		return fmt.Errorf("create ClusterRoleBinding %s: %w", binding.Name, err)
	}
	_, kubeconfig, err := b.env.AddUser(controllerUser)
	if err != nil {
		return err
	}
	b.userKube = filepath.Join(b.dir, "controller.kubeconfig")
	return os.WriteFile(b.userKube, kubeconfig, 0o600)
}

// nodeArch is node i's architecture (its OS is linux): one in four arm64.
func nodeArch(i int) string {
	if i%4 == 3 {
		return "arm64"
	}
	return "amd64"
}

func nodeName(i int) string { return fmt.Sprintf("node-%05d", i) }

func (b *bench) createNodes(ctx context.Context) error {
	start := time.Now()
	for i := range b.cfg.nodes {
		b.platforms["linux/"+nodeArch(i)]++
	}
	err := parallel(ctx, b.cfg.nodes, b.cfg.concurrency, func(ctx context.Context, i int) error {
		node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeName(i), Labels: map[string]string{
			corev1.LabelOSStable: "linux", corev1.LabelArchStable: nodeArch(i), corev1.LabelHostname: nodeName(i),
		}}}
		_, err := b.core.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
		return err
	})
	if err != nil {
		return fmt.Errorf("create nodes: %w", err)
	}
	b.log.Info("nodes created", "nodes", b.cfg.nodes, "platforms", b.platforms, "seconds", round1(time.Since(start).Seconds()))
	return nil
}

// parallel calls fn for 0..n-1, at most concurrency at once, and returns the first error;
// after one, no further call starts.
func parallel(ctx context.Context, n, concurrency int, fn func(context.Context, int) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	next := atomic.Int64{}
	var (
		wg       sync.WaitGroup
		once     sync.Once
		firstErr error
	)
	for range min(concurrency, n) {
		wg.Go(func() {
			for ctx.Err() == nil {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				if err := fn(ctx, i); err != nil {
					once.Do(func() { firstErr = err; cancel() })
					return
				}
			}
		})
	}
	wg.Wait()
	if firstErr == nil {
		firstErr = ctx.Err()
	}
	return firstErr
}

// describe is the run's setup for the report.
func (b *bench) describe() setup {
	s := setup{Nodes: b.cfg.nodes, NodePlatforms: b.platforms, Images: len(b.images), Manifests: len(b.manifests),
		Layers: b.cfg.layers, LayerBytes: b.cfg.layerSize, Rate: b.cfg.rate, Concurrency: b.cfg.concurrency,
		SeedTTL: b.cfg.seedTTL.String(), Args: os.Args[1:], K8s: kubeenv.DefaultK8sVersion, Cores: runtime.NumCPU()}
	for _, img := range b.images {
		if img.Index {
			s.Indexes++
		}
	}
	return s
}

// close stops what newBench and the rounds started, by process id, and waits for them.
func (b *bench) close() {
	b.ctrlMu.Lock()
	ctrl := b.ctrl
	b.ctrlMu.Unlock()
	if ctrl != nil {
		if err := ctrl.stop(); err != nil {
			b.log.Warn("stop controller", "err", err)
		}
	}
	if b.env != nil {
		if err := b.env.Stop(); err != nil {
			b.log.Warn("stop kube-apiserver and etcd", "err", err)
		}
	}
	if b.reg != nil {
		if err := b.reg.close(); err != nil {
			b.log.Warn("stop registry", "err", err)
		}
	}
}

// round runs one round of pods pending Pods against a fresh controller.
func (b *bench) round(ctx context.Context, n, pods int) (*result, error) {
	log := b.log.With("round", n, "pods", pods)
	ns := fmt.Sprintf("scale-%d", n)
	if err := b.admin.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
		return nil, fmt.Errorf("create namespace %s: %w", ns, err)
	}
	startAudit, err := auditSize(b.auditLog)
	if err != nil {
		return nil, err
	}
	ctrlStart := time.Now()
	ctrl, stopCtrl, err := b.startController(n, log)
	if err != nil {
		return nil, err
	}
	defer stopCtrl()
	log.Info("controller started", "pid", ctrl.pid(), "log", ctrl.logPath)
	smp := startSampler(ctx, ctrl, ctrlStart)
	defer smp.stop()

	if err := ctrl.waitReady(ctx); err != nil {
		return nil, err
	}
	ready := time.Since(ctrlStart)
	if err := b.waitSettled(ctx, ctrl); err != nil {
		return nil, err
	}
	settled := time.Since(ctrlStart)
	log.Info("controller settled", "ready_s", round1(ready.Seconds()), "settled_s", round1(settled.Seconds()))
	phaseAudit, err := auditSize(b.auditLog)
	if err != nil {
		return nil, err
	}
	if b.startup == nil {
		reqs, err := readAudit(b.auditLog, startAudit, phaseAudit)
		if err != nil {
			return nil, err
		}
		b.startup = &startup{Nodes: b.cfg.nodes, Ready: ready.Seconds(), Settled: settled.Seconds(), Requests: reqs, PeakHeap: smp.peakHeap()}
	}

	seeds, err := watchSeeds(ctx, b.admin)
	if err != nil {
		return nil, err
	}
	defer seeds.stop()
	before, cpuBefore, err := b.snapshot(ctx, ctrl)
	if err != nil {
		return nil, err
	}
	regManifests, regBlobs := b.reg.manifests.Load(), b.reg.blobs.Load()

	phaseStart := time.Now()
	log.Info("creating pods", "rate", b.cfg.rate, "concurrency", b.cfg.concurrency)
	created := b.createPods(ctx, ns, pods, phaseStart, smp)
	lastCreated := time.Now()
	log.Info("pods created", "ok", created.ok(), "seconds", round1(lastCreated.Sub(phaseStart).Seconds()))
	caughtUp, err := b.waitSeeded(ctx, ctrl, seeds, pods)
	end := time.Now()
	if err != nil {
		return nil, err
	}
	log.Info("all manifests seeded and the controller idle", "seconds", round1(end.Sub(phaseStart).Seconds()))

	after, cpuAfter, err := b.snapshot(ctx, ctrl)
	if err != nil {
		return nil, err
	}
	hwm, err := peakRSS(ctrl.pid())
	if err != nil {
		return nil, err
	}
	smp.stop()
	// The API server writes an event once the response has gone: give the last ones a moment.
	time.Sleep(time.Second)
	reqs, err := readAudit(b.auditLog, phaseAudit, -1)
	if err != nil {
		return nil, err
	}
	res := b.result(n, pods, created, seeds.snapshot(), reqs, before, after, cpuBefore, cpuAfter)
	res.PeakRSS, res.PeakHeap, res.Timeline = hwm, smp.peakHeap(), smp.timeline()
	res.Wall = end.Sub(phaseStart).Seconds()
	res.PhaseStart = phaseStart.Sub(ctrlStart).Seconds()
	res.CaughtUp = caughtUp.Sub(lastCreated).Seconds()
	res.RegistryManifests = b.reg.manifests.Load() - regManifests
	res.RegistryBlobs = b.reg.blobs.Load() - regBlobs
	res.ControllerReady, res.ControllerSettled = ready.Seconds(), settled.Seconds()
	if created.failed > 0 {
		return res, fmt.Errorf("%d of %d pods not created, the first: %s", created.failed, pods, created.firstErr)
	}

	if err := ctrl.stop(); err != nil {
		return res, err
	}
	if n < len(b.cfg.rounds()) {
		return res, b.clear(ctx, ns)
	}
	return res, nil
}

// startController starts a fresh `shoal controller` for round n, which close stops too if the
// run fails, and returns what stops it.
func (b *bench) startController(n int, log *slog.Logger) (*controllerProcess, func(), error) {
	ctrl, err := startController(b.bin, b.dir, n, b.userKube, b.reg.host, b.cfg.seedTTL)
	if err != nil {
		return nil, nil, err
	}
	b.ctrlMu.Lock()
	b.ctrl = ctrl
	b.ctrlMu.Unlock()
	return ctrl, func() {
		if err := ctrl.stop(); err != nil {
			log.Warn("stop controller", "err", err)
		}
	}, nil
}

// snapshot is the controller's metrics and the run's CPU times now.
func (b *bench) snapshot(ctx context.Context, ctrl *controllerProcess) (harness.Metrics, cpuTimes, error) {
	m, err := ctrl.scrape(ctx)
	if err != nil {
		return m, cpuTimes{}, err
	}
	cpu, err := b.cpu(ctrl)
	return m, cpu, err
}

// waitSettled waits until the controller has written one NodeCache per Node and has nothing
// queued: what it does at start, before any pod.
func (b *bench) waitSettled(ctx context.Context, ctrl *controllerProcess) error {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		var caches v1alpha1.NodeCacheList
		if err := b.admin.List(ctx, &caches); err != nil {
			return fmt.Errorf("list NodeCaches: %w", err)
		}
		m, err := ctrl.scrape(ctx)
		if err != nil {
			return err
		}
		// Every Node reconciled once, whether or not its NodeCache was there already.
		reconciled := m.Value("controller_runtime_reconcile_total", map[string]string{"controller": "nodecache"})
		if len(caches.Items) >= b.cfg.nodes && reconciled >= float64(b.cfg.nodes) && m.Value("workqueue_depth", nil) == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for the controller's NodeCaches (%d of %d): %w", len(caches.Items), b.cfg.nodes, ctx.Err())
		case <-ctrl.done:
			return ctrl.exitError()
		case <-tick.C:
		}
	}
}

// waitSeeded waits until every manifest to seed has its SwarmSeed, the controller has looked
// at every pod and its queues are empty. It returns when the controller had looked at every pod.
func (b *bench) waitSeeded(ctx context.Context, ctrl *controllerProcess, seeds *seedWatch, pods int) (time.Time, error) {
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	var caughtUp time.Time
	for {
		m, err := ctrl.scrape(ctx)
		if err != nil {
			return caughtUp, err
		}
		looked := m.Value("shoal_controller_seed_pods_total", nil)
		if caughtUp.IsZero() && looked >= float64(pods) {
			caughtUp = time.Now()
		}
		seen := seeds.count(b.manifests)
		if seen == len(b.manifests) && !caughtUp.IsZero() && m.Value("workqueue_depth", nil) == 0 {
			return caughtUp, nil
		}
		select {
		case <-ctx.Done():
			return caughtUp, fmt.Errorf("waiting for the SwarmSeeds (%d of %d) and the controller (%v of %d pods looked at): %w",
				seen, len(b.manifests), looked, pods, ctx.Err())
		case <-ctrl.done:
			return caughtUp, ctrl.exitError()
		case <-tick.C:
		}
	}
}

// clear deletes a round's pods and every SwarmSeed, so that the next round's controller
// starts from nothing seeded.
func (b *bench) clear(ctx context.Context, ns string) error {
	zero := int64(0) // bound pods would wait for a kubelet that does not exist
	if err := b.core.CoreV1().Pods(ns).DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: &zero}, metav1.ListOptions{}); err != nil {
		return fmt.Errorf("delete the pods of %s: %w", ns, err)
	}
	if err := b.admin.DeleteAllOf(ctx, &v1alpha1.SwarmSeed{}); err != nil {
		return fmt.Errorf("delete SwarmSeeds: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		pods, err := b.core.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{Limit: 1})
		if err != nil {
			return err
		}
		var seeds v1alpha1.SwarmSeedList
		if err := b.admin.List(ctx, &seeds, client.Limit(1)); err != nil {
			return err
		}
		if len(pods.Items) == 0 && len(seeds.Items) == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for the pods of %s and the SwarmSeeds to go: %w", ns, ctx.Err())
		case <-tick.C:
		}
	}
}

// podCreation is when one pod was created.
type podCreation struct {
	image int
	sent  time.Time // the create request was sent
	done  time.Time // its answer came: the pod exists
	// created is the pod's creationTimestamp (whole seconds).
	created time.Time
}

type creations struct {
	pods     []podCreation // by pod index; zero done when not created
	failed   int
	firstErr string
}

func (c *creations) ok() int { return len(c.pods) - c.failed }

// imageOf is the image of pod i of pods: the pods come in rollouts of pods/images pods, one
// image each, one after the other, so that each image's first pod arrives while the controller
// is busy with the pods of the one before.
func imageOf(i, pods, images int) int { return i * images / pods }

// createPods creates pods pending Pods in ns at cfg.rate, cfg.concurrency at once: even ones
// bound to a node (spec.nodeName), odd ones unbound. A pod whose creation fails is counted and
// the others go on.
func (b *bench) createPods(ctx context.Context, ns string, pods int, start time.Time, smp *sampler) *creations {
	out := &creations{pods: make([]podCreation, pods)}
	var mu sync.Mutex
	jobs := make(chan int)
	var wg sync.WaitGroup
	for range b.cfg.concurrency {
		wg.Go(func() {
			for i := range jobs {
				img := imageOf(i, pods, len(b.images))
				pod := &corev1.Pod{
					ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("pod-%06d", i), Namespace: ns},
					Spec: corev1.PodSpec{Containers: []corev1.Container{{
						Name: "app", Image: b.images[img].Ref,
					}}},
				}
				if i%2 == 0 {
					pod.Spec.NodeName = nodeName((i / 2) % b.cfg.nodes)
				}
				sent := time.Now()
				got, err := b.core.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{})
				done := time.Now()
				mu.Lock()
				if err != nil {
					out.failed++
					if out.firstErr == "" {
						out.firstErr = err.Error()
					}
				} else {
					out.pods[i] = podCreation{image: img, sent: sent, done: done, created: got.CreationTimestamp.Time}
					smp.podsCreated.Add(1)
				}
				mu.Unlock()
			}
		})
	}
	interval := time.Duration(float64(time.Second) / b.cfg.rate)
	timer := time.NewTimer(0)
	defer timer.Stop()
dispatch:
	for i := range pods {
		// Pod i is due at start + i·interval: a slow answer delays the pods behind it, never
		// the schedule.
		timer.Reset(time.Until(start.Add(time.Duration(i) * interval)))
		select {
		case <-ctx.Done():
			out.failed += pods - i
			if out.firstErr == "" {
				out.firstErr = ctx.Err().Error()
			}
			break dispatch
		case <-timer.C:
		}
		select {
		case jobs <- i:
		case <-ctx.Done():
			out.failed += pods - i
			break dispatch
		}
	}
	close(jobs)
	wg.Wait()
	return out
}

// cpuTimes are CPU seconds used so far by the machine and the processes of the run.
type cpuTimes struct {
	machine                                testbed.MachineCPU
	controller, apiserver, etcd, benchmark float64
}

func (b *bench) cpu(ctrl *controllerProcess) (cpuTimes, error) {
	var t cpuTimes
	var err error
	if t.machine, err = testbed.ReadMachineCPU(); err != nil {
		return t, err
	}
	for _, p := range []struct {
		pid int
		out *float64
	}{
		{ctrl.pid(), &t.controller}, {b.pids["kube-apiserver"], &t.apiserver}, {b.pids["etcd"], &t.etcd}, {os.Getpid(), &t.benchmark},
	} {
		if p.pid == 0 {
			continue // not found: left at 0
		}
		u, err := testbed.ProcessUsage(p.pid)
		if err != nil {
			return t, err
		}
		*p.out = u.CPUSeconds
	}
	return t, nil
}

// result computes a round's figures from what was recorded.
func (b *bench) result(n, pods int, created *creations, seeds map[string]seedSeen, reqs requests,
	before, after harness.Metrics, cpu0, cpu1 cpuTimes) *result {
	res := &result{Round: n, Pods: pods, PodsCreated: created.ok(), PodErrors: created.failed, FirstPodError: created.firstErr,
		Images: len(b.images), Manifests: len(b.manifests), Requests: reqs}

	// Pod creation: from the first request to the last answer.
	var first, last time.Time
	firstOf := make([]podCreation, len(b.images)) // each image's first pod
	for _, p := range created.pods {
		if p.done.IsZero() {
			continue
		}
		if first.IsZero() || p.sent.Before(first) {
			first = p.sent
		}
		if p.done.After(last) {
			last = p.done
		}
		f := &firstOf[p.image]
		if f.done.IsZero() || p.done.Before(f.done) {
			f.done = p.done
		}
		if f.created.IsZero() || p.created.Before(f.created) {
			f.created = p.created
		}
	}
	res.CreateSeconds = last.Sub(first).Seconds()
	if res.CreateSeconds > 0 {
		res.CreateRate = float64(created.ok()) / res.CreateSeconds
	}

	// Seeds: the watch's clock and the objects' timestamps against each image's first pod.
	var watched, stamped []float64
	for digest, s := range seeds {
		i, ok := b.manifests[digest]
		if !ok {
			res.UnexpectedSeeds++
			continue
		}
		res.SeedsWritten++
		t := seedTiming{Image: b.images[i].Ref, Manifest: digest, Platform: b.images[i].Seeded[digest], Relisted: s.Relisted}
		if f := firstOf[i]; !f.done.IsZero() {
			t.Watch = s.At.Sub(f.done).Seconds()
			t.Stamps = s.Created.Sub(f.created).Seconds()
			watched, stamped = append(watched, t.Watch), append(stamped, t.Stamps)
		}
		res.Seeds = append(res.Seeds, t)
	}
	slices.SortFunc(res.Seeds, func(a, b seedTiming) int {
		if a.Image != b.Image {
			return cmp.Compare(a.Image, b.Image)
		}
		return cmp.Compare(a.Platform, b.Platform)
	})
	res.WatchLatency = spreadOf(watched)
	res.StampLatency = spreadOf(stamped)
	res.HistP50, res.HistCount = histogramQuantile(after, "shoal_controller_seed_latency_seconds", 0.5)
	res.HistP99, _ = histogramQuantile(after, "shoal_controller_seed_latency_seconds", 0.99)

	// Writes.
	w := reqs.writes()
	res.WritesPerImage = float64(w) / float64(len(b.images))
	res.WritesPerManifest = float64(w) / float64(len(b.manifests))
	methods := []string{"POST", "PUT", "PATCH", "DELETE"}
	b0, b1 := sumBy(before, "rest_client_requests_total", "method"), sumBy(after, "rest_client_requests_total", "method")
	for _, m := range methods {
		res.ClientWrites += b1[m] - b0[m]
	}

	// Work done.
	r0, r1 := sumBy(before, "controller_runtime_reconcile_total", "controller"), sumBy(after, "controller_runtime_reconcile_total", "controller")
	res.Reconciles = map[string]float64{}
	for c, v := range r1 {
		if d := v - r0[c]; d > 0 {
			res.Reconciles[c] = d
		}
	}
	delta := func(name string) float64 { return after.Value(name, nil) - before.Value(name, nil) }
	res.PodsLookedAt = delta("shoal_controller_seed_pods_total")
	res.ImagesResolved = delta("shoal_controller_seed_images_resolved_total")
	res.ResolveFailures = delta("shoal_controller_seed_resolve_failures_total")
	res.Resolutions = delta("shoal_controller_resolutions_total")
	res.SeedsCreatedMetric = delta("shoal_controller_swarmseeds_created_total")

	// CPU over the pod phase.
	m := cpu1.machine.Sub(cpu0.machine)
	res.MachineCPU = m.Utilisation()
	if m.Total > 0 {
		res.MachineSteal = m.Steal / m.Total
	}
	res.CPU = map[string]float64{
		"controller":     cpu1.controller - cpu0.controller,
		"kube-apiserver": cpu1.apiserver - cpu0.apiserver,
		"etcd":           cpu1.etcd - cpu0.etcd,
		"benchmark":      cpu1.benchmark - cpu0.benchmark,
	}
	res.CPUAvailable = m.Total
	return res
}

// spread is a distribution's nearest-rank p50 and p99 and its maximum.
type spread struct {
	P50 float64 `json:"p50"`
	P99 float64 `json:"p99"`
	Max float64 `json:"max"`
	N   int     `json:"n"`
}

func spreadOf(values []float64) spread {
	if len(values) == 0 {
		return spread{P50: math.NaN(), P99: math.NaN(), Max: math.NaN()}
	}
	s := slices.Clone(values)
	slices.Sort(s)
	return spread{P50: percentile(s, 0.50), P99: percentile(s, 0.99), Max: s[len(s)-1], N: len(s)}
}

// percentile is the nearest-rank percentile of sorted values.
func percentile(sorted []float64, p float64) float64 {
	i := int(math.Ceil(p*float64(len(sorted)))) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

func round1(v float64) float64 { return math.Round(v*10) / 10 }
