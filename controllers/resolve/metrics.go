package resolve

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/internal/promreg"
)

// Values of the result label of shoal_controller_resolutions_total.
const (
	resultOK                  = "ok"
	resultUnauthorized        = "unauthorized"
	resultNotFound            = "not_found"
	resultPlatformUnavailable = "platform_unavailable"
	resultFailed              = "failed"
)

// Values of the result label of shoal_controller_resolve_cache_total.
const (
	cacheHit  = "hit"
	cacheMiss = "miss"
)

type metrics struct {
	resolutions *prometheus.CounterVec
	cache       *prometheus.CounterVec
	duration    prometheus.Histogram
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		resolutions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "controller", Name: "resolutions_total",
			Help: "References resolved, by result: ok, unauthorized, not_found, platform_unavailable " +
				"(an index lacks a platform asked for) or failed (anything else). Answers from the cache count.",
		}, []string{"result"}),
		cache: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "controller", Name: "resolve_cache_total",
			Help: "Resolutions answered from the cache (hit) or not (miss; a resolution that waited " +
				"for an identical one in progress is a miss too).",
		}, []string{"result"}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: "shoal", Subsystem: "controller", Name: "resolve_duration_seconds",
			Help: "Time a resolution that went to the registry took: the manifest, every " +
				"platform's manifest asked for and, for a single image manifest, its config.",
			Buckets: prometheus.ExponentialBuckets(0.01, 2, 12), // 10ms .. ~20s
		}),
	}
	if reg != nil {
		m.resolutions = promreg.Shared(reg, m.resolutions)
		m.cache = promreg.Shared(reg, m.cache)
		m.duration = promreg.Shared(reg, m.duration)
	}
	for _, r := range []string{resultOK, resultUnauthorized, resultNotFound, resultPlatformUnavailable, resultFailed} {
		m.resolutions.WithLabelValues(r)
	}
	m.cache.WithLabelValues(cacheHit)
	m.cache.WithLabelValues(cacheMiss)
	return m
}

// resultLabel is the result label of an error returned by Resolve.
func resultLabel(err error) string {
	switch Reason(err) {
	case "":
		return resultOK
	case v1alpha1.ReasonUnauthorized:
		return resultUnauthorized
	case v1alpha1.ReasonNotFound:
		return resultNotFound
	case v1alpha1.ReasonPlatformUnavailable:
		return resultPlatformUnavailable
	}
	return resultFailed
}
