package torrent

import (
	"crypto/sha1" //nolint:gosec // BitTorrent v1 piece hashes are SHA-1; blobs are verified by sha256 too
	"hash"
	"hash/crc32"
	"sync"
)

// A piece's check used to read the whole piece back from its file once its last chunk was
// written: a second pass over every byte a node received, in system calls and copies. Now the
// storage hashes a piece's bytes as they are written, in order: a chunk written at the piece's
// hashed length is hashed from the buffer the torrent client hands over, and the chunks written
// ahead of it are read back (from the page cache, just written) when the gap before them fills.
// The check then needs no read at all when the chunks came in order, which is the common case
// (one peer sends a piece's chunks in the order they were requested).
//
// The check also tells which peers lied (see ban.go): it needs the CRC-32C of the verified
// bytes of every block a peer sent. The write hash keeps the CRC of every range it hashed, and
// answers when each recorded block is exactly one of them. Anything it cannot vouch for (a
// range written twice, overlapping writes, a failed write, a block that is not one of the
// ranges) makes the check read the piece back as before.

// writeHash hashes one piece's bytes as they are written.
type writeHash struct {
	mu      sync.Mutex
	h       hash.Hash // SHA-1 of the piece's bytes [0, next)
	next    int64
	ranges  []hashedRange // the writes hashed, in order
	pending []hashedRange // writes beyond next, not hashed yet (sum unset)
	broken  bool          // a write it cannot account for: the check reads the piece back
}

// hashedRange is a write of length bytes at off in a piece, and the CRC-32C of its bytes.
type hashedRange struct {
	off, length int64
	sum         uint32
}

func newWriteHash() *writeHash {
	return &writeHash{h: sha1.New()} //nolint:gosec // see import
}

// wrote records that b was written at off in piece p (ok: the whole of it); it is called with
// w.mu held, just after the write.
func (w *writeHash) wrote(p *blobPiece, b []byte, off int64, ok bool) {
	if w.broken {
		return
	}
	end := off + int64(len(b))
	if !ok || len(b) == 0 || off < w.next || w.overlapsPending(off, end) {
		w.breakOff()
		return
	}
	if off > w.next {
		w.pending = append(w.pending, hashedRange{off: off, length: int64(len(b))})
		return
	}
	w.add(b, off)
	w.catchUp(p)
}

// add hashes b, the bytes at w.next.
func (w *writeHash) add(b []byte, off int64) {
	w.h.Write(b)
	w.ranges = append(w.ranges, hashedRange{off: off, length: int64(len(b)), sum: crc32.Checksum(b, castagnoli)})
	w.next += int64(len(b))
}

// catchUp hashes the pending writes that now follow the hashed bytes, reading them back.
func (w *writeHash) catchUp(p *blobPiece) {
	for {
		i := w.pendingAt(w.next)
		if i < 0 {
			return
		}
		r := w.pending[i]
		w.pending = append(w.pending[:i], w.pending[i+1:]...)
		bufp, _ := hashBuffers.Get().(*[]byte)
		sum, ok := uint32(0), true
		for done := int64(0); done < r.length && ok; {
			chunk := (*bufp)[:min(int64(len(*bufp)), r.length-done)]
			n, err := p.ReadAt(chunk, r.off+done)
			if n < len(chunk) || (err != nil && n == 0) {
				ok = false
				break
			}
			w.h.Write(chunk)
			sum = crc32.Update(sum, castagnoli, chunk)
			done += int64(n)
		}
		hashBuffers.Put(bufp)
		if !ok {
			w.breakOff()
			return
		}
		w.ranges = append(w.ranges, hashedRange{off: r.off, length: r.length, sum: sum})
		w.next += r.length
	}
}

func (w *writeHash) pendingAt(off int64) int {
	for i, r := range w.pending {
		if r.off == off {
			return i
		}
	}
	return -1
}

func (w *writeHash) overlapsPending(from, to int64) bool {
	for _, r := range w.pending {
		if from < r.off+r.length && r.off < to {
			return true
		}
	}
	return false
}

// breakOff gives up hashing on write for this piece and frees what it held.
func (w *writeHash) breakOff() {
	w.broken, w.h, w.ranges, w.pending = true, nil, nil, nil
}

// result returns the SHA-1 of a piece of length bytes and the check of the blocks peers sent
// for it, or false when the write hash cannot vouch for every byte and block: then the piece
// must be read back.
func (w *writeHash) result(length int64, blocks []sentBlock) (sum [sha1Size]byte, check *blockChecker, ok bool) {
	if w == nil {
		return sum, nil, false
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.broken || w.next != length || len(w.pending) > 0 {
		return sum, nil, false
	}
	check = newBlockChecker(blocks)
	for j, b := range blocks {
		k := -1
		for i, r := range w.ranges {
			if r.off == b.offset && r.length == b.length {
				k = i
				break
			}
		}
		if k < 0 {
			return sum, nil, false
		}
		check.sums[j] = w.ranges[k].sum
	}
	check.offset = length
	w.h.Sum(sum[:0])
	return sum, check, true
}
