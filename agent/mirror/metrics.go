package mirror

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	requests *prometheus.CounterVec
	bytes    *prometheus.CounterVec
	// deadlines counts requests the mirror cut by its own deadlines (see serveGuarded).
	deadlines *prometheus.CounterVec
}

// newMetrics creates the mirror's metrics and registers them with reg when it is not nil.
func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "mirror", Name: "requests_total",
			Help: "Distribution API requests answered, by kind (manifest, blob, invalid) and by where the content came from (local store, upstream registry, swarm of peers) or error.",
		}, []string{"kind", "source"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "mirror", Name: "bytes_total",
			Help: "Body bytes sent to clients, by where they came from (local store, upstream registry, swarm of peers).",
		}, []string{"source"}),
		deadlines: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "mirror", Name: "deadline_exceeded_total",
			Help: "Requests the mirror cut by its own deadlines: answered 503 because no answer was ready within the first-byte timeout (first_byte), or connection cut because a started body went silent (body_idle).",
		}, []string{"deadline"}),
	}
	for _, d := range []string{deadlineFirstByte, deadlineBodyIdle} {
		m.deadlines.WithLabelValues(d)
	}
	if reg != nil {
		reg.MustRegister(m.requests, m.bytes, m.deadlines)
	}
	return m
}
