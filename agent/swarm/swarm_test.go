package swarm

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/agent/membership"
	"github.com/shoal-dev/shoal/agent/peerport"
	"github.com/shoal-dev/shoal/agent/plan"
	"github.com/shoal-dev/shoal/agent/store"
	"github.com/shoal-dev/shoal/agent/upstream"
)

// memUpstream is an in-memory registry that serves byte ranges and counts what it sends.
type memUpstream struct {
	mu        sync.Mutex
	blobs     map[string][]byte
	sent      atomic.Int64
	rangeGets atomic.Int64
	down      atomic.Bool // every call fails
	// blobsDown makes blob reads fail while HeadBlob still answers, so that a fetch gets as far
	// as the swarm before upstream fails it.
	blobsDown atomic.Bool
	// noRange makes it a registry that ignores Range: a ranged request fails as the upstream
	// client fails it, and only a request for the whole blob succeeds.
	noRange atomic.Bool
	// hold, when set, is called before each blob request is answered, with whether it is for
	// a range: a test holds requests there.
	hold func(ranged bool)
}

func newMemUpstream() *memUpstream { return &memUpstream{blobs: map[string][]byte{}} }

func (u *memUpstream) add(b []byte) v1.Hash {
	sum := sha256.Sum256(b)
	d := v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(sum[:])}
	u.mu.Lock()
	u.blobs[d.Hex] = b
	u.mu.Unlock()
	return d
}

func (u *memUpstream) get(d v1.Hash) ([]byte, error) {
	if u.down.Load() {
		return nil, errUpstreamDown
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	b, ok := u.blobs[d.Hex]
	if !ok {
		return nil, fmt.Errorf("blob %s not found", d)
	}
	return b, nil
}

func (u *memUpstream) HeadBlob(_ context.Context, _, _ string, d v1.Hash) (int64, error) {
	b, err := u.get(d)
	return int64(len(b)), err
}

// errUpstreamDown is what memUpstream fails with when it is down.
var errUpstreamDown = errors.New("upstream down")

func (u *memUpstream) Blob(_ context.Context, _, _ string, d v1.Hash, offset, length int64) (io.ReadCloser, int64, error) {
	if u.blobsDown.Load() {
		return nil, 0, fmt.Errorf("get %s: %w", d, errUpstreamDown)
	}
	b, err := u.get(d)
	if err != nil {
		return nil, 0, err
	}
	if length < 0 {
		length = int64(len(b)) - offset
	}
	if u.noRange.Load() {
		ranged := offset > 0 || length != int64(len(b))
		if u.hold != nil {
			u.hold(ranged)
		}
		if ranged {
			return nil, 0, fmt.Errorf("get bytes %d-%d: %w", offset, offset+length-1, upstream.ErrRangeUnsupported)
		}
		u.sent.Add(int64(len(b)))
		return io.NopCloser(bytes.NewReader(b)), int64(len(b)), nil
	}
	if u.hold != nil {
		u.hold(offset > 0 || length != int64(len(b)))
	}
	u.rangeGets.Add(1)
	u.sent.Add(length)
	return io.NopCloser(bytes.NewReader(b[offset : offset+length])), int64(len(b)), nil
}

// testNode is one agent's swarm on 127.0.0.1.
type testNode struct {
	swarm   *Swarm
	members *membership.Probed
	server  *http.Server
	handler atomic.Value // http.Handler the server serves: the swarm's, unless a test swaps it
	bt      net.Listener
	addr    netip.AddrPort
}

// startNodes starts n swarms, node i on 127.0.0.(i+1) so that each has an address of its own
// (peers are admitted, and banned, by IP).
func startNodes(t testing.TB, n int, up Upstream, local ...func(i int) LocalBlobs) []*testNode {
	t.Helper()
	return startNodesWith(t, n, up, 1<<20, 256<<10, local...)
}

func startNodesWith(t testing.TB, n int, up Upstream, segmentSize, pieceLength int64, local ...func(i int) LocalBlobs) []*testNode {
	t.Helper()
	return startNodesConfigured(t, n, up, segmentSize, pieceLength, func(i int, cfg *Config) {
		if len(local) > 0 {
			cfg.Local = local[0](i)
		}
	})
}

// startNodesConfigured is startNodesWith with each node's Config adjusted by configure.
func startNodesConfigured(t testing.TB, n int, up Upstream, segmentSize, pieceLength int64, configure func(i int, cfg *Config)) []*testNode {
	t.Helper()
	var listeners []net.Listener
	var addrs []netip.AddrPort
	for i := range n {
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.%d:0", i+1))
		if err != nil {
			t.Fatal(err)
		}
		listeners = append(listeners, l)
		addrs = append(addrs, netip.MustParseAddrPort(l.Addr().String()))
	}
	var nodes []*testNode
	for i, l := range listeners {
		ctx, cancel := context.WithCancel(context.Background())
		members := membership.NewProbed(addrs[i], addrs, membership.WithProbeInterval(200*time.Millisecond))
		var probes sync.WaitGroup
		probes.Go(func() { _ = members.Run(ctx) })
		bt, control := peerport.Split(l, members.Allowed)
		cfg := Config{
			Dir:          t.TempDir(),
			Membership:   members,
			PeerListener: bt,
			Upstream:     up,
			SegmentSize:  segmentSize,
			PieceLength:  pieceLength,
			StallTimeout: 3 * time.Second,
		}
		cfg.DataPath = os.Getenv("SHOAL_SWARM_TEST_DATA_PATH")
		if os.Getenv("SHOAL_SWARM_TEST_LOG") != "" {
			cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("node", addrs[i])
		}
		configure(i, &cfg)
		sw, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		node := &testNode{swarm: sw, members: members, bt: bt, addr: addrs[i]}
		node.handler.Store(sw.Handler())
		node.server = &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if h, ok := node.handler.Load().(http.Handler); ok {
				h.ServeHTTP(w, r)
			}
		})}
		server := node.server
		go func() { _ = server.Serve(control) }()
		t.Cleanup(func() {
			cancel()
			probes.Wait()
			_ = server.Close()
			_ = sw.Close()
			_ = bt.Close()
			_ = control.Close()
		})
		nodes = append(nodes, node)
	}
	return nodes
}

