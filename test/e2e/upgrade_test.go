package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/test/harness"
	"github.com/shoal-dev/shoal/test/testbed"
)

// previousRelease is the commit of the release before protocol 2 and the shorter segments of
// small blobs: the agents a rolling upgrade to this checkout runs side by side with.
const previousRelease = "372d087"

// upgradeSwarmArgs cut blobs into 1 MiB segments of 256 KiB pieces (--swarm-min-segments is
// this release's default, given to show that the previous release's binary is started without
// it): a blob of 16 MiB or more is cut the same way by both releases.
var upgradeSwarmArgs = []string{"--swarm-segment-size", "1Mi", "--swarm-piece-length", "256Ki", "--swarm-min-segments", "16"}

// TestUpgradeOldAndNewAgentsSwarm runs the previous release's agent binary on one node and this
// checkout's on two, each node pulling through its own containerd and CRI. An image whose layer
// both releases cut the same way is traded across the versions (the new agents speak protocol
// 1 with the old one, and count it): every pull goes through the agents and the registry sends
// about one copy. A layer they cut differently is still pulled everywhere: the agents refuse
// each other's segments and fetch them elsewhere, at a bounded cost upstream.
func TestUpgradeOldAndNewAgentsSwarm(t *testing.T) {
	harness.RequireIsolation(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute) // the first run builds the old agent
	defer cancel()
	oldBin := previousReleaseBinary(t, ctx)

	const nodes, oldNode = 3, 2
	tb, err := testbed.New(ctx, nodes, testbed.WithShoalBinary(shoalBinary(t)), testbed.WithContainerd())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = tb.Close() })
	agents := make([]*harness.Agent, nodes)
	for i, node := range tb.Nodes() {
		args := append(node.SwarmArgs(), upgradeSwarmArgs...)
		if i == oldNode {
			agents[i] = startPreviousReleaseAgent(t, ctx, tb, node, oldBin, args)
			continue
		}
		if agents[i], err = node.StartAgent(ctx, args...); err != nil {
			t.Fatal(err)
		}
	}
	waitForLiveMembers(t, ctx, agents)
	oldPeer := tb.Node(oldNode).P2PAddr()
	newAgents := slices.Delete(slices.Clone(agents), oldNode, oldNode+1)

	t.Run("same cut", func(t *testing.T) {
		// 24 MiB: 1 MiB segments after 4 short ones, for both releases.
		img := pushOneLayerImage(t, ctx, tb, "test/upgrade:same", 24<<20)
		layer := img.Layers[0]
		pullEverywhere(t, ctx, tb, img)
		sent := upstreamBytes(t, ctx, tb)[layer]
		size := img.Sizes[layer]
		t.Logf("layer of %d bytes: the registry sent %d bytes (%.2f copies) for %d nodes", size, sent, float64(sent)/float64(size), nodes)
		if float64(sent) > 1.2*float64(size) {
			t.Errorf("the registry sent %d bytes for a %d byte layer both releases cut alike; want about one copy (at most 1.2)", sent, size)
		}
		if direct := containerdGETs(t, ctx, tb)[layer]; direct != 0 {
			t.Errorf("containerd fetched the layer from the registry itself %d times: an agent failed its pull", direct)
		}
		// The old agent is the only one of its release: whatever it received from peers came
		// from new agents, whatever it sent went to them.
		for _, m := range []string{"shoal_swarm_peer_bytes_total", "shoal_swarm_uploaded_bytes_total"} {
			v, err := agents[oldNode].Metric(ctx, m, nil)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("old agent: %s = %.0f", m, v)
			if v == 0 {
				t.Errorf("old agent: %s = 0; it traded nothing with the new agents", m)
			}
		}
		for i, a := range newAgents {
			peer, err := a.Metric(ctx, "shoal_swarm_peer_bytes_total", nil)
			if err != nil {
				t.Fatal(err)
			}
			fallbacks, err := a.Metric(ctx, "shoal_swarm_protocol_fallbacks_total", nil)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("new agent %d: peer bytes %.0f, protocol fallbacks %.0f", i, peer, fallbacks)
			if peer == 0 {
				t.Errorf("new agent %d received nothing from peers", i)
			}
			// Once per peer that speaks protocol 1, and the old agent is the only one.
			if fallbacks != 1 {
				t.Errorf("new agent %d counted %.0f protocol fallbacks; want 1, for the old agent", i, fallbacks)
			}
			if n := countLogLines(t, a.LogPath(), func(l map[string]any) bool {
				return l["level"] == "WARN" && l["peer"] == oldPeer && l["protocol"] == 1.0
			}); n != 1 {
				t.Errorf("new agent %d logged %d protocol fallbacks to the old agent %s; want one line", i, n, oldPeer)
			}
		}
	})

	t.Run("different cut", func(t *testing.T) {
		// 12 MiB: this release cuts it into segments of 768 KiB after the short ones, the previous
		// one into segments of 1 MiB, so the releases cannot trade a segment of it.
		img := pushOneLayerImage(t, ctx, tb, "test/upgrade:different", 12<<20)
		layer := img.Layers[0]
		pullEverywhere(t, ctx, tb, img)
		sent := upstreamBytes(t, ctx, tb)[layer]
		size := img.Sizes[layer]
		t.Logf("layer of %d bytes: the registry sent %d bytes (%.2f copies) for %d nodes", size, sent, float64(sent)/float64(size), nodes)
		if sent > int64(nodes)*size {
			t.Errorf("the registry sent %d bytes for a %d byte layer pulled by %d nodes; want at most one copy per node", sent, size, nodes)
		}
		// The old agent asked new ones for segments of its own cut: they must have refused.
		refusals := 0
		for _, a := range newAgents {
			refusals += countLogLines(t, a.LogPath(), func(l map[string]any) bool {
				_, cut := l["min_segments"]
				return l["level"] == "WARN" && cut && l["peer"] == oldPeer && l["digest"] == layer.String()
			})
		}
		t.Logf("new agents refused %d segment requests of the old agent for the layer", refusals)
		if refusals == 0 {
			t.Error("no new agent refused a segment of the old agent's cut of the layer: was the layer cut alike?")
		}
	})
}

