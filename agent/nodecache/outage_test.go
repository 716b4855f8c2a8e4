package nodecache_test

import (
	"slices"
	"testing"
	"time"

	"github.com/shoal-dev/shoal/agent/nodecache"
	v1alpha1 "github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/test/kubetest"
)

// outageFor is how long TestWorkerRidesOutAPIServerOutage keeps the API server away: long
// enough for the informer's re-lists to fail several times and back off.
const outageFor = 5 * time.Second

// writeBackoff is the test worker's wait after a failed status write: longer than the test
// waits for anything, so that the status is written again after the outage only because the
// worker sees the API server answer again.
const writeBackoff = 10 * waitFor

// TestWorkerRidesOutAPIServerOutage cuts a worker that holds pinned items off the API server
// (its connections closed, new ones refused): it keeps every pin and blob, goes on fetching
// what leaves the store, and once the API server is back it writes the status it could not,
// without waiting out its backoff, and follows the spec changes made meanwhile and after,
// without a restart.
func TestWorkerRidesOutAPIServerOutage(t *testing.T) {
	env := kubetest.Start(t)
	outage, cfg := kubetest.NewOutage(t, env)
	h := &harness{kube: env, reg: startRegistry(t)}
	pinned, cached := randomImage(t, 1024, 2), randomImage(t, 512, 2)
	during, after := randomImage(t, 512, 1), randomImage(t, 512, 1)
	pinnedRef, cachedRef := h.reg.push(t, "team/app:1", pinned), h.reg.push(t, "team/cached:1", cached)
	duringRef, afterRef := h.reg.push(t, "team/during:1", during), h.reg.push(t, "team/after:1", after)
	pc, cc := imageContent(t, pinned), imageContent(t, cached)

	n := h.start(t, "node-a", "", withRestConfig(cfg), withWriteRetry(writeBackoff, writeBackoff),
		withStoreRecheck(20*time.Millisecond), withStatusInterval(50*time.Millisecond))
	items := []v1alpha1.NodeCacheItem{{Reference: pinnedRef, Pin: true}, {Reference: cachedRef}}
	h.create(t, "node-a", items...)
	h.waitStatus(t, "node-a", "both items Ready", allReady)
	pins := sorted(pc.all())
	if got := n.store.PinnedBy(nodecache.Owner); !slices.Equal(got, pins) {
		t.Fatalf("pinned %v, want %v", got, pins)
	}
	// held checks that the worker kept every pin and blob of the items held before the outage.
	held := func(when string) {
		t.Helper()
		if got := n.store.PinnedBy(nodecache.Owner); !slices.Equal(got, pins) {
			t.Fatalf("%s: pinned %v, want %v", when, got, pins)
		}
		for _, d := range append(pc.all(), cc.all()...) {
			if _, err := n.store.Stat(d); err != nil {
				t.Fatalf("%s: %s left the store: %v", when, d, err)
			}
		}
	}

	outage.Down()
	end := time.Now().Add(outageFor)
	// A layer of the cached item leaves the store, and its fetch waits: the item is Pending, a
	// status the worker cannot write.
	layer := cc.blobs[1]
	release := make(chan struct{})
	h.reg.holdBlob("team/cached", layer, release)
	if err := n.store.Delete(layer); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "a status write failing", func() bool {
		return metric(t, n.metrics, "shoal_nodecache_status_writes_total", "result", "error") >= 1
	})
	// The data path needs no API server: the layer is fetched again.
	close(release)
	waitUntil(t, "the layer fetched again during the outage", func() bool {
		_, err := n.store.Stat(layer)
		return err == nil
	})
	// The spec changes while the worker cannot see it.
	items = append(items, v1alpha1.NodeCacheItem{Reference: duringRef, Pin: true})
	gen := h.setItems(t, "node-a", items...)
	for held("during the outage"); time.Now().Before(end); held("during the outage") {
		time.Sleep(50 * time.Millisecond)
	}
	if err := outage.Up(); err != nil {
		t.Fatal(err)
	}
	// The worker sees the change it missed, and writes again at once.
	h.waitStatus(t, "node-a", "the spec changed during the outage Ready", func(nc *v1alpha1.NodeCache) bool {
		return nc.Status.ObservedGeneration == gen && allReady(nc)
	})

	// And after it.
	items = append(items, v1alpha1.NodeCacheItem{Reference: afterRef, Pin: true})
	gen = h.setItems(t, "node-a", items...)
	h.waitStatus(t, "node-a", "the spec changed after the outage Ready", func(nc *v1alpha1.NodeCache) bool {
		return nc.Status.ObservedGeneration == gen && allReady(nc)
	})
	pins = sorted(append(append(pc.all(), imageContent(t, during).all()...), imageContent(t, after).all()...))
	waitUntil(t, "the new items pinned", func() bool { return slices.Equal(n.store.PinnedBy(nodecache.Owner), pins) })
	held("after the outage")
	if got := metric(t, n.metrics, "shoal_nodecache_refetches_total", "", ""); got != 1 {
		t.Errorf("shoal_nodecache_refetches_total = %v, want 1", got)
	}
	if problems, _ := n.logs.Check(nil); len(problems) > 0 {
		t.Errorf("log conventions: %v", problems)
	}
}
