package torrent

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// TestTorrentLogHandlerDemotesRoutineRecords: the client's slow-pass warnings and its errors
// for chunks refused by frozen pieces become debug records (dropped at info level), everything
// else passes unchanged, its records of failed storage reads included. The client's slow-pass
// warning needs a pass over its torrents that takes over 20 ms, which a test cannot provoke
// reliably, so this test gives the handler the records themselves; the frozen-piece error is
// provoked for real by TestLateChunksOfAFrozenPieceAreDemoted.
func TestTorrentLogHandlerDemotesRoutineRecords(t *testing.T) {
	for _, level := range []slog.Level{slog.LevelInfo, slog.LevelDebug} {
		var buf bytes.Buffer
		log := slog.New(torrentLogHandler{slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: level})}).With("component", "torrent")
		log.Error("initial read failed", "err", "unexpected EOF")
		log.Warn("client unlock handlers took a long time", "duration", "25ms")
		log.Error("a87d5398: *torrent.PeerConn 0x2055: writing received chunk 127: " + ErrFrozen.Error())
		log.Error("disk on fire")
		log.Warn("peer misbehaves")
		log.Info("connected")
		out := buf.String()
		if !strings.Contains(out, "level=ERROR msg=\"disk on fire\" component=torrent") || !strings.Contains(out, "msg=connected") ||
			!strings.Contains(out, "level=WARN msg=\"peer misbehaves\"") || !strings.Contains(out, "level=ERROR msg=\"initial read failed\"") {
			t.Errorf("level %v: other records changed or lost:\n%s", level, out)
		}
		routine := strings.Count(out, "took a long time") + strings.Count(out, "writing received chunk")
		switch {
		case level == slog.LevelInfo && routine != 0:
			t.Errorf("routine records logged at info level:\n%s", out)
		case level == slog.LevelDebug && (strings.Count(out, "level=DEBUG msg=\"client unlock handlers took a long time\"") != 1 ||
			strings.Count(out, "level=DEBUG msg=\"a87d5398: *torrent.PeerConn 0x2055: writing received chunk 127") != 1):
			t.Errorf("routine records not demoted to debug:\n%s", out)
		}
	}
}

// TestLateChunksOfAFrozenPieceAreDemoted: a node that reads slowly from a fast seeder has
// chunks of a piece already sent when the piece is frozen (its bytes come from upstream
// instead). They arrive, their writes are refused, and the client logs an error for each,
// which the adapter demotes to debug. The torrent goes on (the refusal is not a write error:
// the torrent is not dropped) and completes once the frozen pieces' bytes are written by the
// other path.
func TestLateChunksOfAFrozenPieceAreDemoted(t *testing.T) {
	seeder := newTestNode(t, "127.0.0.2")
	// The download limiter lets its first MiB through at once, then 256 KiB/s: the seeder's
	// answers wait in the socket.
	node := newTestNode(t, "127.0.0.3", func(c *Config) { c.MaxDownloadRate = 256 << 10 })
	blob := newTestBlob(6, 2<<20, 128<<10)
	seeder.seed(t, blob)
	tt, f := node.leech(t, blob)
	tt.AddPeers([]netip.AddrPort{seeder.addr})
	// frozenWrites counts the client's records of refused chunks at level or above.
	frozenWrites := func(level slog.Level) int {
		return len(node.logs.matching(func(r loggedRecord) bool {
			return r.level >= level && strings.HasSuffix(r.message, frozenWrite)
		}))
	}

	waitFor(t, "the limiter's burst to pass", func() bool { return node.Stats().PeerBytesRead >= 5<<18 })
	var frozen []int
	for frozenWrites(slog.LevelDebug) == 0 && len(frozen) < 4 {
		// The seeder has already sent the chunks asked for: they wait in the socket.
		var piece int
		waitFor(t, "a piece with requests outstanding", func() bool {
			piece = node.reqs.mostPending()
			return piece >= 0 && !tt.IsFrozen(piece)
		})
		tt.Freeze(piece, piece+1)
		frozen = append(frozen, piece)
		got := node.Stats().PeerBytesRead
		waitFor(t, "the chunks in flight", func() bool {
			return frozenWrites(slog.LevelDebug) > 0 || node.Stats().PeerBytesRead >= got+int64(node.cfg.RequestsPerConn)*testChunkSize
		})
	}
	if frozenWrites(slog.LevelDebug) == 0 {
		t.Fatalf("no chunk refused by a frozen piece logged, %d pieces frozen", len(frozen))
	}
	if n := frozenWrites(slog.LevelInfo); n != 0 {
		t.Errorf("%d of %d chunks refused by a frozen piece logged above debug level", n, frozenWrites(slog.LevelDebug))
	}
	got := node.Stats().PeerBytesRead
	waitFor(t, "more data from the seeder", func() bool { return node.Stats().PeerBytesRead > got })
	for _, piece := range frozen {
		if _, err := f.WriteAt(blob.piece(piece), int64(piece)*blob.pieceLength); err != nil {
			t.Fatal(err)
		}
		if !tt.CompleteIfHash(piece, blob.hashes(piece, piece+1)) {
			t.Fatalf("frozen piece %d not completed by its bytes", piece)
		}
	}
	waitComplete(t, tt, f, blob.data)
}

// TestReaderTimeoutsAreNotLogged: the swarm's reader makes reads time out on purpose to notice
// stalls. A read that times out is not logged by the client (v1.62.0 logs its readers' failures
// only when reading the storage fails), so the adapter demotes nothing for it.
func TestReaderTimeoutsAreNotLogged(t *testing.T) {
	node := newTestNode(t, "127.0.0.2")
	blob := newTestBlob(7, 1<<20, 64<<10)
	tt, _ := node.leech(t, blob)
	r := tt.NewReader(t.Context(), blob.pieceLength)
	defer r.Close()
	for range 3 {
		ctx, cancel := context.WithTimeout(t.Context(), 20*time.Millisecond)
		n, err := r.ReadContext(ctx, make([]byte, 100))
		cancel()
		if n != 0 || !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("read of a piece nobody has: %d bytes, %v; want a timeout", n, err)
		}
	}
	if logged := node.logs.matching(func(r loggedRecord) bool {
		return r.level >= slog.LevelWarn || strings.Contains(r.message, "read failed")
	}); len(logged) != 0 {
		t.Errorf("reads that timed out logged %v", logged)
	}
}
