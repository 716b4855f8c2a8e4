package swarm

import (
	"bytes"
	"context"
	"sync"
	"testing"
	"time"

	"github.com/shoal-dev/shoal/agent/plan"
)

// TestPrefetchSeedsEachSegmentOnceAhead: every node prefetches a blob announced as coming;
// each fetches only the segments it seeds, so upstream has sent exactly one copy before any
// reader asks, and the readers then get the blob from peers without upstream sending more.
func TestPrefetchSeedsEachSegmentOnceAhead(t *testing.T) {
	up := newMemUpstream()
	content := randomBlob(t, 6<<20+4321)
	d := up.add(content)
	nodes := startNodes(t, 4, up)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	var wg sync.WaitGroup
	seeded := make([]int, len(nodes))
	for i, node := range nodes {
		wg.Go(func() {
			n, err := node.swarm.Prefetch(ctx, "registry.test", "app", d, int64(len(content)))
			if err != nil {
				t.Errorf("node %d: prefetch: %v", i, err)
			}
			seeded[i] = n
		})
	}
	wg.Wait()
	total := 0
	for _, n := range seeded {
		total += n
	}
	cfg := nodes[0].swarm.cfg
	p, err := plan.New(d, int64(len(content)), cfg.SegmentSize, cfg.PieceLength, cfg.RampSegments, cfg.MinSegments)
	if err != nil {
		t.Fatal(err)
	}
	if total != p.Segments() {
		t.Errorf("nodes prefetched %v segments, %d in all; want each of the %d segments once", seeded, total, p.Segments())
	}
	if sent := up.sent.Load(); sent != int64(len(content)) {
		t.Errorf("upstream sent %d bytes for prefetching a %d-byte blob, want exactly one copy", sent, len(content))
	}

	for i, node := range nodes {
		wg.Go(func() {
			got, err := readSource(ctx, node.swarm.Source("registry.test", "app", d))
			if err != nil || !bytes.Equal(got, content) {
				t.Errorf("node %d: read after prefetch: %d bytes, %v", i, len(got), err)
			}
		})
	}
	wg.Wait()
	if sent := up.sent.Load(); sent != int64(len(content)) {
		t.Errorf("upstream sent %d bytes in all, want the one copy prefetched (%d)", sent, len(content))
	}
}

// TestPrefetchChecksTheAnnouncedSize: a wrong size in the announcement is refused by the nodes
// that would seed, and leaves no state behind that would break the real pull.
func TestPrefetchChecksTheAnnouncedSize(t *testing.T) {
	up := newMemUpstream()
	content := randomBlob(t, 3<<20)
	d := up.add(content)
	nodes := startNodes(t, 2, up)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	refused := 0
	for _, node := range nodes {
		if _, err := node.swarm.Prefetch(ctx, "registry.test", "app", d, int64(len(content))+1); err != nil {
			refused++
		}
	}
	if refused == 0 {
		t.Error("no node refused an announcement with the wrong size")
	}
	if sent := up.sent.Load(); sent != 0 {
		t.Errorf("upstream sent %d bytes for a refused announcement", sent)
	}
	got, err := readSource(ctx, nodes[0].swarm.Source("registry.test", "app", d))
	if err != nil || !bytes.Equal(got, content) {
		t.Errorf("read after a wrong announcement: %d bytes, %v", len(got), err)
	}
}

// TestPrefetchOfAFetchedBlobFetchesNothing: a node that has the blob already fetches nothing.
func TestPrefetchOfAFetchedBlobFetchesNothing(t *testing.T) {
	up := newMemUpstream()
	content := randomBlob(t, 2<<20)
	d := up.add(content)
	nodes := startNodes(t, 1, up)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := readSource(ctx, nodes[0].swarm.Source("registry.test", "app", d)); err != nil {
		t.Fatal(err)
	}
	before := up.sent.Load()
	if _, err := nodes[0].swarm.Prefetch(ctx, "registry.test", "app", d, int64(len(content))); err != nil || up.sent.Load() != before {
		t.Errorf("prefetch of a blob already fetched: %v, upstream sent %d more bytes", err, up.sent.Load()-before)
	}
}
