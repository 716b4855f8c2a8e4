package main

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/shoal-dev/shoal/test/testbed"
)

// sample is one second of a round.
type sample struct {
	T            float64 `json:"t_s"` // since the controller started
	HeapInuse    int64   `json:"heap_inuse_bytes"`
	RSS          int64   `json:"rss_bytes"`
	MachineCPU   float64 `json:"machine_cpu"` // share of all cores busy during the second
	PodsCreated  int64   `json:"pods_created"`
	PodsLookedAt float64 `json:"pods_looked_at"` // shoal_controller_seed_pods_total
}

// sampler reads the controller's heap in use (go_memstats_heap_inuse_bytes), its RSS and the
// machine's CPU use once a second until stopped.
type sampler struct {
	podsCreated atomic.Int64 // counted by the pod creators

	ctrl   *controllerProcess
	start  time.Time
	cancel context.CancelFunc
	done   chan struct{}

	mu      sync.Mutex
	samples []sample
	peak    int64
}

func startSampler(ctx context.Context, ctrl *controllerProcess, start time.Time) *sampler {
	ctx, cancel := context.WithCancel(ctx)
	s := &sampler{ctrl: ctrl, start: start, cancel: cancel, done: make(chan struct{})}
	go s.run(ctx)
	return s
}

func (s *sampler) run(ctx context.Context) {
	defer close(s.done)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	prevCPU, cpuErr := testbed.ReadMachineCPU()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		smp := sample{T: time.Since(s.start).Seconds(), PodsCreated: s.podsCreated.Load()}
		if cpu, err := testbed.ReadMachineCPU(); err == nil && cpuErr == nil {
			smp.MachineCPU = cpu.Sub(prevCPU).Utilisation()
			prevCPU = cpu
		}
		smp.RSS, _ = rss(s.ctrl.pid()) // 0 once the process is gone
		scrapeCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
		m, err := s.ctrl.scrape(scrapeCtx)
		cancel()
		if err == nil {
			smp.HeapInuse = int64(m.Value("go_memstats_heap_inuse_bytes", nil))
			smp.PodsLookedAt = m.Value("shoal_controller_seed_pods_total", nil)
		}
		s.mu.Lock()
		s.samples = append(s.samples, smp)
		s.peak = max(s.peak, smp.HeapInuse)
		s.mu.Unlock()
	}
}

// stop ends the sampling and waits for it; stopping again does nothing.
func (s *sampler) stop() {
	s.cancel()
	<-s.done
}

func (s *sampler) peakHeap() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.peak
}

func (s *sampler) timeline() []sample {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]sample(nil), s.samples...)
}
