package agent

import (
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync/atomic"
	"time"
)

// livenessTimeout bounds each liveness check. The parts it checks answer in microseconds when
// healthy; a part that needs longer is deadlocked or starved, and the kubelet's liveness probe
// (which should allow a few failures) restarts the agent, after which containerd pulls directly
// from the registry until the new agent is ready.
const livenessTimeout = 2 * time.Second

// liveness answers /healthz: whether the agent's parts still answer, not only whether the
// process does. A deadlock in the content store or the swarm leaves the HTTP servers up while
// every pull through the mirror waits for its deadline (and falls back); only a probe that
// takes the same locks as a pull sees it.
type liveness struct {
	log    *slog.Logger
	checks []*livenessCheck
}

// livenessCheck is one part's check: run takes the part's locks and returns.
type livenessCheck struct {
	name string
	run  func()
	// running is set while a check runs: a check that is stuck is not started again, so a
	// deadlocked part costs one goroutine, not one per probe.
	running atomic.Bool
}

func newLiveness(log *slog.Logger) *liveness { return &liveness{log: log} }

// add registers a part's check.
func (l *liveness) add(name string, run func()) {
	l.checks = append(l.checks, &livenessCheck{name: name, run: run})
}

// check runs every part's check, each bounded by livenessTimeout, and says which did not answer.
func (l *liveness) check() error {
	var errs []error
	for _, c := range l.checks {
		if err := c.check(livenessTimeout); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (c *livenessCheck) check(timeout time.Duration) error {
	if !c.running.CompareAndSwap(false, true) {
		return fmt.Errorf("%s: an earlier check has not returned", c.name)
	}
	done := make(chan struct{})
	go func() {
		defer c.running.Store(false)
		defer close(done)
		c.run()
	}()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-done:
		return nil
	case <-t.C:
		return fmt.Errorf("%s: no answer within %s", c.name, timeout)
	}
}

func (l *liveness) serve(w http.ResponseWriter, _ *http.Request) {
	if err := l.check(); err != nil {
		l.log.Error("liveness check failed: a part of the agent is stuck", "error", err)
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
		return
	}
	_, _ = w.Write([]byte("ok\n"))
}
