package torrent

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
)

// TestTorrentLogHandlerDemotesReaderRetries: the torrent readers' per-read errors and the
// client's slow-pass warnings become debug records (dropped at info level), everything else
// passes unchanged.
func TestTorrentLogHandlerDemotesReaderRetries(t *testing.T) {
	for _, level := range []slog.Level{slog.LevelInfo, slog.LevelDebug} {
		var buf bytes.Buffer
		log := slog.New(torrentLogHandler{slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: level})}).With("component", "torrent")
		log.Error("initial read failed", "err", "context deadline exceeded")
		log.Error("read failed after reader reset", "err", "context deadline exceeded")
		log.Warn("client unlock handlers took a long time", "duration", "25ms")
		log.Error("a87d5398: *torrent.PeerConn 0x2055: writing received chunk 127: " + ErrFrozen.Error())
		log.Error("disk on fire")
		log.Warn("peer misbehaves")
		log.Info("connected")
		out := buf.String()
		if !strings.Contains(out, "level=ERROR msg=\"disk on fire\" component=torrent") || !strings.Contains(out, "msg=connected") ||
			!strings.Contains(out, "level=WARN msg=\"peer misbehaves\"") {
			t.Errorf("level %v: other records changed or lost:\n%s", level, out)
		}
		routine := strings.Count(out, "read failed") + strings.Count(out, "took a long time") + strings.Count(out, "writing received chunk")
		switch {
		case level == slog.LevelInfo && routine != 0:
			t.Errorf("routine records logged at info level:\n%s", out)
		case level == slog.LevelDebug && (strings.Count(out, "level=DEBUG msg=\"initial read failed\"") != 1 ||
			strings.Count(out, "level=DEBUG msg=\"client unlock handlers took a long time\"") != 1 ||
			strings.Count(out, "level=DEBUG msg=\"a87d5398: *torrent.PeerConn 0x2055: writing received chunk 127") != 1):
			t.Errorf("routine records not demoted to debug:\n%s", out)
		}
	}
}
