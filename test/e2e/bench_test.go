package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/test/harness"
)

// benchEnv is a real registry holding one random blob of the given size.
type benchEnv struct {
	registry *harness.Registry
	digest   v1.Hash
	size     int64
	binary   string
	dir      string
}

func newBenchEnv(b *testing.B, size int64) *benchEnv {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	dir := b.TempDir()
	registry, err := harness.StartRegistry(ctx, filepath.Join(dir, "registry"))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = registry.Close() })

	digest, err := harness.PushBlob(ctx, registry.Host(), "bench/blob", size, 1)
	if err != nil {
		b.Fatal(err)
	}
	bin, err := harness.ShoalBinary()
	if err != nil {
		b.Fatal(err)
	}
	return &benchEnv{registry: registry, digest: digest, size: size, binary: bin, dir: dir}
}

// startAgent starts an agent with an empty store that mirrors registry.test to the bench registry.
func (e *benchEnv) startAgent(b *testing.B, run int) *harness.Agent {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	agent, err := harness.StartAgent(ctx, harness.AgentConfig{
		Binary:            e.binary,
		DataDir:           filepath.Join(e.dir, fmt.Sprintf("agent-%d", run), "data"),
		MirrorRegistries:  []string{"registry.test"},
		RegistryEndpoints: map[string]string{"registry.test": e.registry.URL()},
		ExtraArgs:         []string{"--containerd-config", ""},
	})
	if err != nil {
		b.Fatal(err)
	}
	return agent
}

func (e *benchEnv) mirrorURL(agent *harness.Agent) string {
	return "http://" + agent.MirrorAddr() + "/v2/bench/blob/blobs/" + e.digest.String() + "?ns=registry.test"
}

func (e *benchEnv) directURL() string {
	return e.registry.URL() + "/v2/bench/blob/blobs/" + e.digest.String()
}

// download GETs url and reads the whole body with a 1 MiB buffer, as containerd reads a layer.
func download(b *testing.B, url string, want int64) {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		b.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	n, err := io.CopyBuffer(io.Discard, struct{ io.Reader }{resp.Body}, make([]byte, 1<<20))
	if err != nil || n != want || resp.StatusCode != http.StatusOK {
		b.Fatalf("GET %s: status %d, %d of %d bytes: %v", url, resp.StatusCode, n, want, err)
	}
}

// BenchmarkColdPull compares fetching a 256 MiB blob through an agent whose store is empty
// (it fetches upstream, verifies, stores and streams at once) with fetching it straight from
// the registry. Agent start-up is not timed.
func BenchmarkColdPull(b *testing.B) {
	harness.RequireIsolation(b)
	env := newBenchEnv(b, 256<<20)
	b.Run("direct", func(b *testing.B) {
		b.SetBytes(env.size)
		for b.Loop() {
			download(b, env.directURL(), env.size)
		}
	})
	b.Run("mirror", func(b *testing.B) {
		b.SetBytes(env.size)
		run := 0
		for b.Loop() {
			b.StopTimer()
			run++
			// The previous run's 256 MiB still being written back would throttle this run's
			// writes: start each run with nothing dirty, as a node that pulls now and then does.
			syscall.Sync()
			agent := env.startAgent(b, run)
			b.StartTimer()
			download(b, env.mirrorURL(agent), env.size)
			b.StopTimer()
			_ = agent.Close()
			_ = os.RemoveAll(filepath.Join(env.dir, fmt.Sprintf("agent-%d", run)))
			b.StartTimer()
		}
	})
}

// BenchmarkAgentRSS reports the agent's peak resident memory (VmHWM) after it served a 1 GiB
// blob cold (streamed from upstream into its store) and then warm (from its store).
func BenchmarkAgentRSS(b *testing.B) {
	harness.RequireIsolation(b)
	env := newBenchEnv(b, 1<<30)
	var peak int64
	run := 0
	for b.Loop() {
		run++
		agent := env.startAgent(b, run)
		download(b, env.mirrorURL(agent), env.size) // cold
		download(b, env.mirrorURL(agent), env.size) // warm
		hwm, err := peakRSS(agent.PID())
		_ = agent.Close()
		if err != nil {
			b.Fatal(err)
		}
		peak = max(peak, hwm)
	}
	b.ReportMetric(float64(peak)/(1<<20), "peak-RSS-MiB")
}

// peakRSS reads VmHWM, the process's peak resident set size, in bytes.
func peakRSS(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	scanner := bufio.NewScanner(f)
	for scanner.Scan() {
		if rest, ok := strings.CutPrefix(scanner.Text(), "VmHWM:"); ok {
			kib, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return kib << 10, err
		}
	}
	return 0, fmt.Errorf("no VmHWM in /proc/%d/status", pid)
}
