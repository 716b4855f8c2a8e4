package nodecache_test

import (
	"context"
	"io"
	"log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/prometheus/client_golang/prometheus"
	apimeta "k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/shoal-dev/shoal/agent/nodecache"
	"github.com/shoal-dev/shoal/agent/store"
	"github.com/shoal-dev/shoal/agent/upstream"
	v1alpha1 "github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/internal/logcheck"
	"github.com/shoal-dev/shoal/test/kubetest"
)

// waitFor bounds how long a test waits for something to happen; it only bounds a failure.
const waitFor = 60 * time.Second

var _ nodecache.Store = (*store.Store)(nil)
var _ nodecache.Manifests = (*upstream.Client)(nil)

// testRegistry is go-containerregistry's in-process registry on loopback, served as
// registry.test, with counts of the content fetched from it and faults for some paths.
type testRegistry struct {
	host    string
	handler http.Handler

	mu     sync.Mutex
	gets   map[string]int              // GETs by kind: "manifests", "blobs"
	faults map[string]http.HandlerFunc // by URL path
	denied map[string]bool             // repositories answered 403
}

func startRegistry(t *testing.T) *testRegistry {
	r := &testRegistry{
		handler: registry.New(registry.Logger(log.New(io.Discard, "", 0))),
		gets:    map[string]int{}, faults: map[string]http.HandlerFunc{}, denied: map[string]bool{},
	}
	srv := httptest.NewServer(r)
	t.Cleanup(srv.Close)
	r.host = strings.TrimPrefix(srv.URL, "http://")
	return r
}

func (r *testRegistry) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	r.mu.Lock()
	kind := ""
	if strings.Contains(req.URL.Path, "/blobs/sha256:") {
		kind = "blobs"
	} else if strings.Contains(req.URL.Path, "/manifests/") {
		kind = "manifests"
	}
	if req.Method == http.MethodGet && kind != "" {
		r.gets[kind]++
	}
	fault := r.faults[req.URL.Path]
	denied := false
	for repo := range r.denied {
		denied = denied || strings.HasPrefix(req.URL.Path, "/v2/"+repo+"/")
	}
	r.mu.Unlock()
	switch {
	case denied:
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusForbidden)
		_, _ = io.WriteString(w, `{"errors":[{"code":"DENIED","message":"no pull access"}]}`)
	case fault != nil && req.Method == http.MethodGet:
		fault(w, req)
	default:
		r.handler.ServeHTTP(w, req)
	}
}

// fetched returns the GETs of manifests and blobs so far.
func (r *testRegistry) fetched() (manifests, blobs int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.gets["manifests"], r.gets["blobs"]
}

func (r *testRegistry) setFault(path string, f http.HandlerFunc) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if f == nil {
		delete(r.faults, path)
	} else {
		r.faults[path] = f
	}
}

func (r *testRegistry) deny(repo string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.denied[repo] = true
}

