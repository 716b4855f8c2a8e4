package swarm

import (
	"fmt"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// Limits on the segmentation parameters a peer may ask for, so that a request cannot make a
// seeder allocate absurd piece tables or fetch absurd ranges.
const (
	minPieceLength   = 16 << 10
	maxPieceLength   = 16 << 20
	maxSegmentPieces = 4096
	maxBlobSize      = 1 << 40
)

// plan is how a blob is cut: fixed segments (the last one shorter), each its own torrent whose
// pieces are pieceLength long. Every node derives the same plan from the same parameters, so
// the torrent of a segment is identical (same infohash) whoever builds it.
type plan struct {
	digest      v1.Hash
	size        int64
	segmentSize int64
	pieceLength int64
}

func newPlan(d v1.Hash, size, segmentSize, pieceLength int64) (plan, error) {
	p := plan{digest: d, size: size, segmentSize: segmentSize, pieceLength: pieceLength}
	switch {
	case size <= 0 || size > maxBlobSize:
		return plan{}, fmt.Errorf("blob size %d out of range", size)
	case pieceLength < minPieceLength || pieceLength > maxPieceLength || pieceLength&(pieceLength-1) != 0:
		return plan{}, fmt.Errorf("piece length %d: want a power of two in [%d, %d]", pieceLength, minPieceLength, maxPieceLength)
	case segmentSize < pieceLength || segmentSize%pieceLength != 0 || segmentSize/pieceLength > maxSegmentPieces:
		return plan{}, fmt.Errorf("segment size %d: want a multiple of the piece length %d, at most %d pieces", segmentSize, pieceLength, maxSegmentPieces)
	}
	return p, nil
}

func (p plan) segments() int { return int((p.size + p.segmentSize - 1) / p.segmentSize) }

// segment returns the offset and length of segment k.
func (p plan) segment(k int) (offset, length int64) {
	offset = int64(k) * p.segmentSize
	return offset, min(p.segmentSize, p.size-offset)
}

func (p plan) pieces(k int) int {
	_, length := p.segment(k)
	return int((length + p.pieceLength - 1) / p.pieceLength)
}

// segmentName names segment k's torrent; it is part of the info, hence of the infohash.
func (p plan) segmentName(k int) string { return fmt.Sprintf("%s.%d", p.digest.Hex, k) }

// key is the rendezvous key of segment k: its seeder is the member that ranks first for it.
func (p plan) key(k int) string { return fmt.Sprintf("%s/segment/%d", p.digest, k) }

func (p plan) String() string {
	return fmt.Sprintf("%s (%d bytes, %d segments of %d, pieces of %d)", p.digest, p.size, p.segments(), p.segmentSize, p.pieceLength)
}
