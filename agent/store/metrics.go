package store

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	hits, misses, evictions, evictedBytes, fetchBytes prometheus.Counter
	fetches                                           *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer, s *Store) (*metrics, error) {
	counter := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Namespace: "shoal", Subsystem: "store", Name: name, Help: help})
	}
	m := &metrics{
		hits:         counter("hits_total", "Blob opens served from a complete blob in the store."),
		misses:       counter("misses_total", "Fetches of blobs not complete in the store (started or joined a download)."),
		evictions:    counter("evictions_total", "Blobs evicted to stay under the size limit."),
		evictedBytes: counter("evicted_bytes_total", "Bytes of blobs evicted to stay under the size limit."),
		fetchBytes:   counter("fetch_bytes_total", "Bytes received from sources."),
		fetches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "store", Name: "fetches_total",
			Help: "Downloads from sources, by result.",
		}, []string{"result"}),
	}
	for _, r := range []string{resultOK, resultError, resultDigestMismatch, resultSizeMismatch,
		resultStalled, resultFull, resultWriteError, resultCanceled} {
		m.fetches.WithLabelValues(r) // export zeros, so rates work before the first failure
	}
	if reg == nil {
		return m, nil
	}
	collectors := []prometheus.Collector{
		m.hits, m.misses, m.evictions, m.evictedBytes, m.fetchBytes, m.fetches,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: "shoal", Subsystem: "store", Name: "bytes", Help: "Bytes of complete blobs in the store.",
		}, func() float64 { b, _ := s.Usage(); return float64(b) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: "shoal", Subsystem: "store", Name: "blobs", Help: "Complete blobs in the store.",
		}, func() float64 { _, n := s.Usage(); return float64(n) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: "shoal", Subsystem: "store", Name: "pinned_bytes",
			Help: "Bytes of complete blobs that some owner pins (never evicted).",
		}, func() float64 { return float64(s.PinnedBytes()) }),
	}
	for i, c := range collectors {
		if err := reg.Register(c); err != nil {
			for _, done := range collectors[:i] {
				reg.Unregister(done)
			}
			return nil, fmt.Errorf("register store metrics: %w", err)
		}
	}
	return m, nil
}
