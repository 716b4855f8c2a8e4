// Package nodecache makes the node's content store hold what the node's NodeCache object asks
// for (docs/kubernetes.md): it watches that one object, fetches each item's manifests and blobs
// into the store by the path a pull's bytes take, pins the items the spec pins under one owner,
// releases the pins of items that leave the spec, and reports each item's progress in the
// object's status.
//
// A held item's manifests and blobs are looked up in the store every Config.StoreRecheck (an
// index lookup each, no data read), and the item is fetched again, and pinned again, when one
// of them left the store out of band: evicted (an unpinned item), deleted, lost.
//
// An item with runtimeImport is, once its content is in the store, pulled into the node's
// container runtime through CRI (so through this agent's mirror) and pinned there; a runtime
// that cannot pin (containerd 1.6) leaves it Imported, which the status says. The runtime's
// copy is checked every Config.RuntimeRecheck and imported again when it was removed or
// unpinned out of band; the runtime pins of items that leave the spec are released.
//
// Private content is fetched with the credentials of the agent's upstream client, which in
// Kubernetes include the controller's pull token for the repository (agent/kubecreds); an
// item's pullSecretName names that token's Secret, for people.
package nodecache

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	toolscache "k8s.io/client-go/tools/cache"

	"github.com/shoal-dev/shoal/agent/store"
	"github.com/shoal-dev/shoal/agent/upstream"
	v1alpha1 "github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/internal/kubeclient"
)

// Owner owns every pin this package makes in the store; it removes only pins of its own, so
// other owners' pins on the same blobs stay.
const Owner = "nodecache"

// Defaults of Config.
const (
	// DefaultStatusInterval is how often, at most, the status is written while only bytes
	// move: a 40 GiB download costs a write every 5 s, not one per block.
	DefaultStatusInterval = 5 * time.Second
	// DefaultStallTimeout is how long a transfer may move no byte before it is given up and
	// retried; longer than the store's own 30 s bound on its source, so that the store's
	// error, which says more, comes first whenever it applies.
	DefaultStallTimeout = time.Minute
	// DefaultParallel is how many items are fetched at once, and how many blobs.
	DefaultParallel = 3
	// DefaultRuntimeRecheck is how often an imported item is checked in the runtime: one CRI
	// image status call per item, a few hundred a minute at most.
	DefaultRuntimeRecheck = time.Minute
	// DefaultStoreRecheck is how often a held item's content is looked up in the store: one
	// lookup in the store's in-memory index per manifest and blob (0.2 µs each, measured), no
	// disk access, so under 30 ms a minute for 512 items of 256 digests each.
	DefaultStoreRecheck = time.Minute
)

// Store is the part of the content store the worker uses; *store.Store implements it.
type Store interface {
	Get(d v1.Hash) (store.Blob, error)
	Fetch(ctx context.Context, d v1.Hash, src store.Source) (store.Blob, error)
	Stat(d v1.Hash) (int64, error)
	Downloading(d v1.Hash) bool
	PinAll(ds []v1.Hash, owner string) error
	UnpinAll(ds []v1.Hash, owner string) error
	PinnedBy(owner string) []v1.Hash
	Usage() (bytes int64, blobs int)
	PinnedBytes() int64
	MaxBytes() int64
}

// Manifests fetches manifests from their registry; *upstream.Client implements it.
type Manifests interface {
	Manifest(ctx context.Context, registry, repo, reference string, accept []string) (*upstream.Manifest, error)
}

// Problem is something wrong on the node, with a reason (CamelCase) and a message for people.
type Problem struct{ Reason, Message string }

