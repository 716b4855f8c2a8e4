package plan

import (
	"fmt"
	"net/netip"
	"net/url"
	"strconv"
	"time"

	"github.com/shoal-dev/shoal/internal/oci"
)

// The control protocol's versions. A node asks with the newest; an agent of the previous
// release answers it 404 (no such route), and the asker then falls back to the version that
// agent speaks, counted in shoal_swarm_protocol_fallbacks_total.
//
//   - 1: GET /swarm/v1/segment answers when the segment is published (or with an error status),
//     and says nothing meanwhile; a seeder that is stopped but whose kernel still completes TCP
//     handshakes cannot be told from one that is fetching.
//   - 2: GET /swarm/v2/segment answers 200 at once, then sends a space every Heartbeat while it
//     waits, then the Answer as JSON (with Error set when it failed). A seeder silent for
//     SilenceTimeout is taken as dead. Adds whole-blob seeding for registries that ignore Range
//     (Request.Whole and CodeRangeUnsupported) and seeding a segment again (Request.Reseed).
const (
	// ProtocolVersion is the newest version, the one a node asks with.
	ProtocolVersion = 2
	// ProtocolHeader carries the version in protocol 2 requests and answers; a 404 without it
	// comes from an agent that knows only protocol 1.
	ProtocolHeader = "Shoal-Swarm-Protocol"
	// SegmentPathV1 is the path of a segment request in protocol 1.
	SegmentPathV1 = "/swarm/v1/segment"
	// SegmentPathV2 is the path of a segment request in protocol 2.
	SegmentPathV2 = "/swarm/v2/segment"
)

// Timing of protocol 2, which both sides must share: the asker's patience is counted in the
// seeder's heartbeats.
const (
	// Heartbeat is how often a seeder that is still waiting for a segment says so.
	Heartbeat = 500 * time.Millisecond
	// SilenceTimeout is how long an asker waits for a byte from a seeder before taking it as
	// stopped: five heartbeats.
	SilenceTimeout = 5 * Heartbeat
)

// Error codes of a protocol 2 Answer.
const (
	// CodeRangeUnsupported: the seeder found that upstream ignores Range requests, so the asker
	// should ask the blob's whole seeder instead.
	CodeRangeUnsupported = "range_unsupported"
	// CodeSeedFailed: the seeder could not publish the segment, for any other reason.
	CodeSeedFailed = "seed_failed"
)

// Request is what a node asks a segment's seeder: which segment of which blob, how the blob is
// cut, where upstream it lives, and the asker's own peer address.
type Request struct {
	// Plan is how the asker cuts the blob. Its MinSegments is 0 (the parameter is absent) in
	// requests of agents of the previous release, and must be 0 in a protocol 1 request.
	Plan Plan
	// Segment is the index of the segment asked for.
	Segment int
	// Registry and Repository are where the blob lives upstream.
	Registry, Repository string
	// Peer is the asker's peer address, where other members will connect to it.
	Peer netip.AddrPort
	// Whole: the asker found that upstream ignores Range, and asks the blob's whole seeder
	// (segment 0's seeder, which fetches the blob in one request). Protocol 2 only.
	Whole bool
	// Reseed: the segment's seeder stopped answering, and the member asked is to fetch the
	// segment's bytes again. Protocol 2 only.
	Reseed bool
}

// Query encodes r as the query parameters of a segment request.
func (r Request) Query() url.Values {
	q := url.Values{
		"digest":       {r.Plan.Digest.String()},
		"segment":      {strconv.Itoa(r.Segment)},
		"size":         {strconv.FormatInt(r.Plan.Size, 10)},
		"segment_size": {strconv.FormatInt(r.Plan.SegmentSize, 10)},
		"piece_length": {strconv.FormatInt(r.Plan.PieceLength, 10)},
		"ramp":         {strconv.Itoa(r.Plan.RampSegments)},
		"registry":     {r.Registry},
		"repository":   {r.Repository},
		"peer":         {r.Peer.String()},
	}
	if r.Plan.MinSegments != 0 {
		q.Set("min_segments", strconv.Itoa(r.Plan.MinSegments))
	}
	if r.Whole {
		q.Set("whole", "1")
	}
	if r.Reseed {
		q.Set("reseed", "1")
	}
	return q
}

// ParseRequest decodes and checks the query parameters of a segment request: the plan must be
// one New accepts, the segment one of its segments, and the registry, repository and peer
// well-formed.
func ParseRequest(q url.Values) (Request, error) {
	var r Request
	d, err := oci.ParseDigest(q.Get("digest"))
	if err != nil {
		return Request{}, err
	}
	var size, segmentSize, pieceLength int64
	ints := map[string]*int64{"size": &size, "segment_size": &segmentSize, "piece_length": &pieceLength}
	for name, dst := range ints {
		if *dst, err = strconv.ParseInt(q.Get(name), 10, 64); err != nil {
			return Request{}, fmt.Errorf("%s: %w", name, err)
		}
	}
	ramp, err := strconv.Atoi(q.Get("ramp"))
	if err != nil {
		return Request{}, fmt.Errorf("ramp: %w", err)
	}
	var minSegments int
	if v := q.Get("min_segments"); v != "" {
		if minSegments, err = strconv.Atoi(v); err != nil {
			return Request{}, fmt.Errorf("min_segments: %w", err)
		}
	}
	if r.Plan, err = New(d, size, segmentSize, pieceLength, ramp, minSegments); err != nil {
		return Request{}, err
	}
	if r.Segment, err = strconv.Atoi(q.Get("segment")); err != nil || r.Segment < 0 || r.Segment >= r.Plan.Segments() {
		return Request{}, fmt.Errorf("segment %q not in 0..%d", q.Get("segment"), r.Plan.Segments()-1)
	}
	r.Registry, r.Repository = q.Get("registry"), q.Get("repository")
	if err := oci.ValidateRegistry(r.Registry); err != nil {
		return Request{}, err
	}
	if err := oci.ValidateRepository(r.Repository); err != nil {
		return Request{}, err
	}
	if r.Peer, err = netip.ParseAddrPort(q.Get("peer")); err != nil {
		return Request{}, fmt.Errorf("peer: %w", err)
	}
	for name, dst := range map[string]*bool{"whole": &r.Whole, "reseed": &r.Reseed} {
		switch q.Get(name) {
		case "", "0":
		case "1":
			*dst = true
		default:
			return Request{}, fmt.Errorf("%s %q: want 0 or 1", name, q.Get(name))
		}
	}
	return r, nil
}

// Answer is a seeder's answer to a Request, sent as JSON: the segment's bencoded info and peers
// to swarm with, or why it could not publish the segment.
type Answer struct {
	// Info is the segment's bencoded torrent info, named by Plan.InfoName.
	Info []byte `json:"info,omitempty"`
	// Peers are the asker's neighbours for the segment, as ip:port.
	Peers []string `json:"peers,omitempty"`
	// Error says why the seeder could not publish the segment; empty on success.
	Error string `json:"error,omitempty"`
	// Code classifies Error in protocol 2: CodeRangeUnsupported or CodeSeedFailed.
	Code string `json:"code,omitempty"`
}
