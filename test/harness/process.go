package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// stopGrace is how long a process gets to exit after SIGTERM before it is killed.
const stopGrace = 10 * time.Second

// process is one child process whose output goes to a log file. It is only ever signalled
// by its own PID, and dies with the harness (SIGKILL on parent death) so nothing leaks.
type process struct {
	name    string
	logPath string
	logger  *slog.Logger
	cmd     *exec.Cmd
	logFile *os.File
	done    chan struct{} // closed when the process has exited and been reaped
	waitErr error         // set before done is closed
}

// startProcess starts bin with args, appending stdout and stderr to logPath (and stdout
// alone to stdoutPath when that is not empty).
func startProcess(name, logPath, stdoutPath string, logger *slog.Logger, bin string, args ...string) (*process, error) {
	if err := errNotIsolated(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open log of %s: %w", name, err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = ChildEnv()
	cmd.Stderr = logFile
	cmd.Stdout = logFile
	if stdoutPath != "" {
		out, err := os.OpenFile(stdoutPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			logFile.Close()
			return nil, fmt.Errorf("open stdout log of %s: %w", name, err)
		}
		defer out.Close() // the child has its own copy once started
		cmd.Stdout = out
	}
	// Pdeathsig: if the harness dies without cleaning up, the kernel kills the child.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, fmt.Errorf("start %s (%s): %w", name, bin, err)
	}
	p := &process{name: name, logPath: logPath, logger: logger, cmd: cmd, logFile: logFile, done: make(chan struct{})}
	go func() {
		p.waitErr = cmd.Wait()
		logFile.Close()
		close(p.done)
	}()
	logger.Info("started", "process", name, "pid", cmd.Process.Pid, "log", logPath)
	return p, nil
}

// inNetns returns the command line that runs bin with args in the network namespace at netns,
// or bin and args unchanged when netns is "". nsenter without --fork execs bin in place.
func inNetns(netns, bin string, args []string) (string, []string) {
	return inNamespaces(netns, "", bin, args)
}

// inNamespaces is inNetns that also enters the mount namespace at mountns when it is not "".
// nsenter opens both namespace files before it enters either, so the paths are resolved here.
func inNamespaces(netns, mountns, bin string, args []string) (string, []string) {
	var ns []string
	if netns != "" {
		ns = append(ns, "--net="+netns)
	}
	if mountns != "" {
		ns = append(ns, "--mount="+mountns)
	}
	if len(ns) == 0 {
		return bin, args
	}
	return "nsenter", append(append(ns, "--", bin), args...)
}

// ChildEnv is the harness's environment without proxy settings, for the processes it (or a
// benchmark) starts: they talk to loopback only, and a proxy variable must never route a
// made-up registry name elsewhere.
func ChildEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		key, _, _ := strings.Cut(kv, "=")
		switch strings.ToLower(key) {
		case "http_proxy", "https_proxy", "all_proxy", "no_proxy":
			continue
		}
		env = append(env, kv)
	}
	return env
}

// PID is the operating-system process id.
func (p *process) PID() int { return p.cmd.Process.Pid }

// exited reports whether the process has terminated.
func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// kill sends SIGKILL and waits until the process is reaped.
func (p *process) kill() error {
	if p.exited() {
		return nil
	}
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("kill %s (pid %d): %w", p.name, p.PID(), err)
	}
	<-p.done
	p.logger.Info("killed", "process", p.name, "pid", p.PID())
	return nil
}

// stop sends SIGTERM, waits up to stopGrace (or until ctx ends), then SIGKILLs.
// It returns an error when the process had to be killed or exited unsuccessfully.
func (p *process) stop(ctx context.Context) error {
	if p.exited() {
		return nil
	}
	_ = p.cmd.Process.Signal(syscall.SIGCONT) // a frozen process would not handle SIGTERM
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("terminate %s (pid %d): %w", p.name, p.PID(), err)
	}
	timer := time.NewTimer(stopGrace)
	defer timer.Stop()
	select {
	case <-p.done:
	case <-timer.C:
		_ = p.kill()
		return fmt.Errorf("%s (pid %d) ignored SIGTERM for %s and was killed", p.name, p.PID(), stopGrace)
	case <-ctx.Done():
		_ = p.kill()
		return fmt.Errorf("stop %s (pid %d): %w", p.name, p.PID(), ctx.Err())
	}
	p.logger.Info("stopped", "process", p.name, "pid", p.PID())
	var exitErr *exec.ExitError
	if errors.As(p.waitErr, &exitErr) && !exitedBySignal(exitErr, syscall.SIGTERM) {
		return fmt.Errorf("%s (pid %d) exited after SIGTERM: %w", p.name, p.PID(), p.waitErr)
	}
	return nil
}

func exitedBySignal(err *exec.ExitError, sig syscall.Signal) bool {
	ws, ok := err.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.Signal() == sig
}

// logTail returns the last lines of the process log, for error messages.
func (p *process) logTail() string { return fileTail(p.logPath, 30) }

func fileTail(path string, lines int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", path, err)
	}
	all := bytes.Split(bytes.TrimRight(data, "\n"), []byte("\n"))
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return string(bytes.Join(all, []byte("\n")))
}

// waitReady polls check every 50ms until it succeeds, the process exits, or ctx ends.
func (p *process) waitReady(ctx context.Context, what string, check func(context.Context) error) error {
	ticker := time.NewTicker(50 * time.Millisecond)
	defer ticker.Stop()
	var last error
	for {
		if last = check(ctx); last == nil {
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("%s exited before %s: %w; log %s:\n%s", p.name, what, exitError(p.waitErr), p.logPath, p.logTail())
		case <-ctx.Done():
			return fmt.Errorf("%s: waiting for %s: %w (last error: %w); log %s:\n%s", p.name, what, ctx.Err(), last, p.logPath, p.logTail())
		case <-ticker.C:
		}
	}
}

// exitError describes how a process ended; a clean exit is an error too when it was
// expected to keep running.
func exitError(waitErr error) error {
	if waitErr == nil {
		return errors.New("exit status 0")
	}
	return waitErr
}

// FreePorts returns n distinct TCP ports on 127.0.0.1 that were free a moment ago. They are
// held open together while chosen so that the kernel cannot hand out the same one twice.
func FreePorts(n int) ([]int, error) {
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("find a free port: %w", err)
		}
		defer l.Close()
		addr, ok := l.Addr().(*net.TCPAddr)
		if !ok {
			return nil, fmt.Errorf("listener address %v is not TCP", l.Addr())
		}
		ports = append(ports, addr.Port)
	}
	return ports, nil
}
