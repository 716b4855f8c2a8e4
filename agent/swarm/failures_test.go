package swarm

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/shoal-dev/shoal/agent/membership"
	"github.com/shoal-dev/shoal/agent/plan"
)

// fetchAll has nodes read blob d at once and fails the test unless each got content.
func fetchAll(t *testing.T, ctx context.Context, nodes []*testNode, d v1.Hash, content []byte) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, len(nodes))
	for _, node := range nodes {
		wg.Go(func() {
			got, err := readSource(ctx, node.swarm.Source("registry.test", "app", d))
			switch {
			case err != nil:
				errs <- fmt.Errorf("node %s: %w", node.addr, err)
			case !bytes.Equal(got, content):
				errs <- fmt.Errorf("node %s: wrong bytes", node.addr)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestRegistryIgnoringRangeCostsOneCopy has every node ask for a new blob from a registry that
// answers every ranged request with the whole blob: each node gets the right bytes, and the
// registry sends the blob about once (one member fetches it whole and the swarm trades it).
func TestRegistryIgnoringRangeCostsOneCopy(t *testing.T) {
	up := newMemUpstream()
	up.noRange.Store(true)
	content := randomBlob(t, 6<<20+4321)
	d := up.add(content)
	nodes := startNodes(t, 4, up)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	fetchAll(t, ctx, nodes, d, content)
	if sent := up.sent.Load(); float64(sent) > 1.1*float64(len(content)) {
		t.Errorf("the registry sent %d bytes for a %d byte blob fetched by %d nodes, want about one copy", sent, len(content), len(nodes))
	}
	var fromPeers int64
	for _, node := range nodes {
		fromPeers += node.swarm.stats().peerBytesRead
	}
	if fromPeers < 2*int64(len(content)) {
		t.Errorf("peers delivered %d bytes, want most of the blob to travel between peers", fromPeers)
	}
}

// wholeAskSetup is two nodes with a new blob from a registry that ignores Range, the blob
// opened on both, and which of them seeds its segment 0 and which asks for it.
type wholeAskSetup struct {
	up            *memUpstream
	content       []byte
	nodes         []*testNode
	blobs         []*blob
	seeder, asker int
}

func newWholeAskSetup(t *testing.T) *wholeAskSetup {
	t.Helper()
	w := &wholeAskSetup{up: newMemUpstream(), content: randomBlob(t, 3<<20+777)}
	w.up.noRange.Store(true)
	d := w.up.add(w.content)
	w.nodes = startNodes(t, 2, w.up)
	w.blobs = make([]*blob, len(w.nodes))
	for i, node := range w.nodes {
		b, err := node.swarm.blobFor(d, int64(len(w.content)), "registry.test", "app")
		if err != nil {
			t.Fatal(err)
		}
		w.blobs[i] = b
	}
	w.seeder, w.asker = 1, 0
	if w.nodes[0].swarm.seedersOf(w.blobs[0]).seeders[0] == w.nodes[0].addr {
		w.seeder, w.asker = 0, 1
	}
	return w
}

// TestWholeAskDuringRangedSeedCostsOneCopy has a member that knows the registry ignores Range
// ask segment 0's seeder for the whole blob while the seeder's own ranged fetch of the segment
// is still under way, and that fetch fails before the whole blob's bytes arrive. The seeder
// must answer once the whole blob is in: failing the ask with the ranged fetch's error would
// make the asker pass it over, and the next member would fetch the whole blob a second time.
func TestWholeAskDuringRangedSeedCostsOneCopy(t *testing.T) {
	w := newWholeAskSetup(t)
	up, content, nodes, blobs, seeder, asker := w.up, w.content, w.nodes, w.blobs, w.seeder, w.asker
	rangeArrived, rangeHeld := make(chan struct{}, 1), make(chan struct{})
	wholeArrived, wholeHeld := make(chan struct{}, 1), make(chan struct{})
	up.hold = func(ranged bool) {
		if ranged {
			rangeArrived <- struct{}{}
			<-rangeHeld
			return
		}
		wholeArrived <- struct{}{}
		<-wholeHeld
	}
	releaseRange := sync.OnceFunc(func() { close(rangeHeld) })
	releaseWhole := sync.OnceFunc(func() { close(wholeHeld) })
	t.Cleanup(releaseWhole) // before the nodes close, which waits for their fetches
	t.Cleanup(releaseRange)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	wait := func(c <-chan struct{}, what string) {
		t.Helper()
		select {
		case <-c:
		case <-ctx.Done():
			t.Fatalf("%s never happened", what)
		}
	}

	seeded := make(chan error, 1)
	go func() {
		_, err := nodes[seeder].swarm.ensureSegment(ctx, blobs[seeder], 0)
		seeded <- err
	}()
	wait(rangeArrived, "the seeder's ranged fetch of segment 0")
	asked := make(chan error, 1)
	go func() {
		_, err := nodes[asker].swarm.requestSegment(ctx, nodes[seeder].addr, blobs[asker], 0, true)
		asked <- err
	}()
	wait(wholeArrived, "the seeder's fetch of the whole blob")
	releaseRange() // the ranged fetch now finds that the registry ignores Range
	for {
		if _, _, err := blobs[seeder].segs[0].state(); err != nil {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatal("the seeder's ranged fetch never failed")
		case <-time.After(5 * time.Millisecond):
		}
	}
	select {
	case err := <-asked:
		t.Fatalf("the ask for the whole blob ended before the whole blob came in: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	releaseWhole()

	if err := <-asked; err != nil {
		t.Errorf("asking the seeder for the whole blob: %v", err)
	}
	if err := <-seeded; err != nil {
		t.Errorf("the seeder's own wait for segment 0: %v", err)
	}
	if sent := up.sent.Load(); sent != int64(len(content)) {
		t.Errorf("the registry sent %d bytes for a %d byte blob, want one whole copy", sent, len(content))
	}
}

// TestWholeAskAnsweredWithARangedFailureIsAskedAgain has segment 0's seeder answer a member's
// first ask for the whole blob with the failure of a ranged fetch, as an agent of the previous
// release does when its ranged fetch of the segment ends after the ask came: the member asks
// it again and gets the segment from it, instead of passing it over and fetching the whole
// blob from the registry itself.
func TestWholeAskAnsweredWithARangedFailureIsAskedAgain(t *testing.T) {
	w := newWholeAskSetup(t)
	nodes, blobs, seeder, asker := w.nodes, w.blobs, w.seeder, w.asker
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	inner, _ := nodes[seeder].handler.Load().(http.Handler)
	var answered atomic.Bool
	mux := http.NewServeMux() // the type the handler slot holds
	mux.Handle("/", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == plan.SegmentPathV2 && r.URL.Query().Get("whole") != "" && answered.CompareAndSwap(false, true) {
			w.Header().Set(plan.ProtocolHeader, strconv.Itoa(plan.ProtocolVersion))
			_ = json.NewEncoder(w).Encode(plan.Answer{
				Error: "seed segment 0: get bytes 0-262143: upstream ignores range requests",
				Code:  plan.CodeRangeUnsupported,
			})
			return
		}
		inner.ServeHTTP(w, r)
	}))
	nodes[seeder].handler.Store(http.Handler(mux))

	nodes[asker].swarm.setWhole(blobs[asker], "the test")
	if err := nodes[asker].swarm.acquire(ctx, blobs[asker], 0); err != nil {
		t.Fatalf("acquire segment 0: %v", err)
	}
	if !answered.Load() {
		t.Fatal("test setup: the seeder was never asked for the whole blob")
	}
	if blobs[asker].wholeHere.Load() {
		t.Error("the asker passed the seeder over and fetched the whole blob itself")
	}
	if got := testutil.ToFloat64(nodes[asker].swarm.metrics.seederFailures); got != 0 {
		t.Errorf("%v seeder failures counted, want none", got)
	}
}

// freeze replaces a node by a listener that never accepts: the kernel still completes TCP
// handshakes and nobody answers, as with a process stopped by SIGSTOP.
func freeze(t *testing.T, node *testNode) {
	t.Helper()
	_ = node.server.Close()
	_ = node.bt.Close()
	_ = node.swarm.Close()
	var l net.Listener
	var err error
	for range 50 { // the split listener lets go of the port asynchronously
		if l, err = net.Listen("tcp", node.addr.String()); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("re-listen on %s: %v", node.addr, err)
	}
	t.Cleanup(func() { _ = l.Close() })
}

// TestFrozenSeederIsPassedOver stops one of four nodes just before the others ask for a new blob
// (its segments are due from it): the others still get the blob, the frozen node's segments are
// seeded by the next members instead, and the registry still sends about one copy.
func TestFrozenSeederIsPassedOver(t *testing.T) {
	up := newMemUpstream()
	content := randomBlob(t, 8<<20)
	d := up.add(content)
	nodes := startNodes(t, 4, up)
	frozen := nodes[3]
	b, err := nodes[0].swarm.blobFor(d, int64(len(content)), "registry.test", "app")
	if err != nil {
		t.Fatal(err)
	}
	seeds := 0
	for _, a := range nodes[0].swarm.seedersOf(b).seeders {
		if a == frozen.addr {
			seeds++
		}
	}
	if seeds == 0 {
		t.Fatal("test setup: the frozen node seeds no segment")
	}
	freeze(t, frozen)

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	fetchAll(t, ctx, nodes[:3], d, content)
	if sent := up.sent.Load(); float64(sent) > 1.2*float64(len(content)) {
		t.Errorf("the registry sent %d bytes for a %d byte blob, want at most 1.2 copies", sent, len(content))
	}
	var failures float64
	for _, node := range nodes[:3] {
		failures += testutil.ToFloat64(node.swarm.metrics.seederFailures)
	}
	if failures == 0 {
		t.Error("no seeder failure counted, yet the frozen node seeds segments")
	}
}

// TestAnnouncesEndWithTheirSegment checks that a node stops asking seeders for peers once it has
// its segments, including those whose pieces it read from upstream (which the torrent never
// completes by itself).
func TestAnnouncesEndWithTheirSegment(t *testing.T) {
	up := newMemUpstream()
	content := randomBlob(t, 4<<20)
	d := up.add(content)
	stores := []*heldBlobs{{d: d, data: content}, {d: d, data: content}, {d: d, data: content}}
	nodes := startNodesWith(t, 3, up, 1<<20, 256<<10, func(i int) LocalBlobs { return stores[i] })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var wg sync.WaitGroup
	for i, node := range nodes {
		wg.Go(func() {
			if got, err := deliver(ctx, node.swarm.Source("registry.test", "app", d), stores[i]); err != nil || !bytes.Equal(got, content) {
				t.Errorf("node %s: %d bytes, %v", node.addr, len(got), err)
			}
		})
	}
	wg.Wait()
	deadline := time.Now().Add(time.Minute)
	for _, node := range nodes {
		for node.swarm.announcing.Load() > 0 {
			if time.Now().After(deadline) {
				t.Fatalf("node %s: %d announce loops still running after the blob was delivered", node.addr, node.swarm.announcing.Load())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// TestSegmentRequestWithWrongSizeIsRefused asks a seeder for a segment of a blob with a size
// that is not the blob's: it refuses before creating any working file.
func TestSegmentRequestWithWrongSizeIsRefused(t *testing.T) {
	up := newMemUpstream()
	content := randomBlob(t, 1<<20)
	d := up.add(content)
	nodes := startNodes(t, 2, up)
	asker, seeder := nodes[0], nodes[1]
	for _, size := range []int64{int64(len(content)) + 1, 1 << 40} {
		req := plan.Request{Plan: plan.Plan{Digest: d, Size: size, SegmentSize: 1 << 20, PieceLength: 256 << 10,
			RampSegments: DefaultRampSegments}, Registry: "registry.test", Repository: "app", Peer: asker.addr}
		_, err := asker.swarm.requestSegmentV2(context.Background(), seeder.addr, req)
		var se *seederError
		if !errors.As(err, &se) || se.status != http.StatusConflict {
			t.Errorf("size %d: got %v, want a 409 answer", size, err)
		}
	}
	if _, err := os.Stat(filepath.Join(seeder.swarm.cfg.Dir, d.Hex)); !os.IsNotExist(err) {
		t.Errorf("the seeder created a working file for a request with a wrong size (stat: %v)", err)
	}
}

// actOld makes node behave as an agent of the previous release: it serves control protocol 1
// only, speaks it to every peer, and cuts every blob into segments of the segment size (its
// Config must have MinSegments < 0).
func actOld(node *testNode, peers []*testNode) {
	mux := http.NewServeMux()
	mux.Handle("GET "+membership.PingPath, node.swarm.Handler())
	mux.Handle("GET "+plan.SegmentPathV1, node.swarm.Handler())
	node.handler.Store(http.Handler(mux))
	for _, p := range peers {
		if p != node {
			node.swarm.protocols.Store(p.addr, 1)
		}
	}
}

// TestOldAndNewAgentsSwarm runs two agents of this release with one of the previous: where
// they cut a blob the same way they trade it (the new ones speak the old protocol with the old
// one, and count that), and where they do not, every node still gets the right bytes. The
// previous release trades pieces with the torrent client only, so all three do.
func TestOldAndNewAgentsSwarm(t *testing.T) {
	up := newMemUpstream()
	nodes := startNodesConfigured(t, 3, up, 1<<20, 256<<10, func(i int, cfg *Config) {
		cfg.DataPath = DataPathTorrent
		if i == 2 {
			cfg.MinSegments = -1
		}
	})
	old := nodes[2]
	actOld(old, nodes)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	large := randomBlob(t, 20<<20) // 24 segments: both releases cut it the same way
	d := up.add(large)
	fetchAll(t, ctx, nodes, d, large)
	if sent := up.sent.Load(); float64(sent) > 1.1*float64(len(large)) {
		t.Errorf("the registry sent %d bytes for a %d byte blob cut the same way by both releases, want about one copy", sent, len(large))
	}
	var fallbacks float64
	for _, node := range nodes[:2] {
		fallbacks += testutil.ToFloat64(node.swarm.metrics.protocolFallbacks)
	}
	if fallbacks == 0 {
		t.Error("no fallback to the old protocol counted, yet the old agent seeds segments")
	}
	if got := old.swarm.stats().peerBytesRead; got == 0 {
		t.Error("the old agent received nothing from the new ones")
	}

	small := randomBlob(t, 3<<20) // the new release cuts it in twelve, the old one in four
	d = up.add(small)
	fetchAll(t, ctx, nodes, d, small)
}

// holdAnswers wraps node's control handler: the first held segment requests that want tells it
// to hold get their answer (headers included) only after hold, while the seeder works on them
// as usual; pings and other requests pass at once. It returns how many requests it held.
func holdAnswers(node *testNode, held int, hold time.Duration, want func(r *http.Request) bool) *atomic.Int64 {
	var n atomic.Int64
	inner, _ := node.handler.Load().(http.Handler)
	mux := http.NewServeMux() // the type the node's handler holds
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == plan.SegmentPathV2 && want(r) && n.Add(1) <= int64(held) {
			w = &lateWriter{ResponseWriter: w, until: time.Now().Add(hold), gone: r.Context().Done()}
		}
		inner.ServeHTTP(w, r)
	})
	node.handler.Store(http.Handler(mux))
	return &n
}

// lateWriter holds a response's first write (headers or body) until a moment, or until the
// asker has gone.
type lateWriter struct {
	http.ResponseWriter
	until time.Time
	gone  <-chan struct{}
	once  sync.Once
}

func (l *lateWriter) wait() {
	l.once.Do(func() {
		select {
		case <-time.After(time.Until(l.until)):
		case <-l.gone:
		}
	})
}

func (l *lateWriter) WriteHeader(code int) {
	l.wait()
	l.ResponseWriter.WriteHeader(code)
}

func (l *lateWriter) Write(p []byte) (int, error) {
	l.wait()
	return l.ResponseWriter.Write(p)
}

func (l *lateWriter) Flush() {
	l.wait()
	if f, ok := l.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// TestBusySeederIsAskedAgain has a seeder whose answers to one segment's requests come after the
// asker's header timeout twice in a row (a packet of each lost on a saturated link, or a
// starved CPU), while it answers pings: the asker asks it again instead of seeding the segment
// itself, which would fetch it from upstream a second time (the seeder fetches it already).
func TestBusySeederIsAskedAgain(t *testing.T) {
	up := newMemUpstream()
	content := randomBlob(t, 8<<20)
	d := up.add(content)
	nodes := startNodes(t, 2, up)
	seeder, asker := nodes[0], nodes[1]
	b, err := asker.swarm.blobFor(d, int64(len(content)), "registry.test", "app")
	if err != nil {
		t.Fatal(err)
	}
	// The longest segment the seeder seeds: a second copy of it would show.
	k, longest := -1, int64(0)
	for i, a := range asker.swarm.seedersOf(b).seeders {
		if _, length := b.plan.Segment(i); a == seeder.addr && length > longest {
			k, longest = i, length
		}
	}
	if k < 0 {
		t.Fatal("test setup: the seeder seeds no segment")
	}
	held := holdAnswers(seeder, 2, controlHeaderTimeout+500*time.Millisecond, func(r *http.Request) bool {
		return r.URL.Query().Get("segment") == strconv.Itoa(k)
	})

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	fetchAll(t, ctx, nodes[1:], d, content)
	if held.Load() < 2 {
		t.Fatalf("test setup: %d requests for segment %d held, want 2", held.Load(), k)
	}
	if sent := up.sent.Load(); sent >= int64(len(content))+longest/2 {
		t.Errorf("the registry sent %d bytes for a %d byte blob: segment %d (%d bytes) came from it twice", sent, len(content), k, longest)
	}
	if busy := testutil.ToFloat64(asker.swarm.metrics.seederBusy); busy == 0 {
		t.Error("no busy retry counted")
	}
}

// TestSeederSilentOnEveryRequestIsLeft: a seeder that answers pings but never a segment request
// (wedged in its segment handling) is left after a bounded number of requests, and the asker
// gets the blob by seeding that segment itself.
func TestSeederSilentOnEveryRequestIsLeft(t *testing.T) {
	up := newMemUpstream()
	content := randomBlob(t, 4<<20)
	d := up.add(content)
	nodes := startNodes(t, 2, up)
	seeder, asker := nodes[0], nodes[1]
	held := holdAnswers(seeder, 1000, time.Hour, func(*http.Request) bool { return true })

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	fetchAll(t, ctx, nodes[1:], d, content)
	if held.Load() == 0 {
		t.Fatal("test setup: no segment request held")
	}
	if failures := testutil.ToFloat64(asker.swarm.metrics.seederFailures); failures == 0 {
		t.Error("no seeder failure counted")
	}
}
