package e2e

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/test/harness"
)

// Metric names and labels the agent exposes (see the interface).
const (
	mirrorRequests = "shoal_mirror_requests_total"
	mirrorBytes    = "shoal_mirror_bytes_total"
	storeHits      = "shoal_store_hits_total"
	storeMisses    = "shoal_store_misses_total"
)

var (
	blobFromUpstream = map[string]string{"kind": "blob", "source": "upstream", "result": "ok"}
	blobFromLocal    = map[string]string{"kind": "blob", "source": "local", "result": "ok"}
	bytesUpstream    = map[string]string{"source": "upstream"}
	bytesLocal       = map[string]string{"source": "local"}
)

// TestPullThroughMirror is the main story: containerd pulls a multi-layer image and a
// multi-platform index through the agent (each blob leaves the registry once, fetched by the
// agent); after the images are removed from containerd, pulling them again costs the
// registry no blob request at all, everything coming from the agent's store.
func TestPullThroughMirror(t *testing.T) {
	harness.RequireIsolation(t)
	e := newEnv(t)
	agent := e.startAgent(e.agentConfig())
	hosts := harness.HostsFile(e.hostsDir, registryName)
	written, err := os.ReadFile(hosts)
	if err != nil {
		t.Fatalf("agent did not write %s: %v", hosts, err)
	}
	if !strings.Contains(string(written), agent.MirrorAddr()) {
		t.Fatalf("%s does not name the mirror %s:\n%s", hosts, agent.MirrorAddr(), written)
	}

	img := e.pushImage("test/app:v1")
	arm64 := v1.Platform{OS: "linux", Architecture: "arm64"}
	idx, err := harness.PushIndex(e.ctx, e.reg.Host(), "test/multi:v1",
		harness.ImageSpec{Layers: 2, LayerSize: 2 << 20}, harness.HostPlatform(), arm64)
	if err != nil {
		t.Fatal(err)
	}
	native := idx.Images[harness.HostPlatform().String()]
	foreign := idx.Images[arm64.String()]
	blobs := append(img.Blobs(), native.Blobs()...)
	blobBytes := img.BlobBytes() + native.BlobBytes()

	ctd := e.startContainerd("containerd-1")
	e.pull(ctd, img.Name(registryName))
	e.pull(ctd, idx.Name(registryName))

	direct, viaAgent := e.blobGETs()
	for _, b := range blobs {
		if viaAgent[b] != 1 {
			t.Errorf("cold pull: the agent fetched blob %s from the registry %d times, want 1", b, viaAgent[b])
		}
		if direct[b] != 0 {
			t.Errorf("cold pull: containerd fetched blob %s from the registry itself %d times, want 0 (it fell back instead of using the mirror)", b, direct[b])
		}
	}
	if n := sum(viaAgent, foreign.Blobs()) + sum(direct, foreign.Blobs()); n != 0 {
		t.Errorf("cold pull: %d registry GETs for blobs of the %s image, which containerd does not need", n, arm64)
	}
	cold := e.metrics(agent)
	if got := cold.Value(mirrorRequests, blobFromUpstream); got < float64(len(blobs)) {
		t.Errorf("cold pull: %s = %v, want >= %d", series(mirrorRequests, blobFromUpstream), got, len(blobs))
	}
	if got := cold.Value(mirrorBytes, bytesUpstream); got < float64(blobBytes) {
		t.Errorf("cold pull: %s = %v, want >= %d (the blobs' size)", series(mirrorBytes, bytesUpstream), got, blobBytes)
	}
	if got := cold.Value(storeMisses, nil); got == 0 {
		t.Errorf("cold pull: %s = 0, want misses", storeMisses)
	}

	e.remove(ctd, img.Name(registryName), img.Blobs())
	e.remove(ctd, idx.Name(registryName), native.Blobs())
	e.pull(ctd, img.Name(registryName))
	e.pull(ctd, idx.Name(registryName))

	direct2, viaAgent2 := e.blobGETs()
	if n := sum(direct2, blobs) + sum(viaAgent2, blobs) - sum(direct, blobs) - sum(viaAgent, blobs); n != 0 {
		t.Errorf("warm pull: %d new blob GETs at the registry, want 0", n)
	}
	warm := e.metrics(agent)
	if got := warm.Value(mirrorRequests, blobFromLocal) - cold.Value(mirrorRequests, blobFromLocal); got < float64(len(blobs)) {
		t.Errorf("warm pull: %s grew by %v, want >= %d", series(mirrorRequests, blobFromLocal), got, len(blobs))
	}
	if got := warm.Value(mirrorRequests, blobFromUpstream) - cold.Value(mirrorRequests, blobFromUpstream); got != 0 {
		t.Errorf("warm pull: %s grew by %v, want 0", series(mirrorRequests, blobFromUpstream), got)
	}
	if got := warm.Value(mirrorBytes, bytesLocal) - cold.Value(mirrorBytes, bytesLocal); got < float64(blobBytes) {
		t.Errorf("warm pull: %s grew by %v, want >= %d", series(mirrorBytes, bytesLocal), got, blobBytes)
	}
	if got := warm.Value(storeHits, nil) - cold.Value(storeHits, nil); got == 0 {
		t.Errorf("warm pull: %s did not grow", storeHits)
	}
}