// push pushes an image or index to repo:tag and returns the item reference for it.
func (r *testRegistry) push(t *testing.T, repoTag string, content remote.Taggable) string {
	t.Helper()
	ref, err := name.ParseReference(r.host + "/" + repoTag)
	if err != nil {
		t.Fatal(err)
	}
	var d v1.Hash
	switch x := content.(type) {
	case v1.ImageIndex:
		err = remote.WriteIndex(ref, x)
		if err == nil {
			d, err = x.Digest()
		}
	case v1.Image:
		err = remote.Write(ref, x)
		if err == nil {
			d, err = x.Digest()
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	return "registry.test/" + repoTag + "@" + d.String()
}

// content is what an item must make the store hold: its manifests and blobs, and their size.
type content struct {
	manifests, blobs []v1.Hash
	size             int64
}

func (c content) all() []v1.Hash { return append(slices.Clone(c.manifests), c.blobs...) }

func imageContent(t *testing.T, img v1.Image) content {
	t.Helper()
	raw, err := img.RawManifest()
	if err != nil {
		t.Fatal(err)
	}
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	d, _ := img.Digest()
	c := content{manifests: []v1.Hash{d}, size: int64(len(raw))}
	for _, desc := range append([]v1.Descriptor{m.Config}, m.Layers...) {
		c.blobs = append(c.blobs, desc.Digest)
		c.size += desc.Size
	}
	return c
}

func indexContent(t *testing.T, idx v1.ImageIndex) content {
	t.Helper()
	raw, err := idx.RawManifest()
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	d, _ := idx.Digest()
	c := content{manifests: []v1.Hash{d}, size: int64(len(raw))}
	for _, desc := range im.Manifests {
		img, err := idx.Image(desc.Digest)
		if err != nil {
			t.Fatal(err)
		}
		child := imageContent(t, img)
		c.manifests = append(c.manifests, child.manifests...)
		c.blobs = append(c.blobs, child.blobs...)
		c.size += child.size
	}
	return c
}

func randomImage(t *testing.T, layerSize int64, layers int) v1.Image {
	t.Helper()
	img, err := random.Image(layerSize, int64(layers))
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// harness is one API server and one registry that the subtests' nodes share.
type harness struct {
	kube *kubetest.Env
	reg  *testRegistry
}

// node is one node's store and worker.
type node struct {
	name    string
	dir     string
	store   *store.Store
	metrics *prometheus.Registry
	logs    *logcheck.Recorder
	stop    func()
}

type option func(*nodecache.Config, *nodeOptions)

type nodeOptions struct {
	storeOpts       []store.Option
	retry, maxRetry time.Duration
	// writeRetry, maxWriteRetry: 0 = the worker's own.
	writeRetry, maxWriteRetry time.Duration
	rest                      *rest.Config                          // nil: the API server's own
	wrapStore                 func(nodecache.Store) nodecache.Store // nil: the store as it is
}

func withStatusInterval(d time.Duration) option {
	return func(c *nodecache.Config, _ *nodeOptions) { c.StatusInterval = d }
}

func withParallel(n int) option {
	return func(c *nodecache.Config, _ *nodeOptions) { c.Parallel = n }
}

// withPinnedShare bounds pinned items to share of a store of maxBytes.
func withPinnedShare(share float64, maxBytes int64) option {
	return func(c *nodecache.Config, o *nodeOptions) {
		c.MaxPinnedShare = share
		o.storeOpts = append(o.storeOpts, store.WithMaxBytes(maxBytes))
	}
}

func withRuntime(r nodecache.Runtime, recheck time.Duration) option {
	return func(c *nodecache.Config, _ *nodeOptions) { c.Runtime, c.RuntimeRecheck = r, recheck }
}

func withStoreRecheck(d time.Duration) option {
	return func(c *nodecache.Config, _ *nodeOptions) { c.StoreRecheck = d }
}

// withWriteRetry sets the backoff of failed status writes.
func withWriteRetry(first, longest time.Duration) option {
	return func(_ *nodecache.Config, o *nodeOptions) { o.writeRetry, o.maxWriteRetry = first, longest }
}

// withRestConfig makes the worker reach the API server with cfg (through an Outage, say).
func withRestConfig(cfg *rest.Config) option {
	return func(_ *nodecache.Config, o *nodeOptions) { o.rest = cfg }
}

// withStatCount makes the worker's store count the worker's Stat calls in n.
func withStatCount(n *atomic.Int64) option {
	return func(_ *nodecache.Config, o *nodeOptions) {
		o.wrapStore = func(s nodecache.Store) nodecache.Store { return &countingStore{Store: s, stats: n} }
	}
}

// countingStore counts the Stat calls made to a store.
type countingStore struct {
	nodecache.Store
	stats *atomic.Int64
}

func (s *countingStore) Stat(d v1.Hash) (int64, error) {
	s.stats.Add(1)
	return s.Store.Stat(d)
}

func withStall(worker, storeStall time.Duration) option {
	return func(c *nodecache.Config, o *nodeOptions) {
		c.StallTimeout = worker
		o.storeOpts = append(o.storeOpts, store.WithStallTimeout(storeStall))
	}
}

// start opens the node's store in dir ("" = a new one) and runs a worker on it until stop or
// the end of the test.
func (h *harness) start(t *testing.T, nodeName, dir string, opts ...option) *node {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	o := nodeOptions{retry: 50 * time.Millisecond, maxRetry: 200 * time.Millisecond}
	n := &node{name: nodeName, dir: dir, metrics: prometheus.NewPedanticRegistry(), logs: &logcheck.Recorder{}}
	cfg := nodecache.Config{NodeName: nodeName, AgentVersion: "v-test", PeerAddress: "127.0.0.1:7070"}
	for _, opt := range opts {
		opt(&cfg, &o)
	}
	s, err := store.Open(dir, append([]store.Option{store.WithMaxBytes(1 << 30)}, o.storeOpts...)...)
	if err != nil {
		t.Fatal(err)
	}
	n.store = s
	endpoint, err := upstream.ParseEndpoint("http://" + h.reg.host)
	if err != nil {
		t.Fatal(err)
	}
	up := upstream.New(upstream.WithEndpointResolver(func(registry string) (upstream.Endpoint, error) {
		if registry == "registry.test" {
			return endpoint, nil
		}
		return upstream.DefaultEndpoint(registry), nil
	}))
	cfg.Store, cfg.Manifests = s, up
	if o.wrapStore != nil {
		cfg.Store = o.wrapStore(s)
	}
	cfg.BlobSource = func(registry, repo string, d v1.Hash, _ []netip.AddrPort) store.Source {
		return func(ctx context.Context) (io.ReadCloser, int64, error) { return up.Blob(ctx, registry, repo, d, 0, -1) }
	}
	cfg.Mirrors = func(registry string) bool { return registry == "registry.test" }
	cfg.Registerer = n.metrics
	cfg.Logger = slog.New(teeHandler{slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}), n.logs})
	restCfg := h.kube.Config
	if o.rest != nil {
		restCfg = o.rest
	}
	w, err := nodecache.New(restCfg, cfg)
	if err != nil {
		t.Fatal(err)
	}
	w.SetRetry(o.retry, o.maxRetry)
	if o.writeRetry > 0 {
		w.SetWriteRetry(o.writeRetry, o.maxWriteRetry)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	var once sync.Once
	n.stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Run: %v", err)
				}
			case <-time.After(waitFor):
				t.Errorf("Run did not return %v after its context ended", waitFor)
			}
			up.CloseIdleConnections()
			if err := s.Close(); err != nil {
				t.Errorf("close store: %v", err)
			}
		})
	}
	t.Cleanup(n.stop)
	return n
}

