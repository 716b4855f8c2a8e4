package e2e

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/test/harness"
)

// registryName is the made-up name images are pulled by; only hosts.toml gives it a meaning.
const registryName = "registry.test"

// Bounds that keep a broken agent from hanging the run; they are never asserted on.
const (
	testTimeout = 4 * time.Minute
	pullTimeout = 2 * time.Minute
)

// testEnv is one scenario's world: a registry, a hosts directory that containerd instances
// read, and the agent and containerds started for it. Everything stops at test cleanup.
type testEnv struct {
	t        *testing.T
	ctx      context.Context
	dir      string
	reg      *harness.Registry
	hostsDir string
	logger   *slog.Logger
}

func newEnv(t *testing.T) *testEnv {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	t.Cleanup(cancel)
	e := &testEnv{t: t, ctx: ctx, dir: t.TempDir(), logger: slog.New(slog.NewTextHandler(t.Output(), nil))}
	e.hostsDir = filepath.Join(e.dir, "certs.d")
	reg, err := harness.StartRegistry(ctx, filepath.Join(e.dir, "registry"), harness.WithLogger(e.logger))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.closeOrLog("registry", reg.Close) })
	e.reg = reg
	return e
}

// agentConfig mirrors registry.test with the test registry as its upstream.
func (e *testEnv) agentConfig() harness.AgentConfig {
	return harness.AgentConfig{
		Binary:            shoalBinary(e.t),
		DataDir:           filepath.Join(e.dir, "agent", "data"),
		HostsDir:          e.hostsDir,
		MirrorRegistries:  []string{registryName},
		RegistryEndpoints: map[string]string{registryName: e.reg.URL()},
		CacheSize:         "1Gi",
	}
}

func (e *testEnv) startAgent(cfg harness.AgentConfig) *harness.Agent {
	e.t.Helper()
	a, err := harness.StartAgent(e.ctx, cfg, harness.WithLogger(e.logger))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() {
		if e.t.Failed() {
			e.t.Logf("agent log %s:\n%s", a.LogPath(), tail(a.LogPath(), 40))
		}
		e.closeOrLog("agent", a.Close)
	})
	return a
}

// startContainerd starts a fresh containerd (empty content store) reading e.hostsDir.
func (e *testEnv) startContainerd(name string) *harness.Containerd {
	e.t.Helper()
	c, err := harness.StartContainerd(e.ctx, filepath.Join(e.dir, name), e.hostsDir, harness.WithLogger(e.logger))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { e.closeOrLog(name, c.Close) })
	return c
}

func (e *testEnv) pushImage(repoTag string) *harness.Image {
	e.t.Helper()
	img, err := harness.PushImage(e.ctx, e.reg.Host(), repoTag, harness.ImageSpec{Layers: 3, LayerSize: 3 << 20})
	if err != nil {
		e.t.Fatal(err)
	}
	return img
}

// pull pulls ref through CRI and fails the test if it does not succeed.
func (e *testEnv) pull(c *harness.Containerd, ref string) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(e.ctx, pullTimeout)
	defer cancel()
	start := time.Now()
	if _, err := c.CRI().PullImage(ctx, ref); err != nil {
		e.t.Fatal(err)
	}
	e.t.Logf("pulled %s in %s", ref, time.Since(start).Round(time.Millisecond))
	if st, err := c.CRI().ImageStatus(ctx, ref); err != nil || st == nil {
		e.t.Fatalf("after pulling %s, CRI ImageStatus = %v, %v; want the image", ref, st, err)
	}
}

// remove removes ref through CRI and checks that containerd's content store dropped blobs,
// so that the next pull by this containerd must fetch them again.
func (e *testEnv) remove(c *harness.Containerd, ref string, blobs []v1.Hash) {
	e.t.Helper()
	if err := c.CRI().RemoveImage(e.ctx, ref); err != nil {
		e.t.Fatal(err)
	}
	for _, b := range blobs {
		if c.HasContent(b) {
			e.t.Fatalf("containerd still holds %s after CRI RemoveImage(%s): a re-pull would not reach the mirror", b, ref)
		}
	}
}

// blobGETs returns the registry's blob GET counts so far, by who asked: containerd itself
// (a direct pull, as in fallback) or someone else (the agent's upstream client).
func (e *testEnv) blobGETs() (byContainerd, byOthers map[v1.Hash]int) {
	e.t.Helper()
	if err := e.reg.Sync(e.ctx); err != nil {
		e.t.Fatal(err)
	}
	var err error
	if byContainerd, err = e.reg.BlobGETsWhere(fromContainerd); err != nil {
		e.t.Fatal(err)
	}
	if byOthers, err = e.reg.BlobGETsWhere(func(r harness.Request) bool { return !fromContainerd(r) }); err != nil {
		e.t.Fatal(err)
	}
	return byContainerd, byOthers
}

func fromContainerd(r harness.Request) bool { return strings.HasPrefix(r.UserAgent, "containerd/") }

func (e *testEnv) metrics(a *harness.Agent) harness.Metrics {
	e.t.Helper()
	m, err := a.Metrics(e.ctx)
	if err != nil {
		e.t.Fatal(err)
	}
	return m
}

func (e *testEnv) closeOrLog(what string, closeFn func() error) {
	if err := closeFn(); err != nil {
		e.t.Logf("stop %s: %v", what, err)
	}
}

// sum adds up counts for the given digests.
func sum(counts map[v1.Hash]int, digests []v1.Hash) int {
	n := 0
	for _, d := range digests {
		n += counts[d]
	}
	return n
}

func tail(path string, lines int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(%v)", err)
	}
	all := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}
