package store

import "fmt"

// evictLocked makes room for need more bytes under the size limit by evicting least-recently-used
// unpinned blobs. Blobs in flight are not in the index, so they are never evicted. If evicting
// every unpinned blob would not be enough, it evicts nothing and returns an error wrapping ErrFull:
// emptying the cache for a download that cannot fit anyway would only cost future hits.
func (s *Store) evictLocked(need int64) error {
	if s.maxBytes == 0 {
		return nil
	}
	over := s.used + s.reserved + need - s.maxBytes
	if over <= 0 {
		return nil
	}
	var victims []*entry
	var freed int64
	for el := s.lru.Back(); el != nil && freed < over; el = el.Prev() {
		e := entryOf(el)
		if len(s.pins[e.hex]) > 0 {
			continue
		}
		victims = append(victims, e)
		freed += e.size
	}
	if freed < over {
		err := fmt.Errorf("%w: need %d bytes; limit %d, %d used by blobs, %d reserved by downloads, %d evictable",
			ErrFull, need, s.maxBytes, s.used, s.reserved, freed)
		if need == 0 {
			s.log.Warn("store is over its size limit and pinned blobs prevent eviction", "err", err)
		}
		return err
	}
	for _, e := range victims {
		if err := s.unlinkLocked(e); err != nil {
			// Keep the index honest: the blob is no longer served. Open re-indexes it if it survived.
			s.log.Error("cannot remove evicted blob", "digest", "sha256:"+e.hex, "err", err)
			s.removeEntryLocked(e)
		}
		s.metrics.evictions.Inc()
		s.metrics.evictedBytes.Add(float64(e.size))
		s.log.Debug("evicted blob", "digest", "sha256:"+e.hex, "bytes", e.size, "lastAccess", e.lastAccess)
	}
	return nil
}
