package harness

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// ShoalBinaryEnv names the environment variable through which a prebuilt shoal binary is
// handed to the tests and the demo (BuildShoal's result, or one the caller built).
const ShoalBinaryEnv = "SHOAL_BINARY"

// BuildShoal builds ./cmd/shoal of the module in moduleDir into outDir and returns the
// binary's path. Run it before isolating the network: the build may need the module proxy.
func BuildShoal(ctx context.Context, moduleDir, outDir string) (string, error) {
	bin := filepath.Join(outDir, "shoal")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/shoal")
	cmd.Dir = moduleDir
	// Static, as released: the local cluster runs it from an image with no C library.
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/shoal in %s: %w\n%s", moduleDir, err, out)
	}
	return bin, nil
}

// BuildShoalFirst is a BeforeIsolation hook that builds ./cmd/shoal of the module around
// the working directory and hands its path to the isolated child in SHOAL_BINARY, unless
// SHOAL_BINARY is already set (then that binary is used as it is). ShoalBinary reads it.
func BuildShoalFirst() IsolateOption {
	return BeforeIsolation(func(ctx context.Context, tmpDir string) ([]string, error) {
		if os.Getenv(ShoalBinaryEnv) != "" {
			return nil, nil
		}
		mod, err := ModuleDir(ctx)
		if err != nil {
			return nil, err
		}
		bin, err := BuildShoal(ctx, mod, tmpDir)
		if err != nil {
			return nil, err
		}
		return []string{ShoalBinaryEnv + "=" + bin}, nil
	})
}

// ShoalBinary returns the shoal binary given by SHOAL_BINARY (see BuildShoalFirst).
func ShoalBinary() (string, error) {
	bin := os.Getenv(ShoalBinaryEnv)
	if bin == "" {
		return "", fmt.Errorf("%s is not set: build the agent before isolating (BuildShoalFirst) or point it at a shoal binary", ShoalBinaryEnv)
	}
	if _, err := os.Stat(bin); err != nil {
		return "", fmt.Errorf("%s: %w", ShoalBinaryEnv, err)
	}
	return bin, nil
}

// ModuleDir returns the directory of the Go module that contains the working directory.
func ModuleDir(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", errors.New("not inside a Go module: run from the shoal checkout")
	}
	return filepath.Dir(gomod), nil
}

// AgentConfig is what `shoal agent` is started with. Addresses are chosen by StartAgent.
type AgentConfig struct {
	Binary   string // the shoal executable
	DataDir  string // --data-dir; reuse it to restart on a warm store
	HostsDir string // --containerd-hosts-dir; "" writes no hosts.toml
	// MirrorRegistries are the registries to mirror (--mirror-registries), e.g. "registry.test".
	MirrorRegistries []string
	// RegistryEndpoints maps a registry name to its upstream URL (--registry-endpoint).
	RegistryEndpoints map[string]string
	CacheSize         string   // --cache-size; empty leaves the agent's default
	ExtraArgs         []string // appended as they are
	// LogDir receives agent-N.log, one per process started; default: DataDir's parent
	// (never DataDir itself, which belongs to the agent's store).
	LogDir string
	// MirrorAddr and MetricsAddr are --mirror-addr and --metrics-addr; "" picks a free port on
	// 127.0.0.1. The harness waits on /readyz at MetricsAddr, so it must be reachable from
	// here (see WithNetns: in another namespace, its loopback is not this one's).
	MirrorAddr  string
	MetricsAddr string
}

// Agent is a running `shoal agent`, listening on 127.0.0.1 unless its config says otherwise.
type Agent struct {
	cfg         AgentConfig
	logger      *slog.Logger
	netns       string // WithNetns, kept for restarts
	mirrorAddr  string
	metricsAddr string
	args        []string
	client      *http.Client

	mu       sync.Mutex
	proc     *process
	restarts int
}

