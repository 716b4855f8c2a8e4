package nodecache_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/shoal-dev/shoal/agent/criruntime"
	"github.com/shoal-dev/shoal/agent/nodecache"
	v1alpha1 "github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/test/kubetest"
)

// fakeRuntime is an in-memory container runtime: images by name, pinned or not, and by whom.
// It checks that an image is imported only once the store holds its content, as the real
// runtime's pull through the mirror would need.
type fakeRuntime struct {
	mu      sync.Mutex
	canPin  bool
	images  map[string]*fakeImage
	imports int
	// before, if set, is called by Import, which fails with its error.
	before func(ref string) error
}

type fakeImage struct{ pinned, ours bool }

var _ nodecache.Runtime = (*fakeRuntime)(nil)
var _ nodecache.Runtime = (*criruntime.Runtime)(nil)

func newFakeRuntime(canPin bool) *fakeRuntime {
	return &fakeRuntime{canPin: canPin, images: map[string]*fakeImage{}}
}

func (f *fakeRuntime) setBefore(fn func(ref string) error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.before = fn
}

func (f *fakeRuntime) Import(_ context.Context, ref string) error {
	f.mu.Lock()
	before := f.before
	f.mu.Unlock()
	if before != nil {
		if err := before(ref); err != nil {
			return err
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.images[ref] == nil {
		f.images[ref] = &fakeImage{}
	}
	f.imports++
	return nil
}

func (f *fakeRuntime) Status(_ context.Context, ref string) (criruntime.State, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.stateLocked(ref), nil
}

func (f *fakeRuntime) stateLocked(ref string) criruntime.State {
	img := f.images[ref]
	switch {
	case img == nil:
		return criruntime.Absent
	case img.pinned && f.canPin:
		return criruntime.Pinned
	}
	return criruntime.Imported
}

func (f *fakeRuntime) Pin(_ context.Context, ref string) (criruntime.State, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	img := f.images[ref]
	if img == nil {
		return criruntime.Absent, fmt.Errorf("pin %s: no such image", ref)
	}
	if !img.pinned {
		img.pinned, img.ours = true, true
	}
	if !f.canPin {
		return criruntime.Imported, fmt.Errorf("pin %s: %w", ref, criruntime.ErrCannotPin)
	}
	return criruntime.Pinned, nil
}

func (f *fakeRuntime) Unpin(_ context.Context, ref string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if img := f.images[ref]; img != nil && img.ours {
		img.pinned, img.ours = false, false
	}
	return nil
}

func (f *fakeRuntime) PinnedByOwner(context.Context) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for ref, img := range f.images {
		if img.ours {
			out = append(out, ref)
		}
	}
	return out, nil
}

// state returns ref's state and whether the pin is this package's.
func (f *fakeRuntime) state(ref string) (criruntime.State, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	img := f.images[ref]
	return f.stateLocked(ref), img != nil && img.ours
}

func (f *fakeRuntime) remove(ref string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.images, ref)
}

func (f *fakeRuntime) importCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.imports
}

// runtimeName is the name the runtime knows an item's image by: the reference without its tag.
func runtimeName(ref string) string {
	repoTag, digest, _ := strings.Cut(ref, "@")
	if slash, colon := strings.LastIndex(repoTag, "/"), strings.LastIndex(repoTag, ":"); colon > slash {
		repoTag = repoTag[:colon]
	}
	return repoTag + "@" + digest
}