// teeHandler sends records to two handlers.
type teeHandler struct{ a, b slog.Handler }

func (h teeHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return h.a.Enabled(ctx, l) || h.b.Enabled(ctx, l)
}

func (h teeHandler) Handle(ctx context.Context, r slog.Record) error {
	_ = h.b.Handle(ctx, r.Clone())
	return h.a.Handle(ctx, r)
}

func (h teeHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return teeHandler{h.a.WithAttrs(as), h.b.WithAttrs(as)}
}

func (h teeHandler) WithGroup(g string) slog.Handler {
	return teeHandler{h.a.WithGroup(g), h.b.WithGroup(g)}
}

func (h *harness) create(t *testing.T, nodeName string, items ...v1alpha1.NodeCacheItem) *v1alpha1.NodeCache {
	t.Helper()
	nc := &v1alpha1.NodeCache{ObjectMeta: metav1.ObjectMeta{Name: nodeName}, Spec: v1alpha1.NodeCacheSpec{Items: items}}
	if err := h.kube.Client.Create(t.Context(), nc); err != nil {
		t.Fatal(err)
	}
	return nc
}

func (h *harness) get(t *testing.T, nodeName string) *v1alpha1.NodeCache {
	t.Helper()
	var nc v1alpha1.NodeCache
	if err := h.kube.Client.Get(t.Context(), client.ObjectKey{Name: nodeName}, &nc); err != nil {
		t.Fatal(err)
	}
	return &nc
}

// setItems replaces the spec's items and returns the new generation.
func (h *harness) setItems(t *testing.T, nodeName string, items ...v1alpha1.NodeCacheItem) int64 {
	t.Helper()
	nc := h.get(t, nodeName)
	nc.Spec.Items = items
	if err := h.kube.Client.Update(t.Context(), nc); err != nil {
		t.Fatal(err)
	}
	return nc.Generation
}

