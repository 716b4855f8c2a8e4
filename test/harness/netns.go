package harness

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"syscall"
	"time"
)

const (
	// isolatedEnv marks the re-executed child. Its value is the parent's network namespace, so
	// a child that inherited the marker without getting a new namespace notices and refuses.
	isolatedEnv = "SHOAL_HARNESS_ISOLATED_FROM"
	// RequireIsolationEnv names the variable that, when "1" (CI sets it), turns "cannot
	// isolate" into a failure instead of a skip.
	RequireIsolationEnv = "SHOAL_E2E"
)

// ErrIsolationUnavailable is returned by RunIsolated when this process cannot create a
// network namespace (not root, or unshare missing).
var ErrIsolationUnavailable = errors.New("network isolation unavailable")

type isolateOptions struct {
	before []func(ctx context.Context, tmpDir string) ([]string, error)
}

// IsolateOption tunes RunIsolated and IsolateNetwork.
type IsolateOption func(*isolateOptions)

// BeforeIsolation runs fn in the parent, outside the namespace, before re-executing, so it
// may still use the network (for example `go build`, which can need the module proxy). fn gets
// a temporary directory that lives until the child exits, and returns environment variables
// ("KEY=value") to pass to the child.
func BeforeIsolation(fn func(ctx context.Context, tmpDir string) (env []string, err error)) IsolateOption {
	return func(o *isolateOptions) { o.before = append(o.before, fn) }
}

// InIsolatedNetwork reports whether this process is the child that RunIsolated started in a
// fresh network namespace.
func InIsolatedNetwork() bool { return os.Getenv(isolatedEnv) != "" }

// RunIsolated runs main in a network namespace of its own with only loopback up, so nothing
// main does can reach beyond this machine's new, empty 127.0.0.1.
//
// It works by re-execution: called in the parent it runs the BeforeIsolation hooks, starts
// this same executable with the same arguments under `unshare --net`, waits for it and
// returns its exit code. Called in that child it brings lo up and returns main's result. A
// program calls it first thing and does nothing else in the parent.
func RunIsolated(main func() int, opts ...IsolateOption) (int, error) {
	if parent := os.Getenv(isolatedEnv); parent != "" {
		return runChild(parent, main)
	}
	var o isolateOptions
	for _, opt := range opts {
		opt(&o)
	}
	if err := canIsolate(); err != nil {
		return 0, err
	}
	self, err := os.Executable()
	if err != nil {
		return 0, fmt.Errorf("find own executable: %w", err)
	}
	netns, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		return 0, fmt.Errorf("read own network namespace: %w", err)
	}
	tmp, err := os.MkdirTemp("", "shoal-isolate-")
	if err != nil {
		return 0, fmt.Errorf("create temp dir: %w", err)
	}
	defer os.RemoveAll(tmp)

	env := append(ChildEnv(), isolatedEnv+"="+netns)
	for _, fn := range o.before {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		extra, err := fn(ctx, tmp)
		cancel()
		if err != nil {
			return 0, fmt.Errorf("before isolation: %w", err)
		}
		env = append(env, extra...)
	}

	cmd := exec.Command("unshare", append([]string{"--net", "--", self}, os.Args[1:]...)...)
	cmd.Env = env
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	// unshare execs self in place, so this is the child itself: it dies with us.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("run %s in a new network namespace: %w", self, err)
	}
	// Pass SIGINT and SIGTERM on rather than dying at once: the child then gets to stop its
	// processes and remove its directories.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	defer func() {
		signal.Stop(sigs)
		close(sigs) // ends the forwarder; Stop guarantees no further sends
	}()
	go func() {
		for s := range sigs {
			_ = cmd.Process.Signal(s)
		}
	}()
	err = cmd.Wait()
	var exitErr *exec.ExitError
	switch {
	case err == nil:
		return 0, nil
	case errors.As(err, &exitErr):
		if code := exitErr.ExitCode(); code >= 0 {
			return code, nil
		}
		return 1, fmt.Errorf("isolated child: %w", err) // killed by a signal
	default:
		return 0, fmt.Errorf("run %s in a new network namespace: %w", self, err)
	}
}

