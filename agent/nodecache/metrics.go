package nodecache

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"

	v1alpha1 "github.com/shoal-dev/shoal/api/v1alpha1"
)

// itemStates are the states items are counted by.
var itemStates = []v1alpha1.ItemState{v1alpha1.ItemPending, v1alpha1.ItemFetching, v1alpha1.ItemReady, v1alpha1.ItemFailed}

// Results of a status write, the result label of shoal_nodecache_status_writes_total.
const (
	writeOK       = "ok"
	writeConflict = "conflict" // another write came first: the object is read again
	writeError    = "error"
)

type metrics struct {
	items   *prometheus.GaugeVec
	writes  *prometheus.CounterVec
	imports prometheus.Counter
	// refetches counts held items fetched again because content of theirs left the store.
	refetches prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		items: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "shoal", Subsystem: "nodecache", Name: "items",
			Help: "Items of this node's NodeCache, by state.",
		}, []string{"state"}),
		writes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "nodecache", Name: "status_writes_total",
			Help: "Writes of the NodeCache's status, by result.",
		}, []string{"result"}),
		imports: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "nodecache", Name: "runtime_imports_total",
			Help: "Images pulled into the container runtime for NodeCache items (again after a removal out of band included).",
		}),
		refetches: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "nodecache", Name: "refetches_total",
			Help: "Held NodeCache items fetched again because a manifest or blob of theirs left the store out of band (evicted, deleted, lost).",
		}),
	}
	for _, s := range itemStates {
		m.items.WithLabelValues(string(s))
	}
	for _, r := range []string{writeOK, writeConflict, writeError} {
		m.writes.WithLabelValues(r) // export zeros, so rates work before the first failure
	}
	if reg == nil {
		return m, nil
	}
	cs := []prometheus.Collector{m.items, m.writes, m.imports, m.refetches}
	for i, c := range cs {
		if err := reg.Register(c); err != nil {
			for _, done := range cs[:i] {
				reg.Unregister(done)
			}
			return nil, fmt.Errorf("register nodecache metrics: %w", err)
		}
	}
	return m, nil
}
