package harness

import (
	"context"
	"log/slog"
)

// Process is a long-running child process started by StartProcess: its output goes to a log
// file, it is signalled only by its own PID, and the kernel kills it if the harness dies.
type Process struct{ p *process }

// StartProcess starts bin with args as a named child whose stdout and stderr go to logPath,
// for components the harness has no helper of its own for (the local cluster's API server,
// kubelets and the like). Like every harness process it refuses to start outside RunIsolated's
// namespace.
func StartProcess(name, logPath string, logger *slog.Logger, bin string, args ...string) (*Process, error) {
	if logger == nil {
		logger = newOptions("", nil).logger
	}
	p, err := startProcess(name, logPath, "", logger, bin, args...)
	if err != nil {
		return nil, err
	}
	return &Process{p: p}, nil
}

// PID is the operating-system process id.
func (p *Process) PID() int { return p.p.PID() }

// Exited reports whether the process has ended.
func (p *Process) Exited() bool { return p.p.exited() }

// Done is closed once the process has ended and been reaped.
func (p *Process) Done() <-chan struct{} { return p.p.done }

// LogTail is the end of the process's log, for error messages.
func (p *Process) LogTail() string { return p.p.logTail() }

// WaitReady polls check until it succeeds; it fails with the log's tail when the process exits
// first or ctx ends.
func (p *Process) WaitReady(ctx context.Context, what string, check func(context.Context) error) error {
	return p.p.waitReady(ctx, what, check)
}

// Stop sends SIGTERM, waits a grace period (or until ctx ends), then kills.
func (p *Process) Stop(ctx context.Context) error { return p.p.stop(ctx) }

// Kill sends SIGKILL and waits until the process is reaped.
func (p *Process) Kill() error { return p.p.kill() }
