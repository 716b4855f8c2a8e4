package mirror

import (
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
)

// Where the content of an answer came from, or was sought when the request failed: the
// "source" label. A fixed set, so that an outcome never hides in it.
const (
	sourceLocal    = "local"    // the node's content store
	sourceUpstream = "upstream" // the upstream registry
	sourceSwarm    = "swarm"    // peers, through the swarm
	sourceNone     = "none"     // nowhere: the mirror answered by itself
)

// How a request ended: the "result" label, one of a fixed set derived from the status sent.
const (
	resultOK       = "ok"        // 2xx or 304, the body sent whole
	resultNotFound = "not_found" // 404: unknown content, or a registry not mirrored
	resultDenied   = "denied"    // 403: the registry refused the agent's credentials
	resultInvalid  = "invalid"   // any other 4xx: a request the mirror refuses
	resultError    = "error"     // 5xx: upstream, the store or a deadline failed; the runtime falls back
	resultAborted  = "aborted"   // headers sent, then the body was cut short
	resultCanceled = "canceled"  // the client went away before an answer
)

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
			Help: "Distribution API requests answered, by kind (manifest, blob, invalid); " +
				"by source, where the content came from or was sought (local: the node's store, upstream: the registry, " +
				"swarm: peers, none: the mirror answered by itself); and by result (ok: 2xx or 304 with the whole body, " +
				"not_found: 404, denied: 403 from upstream credentials, invalid: another 4xx, " +
				"error: 5xx on which the runtime falls back, aborted: the body was cut short after the headers, " +
				"canceled: the client left before the answer).",
		}, []string{"kind", "source", "result"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "mirror", Name: "bytes_total",
			Help: "Content bytes sent to clients (error bodies excluded, bodies cut short included), by where they came from (local store, upstream registry, swarm of peers).",
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

// count records one request's outcome: kind, where its content came from and how it ended.
func (m *metrics) count(kind string, a answer, result string) {
	source := a.source
	if source == "" {
		source = sourceNone
	}
	// Bytes first: whoever sees the request counted sees its bytes too.
	if source != sourceNone && (result == resultOK || result == resultAborted) {
		m.bytes.WithLabelValues(source).Add(float64(a.bytes))
	}
	m.requests.WithLabelValues(kind, source, result).Inc()
}

// resultOf is the result label of a complete answer with the given status; 0 is the 200 that
// net/http sends for a handler that wrote nothing.
func resultOf(status int) string {
	switch {
	case status < http.StatusBadRequest:
		return resultOK
	case status == http.StatusNotFound:
		return resultNotFound
	case status == http.StatusForbidden:
		return resultDenied
	case status == statusClientClosed:
		return resultCanceled
	case status < http.StatusInternalServerError:
		return resultInvalid
	}
	return resultError
}

// statusClientClosed is what the mirror "answers" a client that went away (nginx's 499): it is
// never read, but it is logged and counted apart from the mirror's own failures.
const statusClientClosed = 499