// previousReleaseBinary builds (once, then from the cache) the agent of previousRelease, or
// skips the test when this clone lacks that commit.
func previousReleaseBinary(t *testing.T, ctx context.Context) string {
	t.Helper()
	mod, err := harness.ModuleDir(ctx)
	if err != nil {
		t.Fatal(err)
	}
	cache, err := harness.CacheDir()
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	bin, err := harness.BuildShoalAt(ctx, mod, previousRelease, filepath.Join(cache, "old"))
	if errors.Is(err, harness.ErrCommitUnavailable) {
		t.Skipf("cannot build the previous release's agent to swarm with: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("previous release's agent %s ready in %s", bin, time.Since(start).Round(time.Millisecond))
	return bin
}

// startPreviousReleaseAgent starts oldBin in node as testbed.Node.StartAgent starts this
// release's agent, without the flags oldBin does not know.
func startPreviousReleaseAgent(t *testing.T, ctx context.Context, tb *testbed.Testbed, node *testbed.Node, oldBin string, args []string) *harness.Agent {
	t.Helper()
	args = append([]string{"--containerd-config", "", "--log-level", "info", "--log-format", "json"}, args...)
	kept, dropped, err := harness.AgentArgsFor(ctx, oldBin, args)
	if err != nil {
		t.Fatal(err)
	}
	// The previous release predates --swarm-min-segments, and knows every other flag given.
	if want := []string{"--swarm-min-segments", "16"}; !slices.Equal(dropped, want) {
		t.Fatalf("the previous release's agent lacks the flags %q; want exactly %q: is %s that release?", dropped, want, oldBin)
	}
	dir := filepath.Join(tb.Dir(), "old-"+node.Name())
	a, err := harness.StartAgent(ctx, harness.AgentConfig{
		Binary:            oldBin,
		DataDir:           filepath.Join(dir, "data"),
		LogDir:            dir,
		HostsDir:          node.HostsDir(),
		MirrorRegistries:  []string{testbed.RegistryName},
		RegistryEndpoints: map[string]string{testbed.RegistryName: tb.RegistryURL()},
		CacheSize:         "0",
		MirrorAddr:        testbed.MirrorAddr,
		MetricsAddr:       net.JoinHostPort(node.IP().String(), strconv.Itoa(testbed.MetricsPort)),
		ExtraArgs:         kept,
	}, harness.WithNetns(node.Netns()))
	if err != nil {
		t.Fatalf("node %s, previous release: %v", node.Name(), err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("old agent log %s:\n%s", a.LogPath(), tail(a.LogPath(), 40))
		}
		if err := a.Close(); err != nil {
			t.Logf("stop the old agent: %v", err)
		}
	})
	return a
}

// waitForLiveMembers waits until every agent sees all of them as live members, as
// testbed.WaitForSwarm does for agents the testbed started.
func waitForLiveMembers(t *testing.T, ctx context.Context, agents []*harness.Agent) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for i, a := range agents {
		for {
			live, err := a.Metric(ctx, "shoal_swarm_members", map[string]string{"state": "live"})
			if err == nil && int(live) == len(agents) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("agent %d sees %v live members of %d (%v)", i, live, len(agents), err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

func pushOneLayerImage(t *testing.T, ctx context.Context, tb *testbed.Testbed, repoTag string, size int64) *harness.Image {
	t.Helper()
	img, err := harness.PushImage(ctx, tb.RegistryHost(), repoTag, harness.ImageSpec{Layers: 1, LayerSize: size})
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// pullEverywhere pulls img through CRI on every node at once and fails the test unless every
// node's containerd then holds its blobs (containerd checks each blob's digest as it writes it).
func pullEverywhere(t *testing.T, ctx context.Context, tb *testbed.Testbed, img *harness.Image) {
	t.Helper()
	start := time.Now()
	var wg sync.WaitGroup
	for _, node := range tb.Nodes() {
		wg.Go(func() {
			if _, err := node.PullImage(ctx, img.Name(testbed.RegistryName)); err != nil {
				t.Errorf("node %s: %v", node.Name(), err)
			}
		})
	}
	wg.Wait()
	t.Logf("%d nodes pulled %s in %s", len(tb.Nodes()), img.Name(testbed.RegistryName), time.Since(start).Round(time.Millisecond))
	if t.Failed() {
		t.FailNow()
	}
	for _, node := range tb.Nodes() {
		for _, b := range img.Blobs() {
			if !node.Containerd().HasContent(b) {
				t.Errorf("node %s: containerd lacks blob %s after the pull", node.Name(), b)
			}
		}
	}
}

// containerdGETs counts the blob GETs containerd sent the registry itself, by digest.
func containerdGETs(t *testing.T, ctx context.Context, tb *testbed.Testbed) map[v1.Hash]int {
	t.Helper()
	if err := tb.Registry().Sync(ctx); err != nil {
		t.Fatal(err)
	}
	counts, err := tb.Registry().BlobGETsWhere(fromContainerd)
	if err != nil {
		t.Fatal(err)
	}
	return counts
}

// countLogLines counts the lines of a JSON log for which match is true.
func countLogLines(t *testing.T, path string, match func(map[string]any) bool) int {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n := 0
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var line map[string]any
		if json.Unmarshal(sc.Bytes(), &line) == nil && match(line) {
			n++
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}
