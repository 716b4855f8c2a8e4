package swarm

import (
	"context"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/shoal-dev/shoal/agent/membership"
	"github.com/shoal-dev/shoal/agent/plan"
)

// addrsOf returns the nodes' addresses.
func addrsOf(nodes []*testNode) []netip.AddrPort {
	addrs := make([]netip.AddrPort, len(nodes))
	for i, node := range nodes {
		addrs[i] = node.addr
	}
	return addrs
}

// TestJoinDuringABlobMovesItsSegmentsOnce: a node joins while the others hold the state of a blob
// nobody has fetched yet. The others compute the blob's seeders again over the new members, so
// every node agrees on them: the new node seeds its share, nobody fetches that share a second
// time, and the registry still sends about one copy. The new node is refused before it joins
// and admitted after.
func TestJoinDuringABlobMovesItsSegmentsOnce(t *testing.T) {
	up := newMemUpstream()
	content := randomBlob(t, 8<<20)
	d := up.add(content)
	nodes := startNodes(t, 3, up)
	all, newcomer := addrsOf(nodes), nodes[2]
	for _, node := range nodes[:2] {
		node.members.SetPeers(all[:2]) // they do not know the newcomer yet; it knows them
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	ping := membership.NewPinger(newcomer.addr)
	if err := ping(ctx, nodes[0].addr); err == nil {
		t.Fatal("a node that is not a member yet was admitted")
	}
	var before []*assignment
	for _, node := range nodes[:2] {
		b, err := node.swarm.blobFor(d, int64(len(content)), "registry.test", "app")
		if err != nil {
			t.Fatal(err)
		}
		before = append(before, node.swarm.seedersOf(b))
	}
	if got := before[0].members; !slices.Equal(got, all[:2]) {
		t.Fatalf("test setup: the blob's seeders were computed over %v, want %v", got, all[:2])
	}

	for _, node := range nodes[:2] {
		node.members.SetPeers(all)
	}
	if err := ping(ctx, nodes[0].addr); err != nil {
		t.Fatalf("the node that joined is refused: %v", err)
	}
	p := blobOf(nodes[0], d).plan
	want := assignSeeders(p, all)
	if !slices.Contains(want, newcomer.addr) {
		t.Fatal("test setup: the newcomer seeds no segment")
	}
	fetchAll(t, ctx, nodes, d, content)
	for i, node := range nodes[:2] {
		if got := node.swarm.seedersOf(blobOf(node, d)); !slices.Equal(got.seeders, want) {
			t.Errorf("node %d: seeders %v after the join, want %v", i, got.seeders, want)
		}
	}
	// With seeders computed before the join, the newcomer's segments would come from upstream
	// twice: once to the newcomer, once to their earlier seeder.
	if sent := up.sent.Load(); sent > int64(len(content))+p.SegmentLength() {
		t.Errorf("the registry sent %d bytes for a %d byte blob, want one copy and at most one segment (%d) more", sent, len(content), p.SegmentLength())
	}
}

// TestPeersThatLeaveAreDisconnected: while a member that has left is still downloading from a
// node, the node's Run drops its connections.
func TestPeersThatLeaveAreDisconnected(t *testing.T) {
	const size = 4 << 20
	up := newMemUpstream()
	content := randomBlob(t, size)
	d := up.add(content)
	nodes := startNodesConfigured(t, 2, up, 1<<20, 256<<10, func(i int, cfg *Config) {
		if i == 0 {
			cfg.MaxUploadRate = 256 << 10 // node 1's download lasts seconds
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	runCtx, stop := context.WithCancel(ctx)
	ran := make(chan error, 1)
	go func() { ran <- nodes[0].swarm.Run(runCtx) }() // long running by the time node 1 leaves
	defer func() {
		stop()
		if err := <-ran; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	if _, err := readSource(ctx, nodes[0].swarm.Source("registry.test", "app", d)); err != nil {
		t.Fatal(err)
	}
	readCtx, stopReading := context.WithCancel(ctx)
	reading := make(chan struct{})
	go func() {
		defer close(reading)
		_, _ = readSource(readCtx, nodes[1].swarm.Source("registry.test", "app", d)) // cut short: its result says nothing
	}()
	defer func() {
		stopReading()
		<-reading
	}()
	b := blobOf(nodes[0], d)
	waitUntil(t, "node 1 downloading from node 0", func() bool { return b.t.Stats().PeerConns > 0 && nodes[1].swarm.stats().peerBytesRead > 0 })

	nodes[0].members.SetPeers([]netip.AddrPort{nodes[0].addr})
	leaver := blobOf(nodes[1], d)
	var complete bool
	waitUntil(t, "node 0 to drop its connection to node 1, which left", func() bool {
		complete = leaver.t.BytesCompleted() == size // the torrent client drops connections between complete peers
		return b.t.Stats().PeerConns == 0
	})
	if complete {
		t.Fatal("node 1 had the whole blob when its connection was dropped: the test shows nothing")
	}
}

// waitUntil waits for cond, failing t if it does not hold within a minute.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("waited a minute for %s", what)
		}
	}
}

// TestSegmentRequestsFromMembersThatLeftAreRefused: a member that left may still hold a control
// connection it made before; its segment requests are refused all the same.
func TestSegmentRequestsFromMembersThatLeftAreRefused(t *testing.T) {
	up := newMemUpstream()
	content := randomBlob(t, 1<<20)
	d := up.add(content)
	nodes := startNodes(t, 2, up)
	nodes[0].members.SetPeers(nil) // node 1 leaves
	p, err := plan.New(d, int64(len(content)), 1<<20, 256<<10, DefaultRampSegments, DefaultMinSegments)
	if err != nil {
		t.Fatal(err)
	}
	query := plan.Request{Plan: p, Registry: "registry.test", Repository: "app", Peer: nodes[1].addr}.Query()
	for _, path := range []string{plan.SegmentPathV1, plan.SegmentPathV2} {
		u := url.URL{Path: path, RawQuery: query.Encode()}
		r := httptest.NewRequest(http.MethodGet, u.String(), nil)
		r.RemoteAddr = nodes[1].addr.String()
		w := httptest.NewRecorder()
		nodes[0].swarm.Handler().ServeHTTP(w, r)
		if w.Code != http.StatusForbidden || !strings.Contains(w.Body.String(), "not a member") {
			t.Errorf("%s from a member that left: %d %q, want %d", path, w.Code, w.Body.String(), http.StatusForbidden)
		}
	}
	if blobOf(nodes[0], d) != nil {
		t.Error("a request from a member that left created the blob's state")
	}
}
