package swarm

import (
	"os"
	"path/filepath"
	"time"
)

// DefaultIdleTimeout is how long a blob's swarm state, or a working file nobody uses, is kept
// without activity (see Config.IdleTimeout).
const DefaultIdleTimeout = 10 * time.Minute

// janitorInterval is how often Run sweeps.
const janitorInterval = time.Minute

// Run's sweeps retire what the swarm no longer needs. A node keeps the torrent of a blob it has
// delivered so that it serves peers for the rest of a rollout; kept for ever, every blob ever
// pulled would hold its torrent, its connections and an open file, which also keeps
// the disk space of a blob the content store has evicted. A download whose reader went away
// (the pull was cancelled) would keep its working file for ever too, and so would a working file
// left by an earlier run that nobody resumed.
//
// A blob is retired once it has no reader and its torrent has moved no byte, in or out, for
// IdleTimeout: its torrent stops and its working file, if it still has one, is removed (a
// delivered blob's data belongs to the content store and stays there). A file in Dir that no
// blob uses is removed once it is IdleTimeout old.

// sweep retires idle blobs and removes unused working files, judging idleness at now.
func (s *Swarm) sweep(now time.Time) {
	s.mu.Lock()
	blobs := make([]*blob, 0, len(s.blobs))
	for _, b := range s.blobs {
		blobs = append(blobs, b)
	}
	s.mu.Unlock()
	for _, b := range blobs {
		if b.idleSince(now) < s.cfg.IdleTimeout {
			continue
		}
		// Decided under the lock that blobFor holds while it hands the blob out (and marks it
		// used), so that a blob is never retired under a reader or peer that just asked for it.
		s.mu.Lock()
		retire := s.blobs[b.plan.Digest.Hex] == b && b.stillQuiet()
		reason := retiredDelivered
		if b.path != "" {
			reason = retiredUndelivered
		}
		if retire {
			delete(s.blobs, b.plan.Digest.Hex)
		}
		s.mu.Unlock()
		if retire {
			s.log.Info("retiring an idle blob from the swarm", "digest", b.plan.Digest, "reason", reason,
				"idle", s.cfg.IdleTimeout)
			s.drop(b)
			s.metrics.retired.WithLabelValues(reason).Inc()
		}
	}
	s.removeUnusedFiles(now)
}

// Reasons a blob was retired, as metric labels.
const (
	retiredDelivered   = "delivered"   // handed over to the content store
	retiredUndelivered = "undelivered" // never delivered here: its reader went away, or it only seeded for peers
)

// idleSince returns how long b has had no reader and moved no byte through its torrent, as
// seen by the sweeps so far; zero while it is in use.
func (b *blob) idleSince(now time.Time) time.Duration {
	moved := b.bytesMoved()
	b.activityMu.Lock()
	defer b.activityMu.Unlock()
	if b.readers > 0 || moved != b.moved || b.quietSince.IsZero() {
		b.moved, b.quietSince = moved, now
		return 0
	}
	return now.Sub(b.quietSince)
}

// bytesMoved is the piece data b's torrent has received and sent.
func (b *blob) bytesMoved() int64 {
	st := b.t.Stats()
	return st.BytesReadData + st.BytesWritten
}

// stillQuiet reports whether b has had no reader or use since the last sweep found it quiet.
func (b *blob) stillQuiet() bool {
	b.activityMu.Lock()
	defer b.activityMu.Unlock()
	return b.readers == 0 && !b.quietSince.IsZero()
}

// touch records a use of b: it is quiet again only from the next sweep on.
func (b *blob) touch() {
	b.activityMu.Lock()
	defer b.activityMu.Unlock()
	b.quietSince = time.Time{}
}

// addReader records a reader of b; the returned function, called once, removes it.
func (b *blob) addReader() (done func()) {
	b.activityMu.Lock()
	b.readers++
	b.activityMu.Unlock()
	var once bool
	return func() {
		b.activityMu.Lock()
		defer b.activityMu.Unlock()
		if !once {
			once = true
			b.readers--
			b.quietSince = time.Time{} // idle from the next sweep on, not from before the read
		}
	}
}

// removeUnusedFiles removes the files in Dir that no blob uses and that have not been modified
// for IdleTimeout.
func (s *Swarm) removeUnusedFiles(now time.Time) {
	entries, err := os.ReadDir(s.cfg.Dir)
	if err != nil {
		s.log.Warn("cannot list the swarm's working files", "dir", s.cfg.Dir, "error", err)
		return
	}
	for _, e := range entries {
		if !e.Type().IsRegular() || !isWorkingFileName(e.Name()) {
			continue
		}
		path := filepath.Join(s.cfg.Dir, e.Name())
		info, err := e.Info()
		if err != nil || now.Sub(info.ModTime()) < s.cfg.IdleTimeout {
			continue
		}
		if removed, err := s.removeUnused(path); err != nil {
			s.log.Warn("cannot remove an unused swarm working file", "path", path, "error", err)
		} else if removed {
			s.log.Info("removed an unused swarm working file", "path", path, "bytes", info.Size())
			s.metrics.filesRemoved.Inc()
		}
	}
}

// removeUnused removes path unless a blob uses it as its working file; under the lock blobFor
// holds while it opens one, so that a download resumed just now keeps its file.
func (s *Swarm) removeUnused(path string) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, b := range s.blobs {
		if b.path == path {
			return false, nil
		}
	}
	return true, os.Remove(path)
}

// isWorkingFileName reports whether name is a working file's: the hex of a sha256 digest.
func isWorkingFileName(name string) bool {
	if len(name) != 64 {
		return false
	}
	for _, c := range name {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}
