package upstream

import (
	"errors"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Request kinds, the "kind" label of the metrics.
const (
	kindManifest = "manifest"
	kindBlob     = "blob"
	kindToken    = "token" // the ping + token handshake that authenticates a transport
)

type metrics struct {
	requests *prometheus.CounterVec
	duration *prometheus.HistogramVec
	bytes    *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "upstream", Name: "requests_total",
			Help: "Requests to upstream registries by kind (manifest, blob, token) and HTTP status (\"error\" when there was no answer).",
		}, []string{"registry", "kind", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "shoal", Subsystem: "upstream", Name: "request_duration_seconds",
			Help:    "Time until an upstream registry's response headers (for token: the whole handshake).",
			Buckets: prometheus.ExponentialBuckets(0.005, 2, 12), // 5ms .. ~10s
		}, []string{"registry", "kind"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "upstream", Name: "bytes_total",
			Help: "Manifest and blob body bytes received from upstream registries.",
		}, []string{"registry"}),
	}
	if reg != nil {
		m.requests = register(reg, m.requests)
		m.duration = register(reg, m.duration)
		m.bytes = register(reg, m.bytes)
	}
	return m
}

// register registers c, or reuses the identical collector a previous Client registered.
func register[C prometheus.Collector](reg prometheus.Registerer, c C) C {
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(C); ok {
				return existing
			}
		}
		panic(err) // a conflicting metric of the same name: a programming error
	}
	return c
}

func (m *metrics) observe(registry, kind string, status int, took time.Duration) {
	code := "error"
	if status != 0 {
		code = strconv.Itoa(status)
	}
	m.requests.WithLabelValues(registry, kind, code).Inc()
	m.duration.WithLabelValues(registry, kind).Observe(took.Seconds())
}