// Config says which node the worker acts for and through what.
type Config struct {
	// NodeName is the node's name: the NodeCache's name.
	NodeName string
	// AgentVersion and PeerAddress (host:port, "" if none) are reported in the status.
	AgentVersion, PeerAddress string
	// Store is the node's content store, which verifies what it keeps and holds the pins.
	Store Store
	// Manifests fetches a manifest missing from the store, as the mirror does.
	Manifests Manifests
	// BlobSource is where a blob missing from the store comes from: the mirror's source for a
	// miss (the swarm, else the registry), its segments seeded only by seeders when there are
	// any.
	BlobSource func(registry, repo string, d v1.Hash, seeders []netip.AddrPort) store.Source
	// Seeders returns the swarm addresses of the nodes named (those that are known); nil:
	// items' seeders are ignored, and every member may seed.
	Seeders func(nodes []string) []netip.AddrPort
	// Runtime is the node's container runtime, for items with runtimeImport; nil: such items
	// fail with ImportFailed once their content is in the store.
	Runtime Runtime
	// RuntimeRecheck is how often the runtime's copy of an imported item is checked, to import
	// it again if it was removed or unpinned; 0 = DefaultRuntimeRecheck.
	RuntimeRecheck time.Duration
	// StoreRecheck is how often, on average, a held item's manifests and blobs are looked up in
	// the store, to fetch the item again when one left it; 0 = DefaultStoreRecheck. Each wait
	// is drawn between half and one and a half of it, so that items held at once do not
	// all look at once.
	StoreRecheck time.Duration
	// Mirrors reports whether the agent mirrors a registry; content of one it does not is
	// refused, as pulls of it bypass the agent. nil: every registry.
	Mirrors func(registry string) bool
	// StatusInterval bounds how often the status is written while only bytes move (state
	// changes are written at once); 0 = DefaultStatusInterval.
	StatusInterval time.Duration
	// StallTimeout is how long a transfer may move no byte before it is retried; there is no
	// bound on a transfer that keeps moving. 0 = DefaultStallTimeout.
	StallTimeout time.Duration
	// Parallel is how many items, and how many blobs, are fetched at once; 0 = DefaultParallel.
	Parallel int
	// MaxPinnedShare bounds what pinned items may take of the store (its MaxBytes, when it has
	// one): an item whose pinning would pass the bound is neither pinned nor fetched, and fails
	// with PinLimitExceeded until room is made. Items held already come first, then by
	// reference. 0 = no bound.
	MaxPinnedShare float64
	// ContainerdProblems are what the agent's preflight found wrong with containerd's
	// configuration, reported in the ContainerdConfigured condition; none: it is True.
	ContainerdProblems []Problem
	// Registerer registers the worker's metrics; nil registers none.
	Registerer prometheus.Registerer
	// Logger receives the worker's logs (default: discard).
	Logger *slog.Logger
}

// The agent's rights for its NodeCache (generated into config/rbac/agent): it reads NodeCaches
// and writes their status; the admission policy in config/policy holds it to its own node's.
// +kubebuilder:rbac:groups=shoal.dev,resources=nodecaches,verbs=get;list;watch
// +kubebuilder:rbac:groups=shoal.dev,resources=nodecaches/status,verbs=get;update;patch

// Worker makes the store hold what the node's NodeCache asks for.
type Worker struct {
	cfg     Config
	rest    *rest.Config
	log     *slog.Logger
	metrics *metrics
	// retry is the first wait after an item failed; it doubles up to maxRetry. writeRetry and
	// maxWriteRetry are the same for status writes.
	retry, maxRetry           time.Duration
	writeRetry, maxWriteRetry time.Duration
	// usageInterval bounds how often a change of the store's usage alone is written: it
	// changes with every pull, and the API server need not hear of each.
	usageInterval time.Duration
	// minWriteGap spaces even urgent writes, so that a burst of state changes (items found
	// complete after a restart) costs a write, not one per item.
	minWriteGap time.Duration

	itemSlots, manifestSlots, blobSlots chan struct{}
	kick                                chan struct{} // the status writer looks again
	items                               sync.WaitGroup

	// pinMu serialises pin reconciliation. Taken before mu.
	pinMu sync.Mutex

	mu         sync.Mutex
	synced     bool                // the watch has listed the NodeCache once
	latest     *v1alpha1.NodeCache // as last seen by the watch; nil if there is none
	uid        types.UID
	generation int64
	byRef      map[string]*item
	order      []string // the spec's references, in its order
}

// item is one spec item and how far the worker is with it.
type item struct {
	ref      reference
	parseErr error
	// bytes are the item's bytes held by the store in the current attempt, in flight included;
	// peak is the most they have been in the attempt.
	bytes, peak atomic.Int64

	// Guarded by Worker.mu.
	spec     v1alpha1.NodeCacheItem
	stop     context.CancelFunc // ends the item's goroutine
	done     chan struct{}      // closed when it has ended
	state    v1alpha1.ItemState
	reason   v1alpha1.FailureReason
	message  string
	failedAt int64     // peak of the attempt that failed last: a retry is progress only past it
	total    int64     // manifests and blobs, once known
	digests  []v1.Hash // manifests and blobs, once resolved
	resolved bool      // digests are known
	settled  bool      // a resolution has ended, with or without success
	// overBudget: pinning the item would pass Config.MaxPinnedShare, so it is left alone;
	// granted: it got its share of the budget once, and keeps it ahead of items that did not.
	overBudget, granted bool
	// runtime is where the item's image stands in the container runtime after its last
	// import; runtimeNote says more when it is not what was asked (imported, not pinned).
	runtime     v1alpha1.RuntimeState
	runtimeNote string
}

// New returns a worker for cfg that reaches the API server with restCfg. Nothing is contacted
// before Run.
func New(restCfg *rest.Config, cfg Config) (*Worker, error) {
	switch {
	case cfg.NodeName == "":
		return nil, errors.New("nodecache: no node name (set it from the downward API: spec.nodeName)")
	case cfg.Store == nil || cfg.Manifests == nil || cfg.BlobSource == nil:
		return nil, errors.New("nodecache: a store, a manifest source and a blob source are needed")
	case cfg.StatusInterval < 0, cfg.StallTimeout < 0, cfg.Parallel < 0, cfg.RuntimeRecheck < 0, cfg.StoreRecheck < 0:
		return nil, errors.New("nodecache: the status interval, stall timeout, runtime and store rechecks and parallelism must not be negative")
	case cfg.MaxPinnedShare < 0 || cfg.MaxPinnedShare > 1:
		return nil, fmt.Errorf("nodecache: the pinned share %v is not between 0 and 1", cfg.MaxPinnedShare)
	}
	if cfg.StatusInterval == 0 {
		cfg.StatusInterval = DefaultStatusInterval
	}
	if cfg.StallTimeout == 0 {
		cfg.StallTimeout = DefaultStallTimeout
	}
	if cfg.Parallel == 0 {
		cfg.Parallel = DefaultParallel
	}
	if cfg.RuntimeRecheck == 0 {
		cfg.RuntimeRecheck = DefaultRuntimeRecheck
	}
	if cfg.StoreRecheck == 0 {
		cfg.StoreRecheck = DefaultStoreRecheck
	}
	if cfg.Mirrors == nil {
		cfg.Mirrors = func(string) bool { return true }
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, err
	}
	return &Worker{
		cfg: cfg, rest: restCfg, log: log, metrics: m,
		retry: 10 * time.Second, maxRetry: 5 * time.Minute,
		writeRetry: time.Second, maxWriteRetry: time.Minute,
		usageInterval: max(cfg.StatusInterval, 5*time.Minute),
		minWriteGap:   min(cfg.StatusInterval, 200*time.Millisecond),
		itemSlots:     make(chan struct{}, cfg.Parallel),
		manifestSlots: make(chan struct{}, cfg.Parallel),
		blobSlots:     make(chan struct{}, cfg.Parallel),
		kick:          make(chan struct{}, 1),
		byRef:         map[string]*item{},
	}, nil
}

// Run watches the node's NodeCache and acts on it until ctx ends; it returns nil then, once
// every goroutine it started has ended, and an error only for a configuration it cannot use.
// While the API server does not answer, it keeps acting on the last spec it saw (the pins are
// in the store anyway), and before it has seen one it changes no pin.
func (w *Worker) Run(ctx context.Context) error {
	client, err := w.client()
	if err != nil {
		return err
	}
	inf, changed, err := kubeclient.Informer(client, "nodecaches", &v1alpha1.NodeCache{},
		fields.OneTermEqualSelector("metadata.name", w.cfg.NodeName))
	if err != nil {
		return fmt.Errorf("nodecache: %w", err)
	}

	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		w.items.Wait()
		wg.Wait()
	}()
	wg.Go(func() { inf.RunWithContext(ctx) })
	wg.Go(func() { w.writeStatuses(ctx, client) })
	if !toolscache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		return nil // ctx ended before the API server answered
	}
	w.log.Info("watching this node's NodeCache", "node", w.cfg.NodeName)
	for {
		obj, _, _ := inf.GetStore().GetByKey(w.cfg.NodeName)
		nc, _ := obj.(*v1alpha1.NodeCache)
		w.apply(ctx, nc)
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		}
	}
}

// client returns a REST client for NodeCaches; it reaches the API server only when used.
func (w *Worker) client() (rest.Interface, error) {
	c, err := kubeclient.Shoal(w.rest)
	if err != nil {
		return nil, fmt.Errorf("nodecache: %w", err)
	}
	return c, nil
}

// apply makes the items follow nc's spec (nil: there is no NodeCache, so nothing is wanted):
// it starts the new items, stops those that left, restarts those whose spec changed, then
// reconciles the pins.
func (w *Worker) apply(ctx context.Context, nc *v1alpha1.NodeCache) {
	var (
		spec       []v1alpha1.NodeCacheItem
		uid        types.UID
		generation int64
	)
	if nc != nil {
		spec, uid, generation = nc.Spec.Items, nc.UID, nc.Generation
		if len(spec) > v1alpha1.MaxNodeCacheItems {
			spec = spec[:v1alpha1.MaxNodeCacheItems]
		}
	}
	w.mu.Lock()
	w.latest = nc
	if w.synced && uid == w.uid && generation == w.generation {
		w.mu.Unlock()
		w.poke() // our own status write, most likely
		return
	}
	w.synced, w.uid, w.generation = true, uid, generation
	wanted := make(map[string]bool, len(spec))
	w.order = w.order[:0]
	for _, s := range spec {
		if wanted[s.Reference] {
			continue
		}
		wanted[s.Reference] = true
		w.order = append(w.order, s.Reference)
		it := w.byRef[s.Reference]
		switch {
		case it == nil:
			it = &item{spec: s, state: v1alpha1.ItemPending}
			it.ref, it.parseErr = parseReference(s.Reference)
			w.byRef[s.Reference] = it
			w.startLocked(ctx, it)
		case it.spec != s:
			it.spec = s
			w.startLocked(ctx, it) // pin or import changed: look at the content again
		}
	}
	for ref, it := range w.byRef {
		if !wanted[ref] {
			it.stop()
			delete(w.byRef, ref)
		}
	}
	w.updateGaugesLocked()
	w.mu.Unlock()
	w.log.Info("NodeCache spec", "generation", generation, "items", len(spec))
	w.poke()
	if err := w.reconcilePins(); err != nil {
		w.log.Warn("reconcile pins; trying again at the next change", "error", err)
	}
	if err := w.reconcileRuntimePins(ctx); err != nil {
		w.log.Warn("release runtime pins; trying again at the next change", "error", err)
	}
}

// startLocked starts the item's goroutine, once the one it had, if any, has ended.
func (w *Worker) startLocked(ctx context.Context, it *item) {
	previous := it.done
	if it.stop != nil {
		it.stop()
	}
	ictx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	it.stop, it.done = stop, done
	w.items.Go(func() {
		defer close(done)
		if previous != nil {
			<-previous
		}
		w.runItem(ictx, it)
	})
}

// runItem fetches the item until it is held, retrying with backoff and jitter after a failure,
// then watches it (watchHeld) and fetches or imports it again when it is no longer held as
// asked, until ctx ends.
func (w *Worker) runItem(ctx context.Context, it *item) {
	w.mu.Lock()
	imports := it.spec.RuntimeImport // the spec is fixed for this goroutine: a change restarts it
	w.mu.Unlock()
	wait := w.retry
	for {
		start := time.Now()
		err := w.attempt(ctx, it, imports)
		if ctx.Err() != nil {
			return
		}
		w.mu.Lock()
		moved := it.peak.Load() > it.failedAt
		w.mu.Unlock()
		if err == nil {
			w.finish(it, nil)
			w.log.Info("item held", "reference", it.spec.Reference, "bytes", it.bytes.Load(), "duration", time.Since(start))
			if !w.watchHeld(ctx, it, imports) {
				return
			}
			wait = w.retry
			continue
		}
		w.finish(it, err)
		if errors.Is(err, errPermanent) {
			w.log.Warn("item failed; a new spec item is needed", "reference", it.spec.Reference, "reason", reasonOf(err), "error", err)
			return
		}
		if moved {
			wait = w.retry
		}
		pause := wait/2 + rand.N(wait/2+1)
		w.log.Warn("item failed; retrying", "reference", it.spec.Reference, "reason", reasonOf(err), "retry_in", pause, "error", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(pause):
		}
		wait = min(2*wait, w.maxRetry)
	}
}

// watchHeld watches a held item: its manifests and blobs in the store every StoreRecheck
// (jittered), and, when it is imported, its image in the runtime every RuntimeRecheck. It
// returns true when something left the store or the runtime's copy was removed or unpinned
// out of band, so that the item is fetched or imported again, and false when ctx ends.
func (w *Worker) watchHeld(ctx context.Context, it *item, imports bool) bool {
	storeCheck := time.NewTimer(jitter(w.cfg.StoreRecheck))
	defer storeCheck.Stop()
	var runtimeCheck <-chan time.Time // nil: never
	if imports {
		t := time.NewTicker(w.cfg.RuntimeRecheck)
		defer t.Stop()
		runtimeCheck = t.C
	}
	for {
		select {
		case <-ctx.Done():
			return false
		case <-storeCheck.C:
			if w.storeLost(it) {
				return true
			}
			storeCheck.Reset(jitter(w.cfg.StoreRecheck))
		case <-runtimeCheck:
			if w.runtimeChanged(ctx, it) {
				w.log.Warn("the item's image was removed or unpinned in the container runtime; importing it again", "reference", it.spec.Reference)
				return true
			}
		}
	}
}

// storeLost reports whether a manifest or blob of the held item has left the store; if so it
// counts a refetch and marks the item Pending, as it is no longer held. While all are there it
// changes nothing, so that the status is not written again.
func (w *Worker) storeLost(it *item) bool {
	w.mu.Lock()
	digests := it.digests // replaced, never changed in place, by settle
	w.mu.Unlock()
	var missing []v1.Hash
	for _, d := range digests {
		// A blob the worker read to its end may still be committing: not in the store yet,
		// not lost either.
		if _, err := w.cfg.Store.Stat(d); err != nil && !w.cfg.Store.Downloading(d) {
			missing = append(missing, d)
		}
	}
	if len(missing) == 0 {
		return false
	}
	w.metrics.refetches.Inc()
	w.log.Info("content of a held item left the store; fetching it again",
		"reference", it.spec.Reference, "digest", missing[0], "missing", len(missing))
	w.mu.Lock()
	it.state, it.reason, it.message = v1alpha1.ItemPending, "", ""
	w.updateGaugesLocked()
	w.mu.Unlock()
	w.poke()
	return true
}

// jitter returns a wait drawn evenly between half and one and a half of d, so that timers
// started together spread out.
func jitter(d time.Duration) time.Duration {
	return d/2 + rand.N(d+1)
}

// attempt makes one pass at the item: resolve its manifests, pin, fetch the blobs missing,
// then import the image into the container runtime when the item asks for it.
func (w *Worker) attempt(ctx context.Context, it *item, imports bool) error {
	it.bytes.Store(0)
	it.peak.Store(0)
	if it.parseErr != nil {
		w.settle(it, nil, 0, it.parseErr)
		return it.parseErr
	}
	if !w.cfg.Mirrors(it.ref.registry) {
		err := fmt.Errorf("%w: registry %s is not mirrored by this agent, so pulls from it bypass the store (add it to --mirror-registries)", errPermanent, it.ref.registry)
		w.settle(it, nil, 0, err)
		return err
	}
	manifests, blobs, total, err := w.resolve(ctx, it)
	digests := slices.Clone(manifests)
	for _, b := range blobs {
		digests = append(digests, b.Digest)
	}
	w.settle(it, digests, total, err)
	if perr := w.reconcilePins(); perr != nil && err == nil {
		err = fmt.Errorf("pin: %w", perr)
	}
	if err != nil {
		return err
	}
	w.mu.Lock()
	over := it.overBudget
	w.mu.Unlock()
	if over {
		return fmt.Errorf("%w: pinning its %d bytes would take the node's pinned content past %.0f %% of the store (%d bytes)",
			errPinLimit, total, 100*w.cfg.MaxPinnedShare, w.pinBudget())
	}
	select {
	case w.itemSlots <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	err = w.fetchBlobs(ctx, it, blobs)
	<-w.itemSlots
	if err != nil || !imports {
		return err
	}
	state, note, err := w.importRuntime(ctx, it)
	w.mu.Lock()
	it.runtime, it.runtimeNote = state, note
	w.mu.Unlock()
	return err
}

// settle records the end of a resolution: the item's digests and size, or that it failed.
func (w *Worker) settle(it *item, digests []v1.Hash, total int64, err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	it.settled = true
	if err == nil {
		it.digests, it.total, it.resolved = digests, total, true
	}
}

// add counts n more bytes held for the item (negative: bytes of a download that failed).
func (it *item) add(n int64) {
	v := it.bytes.Add(n)
	for p := it.peak.Load(); v > p && !it.peak.CompareAndSwap(p, v); p = it.peak.Load() {
	}
}

// progressed marks the item Fetching once bytes move for it, and reports whether it is. A
// failed item is Fetching again only once its retry gets further than the attempt that failed,
// so that a retry reading again what the store already had does not look like progress.
func (w *Worker) progressed(it *item) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	switch {
	case it.state == v1alpha1.ItemFetching:
		return true
	case it.state == v1alpha1.ItemFailed && it.peak.Load() <= it.failedAt:
		return false
	}
	it.state, it.reason, it.message = v1alpha1.ItemFetching, "", ""
	w.updateGaugesLocked()
	w.poke()
	return true
}