func TestRuntimeImport(t *testing.T) {
	h := &harness{kube: kubetest.Start(t), reg: startRegistry(t)}

	t.Run("the image is imported from the store and pinned", func(t *testing.T) {
		img := randomImage(t, 1024, 2)
		ref := h.reg.push(t, "team/app:1", img)
		rt := newFakeRuntime(true)
		n := h.start(t, "node-a", "", withRuntime(rt, time.Hour))
		rt.setBefore(func(string) error {
			for _, d := range imageContent(t, img).all() {
				if _, err := n.store.Stat(d); err != nil {
					return fmt.Errorf("import before the store holds %s", d)
				}
			}
			return nil
		})
		h.create(t, "node-a", v1alpha1.NodeCacheItem{Reference: ref, Pin: true, RuntimeImport: true})
		nc := h.waitStatus(t, "node-a", "the item Ready", allReady)
		if st := itemStatus(nc, ref); st.Runtime != v1alpha1.RuntimePinned || st.Message != "" {
			t.Errorf("item %+v; want runtime Pinned and no message", st)
		}
		if nc.Status.Ready != "1/1" {
			t.Errorf("ready %q, want 1/1", nc.Status.Ready)
		}
		if st, ours := rt.state(runtimeName(ref)); st != criruntime.Pinned || !ours {
			t.Errorf("runtime holds %s as %v (ours %v), want pinned by the worker", runtimeName(ref), st, ours)
		}
	})

	t.Run("a runtime that cannot pin leaves the image imported, and says so", func(t *testing.T) {
		img := randomImage(t, 512, 1)
		ref := h.reg.push(t, "team/app:old-runtime", img)
		rt := newFakeRuntime(false)
		h.start(t, "node-b", "", withRuntime(rt, time.Hour))
		h.create(t, "node-b", v1alpha1.NodeCacheItem{Reference: ref, Pin: true, RuntimeImport: true})
		nc := h.waitStatus(t, "node-b", "the item Ready", allReady)
		if st := itemStatus(nc, ref); st.Runtime != v1alpha1.RuntimeImported || !strings.Contains(st.Message, "imported, not pinned") {
			t.Errorf("item %+v; want runtime Imported and a message saying it is not pinned", st)
		}
	})

	t.Run("an image removed or unpinned out of band comes back", func(t *testing.T) {
		img := randomImage(t, 512, 1)
		ref := h.reg.push(t, "team/app:removed", img)
		rt := newFakeRuntime(true)
		h.start(t, "node-c", "", withRuntime(rt, 20*time.Millisecond))
		h.create(t, "node-c", v1alpha1.NodeCacheItem{Reference: ref, Pin: true, RuntimeImport: true})
		h.waitStatus(t, "node-c", "the item Ready", allReady)
		name := runtimeName(ref)
		rt.remove(name)
		waitUntil(t, "the image imported again", func() bool {
			st, _ := rt.state(name)
			return st == criruntime.Pinned && rt.importCount() == 2
		})
		_ = rt.Unpin(t.Context(), name)
		waitUntil(t, "the image pinned again", func() bool {
			st, ours := rt.state(name)
			return st == criruntime.Pinned && ours
		})
	})

	t.Run("an imported item is rechecked in the store and in the runtime", func(t *testing.T) {
		img := randomImage(t, 512, 2)
		ref := h.reg.push(t, "team/app:both", img)
		rt := newFakeRuntime(true)
		n := h.start(t, "node-f", "", withRuntime(rt, 20*time.Millisecond), withStoreRecheck(20*time.Millisecond))
		h.create(t, "node-f", v1alpha1.NodeCacheItem{Reference: ref, Pin: true, RuntimeImport: true})
		h.waitStatus(t, "node-f", "the item Ready", allReady)
		name := runtimeName(ref)

		// A layer leaves the store: it is fetched again; the runtime, which still holds the
		// image, is not asked to import it again.
		layer := imageContent(t, img).blobs[1]
		if err := n.store.Delete(layer); err != nil {
			t.Fatal(err)
		}
		waitUntil(t, "the layer fetched again", func() bool {
			_, err := n.store.Stat(layer)
			return err == nil && metric(t, n.metrics, "shoal_nodecache_refetches_total", "", "") == 1
		})
		nc := h.waitStatus(t, "node-f", "the item Ready again", allReady)
		if st := itemStatus(nc, ref); st.Runtime != v1alpha1.RuntimePinned {
			t.Errorf("item %+v; want runtime Pinned", st)
		}
		if got := rt.importCount(); got != 1 {
			t.Errorf("%d imports, want 1: the runtime kept the image", got)
		}

		// Then the runtime loses the image: the runtime recheck still runs, and imports it.
		rt.remove(name)
		waitUntil(t, "the image imported again", func() bool {
			st, _ := rt.state(name)
			return st == criruntime.Pinned && rt.importCount() == 2
		})
		if got := metric(t, n.metrics, "shoal_nodecache_refetches_total", "", ""); got != 1 {
			t.Errorf("shoal_nodecache_refetches_total = %v, want 1: the store kept everything", got)
		}
	})

	t.Run("leaving the spec releases only the worker's runtime pins", func(t *testing.T) {
		keep, drop := randomImage(t, 512, 1), randomImage(t, 512, 1)
		keepRef, dropRef := h.reg.push(t, "team/keep:1", keep), h.reg.push(t, "team/drop:1", drop)
		rt := newFakeRuntime(true)
		// Pinned by someone else (a user, or containerd's sandbox image setting).
		rt.images["registry.test/pause@sha256:0000000000000000000000000000000000000000000000000000000000000000"] = &fakeImage{pinned: true}
		h.start(t, "node-d", "", withRuntime(rt, time.Hour))
		h.create(t, "node-d",
			v1alpha1.NodeCacheItem{Reference: keepRef, Pin: true, RuntimeImport: true},
			v1alpha1.NodeCacheItem{Reference: dropRef, Pin: true, RuntimeImport: true})
		h.waitStatus(t, "node-d", "both items Ready", allReady)
		h.setItems(t, "node-d", v1alpha1.NodeCacheItem{Reference: keepRef, Pin: true, RuntimeImport: true})
		waitUntil(t, "the dropped image unpinned", func() bool {
			st, _ := rt.state(runtimeName(dropRef))
			return st == criruntime.Imported
		})
		if st, _ := rt.state(runtimeName(keepRef)); st != criruntime.Pinned {
			t.Errorf("the kept image is %v, want Pinned", st)
		}
		if st, _ := rt.state("registry.test/pause@sha256:0000000000000000000000000000000000000000000000000000000000000000"); st != criruntime.Pinned {
			t.Errorf("someone else's pinned image is %v, want Pinned still", st)
		}
	})

	t.Run("a failed import is retried and reported ImportFailed", func(t *testing.T) {
		img := randomImage(t, 512, 1)
		ref := h.reg.push(t, "team/app:flaky", img)
		rt := newFakeRuntime(true)
		var mu sync.Mutex
		fail := true
		rt.setBefore(func(string) error {
			mu.Lock()
			defer mu.Unlock()
			if fail {
				return errors.New("CRI pull: rpc error: code = Unavailable")
			}
			return nil
		})
		h.start(t, "node-e", "", withRuntime(rt, time.Hour))
		h.create(t, "node-e", v1alpha1.NodeCacheItem{Reference: ref, Pin: true, RuntimeImport: true})
		h.waitStatus(t, "node-e", "the item failed ImportFailed", func(nc *v1alpha1.NodeCache) bool {
			st := itemStatus(nc, ref)
			return st != nil && st.State == v1alpha1.ItemFailed && st.Reason == v1alpha1.ReasonImportFailed
		})
		mu.Lock()
		fail = false
		mu.Unlock()
		h.waitStatus(t, "node-e", "the item Ready after a retry", allReady)
	})
}

// waitUntil polls ok until it holds, failing the test after waitFor.
func waitUntil(t *testing.T, what string, ok func() bool) {
	t.Helper()
	for deadline := time.Now().Add(waitFor); !ok(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("waited %v for %s", waitFor, what)
		}
	}
}
