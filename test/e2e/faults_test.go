package e2e

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httputil"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/shoal-dev/shoal/test/harness"
	"github.com/shoal-dev/shoal/test/testbed"
)

// startRangeStrippingFront puts a reverse proxy in front of the testbed's registry that drops
// Range headers, as some proxies and older registries do (every ranged GET gets 200 and the
// whole blob), and makes agents started afterwards use it as registry.test.
func startRangeStrippingFront(t *testing.T, tb *testbed.Testbed) {
	t.Helper()
	l, err := tb.ListenOnSwitch()
	if err != nil {
		t.Fatal(err)
	}
	target, err := url.Parse(tb.RegistryURL())
	if err != nil {
		t.Fatal(err)
	}
	front := &httputil.ReverseProxy{Rewrite: func(r *httputil.ProxyRequest) {
		r.SetURL(target)
		r.Out.Host = r.In.Host
		r.Out.Header.Del("Range")
		r.Out.Header.Del("If-Range")
	}}
	server := &http.Server{Handler: front, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = server.Serve(l) }()
	t.Cleanup(func() { _ = server.Close() })
	tb.SetAgentUpstream("http://" + l.Addr().String())
}

// pullOn pulls ref through CRI on the given nodes at once and fails the test unless every
// pull succeeds and each node's containerd holds every layer (containerd checks every blob
// against its digest as it ingests it). It returns how long each pull took.
func pullOn(t *testing.T, ctx context.Context, img *harness.Image, nodes ...*testbed.Node) []time.Duration {
	t.Helper()
	took := make([]time.Duration, len(nodes))
	var wg sync.WaitGroup
	for i, node := range nodes {
		wg.Go(func() {
			start := time.Now()
			if _, err := node.PullImage(ctx, img.Name(testbed.RegistryName)); err != nil {
				t.Errorf("node %s: %v", node.Name(), err)
				return
			}
			took[i] = time.Since(start)
			for _, l := range img.Layers {
				if !node.Containerd().HasContent(l) {
					t.Errorf("node %s: containerd lacks layer %s", node.Name(), l)
				}
			}
		})
	}
	wg.Wait()
	return took
}

// registrySent returns what the registry sent for img's blobs, in units of their total size.
func registrySent(t *testing.T, ctx context.Context, tb *testbed.Testbed, img *harness.Image) float64 {
	t.Helper()
	sent := upstreamBytes(t, ctx, tb)
	var total int64
	for _, b := range img.Blobs() {
		total += sent[b]
	}
	return float64(total) / float64(img.BlobBytes())
}

// logBlobGETs logs every blob GET the registry answered, with the bytes it sent, so that a
// failed check on upstream bytes shows which blob went twice.
func logBlobGETs(t *testing.T, tb *testbed.Testbed) {
	t.Helper()
	reqs, err := tb.Registry().Requests()
	if err != nil {
		t.Log(err)
		return
	}
	for _, r := range reqs {
		if _, ok := r.BlobDigest(); ok && r.Method == http.MethodGet {
			t.Logf("registry: GET %s: %d, %d bytes", r.Path, r.Status, r.Bytes)
		}
	}
}

// TestSwarmPullsFromRegistryIgnoringRange has four nodes pull a new image through CRI while
// the agents' upstream ignores Range: every pull succeeds with the right content, the agents
// fall back to fetching each blob whole once, and the registry sends about one copy.
func TestSwarmPullsFromRegistryIgnoringRange(t *testing.T) {
	harness.RequireIsolation(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	tb, err := testbed.New(ctx, 4, testbed.WithShoalBinary(shoalBinary(t)), testbed.WithContainerd())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = tb.Close() })
	startRangeStrippingFront(t, tb)
	for _, node := range tb.Nodes() {
		if _, err := node.StartAgent(ctx, node.SwarmArgs()...); err != nil {
			t.Fatal(err)
		}
	}
	waitForMembers(t, ctx, tb)
	img, err := harness.PushImage(ctx, tb.RegistryHost(), "test/norange:v1", harness.ImageSpec{Layers: 3, LayerSize: 20 << 20})
	if err != nil {
		t.Fatal(err)
	}
	took := pullOn(t, ctx, img, tb.Nodes()...)
	if t.Failed() {
		return
	}
	t.Logf("pulls took %v", took)
	if got := agentsMetric(t, ctx, tb, "shoal_swarm_whole_blob_fallbacks_total", nil); got == 0 {
		t.Error("no agent fell back to whole-blob fetching: the front did not strip Range, or nothing noticed")
	}
	sent := registrySent(t, ctx, tb, img)
	t.Logf("the registry sent %.2f × the image", sent)
	if sent > 1.1 {
		t.Errorf("the registry sent %.2f × the image for 4 nodes, want at most 1.1", sent)
		logBlobGETs(t, tb)
	}
}

