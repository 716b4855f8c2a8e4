package swarm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/internal/oci"
)

// segmentRequest is what a node asks a segment's seeder: which segment of which blob, how the
// blob is cut, where upstream it lives, and the asker's own peer address.
type segmentRequest struct {
	digest         v1.Hash
	k              int
	size           int64
	segmentSize    int64
	pieceLength    int64
	rampSegments   int
	registry, repo string
	peer           netip.AddrPort
}

func (r segmentRequest) query() url.Values {
	return url.Values{
		"digest":       {r.digest.String()},
		"segment":      {strconv.Itoa(r.k)},
		"size":         {strconv.FormatInt(r.size, 10)},
		"segment_size": {strconv.FormatInt(r.segmentSize, 10)},
		"piece_length": {strconv.FormatInt(r.pieceLength, 10)},
		"ramp":         {strconv.Itoa(r.rampSegments)},
		"registry":     {r.registry},
		"repository":   {r.repo},
		"peer":         {r.peer.String()},
	}
}

func parseSegmentRequest(q url.Values) (segmentRequest, plan, error) {
	var r segmentRequest
	var err error
	if r.digest, err = oci.ParseDigest(q.Get("digest")); err != nil {
		return r, plan{}, err
	}
	ints := map[string]*int64{"size": &r.size, "segment_size": &r.segmentSize, "piece_length": &r.pieceLength}
	for name, dst := range ints {
		if *dst, err = strconv.ParseInt(q.Get(name), 10, 64); err != nil {
			return r, plan{}, fmt.Errorf("%s: %w", name, err)
		}
	}
	if r.rampSegments, err = strconv.Atoi(q.Get("ramp")); err != nil {
		return r, plan{}, fmt.Errorf("ramp: %w", err)
	}
	p, err := newPlan(r.digest, r.size, r.segmentSize, r.pieceLength, r.rampSegments)
	if err != nil {
		return r, plan{}, err
	}
	if r.k, err = strconv.Atoi(q.Get("segment")); err != nil || r.k < 0 || r.k >= p.segments() {
		return r, plan{}, fmt.Errorf("segment %q not in 0..%d", q.Get("segment"), p.segments()-1)
	}
	r.registry, r.repo = q.Get("registry"), q.Get("repository")
	if err := oci.ValidateRegistry(r.registry); err != nil {
		return r, plan{}, err
	}
	if err := oci.ValidateRepository(r.repo); err != nil {
		return r, plan{}, err
	}
	if r.peer, err = netip.ParseAddrPort(q.Get("peer")); err != nil {
		return r, plan{}, fmt.Errorf("peer: %w", err)
	}
	return r, p, nil
}

// segmentAnswer is a seeder's answer: the segment's bencoded info and peers to swarm with.
type segmentAnswer struct {
	Info  []byte   `json:"info"`
	Peers []string `json:"peers"`
}

// serveSegment is the seeder's side: it makes sure the segment is published (fetching it from
// upstream or the local store if nobody has yet), waits for that, records the asker as a peer and
// answers with the info and the asker's neighbours among the peers that asked before and itself.
func (s *Swarm) serveSegment(w http.ResponseWriter, r *http.Request) {
	req, p, err := parseSegmentRequest(r.URL.Query())
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	// The asker must be who it says it is: its peer address is where others will connect.
	if host, _, err := net.SplitHostPort(r.RemoteAddr); err != nil || host != req.peer.Addr().String() {
		http.Error(w, "peer address does not match the connection", http.StatusForbidden)
		return
	}
	s.cfg.Membership.ReportAlive(req.peer.Addr())
	if p.segmentSize != s.cfg.SegmentSize || p.pieceLength != s.cfg.PieceLength || p.rampSegments != s.cfg.RampSegments {
		s.log.Warn("a peer cuts blobs differently; all agents should share --swarm-segment-size, --swarm-piece-length and --swarm-ramp-segments",
			"peer", req.peer, "segment_size", p.segmentSize, "piece_length", p.pieceLength, "ramp_segments", p.rampSegments)
		http.Error(w, "segmentation parameters differ from this agent's", http.StatusConflict)
		return
	}
	b, err := s.blobFor(req.digest, req.size, req.registry, req.repo)
	if err != nil {
		http.Error(w, err.Error(), http.StatusConflict)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), s.cfg.InfoTimeout)
	defer cancel()
	info, err := s.ensureSegment(ctx, b, req.k)
	if err != nil {
		s.log.Warn("cannot seed segment", "digest", req.digest, "segment", req.k, "error", err)
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	peers := b.segs[req.k].addPeer(p.key(req.k), s.self, req.peer, time.Now(), peersPerAnswer)
	answer := segmentAnswer{Info: info}
	for _, p := range peers {
		answer.Peers = append(answer.Peers, p.String())
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(answer)
}

// requestSegment asks seeder for segment k of b, waiting until it is published.
func (s *Swarm) requestSegment(ctx context.Context, seeder netip.AddrPort, b *blob, k int) (*segmentAnswer, error) {
	req := segmentRequest{
		digest: b.plan.digest, k: k, size: b.plan.size,
		segmentSize: b.plan.segmentSize, pieceLength: b.plan.pieceLength, rampSegments: b.plan.rampSegments,
		registry: b.registry, repo: b.repo, peer: s.self,
	}
	u := url.URL{Scheme: "http", Host: seeder.String(), Path: "/swarm/v1/segment", RawQuery: req.query().Encode()}
	httpReq, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, err
	}
	resp, err := s.control.Do(httpReq)
	if err != nil {
		return nil, fmt.Errorf("ask %s for segment %d: %w", seeder, k, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return nil, fmt.Errorf("ask %s for segment %d: %w", seeder, k, err)
	}
	s.cfg.Membership.ReportAlive(seeder.Addr()) // it answered, whatever it said
	if resp.StatusCode != http.StatusOK {
		return nil, &seederError{status: resp.StatusCode, msg: string(body)}
	}
	var answer segmentAnswer
	if err := json.Unmarshal(body, &answer); err != nil {
		return nil, fmt.Errorf("answer of %s for segment %d: %w", seeder, k, err)
	}
	if _, err := checkInfo(b.plan, k, answer.Info); err != nil {
		return nil, fmt.Errorf("answer of %s for segment %d: %w", seeder, k, err)
	}
	return &answer, nil
}

// seederError is a seeder that answered but could not serve the segment (its upstream failed,
// or it disagrees about the blob).
type seederError struct {
	status int
	msg    string
}

func (e *seederError) Error() string { return fmt.Sprintf("seeder answered %d: %s", e.status, e.msg) }

func isSeederError(err error) bool {
	var se *seederError
	return errors.As(err, &se)
}
