package main

import (
	"context"
	"fmt"
	"sync"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/shoal-dev/shoal/api/v1alpha1"
)

// maxRewatches bounds how often the SwarmSeed watch is opened again after the API server
// ended it.
const maxRewatches = 100

// seedSeen is when the benchmark saw the SwarmSeed of a manifest, as an agent would.
type seedSeen struct {
	At      time.Time // the watch event arrived (the benchmark's clock)
	Created time.Time // the object's creationTimestamp (whole seconds)
	// Relisted means it was found by listing again after the watch ended, so At is late.
	Relisted bool
}

// seedWatch records the SwarmSeeds that appear, by manifest digest.
type seedWatch struct {
	cancel context.CancelFunc
	done   chan struct{}

	mu   sync.Mutex
	seen map[string]seedSeen
}

// watchSeeds lists the SwarmSeeds and watches them from there until stopped.
func watchSeeds(ctx context.Context, c client.WithWatch) (*seedWatch, error) {
	ctx, cancel := context.WithCancel(ctx)
	s := &seedWatch{cancel: cancel, done: make(chan struct{}), seen: map[string]seedSeen{}}
	w, err := s.listAndWatch(ctx, c, false)
	if err != nil {
		cancel()
		return nil, err
	}
	go func() {
		defer close(s.done)
		for rewatches := 0; ; rewatches++ {
			s.consume(ctx, w)
			w.Stop()
			if ctx.Err() != nil || rewatches == maxRewatches {
				return
			}
			next, err := s.listAndWatch(ctx, c, true)
			if err != nil {
				return // the round's wait for the SwarmSeeds times out and says which are missing
			}
			w = next
		}
	}()
	return s, nil
}

func (s *seedWatch) listAndWatch(ctx context.Context, c client.WithWatch, relisted bool) (watch.Interface, error) {
	var list v1alpha1.SwarmSeedList
	if err := c.List(ctx, &list); err != nil {
		return nil, fmt.Errorf("list SwarmSeeds: %w", err)
	}
	for i := range list.Items {
		s.record(&list.Items[i], relisted)
	}
	w, err := c.Watch(ctx, &v1alpha1.SwarmSeedList{}, &client.ListOptions{Raw: &metav1.ListOptions{ResourceVersion: list.ResourceVersion}})
	if err != nil {
		return nil, fmt.Errorf("watch SwarmSeeds: %w", err)
	}
	return w, nil
}

// consume records what w sends until it ends or ctx does.
func (s *seedWatch) consume(ctx context.Context, w watch.Interface) {
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-w.ResultChan():
			if !ok || ev.Type == watch.Error {
				return
			}
			if seed, isSeed := ev.Object.(*v1alpha1.SwarmSeed); isSeed && (ev.Type == watch.Added || ev.Type == watch.Modified) {
				s.record(seed, false)
			}
		}
	}
}

func (s *seedWatch) record(seed *v1alpha1.SwarmSeed, relisted bool) {
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.seen[seed.Spec.Manifest]; !ok {
		s.seen[seed.Spec.Manifest] = seedSeen{At: now, Created: seed.CreationTimestamp.Time, Relisted: relisted}
	}
}

// count is how many of manifests have been seen.
func (s *seedWatch) count(manifests map[string]int) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for d := range s.seen {
		if _, ok := manifests[d]; ok {
			n++
		}
	}
	return n
}

func (s *seedWatch) snapshot() map[string]seedSeen {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]seedSeen, len(s.seen))
	for k, v := range s.seen {
		out[k] = v
	}
	return out
}

// stop ends the watch and waits for it; stopping again does nothing.
func (s *seedWatch) stop() {
	s.cancel()
	<-s.done
}