// StartAgent starts the agent (on free loopback ports unless cfg names its addresses) and
// waits until /readyz answers 200.
func StartAgent(ctx context.Context, cfg AgentConfig, opts ...Option) (*Agent, error) {
	o := newOptions(cfg.Binary, opts)
	cfg.Binary = o.binary
	if cfg.Binary == "" {
		return nil, errors.New("start agent: no shoal binary given")
	}
	if cfg.LogDir == "" {
		cfg.LogDir = filepath.Dir(filepath.Clean(cfg.DataDir))
	}
	for _, d := range []string{cfg.DataDir, cfg.LogDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("create agent directory: %w", err)
		}
	}
	ports, err := FreePorts(2)
	if err != nil {
		return nil, err
	}
	a := &Agent{
		cfg:         cfg,
		logger:      o.logger,
		netns:       o.netns,
		mirrorAddr:  cmp.Or(cfg.MirrorAddr, fmt.Sprintf("127.0.0.1:%d", ports[0])),
		metricsAddr: cmp.Or(cfg.MetricsAddr, fmt.Sprintf("127.0.0.1:%d", ports[1])),
		client:      loopbackHTTPClient(),
	}
	if err := checkLoopback(a.metricsAddr); err != nil {
		return nil, fmt.Errorf("agent metrics address: %w", err)
	}
	a.args = a.buildArgs()
	if err := a.start(ctx); err != nil {
		return nil, err
	}
	return a, nil
}

func (a *Agent) buildArgs() []string {
	args := []string{"agent",
		"--mirror-addr", a.mirrorAddr,
		"--metrics-addr", a.metricsAddr,
		"--data-dir", a.cfg.DataDir,
		"--containerd-hosts-dir", a.cfg.HostsDir,
		"--log-level", "debug",
	}
	if a.cfg.CacheSize != "" {
		args = append(args, "--cache-size", a.cfg.CacheSize)
	}
	if len(a.cfg.MirrorRegistries) > 0 {
		args = append(args, "--mirror-registries", strings.Join(a.cfg.MirrorRegistries, ","))
	}
	registries := make([]string, 0, len(a.cfg.RegistryEndpoints))
	for r := range a.cfg.RegistryEndpoints {
		registries = append(registries, r)
	}
	sort.Strings(registries)
	for _, r := range registries {
		args = append(args, "--registry-endpoint", r+"="+a.cfg.RegistryEndpoints[r])
	}
	return append(args, a.cfg.ExtraArgs...)
}

// start runs a new agent process with the agent's arguments and waits until it is ready.
func (a *Agent) start(ctx context.Context) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	logPath := filepath.Join(a.cfg.LogDir, fmt.Sprintf("agent-%d.log", a.restarts))
	a.restarts++
	bin, args := inNetns(a.netns, a.cfg.Binary, a.args)
	proc, err := startProcess("shoal agent", logPath, "", a.logger, bin, args...)
	if err != nil {
		return err
	}
	if err := proc.waitReady(ctx, "/readyz answers 200", a.ready); err != nil {
		_ = proc.kill()
		return err
	}
	a.proc = proc
	return nil
}

func (a *Agent) ready(ctx context.Context) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+a.metricsAddr+"/readyz", nil)
	if err != nil {
		return err
	}
	resp, err := a.client.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("/readyz: %s", resp.Status)
	}
	return nil
}

// MirrorAddr is where containerd reaches the mirror, "127.0.0.1:PORT".
func (a *Agent) MirrorAddr() string { return a.mirrorAddr }

// MetricsAddr serves /metrics, /healthz and /readyz.
func (a *Agent) MetricsAddr() string { return a.metricsAddr }

// DataDir is the agent's --data-dir (its store and swarm files).
func (a *Agent) DataDir() string { return a.cfg.DataDir }

// Args are the command-line arguments the agent runs with (after the binary).
func (a *Agent) Args() []string { return append([]string(nil), a.args...) }

// LogPath is the log file of the current (latest) agent process.
func (a *Agent) LogPath() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.proc.logPath
}

// PID is the current agent process's id.
func (a *Agent) PID() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.proc.PID()
}