// TestFallbackWhenAgentKilled: with the agent dead (SIGKILL, so it could not tidy up),
// containerd still pulls a new image, from the registry listed after the mirror in hosts.toml.
func TestFallbackWhenAgentKilled(t *testing.T) {
	harness.RequireIsolation(t)
	e := newEnv(t)
	agent := e.startAgent(e.agentConfig())
	ctd := e.startContainerd("containerd")
	if err := agent.Kill(); err != nil {
		t.Fatal(err)
	}
	hosts := harness.HostsFile(e.hostsDir, registryName)
	if data, err := os.ReadFile(hosts); err != nil || !strings.Contains(string(data), agent.MirrorAddr()) {
		t.Fatalf("after SIGKILL %s should still name the dead mirror %s (err %v):\n%s", hosts, agent.MirrorAddr(), err, data)
	}

	img := e.pushImage("test/fallback:v1")
	e.pull(ctd, img.Name(registryName))

	direct, viaAgent := e.blobGETs()
	for _, b := range img.Blobs() {
		if direct[b] != 1 || viaAgent[b] != 0 {
			t.Errorf("blob %s: %d GETs by containerd and %d by others, want 1 and 0", b, direct[b], viaAgent[b])
		}
	}
}

// TestRestartKeepsStoreWarm: an agent restarted on the same data directory, after a clean
// stop or a crash, serves what it fetched before from its store: a fresh containerd pulls
// the image without a single blob request reaching the registry.
func TestRestartKeepsStoreWarm(t *testing.T) {
	harness.RequireIsolation(t)
	tests := []struct {
		name string
		down func(*testEnv, *harness.Agent) error
	}{
		{"after SIGTERM", func(e *testEnv, a *harness.Agent) error { return a.Stop(e.ctx) }},
		{"after SIGKILL", func(_ *testEnv, a *harness.Agent) error { return a.Kill() }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			agent := e.startAgent(e.agentConfig())
			img := e.pushImage("test/restart:v1")
			e.pull(e.startContainerd("containerd-1"), img.Name(registryName))
			_, before := e.blobGETs()
			if got := sum(before, img.Blobs()); got != len(img.Blobs()) {
				t.Fatalf("cold pull: the agent made %d blob GETs, want %d (one per blob)", got, len(img.Blobs()))
			}

			if err := tt.down(e, agent); err != nil {
				t.Fatal(err)
			}
			if err := agent.Restart(e.ctx); err != nil {
				t.Fatal(err)
			}
			e.pull(e.startContainerd("containerd-2"), img.Name(registryName))

			direct, after := e.blobGETs()
			if n := sum(after, img.Blobs()) - sum(before, img.Blobs()) + sum(direct, img.Blobs()); n != 0 {
				t.Errorf("pull after restart: %d new blob GETs at the registry, want 0", n)
			}
			m := e.metrics(agent)
			if got := m.Value(mirrorRequests, blobFromLocal); got < float64(len(img.Blobs())) {
				t.Errorf("pull after restart: %s = %v, want >= %d", series(mirrorRequests, blobFromLocal), got, len(img.Blobs()))
			}
		})
	}
}

