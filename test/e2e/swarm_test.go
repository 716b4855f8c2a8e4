package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/test/harness"
	"github.com/shoal-dev/shoal/test/testbed"
)

// newSwarmTestbed builds n nodes (with containerd if asked) and starts a swarm agent on each.
func newSwarmTestbed(t *testing.T, ctx context.Context, n int, opts ...testbed.Option) *testbed.Testbed {
	t.Helper()
	tb, err := testbed.New(ctx, n, append([]testbed.Option{testbed.WithShoalBinary(shoalBinary(t))}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = tb.Close() })
	for _, node := range tb.Nodes() {
		if _, err := node.StartAgent(ctx, node.SwarmArgs()...); err != nil {
			t.Fatal(err)
		}
	}
	waitForMembers(t, ctx, tb)
	return tb
}

// waitForMembers waits until every agent sees every other as alive.
func waitForMembers(t *testing.T, ctx context.Context, tb *testbed.Testbed) {
	t.Helper()
	if err := tb.WaitForSwarm(ctx, 30*time.Second); err != nil {
		t.Fatal(err)
	}
}

// upstreamBytes sums the body bytes the registry sent for each blob.
func upstreamBytes(t *testing.T, ctx context.Context, tb *testbed.Testbed) map[v1.Hash]int64 {
	t.Helper()
	if err := tb.Registry().Sync(ctx); err != nil {
		t.Fatal(err)
	}
	requests, err := tb.Registry().Requests()
	if err != nil {
		t.Fatal(err)
	}
	return harness.BlobBytes(requests)
}

// agentsMetric sums a metric over every node's agent.
func agentsMetric(t *testing.T, ctx context.Context, tb *testbed.Testbed, name string, labels map[string]string) float64 {
	t.Helper()
	var sum float64
	for _, node := range tb.Nodes() {
		v, err := node.Agent().Metric(ctx, name, labels)
		if err != nil {
			t.Fatalf("node %s: %v", node.Name(), err)
		}
		sum += v
	}
	return sum
}