func canIsolate() error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("%w: needs root for `unshare --net` (running as uid %d)", ErrIsolationUnavailable, os.Geteuid())
	}
	if _, err := exec.LookPath("unshare"); err != nil {
		return fmt.Errorf("%w: unshare (util-linux) not found: %w", ErrIsolationUnavailable, err)
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return fmt.Errorf("%w: ip (iproute2) not found: %w", ErrIsolationUnavailable, err)
	}
	return nil
}

func runChild(parentNetns string, main func() int) (int, error) {
	netns, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		return 0, fmt.Errorf("read own network namespace: %w", err)
	}
	if netns == parentNetns {
		return 0, fmt.Errorf("%s is set but this process is still in network namespace %s: refusing to run un-isolated", isolatedEnv, netns)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
		return 0, fmt.Errorf("bring up lo in the new namespace: %w: %s", err, out)
	}
	return main(), nil
}

// M is the part of *testing.M that IsolateNetwork uses. The harness names it instead of
// importing the testing package because commands (hack/demo, hack/swarmbench) link the harness,
// and test-only code does not belong in them (internal/depcheck enforces it).
type M interface {
	Run() (code int)
}

// TB is the part of testing.TB that RequireIsolation uses; *testing.T and *testing.B have it.
type TB interface {
	Helper()
	Skip(args ...any)
	Fatal(args ...any)
}

// notIsolated is why IsolateNetwork ran the tests in this process's own network namespace;
// empty when it did not. It is written before m.Run and only read after.
var notIsolated string

// IsolateNetwork is RunIsolated for TestMain: it runs m's tests in a fresh network namespace
// and returns the exit code for os.Exit.
//
// When isolation is impossible here (not root, or unshare or ip missing) and SHOAL_E2E is not
// "1", it says why on stderr and runs the tests in this process all the same: each test that
// needs the namespace calls RequireIsolation first and is skipped with that reason, and the
// harness refuses to start registries, containerd or agents. With SHOAL_E2E=1 (CI, make e2e)
// not being able to isolate fails the package with the reason instead.
func IsolateNetwork(m M, opts ...IsolateOption) int {
	code, err := RunIsolated(m.Run, opts...)
	switch {
	case err == nil:
		return code
	case errors.Is(err, ErrIsolationUnavailable) && os.Getenv(RequireIsolationEnv) != "1":
		notIsolated = err.Error()
		fmt.Fprintf(os.Stderr, "harness: %v; the tests that need their own network namespace skip "+
			"(run as root with util-linux and iproute2; %s=1 makes this a failure)\n", err, RequireIsolationEnv)
		return m.Run()
	default:
		fmt.Fprintf(os.Stderr, "FAIL: %v\n", err)
		return 1
	}
}

// RequireIsolation skips the test unless it runs in the network namespace of IsolateNetwork,
// with the reason IsolateNetwork found; under SHOAL_E2E=1 it fails the test instead. Every
// test of a package whose TestMain calls IsolateNetwork and that starts processes, listens
// beyond loopback or builds a testbed calls it first thing.
func RequireIsolation(t TB) {
	t.Helper()
	requireIsolation(t, InIsolatedNetwork(), notIsolated, os.Getenv(RequireIsolationEnv) == "1")
}

func requireIsolation(t TB, isolated bool, reason string, required bool) {
	t.Helper()
	if isolated {
		return
	}
	if reason == "" {
		reason = "the test binary did not run under harness.IsolateNetwork (call it from TestMain)"
	}
	msg := "needs its own network namespace: " + reason
	if required {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// errNotIsolated is why the harness refuses to start a process: IsolateNetwork could not
// isolate this test binary, so a test that got this far forgot RequireIsolation.
func errNotIsolated() error {
	if notIsolated == "" {
		return nil
	}
	return fmt.Errorf("not in an isolated network namespace (%s): the test must call harness.RequireIsolation first", notIsolated)
}