// TestCleanup: `shoal cleanup` removes the hosts.toml the agent created and leaves a user's
// hosts.toml for another registry byte for byte as it was.
func TestCleanup(t *testing.T) {
	harness.RequireIsolation(t)
	e := newEnv(t)
	userFile, err := harness.WriteDirectHosts(e.hostsDir, "other.test", e.reg.URL())
	if err != nil {
		t.Fatal(err)
	}
	userBytes := mustRead(t, userFile)

	agent := e.startAgent(e.agentConfig())
	ours := harness.HostsFile(e.hostsDir, registryName)
	mustRead(t, ours) // written at start
	// SIGKILL: cleanup must work when the agent had no chance to tidy up (uninstall, crash).
	if err := agent.Kill(); err != nil {
		t.Fatal(err)
	}

	for i := range 2 { // twice: cleanup is idempotent
		if _, err := harness.RunShoal(e.ctx, shoalBinary(t), "cleanup", "--containerd-hosts-dir", e.hostsDir); err != nil {
			t.Fatalf("cleanup run %d: %v", i+1, err)
		}
		if _, err := os.Stat(ours); !os.IsNotExist(err) {
			t.Errorf("cleanup run %d: %s still exists (stat error %v)", i+1, ours, err)
		}
		if got := mustRead(t, userFile); !bytes.Equal(got, userBytes) {
			t.Errorf("cleanup run %d changed the user's %s:\n%s\nwant:\n%s", i+1, userFile, got, userBytes)
		}
	}
}

// TestUserHostsMergedAndRestored: a user's own hosts.toml for a mirrored registry is kept:
// the agent, given no --registry-endpoint, takes its upstream from that file's server, puts
// the mirror in front, pulls go through the mirror, and `shoal cleanup` restores the user's
// file byte for byte, after which pulls go straight to the registry again.
func TestUserHostsMergedAndRestored(t *testing.T) {
	harness.RequireIsolation(t)
	e := newEnv(t)
	userFile, err := harness.WriteDirectHosts(e.hostsDir, registryName, e.reg.URL())
	if err != nil {
		t.Fatal(err)
	}
	userBytes := mustRead(t, userFile)

	cfg := e.agentConfig()
	cfg.RegistryEndpoints = nil
	agent := e.startAgent(cfg)
	if merged := mustRead(t, userFile); !strings.Contains(string(merged), agent.MirrorAddr()) {
		t.Fatalf("the agent did not add the mirror %s to the user's %s:\n%s", agent.MirrorAddr(), userFile, merged)
	}

	ctd := e.startContainerd("containerd")
	img := e.pushImage("test/merged:v1")
	e.pull(ctd, img.Name(registryName))
	direct, viaAgent := e.blobGETs()
	for _, b := range img.Blobs() {
		if direct[b] != 0 || viaAgent[b] != 1 {
			t.Errorf("pull through the merged hosts.toml, blob %s: %d GETs by containerd and %d by the agent, want 0 and 1", b, direct[b], viaAgent[b])
		}
	}

	if err := agent.Kill(); err != nil {
		t.Fatal(err)
	}
	if _, err := harness.RunShoal(e.ctx, shoalBinary(t), "cleanup", "--containerd-hosts-dir", e.hostsDir); err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, userFile); !bytes.Equal(got, userBytes) {
		t.Fatalf("cleanup did not restore the user's %s:\n%s\nwant:\n%s", userFile, got, userBytes)
	}
	leftovers, err := filepath.Glob(filepath.Join(e.hostsDir, registryName, "*"))
	if err != nil || len(leftovers) != 1 {
		t.Errorf("after cleanup %s holds %v (err %v), want only hosts.toml", filepath.Dir(userFile), leftovers, err)
	}

	after := e.pushImage("test/after-cleanup:v1")
	e.pull(ctd, after.Name(registryName))
	direct, _ = e.blobGETs()
	for _, b := range after.Blobs() {
		if direct[b] != 1 {
			t.Errorf("pull after cleanup, blob %s: %d GETs by containerd, want 1", b, direct[b])
		}
	}
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// series formats a metric selector for messages, e.g. name{kind="blob",source="local"}.
func series(name string, labels map[string]string) string {
	keys := make([]string, 0, len(labels))
	for k := range labels {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	pairs := make([]string, len(keys))
	for i, k := range keys {
		pairs[i] = fmt.Sprintf("%s=%q", k, labels[k])
	}
	return name + "{" + strings.Join(pairs, ",") + "}"
}
