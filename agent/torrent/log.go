package torrent

import (
	"context"
	"log/slog"
	"strings"
)

// torrentLogHandler passes the torrent client's records on, except that it turns a few that
// are routine here into debug records:
//   - its warning that a pass over its torrents took over 20 ms, which on a node busy with a
//     rollout happens about three times a minute and says nothing an operator can act on;
//   - its error for a chunk that arrives for a piece the swarm's reader has meanwhile read from
//     upstream (the write is refused on purpose, see blobStorage.freezePieces;
//     TestLateChunksOfAFrozenPieceAreDemoted).
//
// The swarm's reader makes reads time out on purpose (to notice stalls); the client logs
// nothing for those (TestReaderTimeoutsAreNotLogged), and its records of failed reads, which
// now mean that reading the blob's file failed, pass unchanged.
type torrentLogHandler struct{ slog.Handler }

var demotedMessages = map[string]bool{
	"client unlock handlers took a long time": true,
}

func (h torrentLogHandler) Enabled(ctx context.Context, level slog.Level) bool {
	// Warnings and errors may be demoted in Handle, which needs to see them.
	return level >= slog.LevelWarn || h.Handler.Enabled(ctx, level)
}

// frozenWrite ends the client's message for a chunk refused by a frozen piece.
var frozenWrite = ": " + ErrFrozen.Error()

func (h torrentLogHandler) Handle(ctx context.Context, r slog.Record) error {
	if r.Level >= slog.LevelWarn && (demotedMessages[r.Message] || strings.HasSuffix(r.Message, frozenWrite)) {
		if !h.Handler.Enabled(ctx, slog.LevelDebug) {
			return nil
		}
		r.Level = slog.LevelDebug
	}
	return h.Handler.Handle(ctx, r)
}

func (h torrentLogHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return torrentLogHandler{h.Handler.WithAttrs(attrs)}
}

func (h torrentLogHandler) WithGroup(name string) slog.Handler {
	return torrentLogHandler{h.Handler.WithGroup(name)}
}
