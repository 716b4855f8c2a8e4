// Package promreg registers Prometheus collectors that several instances of a component share
// in one process: the second instance given the same registerer (tests start several agents'
// parts in one process) gets the collector the first registered instead of a panic.
package promreg

import (
	"errors"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// Shared registers c with reg, or returns the identical collector registered before. A
// different metric under the same name is a programming error and panics.
func Shared[C prometheus.Collector](reg prometheus.Registerer, c C) C {
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(C); ok {
				return existing
			}
		}
		panic(fmt.Sprintf("register metrics: %v", err))
	}
	return c
}