// TestSwarmPullThroughCRI has four nodes, each with its own containerd and agent, pull the same
// new multi-layer image at once through CRI: every pull succeeds, the registry serves about one
// copy of each layer, and most bytes travel between peers.
func TestSwarmPullThroughCRI(t *testing.T) {
	harness.RequireIsolation(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	tb := newSwarmTestbed(t, ctx, 4, testbed.WithContainerd())
	img, err := harness.PushImage(ctx, tb.RegistryHost(), "test/swarm:v1", harness.ImageSpec{Layers: 3, LayerSize: 24 << 20})
	if err != nil {
		t.Fatal(err)
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
	if t.Failed() {
		return
	}
	for _, node := range tb.Nodes() {
		for _, l := range img.Layers {
			if !node.Containerd().HasContent(l) {
				t.Errorf("node %s: containerd lacks layer %s", node.Name(), l)
			}
		}
	}
	sent := upstreamBytes(t, ctx, tb)
	var layerBytes int64
	for _, l := range img.Layers {
		size := img.Sizes[l]
		layerBytes += size
		if got := sent[l]; float64(got) > 1.25*float64(size) {
			t.Errorf("layer %s (%d bytes): the registry sent %d bytes for 4 nodes, want about one copy", l, size, got)
		}
	}
	peer := agentsMetric(t, ctx, tb, "shoal_swarm_peer_bytes_total", nil)
	if peer < 2*float64(layerBytes) {
		t.Errorf("peers exchanged %.0f bytes of %d bytes of layers pulled by 4 nodes; want peer bytes to dominate", peer, layerBytes)
	}
}

// fetchOn runs the fetch client on the given nodes at once and fails the test unless every one
// received the blob with the right digest.
func fetchOn(t *testing.T, ctx context.Context, tb *testbed.Testbed, d v1.Hash, nodes ...int) {
	t.Helper()
	if err := fetchAll(ctx, tb, d, nodes...); err != nil {
		t.Fatal(err)
	}
}

// fetchAll runs the fetch client on the given nodes at once and returns an error unless every
// one received the blob with the right digest. Unlike fetchOn it may run in a goroutine.
func fetchAll(ctx context.Context, tb *testbed.Testbed, d v1.Hash, nodes ...int) error {
	want := map[int]bool{}
	for _, i := range nodes {
		want[i] = true
	}
	results, err := tb.FetchAll(ctx, func(i int) *testbed.FetchSpec {
		if !want[i] {
			return nil
		}
		return &testbed.FetchSpec{URL: tb.Node(i).MirrorBlobURL("test/blob", d.String()), Digest: d, Timeout: 5 * time.Minute}
	})
	if err != nil {
		return err
	}
	var failed []error
	for _, i := range nodes {
		if r := results[i]; !r.OK {
			failed = append(failed, fmt.Errorf("node %d: fetch failed: %s", i, r.Error))
		}
	}
	return errors.Join(failed...)
}

// TestSwarmSeederKilledMidTransfer kills an agent that is seeding while the others download:
// they all still complete, from the remaining peers or upstream.
func TestSwarmSeederKilledMidTransfer(t *testing.T) {
	harness.RequireIsolation(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	tb := newSwarmTestbed(t, ctx, 4, testbed.WithNodeRate(100*testbed.Mbit))
	d, err := tb.PushBlob(ctx, "test/blob", 64<<20, 1)
	if err != nil {
		t.Fatal(err)
	}
	fetched := make(chan error, 1)
	go func() { fetched <- fetchAll(ctx, tb, d, 0, 1, 2) }()
	// Kill node 3 as soon as it has fetched something from upstream: it is seeding then.
	victim := tb.Node(3).Agent()
	deadline := time.Now().Add(time.Minute)
	for {
		v, err := victim.Metric(ctx, "shoal_swarm_fetched_bytes_total", map[string]string{"source": "upstream"})
		if err == nil && v > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("node 3 never seeded a segment (%v, %v)", v, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := victim.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := <-fetched; err != nil {
		t.Errorf("with node 3 killed mid-transfer: %v", err)
	}
}

// TestSwarmCorruptPeerNeverReachesClients makes one node's copy of a blob corrupt on disk
// behind its agent's back. That node is the only holder of the segment it seeds: the pieces it
// serves fail their hash checks, it is banned, and the others still receive the exact blob (the
// next member seeds its segments again from upstream).
func TestSwarmCorruptPeerNeverReachesClients(t *testing.T) {
	harness.RequireIsolation(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	tb := newSwarmTestbed(t, ctx, 4)
	// 19 segments over four members: every member seeds some of them.
	d, err := tb.PushBlob(ctx, "test/blob", 64<<20, 2)
	if err != nil {
		t.Fatal(err)
	}
	fetchOn(t, ctx, tb, d, 0)
	path := filepath.Join(filepath.Dir(tb.Node(0).Agent().LogPath()), "data", "blobs", "sha256", d.Hex)
	waitForFile(t, path) // the store commits just after the client's last byte
	// Fresh agents elsewhere: node 0 is now the only node that knows the blob.
	for _, node := range tb.Nodes()[1:] {
		if _, err := node.StartAgent(ctx, node.SwarmArgs()...); err != nil {
			t.Fatal(err)
		}
	}
	waitForMembers(t, ctx, tb)
	// Node 0 serves its segment from its store's copy: flip a byte in every MiB of it.
	corruptEveryMiB(t, path)

	fetchOn(t, ctx, tb, d, 1, 2, 3)
	var failed float64
	for _, node := range tb.Nodes()[1:] {
		v, err := node.Agent().Metric(ctx, "shoal_swarm_pieces_failed_total", nil)
		if err != nil {
			t.Fatal(err)
		}
		failed += v
	}
	if failed == 0 {
		t.Error("no piece from the corrupt node failed its hash check: did it serve nothing?")
	}
}

func waitForFile(t *testing.T, path string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := os.Stat(path)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func corruptEveryMiB(t *testing.T, path string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	one := make([]byte, 1)
	for off := int64(0); off < fi.Size(); off += 1 << 20 {
		if _, err := f.ReadAt(one, off); err != nil {
			t.Fatal(err)
		}
		one[0] ^= 0xff
		if _, err := f.WriteAt(one, off); err != nil {
			t.Fatal(err)
		}
	}
}

// TestSwarmAgentRestartResumes kills a downloading agent halfway and restarts it on the same
// data directory: the download completes without fetching everything again.
func TestSwarmAgentRestartResumes(t *testing.T) {
	harness.RequireIsolation(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	tb := newSwarmTestbed(t, ctx, 3, testbed.WithNodeRate(50*testbed.Mbit))
	const size = 96 << 20
	d, err := tb.PushBlob(ctx, "test/blob", size, 3)
	if err != nil {
		t.Fatal(err)
	}
	fetchOn(t, ctx, tb, d, 1) // nodes 1 and 2 (and the seeders) hold it now
	agent := tb.Node(0).Agent()
	go func() {
		_, _ = tb.Node(0).Fetch(ctx, testbed.FetchSpec{URL: tb.Node(0).MirrorBlobURL("test/blob", d.String()), Digest: d})
	}()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		peer, err1 := agent.Metric(ctx, "shoal_swarm_peer_bytes_total", nil)
		up, err2 := agent.Metric(ctx, "shoal_swarm_fetched_bytes_total", nil)
		if err1 == nil && err2 == nil && peer+up > size/2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("node 0 never got half of the blob")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := agent.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := agent.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	fetchOn(t, ctx, tb, d, 0)
	peer, err := agent.Metric(ctx, "shoal_swarm_peer_bytes_total", nil)
	if err != nil {
		t.Fatal(err)
	}
	up, err := agent.Metric(ctx, "shoal_swarm_fetched_bytes_total", nil)
	if err != nil {
		t.Fatal(err)
	}
	if peer+up >= size {
		t.Errorf("after the restart node 0 fetched %.0f bytes of a %d byte blob: it started over", peer+up, size)
	}
}

// TestSwarmAllAgentsDownFallsBack kills every agent: containerd pulls from the registry itself.
func TestSwarmAllAgentsDownFallsBack(t *testing.T) {
	harness.RequireIsolation(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	tb := newSwarmTestbed(t, ctx, 2, testbed.WithContainerd())
	img, err := harness.PushImage(ctx, tb.RegistryHost(), "test/fallback:v1", harness.ImageSpec{Layers: 2, LayerSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	for _, node := range tb.Nodes() {
		if err := node.Agent().Kill(); err != nil {
			t.Fatal(err)
		}
	}
	for _, node := range tb.Nodes() {
		if _, err := node.PullImage(ctx, img.Name(testbed.RegistryName)); err != nil {
			t.Errorf("node %s: pull with every agent down: %v", node.Name(), err)
		}
	}
}
