package store

import "fmt"

// evictLocked makes room for need more bytes under the size limit by forgetting
// least-recently-used unpinned blobs; the caller removes their files with removeEvicted once it
// has released the lock. Blobs in flight are not in the index, so they are never evicted. If
// evicting every unpinned blob would not be enough, it evicts nothing and returns an error
// wrapping ErrFull: emptying the cache for a download that cannot fit anyway would only cost
// future hits.
func (s *Store) evictLocked(need int64) ([]*entry, error) {
	if s.maxBytes == 0 {
		return nil, nil
	}
	over := s.used + s.reserved + need - s.maxBytes
	if over <= 0 {
		return nil, nil
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
		return nil, fmt.Errorf("%w: need %d bytes; limit %d, %d used by blobs, %d reserved by downloads, %d evictable",
			ErrFull, need, s.maxBytes, s.used, s.reserved, freed)
	}
	for _, e := range victims {
		s.forgetLocked(e)
	}
	return victims, nil
}

// removeEvicted removes the files of the blobs evictLocked forgot. Until the file is gone the
// disk may hold more than the limit; readers that have a blob open keep it on disk anyway.
func (s *Store) removeEvicted(victims []*entry) {
	for _, e := range victims {
		if err := s.unlink(e.hex); err != nil {
			// No longer served either way; the next Open indexes the file again if it survived.
			s.log.Error("cannot remove evicted blob", "digest", "sha256:"+e.hex, "error", err)
		}
		s.metrics.evictions.Inc()
		s.metrics.evictedBytes.Add(float64(e.size))
		s.log.Debug("evicted blob", "digest", "sha256:"+e.hex, "bytes", e.size, "lastAccess", e.lastAccess)
	}
}
