package upstream

import (
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/shoal-dev/shoal/internal/promreg"
)

// Request kinds, the "kind" label of the metrics.
const (
	kindManifest = "manifest"
	kindBlob     = "blob"
	kindToken    = "token" // the ping + token handshake that authenticates a transport
)

// MaxRegistryLabels is how many registries the metrics name; requests to any other registry
// are counted under the registry label "other".
//
// The registry label cannot take every name a client sends: an agent that mirrors every
// registry ("*") fetches from whichever registry an image reference names, so the names are
// as many as whoever creates pods cares to write. A registry is named once it is known to be
// real: Check was called for it (the agent does so for each registry it is configured with) or
// the client authenticated to it (its endpoint answered the Distribution API's ping). A node
// pulls from a handful of registries; 64 leaves room for them all while bounding every metric
// at 65 registries whatever clients send. Names are kept for the client's lifetime, first come
// first named, so that a series never changes meaning.
const MaxRegistryLabels = 64

// otherRegistry is the registry label of the registries beyond MaxRegistryLabels or not yet
// known to be real.
const otherRegistry = "other"

// codeNone is the code label of a request that got no HTTP answer (dial error, timeout, TLS
// failure).
const codeNone = "none"

// knownCodes are the HTTP statuses the code label names; any other is counted by its class
// ("2xx", "4xx", ...), so that a registry answering odd statuses cannot add series either.
var knownCodes = map[int]bool{
	http.StatusOK: true, http.StatusPartialContent: true,
	http.StatusBadRequest: true, http.StatusUnauthorized: true, http.StatusForbidden: true,
	http.StatusNotFound: true, http.StatusMethodNotAllowed: true, http.StatusRequestTimeout: true,
	http.StatusRequestedRangeNotSatisfiable: true, http.StatusTooManyRequests: true,
	http.StatusInternalServerError: true, http.StatusNotImplemented: true, http.StatusBadGateway: true,
	http.StatusServiceUnavailable: true, http.StatusGatewayTimeout: true,
}

type metrics struct {
	requests   *prometheus.CounterVec
	duration   *prometheus.HistogramVec
	bytes      *prometheus.CounterVec
	registries registryLabels
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "upstream", Name: "requests_total",
			Help: "Requests to upstream registries by registry (at most 64 named, the rest \"other\"), " +
				"kind (manifest, blob, token) and code: the HTTP status of the answer (statuses other than " +
				"200, 206, 400, 401, 403, 404, 405, 408, 416, 429, 500, 501, 502, 503, 504 by class, e.g. \"4xx\"), " +
				"or \"none\" when there was no answer.",
		}, []string{"registry", "kind", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "shoal", Subsystem: "upstream", Name: "request_duration_seconds",
			Help:    "Time until an upstream registry's response headers (for token: the whole handshake), by registry (at most 64 named, the rest \"other\") and kind.",
			Buckets: prometheus.ExponentialBuckets(0.005, 2, 12), // 5ms .. ~10s
		}, []string{"registry", "kind"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "upstream", Name: "bytes_total",
			Help: "Manifest and blob body bytes received from upstream registries, by registry (at most 64 named, the rest \"other\").",
		}, []string{"registry"}),
		registries: registryLabels{max: MaxRegistryLabels, named: map[string]bool{}},
	}
	if reg != nil {
		m.requests = promreg.Shared(reg, m.requests)
		m.duration = promreg.Shared(reg, m.duration)
		m.bytes = promreg.Shared(reg, m.bytes)
	}
	return m
}

func (m *metrics) observe(registry, kind string, status int, took time.Duration) {
	label := m.registries.label(registry)
	m.requests.WithLabelValues(label, kind, codeLabel(status)).Inc()
	m.duration.WithLabelValues(label, kind).Observe(took.Seconds())
}

// received returns the counter of body bytes received from registry.
func (m *metrics) received(registry string) prometheus.Counter {
	return m.bytes.WithLabelValues(m.registries.label(registry))
}

// codeLabel is the code label of an answer with status, 0 for none.
func codeLabel(status int) string {
	switch {
	case status == 0:
		return codeNone
	case knownCodes[status]:
		return strconv.Itoa(status)
	case status >= 100 && status <= 599:
		return strconv.Itoa(status/100) + "xx"
	}
	return "other"
}

// registryLabels is the set of registries the metrics name (see MaxRegistryLabels). Each Client
// has its own; clients sharing a registerer share the collectors, not the set.
type registryLabels struct {
	max   int
	mu    sync.Mutex
	named map[string]bool
}

// admit names registry in the metrics from now on, if there is room.
func (l *registryLabels) admit(registry string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.named) < l.max {
		l.named[registry] = true
	}
}

// label is registry's label: its name if it was admitted, "other" otherwise.
func (l *registryLabels) label(registry string) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.named[registry] {
		return registry
	}
	return otherRegistry
}