// TestWedgedMirrorFallsBack wedges the agent's content store (as a deadlock would: calls block
// and ignore their context) and pulls an image through CRI on containerd 1.6, which would wait
// for ever on a mirror that never answers: the mirror's first-byte deadline answers 503 and
// containerd fetches everything from the registry itself.
func TestWedgedMirrorFallsBack(t *testing.T) {
	harness.RequireIsolation(t)
	e := newEnv(t)
	cfg := e.agentConfig()
	cfg.ExtraArgs = append(cfg.ExtraArgs, "--fault-injection")
	agent := e.startAgent(cfg)
	img := e.pushImage("test/wedged:v1")
	ctd := e.startContainerd("containerd-wedged")

	wedge(t, e.ctx, agent, true)
	start := time.Now()
	e.pull(ctd, img.Name(registryName)) // fails the test past pullTimeout, many times the bound
	took := time.Since(start)
	wedge(t, e.ctx, agent, false)

	byContainerd, _ := e.blobGETs()
	if n := sum(byContainerd, img.Blobs()); n < len(img.Blobs()) {
		t.Errorf("containerd fetched %d of the image's %d blobs from the registry itself, want all (the mirror was wedged)", n, len(img.Blobs()))
	}
	timeouts := e.metrics(agent).Value("shoal_mirror_deadline_exceeded_total", map[string]string{"deadline": "first_byte"})
	if timeouts < float64(len(img.Blobs())) {
		t.Errorf("the mirror counted %v first-byte timeouts, want one at least per blob (%d)", timeouts, len(img.Blobs()))
	}
	t.Logf("pull with the mirror wedged: %s, %v requests answered 503 at the first-byte deadline", took.Round(time.Millisecond), timeouts)
}

// wedge turns the agent's fault hook on or off.
func wedge(t *testing.T, ctx context.Context, a *harness.Agent, on bool) {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, fmt.Sprintf("http://%s/debug/faults/wedge?on=%t", a.MetricsAddr(), on), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("wedge on=%t: status %d", on, resp.StatusCode)
	}
}

// TestFrozenPeer stops one agent of four with SIGSTOP, which leaves the kernel completing
// handshakes on its port while nothing answers: first in the middle of a rollout (half of the
// bytes delivered, some of the node's segments published and not all shared yet), then, still
// frozen, before the others ask for a new image (every segment it should seed is due from it).
// Each time the other nodes' CRI pulls succeed, its segments are taken over, and the registry
// sends at most 1.2 copies. A rollout without the fault, of another image of the same shape,
// is the baseline the delay is measured against (the figures are in docs/benchmarks.md).
func TestFrozenPeer(t *testing.T) {
	harness.RequireIsolation(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	tb := newSwarmTestbed(t, ctx, 4, testbed.WithContainerd(),
		testbed.WithNodeRate(100*testbed.Mbit), testbed.WithRegistryRate(400*testbed.Mbit))
	spec := harness.ImageSpec{Layers: 1, LayerSize: 64 << 20}
	pullers, frozen := tb.Nodes()[:3], tb.Node(3)
	push := func(repoTag string) *harness.Image {
		img, err := harness.PushImage(ctx, tb.RegistryHost(), repoTag, spec)
		if err != nil {
			t.Fatal(err)
		}
		return img
	}
	check := func(what string, img *harness.Image, took []time.Duration) {
		sent := registrySent(t, ctx, tb, img)
		t.Logf("%s: pulls took %v, the registry sent %.2f × the image", what, took, sent)
		if sent > 1.2 {
			t.Errorf("%s: the registry sent %.2f × the image, want at most 1.2", what, sent)
		}
	}

	baseline := pullOn(t, ctx, push("test/frozen-base:v1"), pullers...)
	if t.Failed() {
		return
	}
	t.Logf("without the fault: pulls took %v", baseline)

	mid := push("test/frozen-mid:v1")
	before := 0.0
	for _, n := range pullers {
		before += nodeMetric(t, ctx, n, "shoal_swarm_peer_bytes_total")
	}
	froze := make(chan error, 1)
	go func() {
		half := before + float64(len(pullers))*float64(mid.BlobBytes())/2
		for ctx.Err() == nil {
			got := 0.0
			for _, n := range pullers {
				v, err := n.Agent().Metric(ctx, "shoal_swarm_peer_bytes_total", nil)
				if err != nil {
					froze <- err
					return
				}
				got += v
			}
			if got >= half {
				froze <- frozen.Agent().Freeze()
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
		froze <- ctx.Err()
	}()
	took := pullOn(t, ctx, mid, pullers...)
	if err := <-froze; err != nil {
		t.Fatalf("freeze %s: %v", frozen.Name(), err)
	}
	t.Cleanup(func() { _ = frozen.Agent().Thaw() })
	if t.Failed() {
		return
	}
	check(frozen.Name()+" frozen mid-rollout", mid, took)

	late := push("test/frozen-before:v1")
	took = pullOn(t, ctx, late, pullers...)
	if t.Failed() {
		return
	}
	check(frozen.Name()+" frozen before the rollout", late, took)
}

// nodeMetric reads a metric of a node's agent.
func nodeMetric(t *testing.T, ctx context.Context, node *testbed.Node, name string) float64 {
	t.Helper()
	v, err := node.Agent().Metric(ctx, name, nil)
	if err != nil {
		t.Fatalf("node %s: %v", node.Name(), err)
	}
	return v
}
