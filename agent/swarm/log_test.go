package swarm

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
)

// TestTorrentLogHandlerDemotesReaderRetries: the torrent readers' per-read errors become debug
// records (dropped at info level), everything else passes unchanged.
func TestTorrentLogHandlerDemotesReaderRetries(t *testing.T) {
	for _, level := range []slog.Level{slog.LevelInfo, slog.LevelDebug} {
		var buf bytes.Buffer
		log := slog.New(torrentLogHandler{slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: level})}).With("component", "torrent")
		log.Error("initial read failed", "err", "context deadline exceeded")
		log.Error("read failed after reader reset", "err", "context deadline exceeded")
		log.Error("disk on fire")
		log.Info("connected")
		out := buf.String()
		if !strings.Contains(out, "level=ERROR msg=\"disk on fire\" component=torrent") || !strings.Contains(out, "msg=connected") {
			t.Errorf("level %v: other records changed or lost:\n%s", level, out)
		}
		retries := strings.Count(out, "read failed")
		switch {
		case level == slog.LevelInfo && retries != 0:
			t.Errorf("reader retries logged at info level:\n%s", out)
		case level == slog.LevelDebug && strings.Count(out, "level=DEBUG msg=\"initial read failed\"") != 1:
			t.Errorf("reader retries not demoted to debug:\n%s", out)
		}
	}
}