func readSource(ctx context.Context, src store.Source) ([]byte, error) {
	rc, size, err := src(ctx)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err == nil && int64(len(b)) != size {
		err = fmt.Errorf("read %d bytes, size said %d", len(b), size)
	}
	return b, err
}

func randomBlob(t testing.TB, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestConcurrentColdFetchCostsOneUpstreamCopy has every node ask for the same new blob at once
// and checks that each gets the right bytes while upstream sends about one copy.
func TestConcurrentColdFetchCostsOneUpstreamCopy(t *testing.T) {
	up := newMemUpstream()
	content := randomBlob(t, 8<<20+12345)
	d := up.add(content)
	nodes := startNodes(t, 4, up)

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, len(nodes))
	for i, node := range nodes {
		wg.Go(func() {
			got, err := readSource(ctx, node.swarm.Source("registry.test", "app", d))
			if err != nil {
				errs <- fmt.Errorf("node %d: %w", i, err)
				return
			}
			if !bytes.Equal(got, content) {
				errs <- fmt.Errorf("node %d: wrong bytes", i)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// One copy, give or take a piece or segment read again by a reader that lost patience on a
	// machine loaded by the race detector: never one copy per node.
	p, err := plan.New(d, int64(len(content)), 1<<20, 256<<10, DefaultRampSegments, DefaultMinSegments)
	if err != nil {
		t.Fatal(err)
	}
	if sent := up.sent.Load(); sent > int64(len(content))+p.SegmentLength() {
		t.Errorf("upstream sent %d bytes for a %d byte blob fetched by %d nodes, want one copy and at most one segment (%d) more", sent, len(content), len(nodes), p.SegmentLength())
	}
	var fromPeers int64
	for _, node := range nodes {
		fromPeers += node.swarm.stats().peerBytesRead
	}
	if fromPeers < int64(len(content)) {
		t.Errorf("peers delivered %d bytes in total, want at least one blob's worth (%d)", fromPeers, len(content))
	}
}

// TestDeadSeederFallsBack stops one node before anyone asks: the segments it would seed move to
// the next member and everyone still gets the blob.
func TestDeadSeederFallsBack(t *testing.T) {
	up := newMemUpstream()
	content := randomBlob(t, 6<<20)
	d := up.add(content)
	nodes := startNodes(t, 3, up)
	dead := nodes[2]
	_ = dead.server.Close()
	_ = dead.swarm.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for i, node := range nodes[:2] {
		got, err := readSource(ctx, node.swarm.Source("registry.test", "app", d))
		if err != nil || !bytes.Equal(got, content) {
			t.Fatalf("node %d: %v (equal %v)", i, err, bytes.Equal(got, content))
		}
	}
	// The dead node's segments were seeded by the others once each: the registry sent one
	// copy, not one per node, and the second node got the blob from the first.
	if sent := up.sent.Load(); float64(sent) > 1.1*float64(len(content)) {
		t.Errorf("the registry sent %d bytes for a %d byte blob, want one copy", sent, len(content))
	}
	b := blobOf(nodes[0], d)
	deadSeeds := 0
	for _, m := range nodes[0].swarm.seedersOf(b).seeders {
		if m == dead.addr {
			deadSeeds++
		}
	}
	if deadSeeds == 0 {
		t.Fatal("test setup: the dead node seeds no segment")
	}
	if got := nodes[1].swarm.stats().peerBytesRead; got == 0 {
		t.Error("the second node received nothing from the first")
	}
}

// TestUpstreamDownFailsFast: a blob nobody has, whose registry answers HEAD but fails every
// read, fails with the registry's error: the seeders answer with it, and the reader's direct
// read fails the same way, without waiting for any of the swarm's timeouts (which would end the
// read with the context's deadline instead, well within InfoTimeout).
func TestUpstreamDownFailsFast(t *testing.T) {
	up := newMemUpstream()
	d := up.add(randomBlob(t, 4<<20))
	up.blobsDown.Store(true)
	nodes := startNodes(t, 3, up)
	ctx, cancel := context.WithTimeout(context.Background(), DefaultInfoTimeout/2)
	defer cancel()
	_, err := readSource(ctx, nodes[0].swarm.Source("registry.test", "app", d))
	if err == nil {
		t.Fatal("fetch succeeded with upstream down")
	}
	if !errors.Is(err, errUpstreamDown) {
		t.Fatalf("fetch failed with %v, want the registry's error (not a timeout of the swarm's)", err)
	}
}

// TestCorruptPeerIsBanned makes one node serve corrupted data for the segments it seeds: the
// others reject every such piece, ban its address, and still deliver the right bytes (reading
// those segments from upstream once the swarm stalls).
func TestCorruptPeerIsBanned(t *testing.T) {
	up := newMemUpstream()
	content := randomBlob(t, 6<<20)
	d := up.add(content)
	nodes := startNodes(t, 3, up)
	// The bad node is the seeder of segment 0; the two others fetch.
	p, err := plan.New(d, int64(len(content)), 1<<20, 256<<10, DefaultRampSegments, DefaultMinSegments)
	if err != nil {
		t.Fatal(err)
	}
	assignment := assignSeeders(p, nodes[0].members.Members())
	var bad *testNode
	var good []*testNode
	for _, node := range nodes {
		if assignment[0] == node.addr {
			bad = node
		} else {
			good = append(good, node)
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	b, err := bad.swarm.blobFor(d, int64(len(content)), "registry.test", "app")
	if err != nil {
		t.Fatal(err)
	}
	var corrupted int
	if !b.plan.SameCut(p) {
		t.Fatalf("test setup: the node cuts the blob as %v, the test as %v", b.plan, p)
	}
	for k := range b.segs {
		if bad.swarm.seedersOf(b).seeders[k] != bad.addr {
			continue
		}
		if _, err := bad.swarm.ensureSegment(ctx, b, k); err != nil {
			t.Fatal(err)
		}
		// Flip a byte in every piece of the seeded segment, behind the torrent's back.
		offset, length := b.plan.Segment(k)
		for off := offset; off < offset+length; off += b.plan.PieceLength {
			one := make([]byte, 1)
			if _, err := b.file.ReadAt(one, off); err != nil {
				t.Fatal(err)
			}
			one[0] ^= 0xff
			if _, err := b.file.WriteAt(one, off); err != nil {
				t.Fatal(err)
			}
		}
		corrupted++
	}
	if corrupted == 0 {
		t.Fatal("test setup: the bad node seeds no segment")
	}

	var wg sync.WaitGroup
	for _, node := range good {
		wg.Go(func() {
			got, err := readSource(ctx, node.swarm.Source("registry.test", "app", d))
			if err != nil || !bytes.Equal(got, content) {
				first := -1
				for i := range min(len(got), len(content)) {
					if got[i] != content[i] {
						first = i
						break
					}
				}
				t.Errorf("node %s: %v (got %d bytes, first difference at %d: % x, want % x)", node.addr, err, len(got), first, got[max(first, 0):max(first, 0)+8], content[max(first, 0):max(first, 0)+8])
			}
		})
	}
	wg.Wait()
	var failed int64
	banned := false
	for _, node := range good {
		failed += node.swarm.stats().piecesBad
		// Banned by the torrent client (the bad node sent all of a failed piece) or by the swarm
		// (it sent a block of a piece that later verified from other peers).
		banned = banned || node.swarm.client.IsBanned(bad.addr.Addr())
	}
	if failed == 0 {
		t.Error("no piece failed its hash check, yet the bad node served corrupted data")
	}
	if !banned {
		t.Errorf("the corrupting node %s was not banned", bad.addr.Addr())
	}
}

// TestSeedersWithinTheSeedSet: three of four nodes fetch a blob with themselves as its seed
// set; they get it, upstream sends about one copy, and the fourth node, though a member, is
// never asked to seed a segment of it: it has no record of the blob and wrote nothing.
func TestSeedersWithinTheSeedSet(t *testing.T) {
	up := newMemUpstream()
	content := randomBlob(t, 8<<20+777)
	d := up.add(content)
	nodes := startNodes(t, 4, up)
	within := []netip.AddrPort{nodes[0].addr, nodes[1].addr, nodes[2].addr}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, 3)
	for i, node := range nodes[:3] {
		wg.Go(func() {
			got, err := readSource(ctx, node.swarm.SourceWithin("registry.test", "app", d, within))
			switch {
			case err != nil:
				errs <- fmt.Errorf("node %d: %w", i, err)
			case !bytes.Equal(got, content):
				errs <- fmt.Errorf("node %d: wrong bytes", i)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	outside := nodes[3].swarm
	outside.mu.Lock()
	_, known := outside.blobs[d.Hex]
	outside.mu.Unlock()
	if known || outside.stats().bytesWritten != 0 {
		t.Errorf("the node outside the seed set took part: blob known %v, %d bytes written", known, outside.stats().bytesWritten)
	}
	p, err := plan.New(d, int64(len(content)), 1<<20, 256<<10, DefaultRampSegments, DefaultMinSegments)
	if err != nil {
		t.Fatal(err)
	}
	if sent := up.sent.Load(); sent > int64(len(content))+p.SegmentLength() {
		t.Errorf("upstream sent %d bytes for a %d byte blob, want about one copy", sent, len(content))
	}
}
