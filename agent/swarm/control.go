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
	"os"
	"strconv"
	"time"

	"github.com/shoal-dev/shoal/agent/plan"
	"github.com/shoal-dev/shoal/agent/upstream"
)

// Timing of this node's requests to seeders; the timing both sides share is in package plan.
const (
	// controlHeaderTimeout bounds the wait for a seeder's response headers, which a live
	// seeder of protocol 2 sends as soon as it has read the request.
	controlHeaderTimeout = time.Second
	// v1AnswerTimeout bounds a protocol 1 request, which says nothing until it answers.
	v1AnswerTimeout = 15 * time.Second
)

// segmentCall is a checked segment request on its way to being answered.
type segmentCall struct {
	req plan.Request
	b   *blob
}

// admitSegmentRequest checks a segment request and returns the blob it is about, or answers the
// request with an error status and returns nil.
func (s *Swarm) admitSegmentRequest(w http.ResponseWriter, r *http.Request) *segmentCall {
	req, err := plan.ParseRequest(r.URL.Query())
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return nil
	}
	// The asker must be who it says it is: its peer address is where others will connect.
	if host, _, err := net.SplitHostPort(r.RemoteAddr); err != nil || host != req.Peer.Addr().String() {
		http.Error(w, "peer address does not match the connection", http.StatusForbidden)
		return nil
	}
	// Split admitted the connection, but a member may have left since it was made.
	if !s.cfg.Membership.Allowed(req.Peer.Addr()) {
		http.Error(w, "not a member of this node's swarm", http.StatusForbidden)
		return nil
	}
	s.cfg.Membership.ReportAlive(req.Peer.Addr())
	p := req.Plan
	ours, err := plan.New(p.Digest, p.Size, s.cfg.SegmentSize, s.cfg.PieceLength, s.cfg.RampSegments, s.cfg.MinSegments)
	if err != nil || !p.SameCut(ours) {
		// Agents of the previous release cut blobs under 16 segments differently; other flags
		// differ by mistake.
		s.log.Warn("a peer cuts this blob into other segments; all agents should share --swarm-segment-size, --swarm-piece-length, --swarm-ramp-segments and --swarm-min-segments",
			"peer", req.Peer, "digest", p.Digest, "segment_size", p.SegmentSize, "piece_length", p.PieceLength, "ramp_segments", p.RampSegments, "min_segments", p.MinSegments)
		http.Error(w, "this agent cuts the blob into other segments", http.StatusConflict)
		return nil
	}
	// The working file is sized from the blob's size: check the asker's against what this node
	// knows before creating it, so that a confused or malicious peer cannot make it allocate
	// files of any size.
	if err := s.checkBlobSize(r.Context(), req); err != nil {
		http.Error(w, err.Error(), http.StatusConflict)
		return nil
	}
	b, err := s.blobFor(p.Digest, p.Size, req.Registry, req.Repository)
	if err != nil {
		http.Error(w, err.Error(), http.StatusConflict)
		return nil
	}
	return &segmentCall{req: req, b: b}
}

// checkBlobSize verifies the size a segment request gives for a blob this node has no state for:
// against the content store's copy, else the registry's.
func (s *Swarm) checkBlobSize(ctx context.Context, req plan.Request) error {
	d := req.Plan.Digest
	s.mu.Lock()
	_, known := s.blobs[d.Hex]
	s.mu.Unlock()
	if known {
		return nil // blobFor compares with the size already known
	}
	var size int64
	if local := s.openLocal(d); local != nil {
		size = local.Size()
		_ = local.Close()
	} else {
		ctx, cancel := context.WithTimeout(ctx, s.cfg.InfoTimeout)
		defer cancel()
		var err error
		if size, err = s.cfg.Upstream.HeadBlob(ctx, req.Registry, req.Repository, d); err != nil {
			return fmt.Errorf("size of %s upstream: %w", d, err)
		}
	}
	if size != req.Plan.Size {
		return fmt.Errorf("blob %s has %d bytes, the request says %d", d, size, req.Plan.Size)
	}
	return nil
}

// serveSegment is the seeder's side of protocol 1, kept for agents of the previous release: it
// makes sure the segment is published (fetching it from upstream or the local store if nobody
// has yet), waits for that, records the asker as a peer and answers with the info and the
// asker's neighbours among the peers that asked before and itself.
func (s *Swarm) serveSegment(w http.ResponseWriter, r *http.Request) {
	call := s.admitSegmentRequest(w, r)
	if call == nil {
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), s.cfg.InfoTimeout)
	defer cancel()
	answer := s.answerSegment(ctx, call)
	if answer.Error != "" {
		http.Error(w, answer.Error, http.StatusBadGateway)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(answer)
}

