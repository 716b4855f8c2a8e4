package promreg

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

func counter() prometheus.Counter {
	return prometheus.NewCounter(prometheus.CounterOpts{Name: "things_total", Help: "Things."})
}

func TestSecondInstanceSharesTheFirst(t *testing.T) {
	reg := prometheus.NewRegistry()
	first := Shared(reg, counter())
	second := Shared(reg, counter())
	second.Inc()
	if first != second {
		t.Fatal("the second registration got its own counter, which /metrics never shows")
	}
}

func TestConflictingMetricPanics(t *testing.T) {
	reg := prometheus.NewRegistry()
	Shared(reg, counter())
	defer func() {
		if recover() == nil {
			t.Fatal("a gauge registered under a counter's name did not panic")
		}
	}()
	Shared(reg, prometheus.NewGauge(prometheus.GaugeOpts{Name: "things_total", Help: "Other things."}))
}