// waitStatus waits until ok holds for the NodeCache's status, and returns the status.
func (h *harness) waitStatus(t *testing.T, nodeName, what string, ok func(*v1alpha1.NodeCache) bool) *v1alpha1.NodeCache {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for {
		nc := h.get(t, nodeName)
		if ok(nc) {
			return nc
		}
		if time.Now().After(deadline) {
			t.Fatalf("NodeCache %s: waited %v for %s; status: %+v", nodeName, waitFor, what, nc.Status)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// allReady holds when the status is for the current spec and every item is Ready.
func allReady(nc *v1alpha1.NodeCache) bool {
	if nc.Status.ObservedGeneration != nc.Generation || len(nc.Status.Items) != len(nc.Spec.Items) {
		return false
	}
	for _, it := range nc.Status.Items {
		if it.State != v1alpha1.ItemReady {
			return false
		}
	}
	return true
}

func itemStatus(nc *v1alpha1.NodeCache, ref string) *v1alpha1.NodeCacheItemStatus {
	for i := range nc.Status.Items {
		if nc.Status.Items[i].Reference == ref {
			return &nc.Status.Items[i]
		}
	}
	return nil
}

func sorted(ds []v1.Hash) []v1.Hash {
	out := slices.Clone(ds)
	slices.SortFunc(out, func(a, b v1.Hash) int { return strings.Compare(a.Hex, b.Hex) })
	return slices.Compact(out)
}

// metric returns a counter's or gauge's value with the given label pair (label "": the
// metric has no labels), or -1.
func metric(t *testing.T, reg *prometheus.Registry, metricName, label, value string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != metricName {
			continue
		}
		for _, m := range mf.GetMetric() {
			match := label == "" && len(m.GetLabel()) == 0
			for _, l := range m.GetLabel() {
				match = match || l.GetName() == label && l.GetValue() == value
			}
			if !match {
				continue
			}
			if m.GetCounter() != nil {
				return m.GetCounter().GetValue()
			}
			return m.GetGauge().GetValue()
		}
	}
	return -1
}

// holdBlob makes the registry answer GETs of repo's blob d only once release is closed.
func (r *testRegistry) holdBlob(repo string, d v1.Hash, release <-chan struct{}) {
	r.setFault("/v2/"+repo+"/blobs/"+d.String(), func(w http.ResponseWriter, req *http.Request) {
		select {
		case <-release:
			r.handler.ServeHTTP(w, req)
		case <-req.Context().Done():
		}
	})
}

func TestNodeCache(t *testing.T) {
	h := &harness{kube: kubetest.Start(t), reg: startRegistry(t)}

	t.Run("items are fetched, verified and pinned; the rest is released", func(t *testing.T) {
		app := randomImage(t, 1024, 3)
		// app2 shares app's layers: they stay pinned while it wants them.
		app2, err := mutate.AppendLayers(app, mustLayer(t, 2048))
		if err != nil {
			t.Fatal(err)
		}
		idx := mutate.AppendManifests(empty.Index,
			mutate.IndexAddendum{Add: randomImage(t, 512, 2), Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}},
			mutate.IndexAddendum{Add: randomImage(t, 512, 2), Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64"}}},
		)
		cached := randomImage(t, 256, 1)
		appRef, app2Ref := h.reg.push(t, "team/app:1", app), h.reg.push(t, "team/app:2", app2)
		idxRef, cachedRef := h.reg.push(t, "models/m:v1", idx), h.reg.push(t, "team/cached:1", cached)
		want := map[string]content{
			appRef: imageContent(t, app), app2Ref: imageContent(t, app2),
			idxRef: indexContent(t, idx), cachedRef: imageContent(t, cached),
		}

		n := h.start(t, "node-a", "")
		h.create(t, "node-a",
			v1alpha1.NodeCacheItem{Reference: appRef, Pin: true},
			v1alpha1.NodeCacheItem{Reference: app2Ref, Pin: true},
			v1alpha1.NodeCacheItem{Reference: idxRef, Pin: true},
			v1alpha1.NodeCacheItem{Reference: cachedRef},
		)
		nc := h.waitStatus(t, "node-a", "every item Ready", allReady)

		for ref, c := range want {
			st := itemStatus(nc, ref)
			if st.Bytes != c.size || st.TotalBytes != c.size {
				t.Errorf("%s: bytes %d of %d, want %d of %d", ref, st.Bytes, st.TotalBytes, c.size, c.size)
			}
			if st.Runtime != "" || st.Reason != "" {
				t.Errorf("%s: runtime %q, reason %q; want neither", ref, st.Runtime, st.Reason)
			}
			for _, d := range c.all() {
				if _, err := n.store.Stat(d); err != nil {
					t.Errorf("%s: %s not in the store: %v", ref, d, err)
				}
			}
		}
		// The index item brought every child manifest and its blobs, not only the index.
		if got := len(want[idxRef].manifests); got != 3 {
			t.Fatalf("the index has %d manifests, want itself and 2 children", got)
		}
		pinned := sorted(append(append(want[appRef].all(), want[app2Ref].all()...), want[idxRef].all()...))
		if got := n.store.PinnedBy(nodecache.Owner); !slices.Equal(got, pinned) {
			t.Errorf("pinned by %s: %v\nwant the manifests and blobs of the pinned items: %v", nodecache.Owner, got, pinned)
		}
		for _, d := range want[cachedRef].all() {
			if slices.Contains(n.store.PinnedBy(nodecache.Owner), d) {
				t.Errorf("%s of an item with pin false is pinned", d)
			}
		}
		st := nc.Status
		if st.Ready != "4/4" || st.AgentVersion != "v-test" || st.PeerAddress != "127.0.0.1:7070" || st.ObservedGeneration != nc.Generation {
			t.Errorf("status: ready %q, agent %q, peer %q, observed generation %d (of %d)", st.Ready, st.AgentVersion, st.PeerAddress, st.ObservedGeneration, nc.Generation)
		}
		if !apimeta.IsStatusConditionTrue(st.Conditions, nodecache.ConditionReady) || !apimeta.IsStatusConditionFalse(st.Conditions, nodecache.ConditionDegraded) {
			t.Errorf("conditions %+v, want Ready and not Degraded", st.Conditions)
		}
		if used, _ := n.store.Usage(); st.Store == nil || st.Store.CapacityBytes != 1<<30 || st.Store.UsedBytes != used || st.Store.PinnedBytes != n.store.PinnedBytes() {
			t.Errorf("store %+v, want capacity %d, used %d, pinned %d", st.Store, 1<<30, used, n.store.PinnedBytes())
		}
		if got := metric(t, n.metrics, "shoal_nodecache_items", "state", "Ready"); got != 4 {
			t.Errorf("shoal_nodecache_items{state=Ready} = %v, want 4", got)
		}
		if got := metric(t, n.metrics, "shoal_nodecache_status_writes_total", "result", "ok"); got < 1 {
			t.Errorf("shoal_nodecache_status_writes_total{result=ok} = %v, want at least 1", got)
		}

		// Another owner's pin on app's config, which app alone uses.
		appConfig := want[appRef].blobs[0]
		if err := n.store.Pin(appConfig, "prewarm/other"); err != nil {
			t.Fatal(err)
		}
		gen := h.setItems(t, "node-a",
			v1alpha1.NodeCacheItem{Reference: app2Ref, Pin: true},
			v1alpha1.NodeCacheItem{Reference: idxRef, Pin: true},
			v1alpha1.NodeCacheItem{Reference: cachedRef},
		)
		h.waitStatus(t, "node-a", "the spec without app", func(nc *v1alpha1.NodeCache) bool {
			return nc.Status.ObservedGeneration == gen && allReady(nc)
		})
		pinned = sorted(append(want[app2Ref].all(), want[idxRef].all()...))
		deadline := time.Now().Add(waitFor)
		for !slices.Equal(n.store.PinnedBy(nodecache.Owner), pinned) {
			if time.Now().After(deadline) {
				t.Fatalf("pinned by %s: %v\nwant those of app2 (app's layers among them) and the index: %v",
					nodecache.Owner, n.store.PinnedBy(nodecache.Owner), pinned)
			}
			time.Sleep(20 * time.Millisecond)
		}
		if !slices.Contains(n.store.PinnedBy("prewarm/other"), appConfig) {
			t.Errorf("another owner's pin on %s was removed", appConfig)
		}
		if problems, _ := n.logs.Check(nil); len(problems) > 0 {
			t.Errorf("log conventions: %v", problems)
		}

		// The worker restarts with the store; meanwhile the index left the spec.
		n.stop()
		manifestsBefore, blobsBefore := h.reg.fetched()
		gen = h.setItems(t, "node-a",
			v1alpha1.NodeCacheItem{Reference: app2Ref, Pin: true},
			v1alpha1.NodeCacheItem{Reference: cachedRef},
		)
		n = h.start(t, "node-a", n.dir)
		h.waitStatus(t, "node-a", "the spec without the index, after a restart", func(nc *v1alpha1.NodeCache) bool {
			return nc.Status.ObservedGeneration == gen && allReady(nc)
		})
		pinned = sorted(want[app2Ref].all())
		for deadline := time.Now().Add(waitFor); !slices.Equal(n.store.PinnedBy(nodecache.Owner), pinned); time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("after a restart, pinned by %s: %v\nwant those of app2 alone: %v", nodecache.Owner, n.store.PinnedBy(nodecache.Owner), pinned)
			}
		}
		if m, b := h.reg.fetched(); m != manifestsBefore || b != blobsBefore {
			t.Errorf("a restart fetched %d manifests and %d blobs again, want none", m-manifestsBefore, b-blobsBefore)
		}
	})

	t.Run("failures are reported with their reason while the other items become ready", func(t *testing.T) {
		good := randomImage(t, 1024, 2)
		corrupt := randomImage(t, 1024, 2)
		denied := randomImage(t, 256, 1)
		goodRef := h.reg.push(t, "team/good:1", good)
		corruptRef := h.reg.push(t, "team/corrupt:1", corrupt)
		deniedRef := h.reg.push(t, "private/app:1", denied)
		h.reg.deny("private/app")
		layers, err := corrupt.Layers()
		if err != nil {
			t.Fatal(err)
		}
		bad, _ := layers[1].Digest()
		size, _ := layers[1].Size()
		h.reg.setFault("/v2/team/corrupt/blobs/"+bad.String(), func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Length", itoa(size))
			_, _ = w.Write(make([]byte, size)) // zeros, not the layer
		})
		missingRef := "registry.test/team/good:gone@sha256:" + strings.Repeat("0", 64)
		elsewhereRef := "other.test/team/good:1@sha256:" + strings.Repeat("1", 64)

		n := h.start(t, "node-b", "")
		h.create(t, "node-b",
			v1alpha1.NodeCacheItem{Reference: goodRef, Pin: true},
			v1alpha1.NodeCacheItem{Reference: missingRef, Pin: true},
			v1alpha1.NodeCacheItem{Reference: corruptRef, Pin: true},
			v1alpha1.NodeCacheItem{Reference: deniedRef},
			v1alpha1.NodeCacheItem{Reference: elsewhereRef},
		)
		wantReason := map[string]v1alpha1.FailureReason{
			missingRef:   v1alpha1.ReasonNotFound,
			corruptRef:   v1alpha1.ReasonVerifyFailed,
			deniedRef:    v1alpha1.ReasonUnauthorized,
			elsewhereRef: v1alpha1.ReasonResolveFailed,
		}
		nc := h.waitStatus(t, "node-b", "good Ready, the others Failed", func(nc *v1alpha1.NodeCache) bool {
			if len(nc.Status.Items) != 5 || itemStatus(nc, goodRef).State != v1alpha1.ItemReady {
				return false
			}
			for ref := range wantReason {
				if itemStatus(nc, ref).State != v1alpha1.ItemFailed {
					return false
				}
			}
			return true
		})
		for ref, reason := range wantReason {
			if st := itemStatus(nc, ref); st.Reason != reason || st.Message == "" {
				t.Errorf("%s: reason %q (%s), want %s with a message", ref, st.Reason, st.Message, reason)
			}
		}
		if nc.Status.Ready != "1/5" || !apimeta.IsStatusConditionTrue(nc.Status.Conditions, nodecache.ConditionDegraded) ||
			apimeta.IsStatusConditionTrue(nc.Status.Conditions, nodecache.ConditionReady) {
			t.Errorf("ready %q, conditions %+v; want 1/5, Degraded, not Ready", nc.Status.Ready, nc.Status.Conditions)
		}
		if _, err := n.store.Stat(bad); err == nil {
			t.Errorf("the corrupt blob %s was kept", bad)
		}
		if got := metric(t, n.metrics, "shoal_nodecache_items", "state", "Failed"); got != 4 {
			t.Errorf("shoal_nodecache_items{state=Failed} = %v, want 4", got)
		}
		problems, withError := n.logs.Check(nil)
		if len(problems) > 0 {
			t.Errorf("log conventions: %v", problems)
		}
		if withError == 0 {
			t.Error("no failure was logged with its error")
		}
	})

	t.Run("a stalled download fails FetchStalled, and is fetched once it moves again", func(t *testing.T) {
		img := randomImage(t, 64<<10, 1)
		ref := h.reg.push(t, "team/slow:1", img)
		layers, err := img.Layers()
		if err != nil {
			t.Fatal(err)
		}
		d, _ := layers[0].Digest()
		path := "/v2/team/slow/blobs/" + d.String()
		release := make(chan struct{})
		h.reg.setFault(path, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Length", itoa(64<<10))
			_, _ = w.Write(make([]byte, 1024))
			_ = http.NewResponseController(w).Flush()
			select { // then nothing, until the test lets go or the client gives up
			case <-release:
			case <-r.Context().Done():
			}
		})
		// The store's own bound outlasts the test: only the worker's can fire.
		h.start(t, "node-c", "", withStall(300*time.Millisecond, 10*waitFor))
		h.create(t, "node-c", v1alpha1.NodeCacheItem{Reference: ref, Pin: true})
		nc := h.waitStatus(t, "node-c", "the item Failed", func(nc *v1alpha1.NodeCache) bool {
			return len(nc.Status.Items) == 1 && nc.Status.Items[0].State == v1alpha1.ItemFailed
		})
		if st := nc.Status.Items[0]; st.Reason != v1alpha1.ReasonFetchStalled || !strings.Contains(st.Message, "no progress") {
			t.Errorf("reason %q (%s), want FetchStalled from the worker's own bound (no progress)", st.Reason, st.Message)
		}
		// The stalled answer ends short; the download after it gets the whole layer.
		h.reg.setFault(path, nil)
		close(release)
		h.waitStatus(t, "node-c", "the item Ready", allReady)
	})

	t.Run("progress is written while bytes move, and a conflicting write reads the object again", func(t *testing.T) {
		const size = 4 << 20
		img := randomImage(t, size, 1)
		ref := h.reg.push(t, "team/big:1", img)
		layers, err := img.Layers()
		if err != nil {
			t.Fatal(err)
		}
		d, _ := layers[0].Digest()
		layer, err := layers[0].Compressed()
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(layer)
		if err != nil {
			t.Fatal(err)
		}
		release := make(chan struct{})
		h.reg.setFault("/v2/team/big/blobs/"+d.String(), func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Length", itoa(int64(len(body))))
			_, _ = w.Write(body[:len(body)/2])
			_ = http.NewResponseController(w).Flush()
			select {
			case <-release:
				_, _ = w.Write(body[len(body)/2:])
			case <-r.Context().Done():
			}
		})
		n := h.start(t, "node-d", "", withStatusInterval(50*time.Millisecond))
		h.create(t, "node-d", v1alpha1.NodeCacheItem{Reference: ref, Pin: true})
		total := imageContent(t, img).size
		h.waitStatus(t, "node-d", "half the layer reported", func(nc *v1alpha1.NodeCache) bool {
			if len(nc.Status.Items) != 1 {
				return false
			}
			st := nc.Status.Items[0]
			return st.State == v1alpha1.ItemFetching && st.TotalBytes == total && st.Bytes >= int64(len(body)/2) && st.Bytes < total
		})
		// Someone else changes the object: the worker's next write meets a newer version.
		nc := h.get(t, "node-d")
		nc.Labels = map[string]string{"touched": "yes"}
		if err := h.kube.Client.Update(t.Context(), nc); err != nil {
			t.Fatal(err)
		}
		close(release)
		nc = h.waitStatus(t, "node-d", "the item Ready", allReady)
		if st := nc.Status.Items[0]; st.Bytes != total {
			t.Errorf("bytes %d, want %d", st.Bytes, total)
		}
		if got := metric(t, n.metrics, "shoal_nodecache_status_writes_total", "result", "conflict"); got < 1 {
			t.Errorf("shoal_nodecache_status_writes_total{result=conflict} = %v, want at least 1", got)
		}
	})

	t.Run("status writes are coalesced while bytes move", func(t *testing.T) {
		img := randomImage(t, 1024, 20)
		ref := h.reg.push(t, "team/many:1", img)
		layers, err := img.Layers()
		if err != nil {
			t.Fatal(err)
		}
		// Each layer takes a moment, one after the other, so that every one would be a write of
		// its own if nothing coalesced them.
		for _, l := range layers {
			d, _ := l.Digest()
			h.reg.setFault("/v2/team/many/blobs/"+d.String(), func(w http.ResponseWriter, r *http.Request) {
				time.Sleep(100 * time.Millisecond)
				r.URL.Path = "/v2/team/many/blobs/" + d.String()
				h.reg.handler.ServeHTTP(w, r)
			})
		}
		wc, err := client.NewWithWatch(h.kube.Config, client.Options{Scheme: h.kube.Scheme})
		if err != nil {
			t.Fatal(err)
		}
		nc := h.create(t, "node-e", v1alpha1.NodeCacheItem{Reference: ref, Pin: true})
		watch, err := wc.Watch(t.Context(), &v1alpha1.NodeCacheList{},
			client.MatchingFields{"metadata.name": "node-e"}, &client.ListOptions{Raw: &metav1.ListOptions{ResourceVersion: nc.ResourceVersion}})
		if err != nil {
			t.Fatal(err)
		}
		defer watch.Stop()
		h.start(t, "node-e", "", withStatusInterval(time.Hour), withParallel(1))
		writes := 0
		deadline := time.After(waitFor)
		for done := false; !done; {
			select {
			case ev := <-watch.ResultChan():
				got, ok := ev.Object.(*v1alpha1.NodeCache)
				if !ok {
					t.Fatalf("watch event %v: %T", ev.Type, ev.Object)
				}
				writes++
				done = allReady(got)
			case <-deadline:
				t.Fatalf("the item was not Ready within %v (%d writes)", waitFor, writes)
			}
		}
		// One write for the new item, one when it is held; bytes of 20 layers in between
		// wait for the hour-long interval.
		if writes > 3 {
			t.Errorf("%d status writes for one item of 20 layers, want at most 3", writes)
		}
	})

	t.Run("pinned items stay within their share of the store", func(t *testing.T) {
		first, second := randomImage(t, 4096, 2), randomImage(t, 4096, 2)
		firstRef, secondRef := h.reg.push(t, "team/pin-a:1", first), h.reg.push(t, "team/pin-b:1", second)
		size := imageContent(t, first).size
		// Room for one of the two (they are about the same size), not both.
		n := h.start(t, "node-g", "", withPinnedShare(0.5, 3*size))
		h.create(t, "node-g",
			v1alpha1.NodeCacheItem{Reference: firstRef, Pin: true},
			v1alpha1.NodeCacheItem{Reference: secondRef, Pin: true})
		// Whichever resolves first gets the room; the other is refused and not fetched.
		var held, refused string
		nc := h.waitStatus(t, "node-g", "one item Ready, the other refused", func(nc *v1alpha1.NodeCache) bool {
			a, b := itemStatus(nc, firstRef), itemStatus(nc, secondRef)
			if a == nil || b == nil {
				return false
			}
			for _, pair := range [][2]*v1alpha1.NodeCacheItemStatus{{a, b}, {b, a}} {
				if pair[0].State == v1alpha1.ItemReady && pair[1].State == v1alpha1.ItemFailed && pair[1].Reason == v1alpha1.ReasonPinLimitExceeded {
					held, refused = pair[0].Reference, pair[1].Reference
					return true
				}
			}
			return false
		})
		if msg := itemStatus(nc, refused).Message; !strings.Contains(msg, "50 % of the store") {
			t.Errorf("message %q does not name the bound", msg)
		}
		contentOf := map[string]content{firstRef: imageContent(t, first), secondRef: imageContent(t, second)}
		for _, d := range contentOf[refused].blobs {
			if _, err := n.store.Stat(d); err == nil {
				t.Errorf("%s of the refused item was fetched", d)
			}
		}
		// Once the held one leaves the spec, the other fits.
		h.setItems(t, "node-g", v1alpha1.NodeCacheItem{Reference: refused, Pin: true})
		h.waitStatus(t, "node-g", "the other Ready", allReady)
		if got, want := sorted(n.store.PinnedBy(nodecache.Owner)), sorted(contentOf[refused].all()); !slices.Equal(got, want) {
			t.Errorf("pinned %v, want the refused item's %v (%s released)", got, want, held)
		}
	})

	t.Run("runtime import without a runtime fails ImportFailed", func(t *testing.T) {
		img := randomImage(t, 256, 1)
		ref := h.reg.push(t, "team/runtime:1", img)
		h.start(t, "node-f", "")
		h.create(t, "node-f", v1alpha1.NodeCacheItem{Reference: ref, Pin: true, RuntimeImport: true})
		nc := h.waitStatus(t, "node-f", "the item failed", func(nc *v1alpha1.NodeCache) bool {
			st := itemStatus(nc, ref)
			return st != nil && st.State == v1alpha1.ItemFailed
		})
		st := itemStatus(nc, ref)
		if st.Reason != v1alpha1.ReasonImportFailed || st.Runtime != v1alpha1.RuntimeNotImported || !strings.Contains(st.Message, "--runtime-endpoint") {
			t.Errorf("item %+v; want ImportFailed, NotImported and a message naming --runtime-endpoint", st)
		}
		if nc.Status.Ready != "0/1" {
			t.Errorf("ready %q, want 0/1", nc.Status.Ready)
		}
	})

	t.Run("content removed from the store out of band is fetched and pinned again", func(t *testing.T) {
		pinned, cached := randomImage(t, 1024, 2), randomImage(t, 512, 1)
		pinnedRef, cachedRef := h.reg.push(t, "team/lost:1", pinned), h.reg.push(t, "team/lost-cached:1", cached)
		pc, cc := imageContent(t, pinned), imageContent(t, cached)
		var stats atomic.Int64
		n := h.start(t, "node-h", "", withStoreRecheck(20*time.Millisecond), withStatusInterval(50*time.Millisecond), withStatCount(&stats))
		h.create(t, "node-h",
			v1alpha1.NodeCacheItem{Reference: pinnedRef, Pin: true},
			v1alpha1.NodeCacheItem{Reference: cachedRef})
		h.waitStatus(t, "node-h", "both items Ready", allReady)
		pins := sorted(pc.all())
		if got := n.store.PinnedBy(nodecache.Owner); !slices.Equal(got, pins) {
			t.Fatalf("pinned %v, want %v", got, pins)
		}

		// While everything is there, the rechecks look and change nothing: no refetch, no write.
		// The write that said Ready may have a coalesced one behind it (the store's use), so
		// the test looks for a span of three rechecks without a write, a few spans at most: a
		// recheck that writes every time never gives one.
		quiet := false
		var extra float64
		for range 5 {
			writes := metric(t, n.metrics, "shoal_nodecache_status_writes_total", "result", "ok")
			from := stats.Load()
			waitUntil(t, "three rechecks of both items", func() bool {
				return stats.Load() >= from+3*int64(len(pc.all())+len(cc.all()))
			})
			if extra = metric(t, n.metrics, "shoal_nodecache_status_writes_total", "result", "ok") - writes; extra == 0 {
				quiet = true
				break
			}
		}
		if !quiet {
			t.Errorf("%v status writes in each of five spans of three rechecks while nothing changed, want none", extra)
		}
		if got := metric(t, n.metrics, "shoal_nodecache_refetches_total", "", ""); got != 0 {
			t.Errorf("shoal_nodecache_refetches_total = %v with everything in the store, want 0", got)
		}

		// A layer of the pinned item goes, its pin with it, and the cached item's manifest.
		layer := pc.blobs[1]
		release := make(chan struct{})
		h.reg.holdBlob("team/lost", layer, release)
		manifestsBefore, blobsBefore := h.reg.fetched()
		if err := n.store.Unpin(layer, nodecache.Owner); err != nil {
			t.Fatal(err)
		}
		if err := n.store.Delete(layer); err != nil {
			t.Fatal(err)
		}
		if err := n.store.Delete(cc.manifests[0]); err != nil {
			t.Fatal(err)
		}
		h.waitStatus(t, "node-h", "the pinned item no longer Ready while its layer is fetched", func(nc *v1alpha1.NodeCache) bool {
			st := itemStatus(nc, pinnedRef)
			return st != nil && (st.State == v1alpha1.ItemPending || st.State == v1alpha1.ItemFetching) &&
				apimeta.IsStatusConditionFalse(nc.Status.Conditions, nodecache.ConditionReady)
		})
		close(release)
		h.waitStatus(t, "node-h", "both items Ready again", allReady)
		for _, d := range append(pc.all(), cc.all()...) {
			if _, err := n.store.Stat(d); err != nil {
				t.Errorf("%s not in the store again: %v", d, err)
			}
		}
		waitUntil(t, "the layer pinned again", func() bool { return slices.Equal(n.store.PinnedBy(nodecache.Owner), pins) })
		if m, b := h.reg.fetched(); m != manifestsBefore+1 || b != blobsBefore+1 {
			t.Errorf("fetched %d manifests and %d blobs again, want the one of each that was removed", m-manifestsBefore, b-blobsBefore)
		}
		if got := metric(t, n.metrics, "shoal_nodecache_refetches_total", "", ""); got != 2 {
			t.Errorf("shoal_nodecache_refetches_total = %v, want 2", got)
		}
		logged := map[string]bool{}
		for _, r := range n.logs.Records() {
			if r.Level == slog.LevelInfo && strings.Contains(r.Message, "left the store") {
				r.Attrs(func(a slog.Attr) bool {
					if a.Key == "digest" {
						logged[a.Value.String()] = true
					}
					return true
				})
			}
		}
		if !logged[layer.String()] || !logged[cc.manifests[0].String()] {
			t.Errorf("refetches logged for %v, want %s and %s", logged, layer, cc.manifests[0])
		}
		if problems, _ := n.logs.Check(nil); len(problems) > 0 {
			t.Errorf("log conventions: %v", problems)
		}
	})
}

func mustLayer(t *testing.T, size int64) v1.Layer {
	t.Helper()
	img := randomImage(t, size, 1)
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	return layers[0]
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }
