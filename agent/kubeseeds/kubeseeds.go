// Package kubeseeds starts the swarm's upstream fetch of blobs that pods are about to pull: it
// watches the cluster's SwarmSeeds, written by the controller, and has the swarm prefetch the
// segments this node seeds of each of their blobs (docs/kubernetes.md).
package kubeseeds

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	toolscache "k8s.io/client-go/tools/cache"

	"github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/internal/kubeclient"
	"github.com/shoal-dev/shoal/internal/oci"
	"github.com/shoal-dev/shoal/internal/promreg"
)

// Prefetch fetches the segments of a blob that this node seeds (swarm.Swarm.Prefetch) and
// returns how many it seeds.
type Prefetch func(ctx context.Context, registry, repo string, d v1.Hash, size int64) (int, error)

// The agent's rights for SwarmSeeds (generated into config/rbac/agent): read only.
// +kubebuilder:rbac:groups=shoal.dev,resources=swarmseeds,verbs=get;list;watch

// Watcher watches SwarmSeeds and prefetches their blobs.
type Watcher struct {
	rest     *rest.Config
	prefetch Prefetch
	log      *slog.Logger
	// blobs is how many blobs are prefetched at once.
	blobs int

	mu   sync.Mutex
	done map[types.UID]bool // seeds handled, so that a resync or an update does nothing again

	seeds, prefetched, failed prometheus.Counter
}

// Option configures a Watcher.
type Option func(*Watcher)

// WithLogger sets the logger (default: discard).
func WithLogger(l *slog.Logger) Option { return func(w *Watcher) { w.log = l } }

// WithRegisterer registers the watcher's metrics with reg.
func WithRegisterer(reg prometheus.Registerer) Option {
	return func(w *Watcher) {
		if reg == nil {
			return
		}
		w.seeds = promreg.Shared(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "seeds", Name: "seen_total",
			Help: "SwarmSeeds this agent acted on: announcements that pods are about to pull an image.",
		}))
		w.prefetched = promreg.Shared(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "seeds", Name: "segments_prefetched_total",
			Help: "Segments of announced blobs this agent seeds and fetched ahead of readers.",
		}))
		w.failed = promreg.Shared(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "seeds", Name: "blob_failures_total",
			Help: "Announced blobs whose prefetch failed (the runtime's pull fetches them as usual).",
		}))
	}
}

// New returns a Watcher that reaches the API server with restCfg and prefetches with prefetch.
func New(restCfg *rest.Config, prefetch Prefetch, opts ...Option) *Watcher {
	w := &Watcher{rest: restCfg, prefetch: prefetch, log: slog.New(slog.DiscardHandler), blobs: 2, done: map[types.UID]bool{}}
	for _, o := range opts {
		o(w)
	}
	return w
}

// Run watches SwarmSeeds until ctx ends and returns nil then, once every prefetch it started
// has returned. While the API server does not answer, it keeps trying; pulls never wait for it.
func (w *Watcher) Run(ctx context.Context) error {
	client, err := kubeclient.Shoal(w.rest)
	if err != nil {
		return fmt.Errorf("kubeseeds: %w", err)
	}
	queue := make(chan *v1alpha1.SwarmSeed, 256)
	inf := toolscache.NewSharedIndexInformer(
		toolscache.NewListWatchFromClient(client, "swarmseeds", "", fields.Everything()),
		&v1alpha1.SwarmSeed{}, 0, toolscache.Indexers{})
	enqueue := func(o any) {
		seed, ok := o.(*v1alpha1.SwarmSeed)
		if !ok || !w.claim(seed.UID) {
			return
		}
		select {
		case queue <- seed:
		default:
			// Far behind: this one is left to the runtime's pull, which fetches it as usual.
			w.log.Warn("too many SwarmSeeds waiting; one skipped", "name", seed.Name)
		}
	}
	if _, err := inf.AddEventHandler(toolscache.ResourceEventHandlerFuncs{
		AddFunc:    enqueue,
		UpdateFunc: func(_, o any) { enqueue(o) },
		DeleteFunc: func(o any) {
			if seed, ok := o.(*v1alpha1.SwarmSeed); ok {
				w.forget(seed.UID)
			}
		},
	}); err != nil {
		return fmt.Errorf("kubeseeds: informer: %w", err)
	}

	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	wg.Go(func() { inf.RunWithContext(ctx) })
	sem := make(chan struct{}, w.blobs)
	for {
		select {
		case <-ctx.Done():
			return nil
		case seed := <-queue:
			w.count(w.seeds, 1)
			registry, repo, err := SplitRepository(seed.Spec.Repository)
			if err != nil {
				w.log.Warn("SwarmSeed skipped", "name", seed.Name, "error", err)
				continue
			}
			for _, blob := range seed.Spec.Blobs {
				d, err := v1.NewHash(blob.Digest)
				if err != nil {
					w.log.Warn("SwarmSeed blob skipped", "name", seed.Name, "digest", blob.Digest, "error", err)
					continue
				}
				select {
				case sem <- struct{}{}:
				case <-ctx.Done():
					return nil
				}
				wg.Go(func() {
					defer func() { <-sem }()
					n, err := w.prefetch(ctx, registry, repo, d, blob.Size)
					w.count(w.prefetched, float64(n))
					if err != nil && ctx.Err() == nil {
						w.count(w.failed, 1)
						w.log.Info("prefetch of an announced blob failed; the pull will fetch it", "digest", d, "repository", seed.Spec.Repository, "error", err)
					}
				})
			}
		}
	}
}

func (w *Watcher) claim(uid types.UID) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.done[uid] {
		return false
	}
	w.done[uid] = true
	return true
}

func (w *Watcher) forget(uid types.UID) {
	w.mu.Lock()
	defer w.mu.Unlock()
	delete(w.done, uid)
}

func (w *Watcher) count(c prometheus.Counter, v float64) {
	if c != nil {
		c.Add(v)
	}
}

// SplitRepository splits a repository in full (registry.example/team/app) into the registry,
// as containerd names it to the mirror (docker.io for Docker Hub), and the repository path.
func SplitRepository(full string) (registry, repo string, err error) {
	registry, repo, ok := strings.Cut(full, "/")
	if !ok || registry == "" || repo == "" {
		return "", "", fmt.Errorf("repository %q: want registry/name", full)
	}
	registry = oci.MirrorRegistry(registry)
	if err := oci.ValidateRegistry(registry); err != nil {
		return "", "", fmt.Errorf("repository %q: %w", full, err)
	}
	if err := oci.ValidateRepository(repo); err != nil {
		return "", "", fmt.Errorf("repository %q: %w", full, err)
	}
	return registry, repo, nil
}