// Kill sends SIGKILL, as a crash or an OOM kill would, and waits for the process to die.
func (a *Agent) Kill() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.proc.kill()
}

// Freeze stops the agent with SIGSTOP: the kernel still completes TCP handshakes on its
// ports, and nothing answers, as with a process that is wedged, swapped out or paused by a
// debugger. Thaw (or Stop, Kill, Close) resumes it.
func (a *Agent) Freeze() error { return a.signal(syscall.SIGSTOP) }

// Thaw resumes a frozen agent with SIGCONT.
func (a *Agent) Thaw() error { return a.signal(syscall.SIGCONT) }

func (a *Agent) signal(sig syscall.Signal) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.proc.exited() {
		return fmt.Errorf("signal %v to the agent: pid %d has exited", sig, a.proc.PID())
	}
	if err := a.proc.cmd.Process.Signal(sig); err != nil {
		return fmt.Errorf("signal %v to the agent (pid %d): %w", sig, a.proc.PID(), err)
	}
	return nil
}

// Stop sends SIGTERM and waits for a clean exit (killing it after a grace period).
func (a *Agent) Stop(ctx context.Context) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.proc.stop(ctx)
}

// Restart starts the agent again, after Kill or Stop, with the same arguments: same data
// directory, same addresses (the hosts.toml containerd reads keeps pointing at it).
func (a *Agent) Restart(ctx context.Context) error {
	a.mu.Lock()
	running := !a.proc.exited()
	a.mu.Unlock()
	if running {
		return fmt.Errorf("restart agent: pid %d is still running; Stop or Kill it first", a.PID())
	}
	return a.start(ctx)
}

// Close stops the agent if it still runs.
func (a *Agent) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*stopGrace)
	defer cancel()
	return a.Stop(ctx)
}

// Metrics scrapes /metrics.
func (a *Agent) Metrics(ctx context.Context) (Metrics, error) {
	m, err := ScrapeMetrics(ctx, a.client, "http://"+a.metricsAddr+"/metrics")
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	return m, nil
}

// ScrapeMetrics reads a Prometheus /metrics endpoint at url with client.
func ScrapeMetrics(ctx context.Context, client *http.Client, url string) (Metrics, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	// Ask for the classic text format, the one TextParser reads.
	req.Header.Set("Accept", "text/plain; version=0.0.4")
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("scrape metrics: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("scrape metrics: %s", resp.Status)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("parse metrics: %w", err)
	}
	return Metrics(families), nil
}

// Metric scrapes /metrics and returns Metrics.Value(name, labels).
func (a *Agent) Metric(ctx context.Context, name string, labels map[string]string) (float64, error) {
	m, err := a.Metrics(ctx)
	if err != nil {
		return 0, err
	}
	return m.Value(name, labels), nil
}

// Metrics is one scrape of Prometheus metrics, by family name.
type Metrics map[string]*dto.MetricFamily

// Value sums the counters, gauges or untyped values of the series of family name whose
// labels include all of labels (nil matches every series). It is 0 when nothing matches,
// which is also what a counter that was never incremented reads as.
func (m Metrics) Value(name string, labels map[string]string) float64 {
	fam, ok := m[name]
	if !ok {
		return 0
	}
	var sum float64
	for _, s := range fam.GetMetric() {
		if !hasLabels(s, labels) {
			continue
		}
		switch {
		case s.Counter != nil:
			sum += s.Counter.GetValue()
		case s.Gauge != nil:
			sum += s.Gauge.GetValue()
		case s.Untyped != nil:
			sum += s.Untyped.GetValue()
		}
	}
	return sum
}

func hasLabels(s *dto.Metric, want map[string]string) bool {
	for k, v := range want {
		found := false
		for _, l := range s.GetLabel() {
			if l.GetName() == k && l.GetValue() == v {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// RunShoal runs the shoal binary with args (e.g. "cleanup", "--containerd-hosts-dir", dir)
// to completion and returns its combined output.
func RunShoal(ctx context.Context, binary string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, binary, args...)
	cmd.Env = ChildEnv()
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("shoal %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}
