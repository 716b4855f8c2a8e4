// Package plan is what agents must agree on to trade a blob: how the blob is cut into segments
// and pieces, and the messages of the control protocol by which one agent asks another for a
// segment, with their versions. Both must be the same on every node and stay compatible across
// adjacent releases.
package plan

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
	maxRampSegments  = 64
	// rampDivisor: the first segments of a blob (see Plan) are a quarter of the segment size.
	rampDivisor    = 4
	maxMinSegments = 1024
)

// Plan is how a blob is cut into segments of whole pieces of PieceLength: first RampSegments
// short ones (a quarter of the segment length, in whole pieces), then segments of the segment
// length, the last one shorter. The segment length is SegmentSize, or less for a blob under
// MinSegments × SegmentSize (see SegmentLength). Every node derives the same plan from the same
// parameters, so a segment's info is identical whoever builds it, and its pieces are the same
// pieces of the blob's torrent. Make one with New, which checks the parameters.
//
// The short segments at the start are for the first seconds of a rollout: nobody can trade a
// byte of a segment before its seeder has fetched all of it from upstream (its piece hashes
// exist only then), so the time to publish the first segments is time every node's link sits
// idle. A quarter of the size is published four times sooner (N = 32 cold: the links 41 % busy
// by the 3rd second against 12 %; p99 1.58-1.65 × S/B against 1.68 the same day).
type Plan struct {
	Digest       v1.Hash
	Size         int64
	SegmentSize  int64
	PieceLength  int64
	RampSegments int
	MinSegments  int // 0: segments of SegmentSize whatever the blob's size
}

// New returns the plan of blob d of size bytes, or an error if a parameter is out of the range
// a seeder accepts: a piece length that is a power of two in [16 KiB, 16 MiB], a segment size
// that is a whole number of at most 4096 pieces, a size in (0, 1 TiB], at most 64 short
// segments and a minimum of at most 1024 segments.
func New(d v1.Hash, size, segmentSize, pieceLength int64, rampSegments, minSegments int) (Plan, error) {
	p := Plan{Digest: d, Size: size, SegmentSize: segmentSize, PieceLength: pieceLength, RampSegments: rampSegments, MinSegments: minSegments}
	switch {
	case rampSegments < 0 || rampSegments > maxRampSegments:
		return Plan{}, fmt.Errorf("ramp segments %d out of range [0, %d]", rampSegments, maxRampSegments)
	case minSegments < 0 || minSegments > maxMinSegments:
		return Plan{}, fmt.Errorf("minimum segments %d out of range [0, %d]", minSegments, maxMinSegments)
	case size <= 0 || size > maxBlobSize:
		return Plan{}, fmt.Errorf("blob size %d out of range", size)
	case pieceLength < minPieceLength || pieceLength > maxPieceLength || pieceLength&(pieceLength-1) != 0:
		return Plan{}, fmt.Errorf("piece length %d: want a power of two in [%d, %d]", pieceLength, minPieceLength, maxPieceLength)
	case segmentSize < pieceLength || segmentSize%pieceLength != 0 || segmentSize/pieceLength > maxSegmentPieces:
		return Plan{}, fmt.Errorf("segment size %d: want a multiple of the piece length %d, at most %d pieces", segmentSize, pieceLength, maxSegmentPieces)
	}
	return p, nil
}

// SegmentLength is the length of the blob's segments after the short ones: SegmentSize, or, for
// a blob under MinSegments × SegmentSize, its size / MinSegments in whole pieces (rounded down:
// a blob a little over a round size gets one short segment at its end rather than every
// segment a piece longer).
//
// What a stopped or lost seeder costs is the segment it was fetching from upstream (the registry
// sent those bytes to a node that will never share them, and another member fetches the segment
// again), so that loss must be a small share of any blob: with 16 MiB segments a 64 MiB blob
// cost 1.25-1.29 copies from the registry when a seeder was stopped mid-fetch.
func (p Plan) SegmentLength() int64 {
	if p.MinSegments == 0 {
		return p.SegmentSize
	}
	want := p.Size / int64(p.MinSegments) / p.PieceLength * p.PieceLength
	return min(p.SegmentSize, max(want, p.PieceLength))
}

// LegacyCut reports whether the blob is cut as agents of the previous release cut it (segments
// of SegmentSize whatever the blob's size), so that they can trade it.
func (p Plan) LegacyCut() bool { return p.SegmentLength() == p.SegmentSize }

// SameCut reports whether p and q cut the blob into the same segments, whatever parameters
// they were made from.
func (p Plan) SameCut(q Plan) bool {
	return p.Size == q.Size && p.PieceLength == q.PieceLength && p.RampSegments == q.RampSegments &&
		p.RampLength() == q.RampLength() && p.SegmentLength() == q.SegmentLength()
}

// RampLength is the length of the short segments at the start of a blob.
func (p Plan) RampLength() int64 {
	return max(p.PieceLength, p.SegmentLength()/rampDivisor/p.PieceLength*p.PieceLength)
}

// Segments is the number of segments of the blob.
func (p Plan) Segments() int {
	short := p.RampLength()
	ramp := int64(p.RampSegments) * short
	if p.Size <= ramp {
		return int((p.Size + short - 1) / short)
	}
	seg := p.SegmentLength()
	return p.RampSegments + int((p.Size-ramp+seg-1)/seg)
}

// Segment returns the offset and length of segment k.
func (p Plan) Segment(k int) (offset, length int64) {
	if k < p.RampSegments {
		offset = int64(k) * p.RampLength()
		return offset, min(p.RampLength(), p.Size-offset)
	}
	seg := p.SegmentLength()
	offset = int64(p.RampSegments)*p.RampLength() + int64(k-p.RampSegments)*seg
	return offset, min(seg, p.Size-offset)
}

// Pieces is the number of pieces of segment k, the last one of the blob possibly short.
func (p Plan) Pieces(k int) int {
	_, length := p.Segment(k)
	return int((length + p.PieceLength - 1) / p.PieceLength)
}

// FirstPiece is the index, in the blob's torrent, of segment k's first piece.
func (p Plan) FirstPiece(k int) int {
	offset, _ := p.Segment(k)
	return int(offset / p.PieceLength)
}

// InfoName is the name in segment k's info: the blob's hex digest and the segment's byte range,
// "<hex>.<start>-<end>". Naming the range rather than the index makes nodes that cut a blob
// differently (other segmentation flags, or an older version during an upgrade) disagree on
// every info instead of taking a segment's hashes for the pieces of another range: a segment k
// of the same length at another offset would pass every other check, and its pieces would then
// fail against hashes of other bytes.
func (p Plan) InfoName(k int) string {
	offset, length := p.Segment(k)
	return fmt.Sprintf("%s.%d-%d", p.Digest.Hex, offset, offset+length)
}

// Key is the rendezvous key of segment k, "sha256:<hex>/segment/<k>": its seeder is chosen by
// ranking the members for it.
func (p Plan) Key(k int) string { return fmt.Sprintf("%s/segment/%d", p.Digest, k) }

// String describes the plan for logs.
func (p Plan) String() string {
	return fmt.Sprintf("%s (%d bytes, %d segments of %d after %d of %d, pieces of %d)",
		p.Digest, p.Size, p.Segments(), p.SegmentLength(), p.RampSegments, p.RampLength(), p.PieceLength)
}