// finish marks the item Ready (err nil) or Failed.
func (w *Worker) finish(it *item, err error) {
	w.mu.Lock()
	if err == nil && it.overBudget {
		// Another item took the budget while this one was fetched: it is held, not pinned.
		err = fmt.Errorf("%w: another pinned item took the room first", errPinLimit)
	}
	if err == nil {
		it.state, it.reason, it.message = v1alpha1.ItemReady, "", ""
	} else {
		it.state, it.reason, it.message = v1alpha1.ItemFailed, reasonOf(err), truncate(err.Error(), maxMessage)
		it.failedAt = it.peak.Load()
	}
	w.updateGaugesLocked()
	w.mu.Unlock()
	w.poke()
}

// reconcilePins pins every digest of the resolved items that the spec pins, and, once every
// pinned item has been resolved or has failed to be, unpins the digests this package pinned
// that none of them needs. Items still resolving might need a digest pinned before, so nothing
// is unpinned until they are done. Nothing is unpinned before the spec is known.
func (w *Worker) reconcilePins() error {
	w.pinMu.Lock()
	defer w.pinMu.Unlock()
	w.mu.Lock()
	if !w.synced {
		w.mu.Unlock()
		return nil
	}
	want := map[v1.Hash]bool{}
	complete := true
	budget, used := w.pinBudget(), int64(0)
	for _, it := range w.pinOrderLocked() {
		complete = complete && it.settled
		// An item's total counts layers it shares with others again: the bound errs on the
		// side of pinning less.
		it.overBudget = budget > 0 && it.resolved && used+it.total > budget
		if it.overBudget {
			continue
		}
		it.granted = it.granted || it.resolved
		used += it.total
		for _, d := range it.digests {
			want[d] = true
		}
	}
	w.mu.Unlock()
	pins := make([]v1.Hash, 0, len(want))
	for d := range want {
		pins = append(pins, d)
	}
	if err := w.cfg.Store.PinAll(pins, Owner); err != nil {
		return err
	}
	if !complete {
		return nil
	}
	var unpin []v1.Hash
	for _, d := range w.cfg.Store.PinnedBy(Owner) {
		if !want[d] {
			unpin = append(unpin, d)
		}
	}
	if len(unpin) == 0 {
		return nil
	}
	if err := w.cfg.Store.UnpinAll(unpin, Owner); err != nil {
		return err
	}
	w.log.Info("unpinned what no item pins any more", "blobs", len(unpin))
	return nil
}

// pinBudget is the most pinned items may take of the store, in bytes; 0 = no bound.
func (w *Worker) pinBudget() int64 {
	if w.cfg.MaxPinnedShare == 0 || w.cfg.Store.MaxBytes() <= 0 {
		return 0
	}
	return int64(w.cfg.MaxPinnedShare * float64(w.cfg.Store.MaxBytes()))
}

// pinOrderLocked returns the pinned items in the order they get the pin budget: items that got
// it before, then items held already, so that a new item never pushes out one the node holds
// or fetches, then by reference.
func (w *Worker) pinOrderLocked() []*item {
	var out []*item
	for _, it := range w.byRef {
		if it.spec.Pin {
			out = append(out, it)
		}
	}
	first := func(a, b bool) int {
		switch {
		case a == b:
			return 0
		case a:
			return -1
		}
		return 1
	}
	slices.SortFunc(out, func(a, b *item) int {
		if c := first(a.granted, b.granted); c != 0 {
			return c
		}
		if c := first(a.state == v1alpha1.ItemReady, b.state == v1alpha1.ItemReady); c != 0 {
			return c
		}
		return strings.Compare(a.spec.Reference, b.spec.Reference)
	})
	return out
}

// poke makes the status writer look again.
func (w *Worker) poke() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// updateGaugesLocked sets the items-by-state gauge.
func (w *Worker) updateGaugesLocked() {
	counts := map[v1alpha1.ItemState]int{}
	for _, it := range w.byRef {
		counts[it.state]++
	}
	for _, s := range itemStates {
		w.metrics.items.WithLabelValues(string(s)).Set(float64(counts[s]))
	}
}