// serveSegmentV2 is the seeder's side of protocol 2: serveSegment's work, with headers sent at
// once and a heartbeat while the segment is being published, so that the asker can tell a
// seeder at work from one that is stopped.
func (s *Swarm) serveSegmentV2(w http.ResponseWriter, r *http.Request) {
	call := s.admitSegmentRequest(w, r)
	if call == nil {
		return
	}
	if call.req.Whole {
		s.setWhole(call.b, "asked by "+call.req.Peer.String())
		call.b.wholeHere.Store(true)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set(plan.ProtocolHeader, strconv.Itoa(plan.ProtocolVersion))
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	_ = rc.Flush()
	ctx, cancel := context.WithTimeout(r.Context(), s.cfg.InfoTimeout)
	defer cancel()
	answered := make(chan plan.Answer, 1)
	if !s.background(func() { answered <- s.answerSegment(ctx, call) }) {
		answered <- plan.Answer{Error: errSwarmClosed.Error()}
	}
	beat := time.NewTicker(plan.Heartbeat)
	defer beat.Stop()
	for {
		select {
		case answer := <-answered:
			_ = json.NewEncoder(w).Encode(answer)
			return
		case <-beat.C:
			if _, err := w.Write([]byte{' '}); err != nil {
				return // the asker went away; ctx ends with the request
			}
			_ = rc.Flush()
		}
	}
}

// answerSegment waits for the call's segment to be published and answers with its info and the
// asker's neighbours, or with why it failed.
func (s *Swarm) answerSegment(ctx context.Context, call *segmentCall) plan.Answer {
	req, b := call.req, call.b
	k := req.Segment
	info, err := s.ensureSegment(ctx, b, k)
	if err == nil && req.Reseed {
		err = s.refetchSegment(ctx, b, k)
	}
	if err != nil {
		s.log.Warn("cannot seed segment", "digest", req.Plan.Digest, "segment", k, "error", err)
		code := plan.CodeSeedFailed
		if errors.Is(err, upstream.ErrRangeUnsupported) {
			code = plan.CodeRangeUnsupported
		}
		return plan.Answer{Error: err.Error(), Code: code}
	}
	peers := b.segs[k].addPeer(b.plan.Key(k), s.self, req.Peer, time.Now(), peersPerAnswer, s.cfg.Membership.Allowed)
	answer := plan.Answer{Info: info}
	for _, p := range peers {
		answer.Peers = append(answer.Peers, p.String())
	}
	return answer
}

// requestSegment asks seeder for segment k of b, waiting until it is published, in the newest
// protocol the seeder speaks. whole says that seeder was chosen as the whole blob's seeder (see
// seedWhole); it must be what the choice was made on, never read again from the blob, which
// may have changed since: a member asked for the whole blob fetches it.
func (s *Swarm) requestSegment(ctx context.Context, seeder netip.AddrPort, b *blob, k int, whole bool) (*plan.Answer, error) {
	req := s.segmentRequestFor(b, k, whole)
	var answer *plan.Answer
	var err error
	if s.peerProtocol(seeder) >= 2 {
		answer, err = s.requestSegmentV2(ctx, seeder, req)
		if errors.Is(err, errOldProtocol) {
			s.protocolFallback(seeder, 1)
		}
	}
	if s.peerProtocol(seeder) < 2 {
		answer, err = s.requestSegmentV1(ctx, seeder, req)
	}
	if err != nil {
		return nil, err
	}
	s.cfg.Membership.ReportAlive(seeder.Addr()) // it answered, whatever it said
	if answer.Error != "" {
		return nil, &seederError{status: http.StatusBadGateway, msg: answer.Error, code: answer.Code}
	}
	if _, err := checkInfo(b.plan, k, answer.Info); err != nil {
		return nil, fmt.Errorf("answer of %s for segment %d: %w", seeder, k, err)
	}
	return answer, nil
}

// segmentRequestFor is this node's request for segment k of b.
func (s *Swarm) segmentRequestFor(b *blob, k int, whole bool) plan.Request {
	return plan.Request{Plan: b.plan, Segment: k, Registry: b.registry, Repository: b.repo, Peer: s.self, Whole: whole}
}

// errOldProtocol: the seeder does not know protocol 2.
var errOldProtocol = errors.New("seeder speaks an older control protocol")

// errSeederSilent: the seeder stopped sending heartbeats. It counts as a timeout (see
// isTimeout): the seeder may be stopped or only overloaded, and the probes decide which.
var errSeederSilent = fmt.Errorf("seeder sent nothing for %s: %w", plan.SilenceTimeout, os.ErrDeadlineExceeded)

func (s *Swarm) requestSegmentV2(ctx context.Context, seeder netip.AddrPort, req plan.Request) (*plan.Answer, error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	u := url.URL{Scheme: "http", Host: seeder.String(), Path: plan.SegmentPathV2, RawQuery: req.Query().Encode()}
	httpReq, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, err
	}
	httpReq.Header.Set(plan.ProtocolHeader, strconv.Itoa(plan.ProtocolVersion))
	resp, err := s.control.Do(httpReq)
	if err != nil {
		return nil, fmt.Errorf("ask %s for segment %d: %w", seeder, req.Segment, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusNotFound && resp.Header.Get(plan.ProtocolHeader) == "" {
		return nil, errOldProtocol
	}
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		return nil, &seederError{status: resp.StatusCode, msg: string(body)}
	}
	silence := time.AfterFunc(plan.SilenceTimeout, func() { cancel(errSeederSilent) })
	defer silence.Stop()
	body := &heartbeatReader{r: io.LimitReader(resp.Body, 4<<20), silence: silence}
	var answer plan.Answer
	if err := json.NewDecoder(body).Decode(&answer); err != nil {
		if cause := context.Cause(ctx); errors.Is(cause, errSeederSilent) {
			err = cause
		}
		return nil, fmt.Errorf("answer of %s for segment %d: %w", seeder, req.Segment, err)
	}
	return &answer, nil
}

// heartbeatReader restarts the silence timer whenever bytes arrive.
type heartbeatReader struct {
	r       io.Reader
	silence *time.Timer
}

func (h *heartbeatReader) Read(p []byte) (int, error) {
	n, err := h.r.Read(p)
	if n > 0 {
		h.silence.Reset(plan.SilenceTimeout)
	}
	return n, err
}

func (s *Swarm) requestSegmentV1(ctx context.Context, seeder netip.AddrPort, req plan.Request) (*plan.Answer, error) {
	switch {
	case req.Whole, req.Reseed:
		return nil, &seederError{status: http.StatusNotImplemented, msg: "an agent of the previous release cannot seed a whole blob or seed a segment again", code: plan.CodeSeedFailed}
	case !req.Plan.LegacyCut():
		return nil, &seederError{status: http.StatusConflict, msg: "an agent of the previous release cuts this blob into other segments", code: plan.CodeSeedFailed}
	}
	req.Plan.MinSegments = 0 // unknown to protocol 1
	ctx, cancel := context.WithTimeout(ctx, v1AnswerTimeout)
	defer cancel()
	u := url.URL{Scheme: "http", Host: seeder.String(), Path: plan.SegmentPathV1, RawQuery: req.Query().Encode()}
	httpReq, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, err
	}
	resp, err := s.controlV1.Do(httpReq)
	if err != nil {
		return nil, fmt.Errorf("ask %s for segment %d: %w", seeder, req.Segment, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return nil, fmt.Errorf("ask %s for segment %d: %w", seeder, req.Segment, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, &seederError{status: resp.StatusCode, msg: string(body)}
	}
	var answer plan.Answer
	if err := json.Unmarshal(body, &answer); err != nil {
		return nil, fmt.Errorf("answer of %s for segment %d: %w", seeder, req.Segment, err)
	}
	return &answer, nil
}

// peerProtocol is the control protocol this node speaks with peer: the newest, until the peer
// showed it knows only an older one.
func (s *Swarm) peerProtocol(peer netip.AddrPort) int {
	if v, ok := s.protocols.Load(peer); ok {
		if version, ok := v.(int); ok {
			return version
		}
	}
	return plan.ProtocolVersion
}

// protocolFallback records that peer speaks only version v, once per peer, visibly.
func (s *Swarm) protocolFallback(peer netip.AddrPort, v int) {
	if _, loaded := s.protocols.Swap(peer, v); loaded {
		return
	}
	s.metrics.protocolFallbacks.Inc()
	s.log.Warn("a peer speaks an older control protocol (an agent of the previous release?); falling back to it until the rollout of the new release reaches it",
		"peer", peer, "protocol", v, "ours", plan.ProtocolVersion)
}

// seederError is a seeder that answered but could not serve the segment (its upstream failed,
// or it disagrees about the blob).
type seederError struct {
	status int
	msg    string
	code   string // of a protocol 2 answer
}

func (e *seederError) Error() string { return fmt.Sprintf("seeder answered %d: %s", e.status, e.msg) }

func isSeederError(err error) bool {
	var se *seederError
	return errors.As(err, &se)
}

// isRangeUnsupported reports whether err says that upstream ignores Range: from this node's
// own fetch, or a seeder's answer.
func isRangeUnsupported(err error) bool {
	var se *seederError
	return errors.Is(err, upstream.ErrRangeUnsupported) || (errors.As(err, &se) && se.code == plan.CodeRangeUnsupported)
}
