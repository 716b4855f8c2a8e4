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

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/agent/upstream"
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
	minSegments    int // absent (0) in requests of agents of the previous release
	registry, repo string
	peer           netip.AddrPort
	// whole: the asker found that upstream ignores Range, and asks the blob's whole seeder (see
	// seedWhole). Protocol 2 only.
	whole bool
	// reseed: the segment's seeder stopped answering, and this member is asked to fetch the
	// segment's bytes again (see Swarm.rescue). Protocol 2 only.
	reseed bool
}

func (r segmentRequest) query() url.Values {
	q := url.Values{
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
	if r.minSegments != 0 {
		q.Set("min_segments", strconv.Itoa(r.minSegments))
	}
	if r.whole {
		q.Set("whole", "1")
	}
	if r.reseed {
		q.Set("reseed", "1")
	}
	return q
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
	if v := q.Get("min_segments"); v != "" {
		if r.minSegments, err = strconv.Atoi(v); err != nil {
			return r, plan{}, fmt.Errorf("min_segments: %w", err)
		}
	}
	p, err := newPlan(r.digest, r.size, r.segmentSize, r.pieceLength, r.rampSegments, r.minSegments)
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
	for name, dst := range map[string]*bool{"whole": &r.whole, "reseed": &r.reseed} {
		switch q.Get(name) {
		case "", "0":
		case "1":
			*dst = true
		default:
			return r, plan{}, fmt.Errorf("%s %q: want 0 or 1", name, q.Get(name))
		}
	}
	return r, p, nil
}

// The control API's protocol versions. A node asks with the newest; an agent of the previous
// release answers it 404 (no such route), and the asker then falls back to the version that
// agent speaks, counted in shoal_swarm_protocol_fallbacks_total.
//
//   - 1: GET /swarm/v1/segment answers when the segment is published (or with an error status),
//     and says nothing meanwhile; a seeder that is stopped but whose kernel still completes TCP
//     handshakes cannot be told from one that is fetching.
//   - 2: GET /swarm/v2/segment answers 200 at once, then sends a space every controlHeartbeat
//     while it waits, then the answer as JSON (with "error" set when it failed). A seeder silent
//     for controlSilence is taken as dead. Adds whole-blob seeding for registries that ignore
//     Range (the "whole" parameter and the range_unsupported error code).
const (
	protocolVersion = 2
	protocolHeader  = "Shoal-Swarm-Protocol"
	segmentPathV1   = "/swarm/v1/segment"
	segmentPathV2   = "/swarm/v2/segment"
)

// Timing of the control API (protocol 2).
const (
	// controlHeaderTimeout bounds the wait for a seeder's response headers, which a live
	// seeder sends as soon as it has read the request.
	controlHeaderTimeout = time.Second
	// controlHeartbeat is how often a seeder that is still waiting for a segment says so.
	controlHeartbeat = 500 * time.Millisecond
	// controlSilence is how long an asker waits for a byte from a seeder before taking it as
	// stopped: five heartbeats.
	controlSilence = 5 * controlHeartbeat
	// v1AnswerTimeout bounds a protocol 1 request, which says nothing until it answers.
	v1AnswerTimeout = 15 * time.Second
)

// Error codes of a protocol 2 answer.
const (
	codeRangeUnsupported = "range_unsupported"
	codeSeedFailed       = "seed_failed"
)

// segmentAnswer is a seeder's answer: the segment's bencoded info and peers to swarm with, or
// why it could not publish the segment.
type segmentAnswer struct {
	Info  []byte   `json:"info,omitempty"`
	Peers []string `json:"peers,omitempty"`
	Error string   `json:"error,omitempty"`
	Code  string   `json:"code,omitempty"`
}

// segmentCall is a checked segment request on its way to being answered.
type segmentCall struct {
	req segmentRequest
	b   *blob
}

// admitSegmentRequest checks a segment request and returns the blob it is about, or answers the
// request with an error status and returns nil.
func (s *Swarm) admitSegmentRequest(w http.ResponseWriter, r *http.Request) *segmentCall {
	req, p, err := parseSegmentRequest(r.URL.Query())
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return nil
	}
	// The asker must be who it says it is: its peer address is where others will connect.
	if host, _, err := net.SplitHostPort(r.RemoteAddr); err != nil || host != req.peer.Addr().String() {
		http.Error(w, "peer address does not match the connection", http.StatusForbidden)
		return nil
	}
	s.cfg.Membership.ReportAlive(req.peer.Addr())
	ours, err := newPlan(req.digest, req.size, s.cfg.SegmentSize, s.cfg.PieceLength, s.cfg.RampSegments, s.cfg.MinSegments)
	if err != nil || !p.sameCut(ours) {
		// Agents of the previous release cut blobs under 16 segments differently; other flags
		// differ by mistake.
		s.log.Warn("a peer cuts this blob into other segments; all agents should share --swarm-segment-size, --swarm-piece-length, --swarm-ramp-segments and --swarm-min-segments",
			"peer", req.peer, "digest", req.digest, "segment_size", p.segmentSize, "piece_length", p.pieceLength, "ramp_segments", p.rampSegments, "min_segments", p.minSegments)
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
	b, err := s.blobFor(req.digest, req.size, req.registry, req.repo)
	if err != nil {
		http.Error(w, err.Error(), http.StatusConflict)
		return nil
	}
	return &segmentCall{req: req, b: b}
}

// checkBlobSize verifies the size a segment request gives for a blob this node has no state for:
// against the content store's copy, else the registry's.
func (s *Swarm) checkBlobSize(ctx context.Context, req segmentRequest) error {
	s.mu.Lock()
	_, known := s.blobs[req.digest.Hex]
	s.mu.Unlock()
	if known {
		return nil // blobFor compares with the size already known
	}
	var size int64
	if local := s.openLocal(req.digest); local != nil {
		size = local.Size()
		_ = local.Close()
	} else {
		ctx, cancel := context.WithTimeout(ctx, s.cfg.InfoTimeout)
		defer cancel()
		var err error
		if size, err = s.cfg.Upstream.HeadBlob(ctx, req.registry, req.repo, req.digest); err != nil {
			return fmt.Errorf("size of %s upstream: %w", req.digest, err)
		}
	}
	if size != req.size {
		return fmt.Errorf("blob %s has %d bytes, the request says %d", req.digest, size, req.size)
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
	if call.req.whole {
		s.setWhole(call.b, "asked by "+call.req.peer.String())
		call.b.wholeHere.Store(true)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set(protocolHeader, strconv.Itoa(protocolVersion))
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	_ = rc.Flush()
	ctx, cancel := context.WithTimeout(r.Context(), s.cfg.InfoTimeout)
	defer cancel()
	answered := make(chan segmentAnswer, 1)
	if !s.background(func() { answered <- s.answerSegment(ctx, call) }) {
		answered <- segmentAnswer{Error: errSwarmClosed.Error()}
	}
	beat := time.NewTicker(controlHeartbeat)
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
func (s *Swarm) answerSegment(ctx context.Context, call *segmentCall) segmentAnswer {
	req, b := call.req, call.b
	info, err := s.ensureSegment(ctx, b, req.k)
	if err == nil && req.reseed {
		err = s.refetchSegment(ctx, b, req.k)
	}
	if err != nil {
		s.log.Warn("cannot seed segment", "digest", req.digest, "segment", req.k, "error", err)
		code := codeSeedFailed
		if errors.Is(err, upstream.ErrRangeUnsupported) {
			code = codeRangeUnsupported
		}
		return segmentAnswer{Error: err.Error(), Code: code}
	}
	peers := b.segs[req.k].addPeer(b.plan.key(req.k), s.self, req.peer, time.Now(), peersPerAnswer)
	answer := segmentAnswer{Info: info}
	for _, p := range peers {
		answer.Peers = append(answer.Peers, p.String())
	}
	return answer
}

// requestSegment asks seeder for segment k of b, waiting until it is published, in the newest
// protocol the seeder speaks. whole says that seeder was chosen as the whole blob's seeder (see
// seedWhole); it must be what the choice was made on, never read again from the blob, which
// may have changed since: a member asked for the whole blob fetches it.
func (s *Swarm) requestSegment(ctx context.Context, seeder netip.AddrPort, b *blob, k int, whole bool) (*segmentAnswer, error) {
	req := s.segmentRequestFor(b, k, whole)
	var answer *segmentAnswer
	var err error
	if s.peerProtocol(seeder) >= 2 {
		answer, err = s.requestSegmentV2(ctx, seeder, req)
		if errors.Is(err, errOldProtocol) {
			s.protocolFallback(seeder, 1)
		}
	}
	if s.peerProtocol(seeder) < 2 {
		answer, err = s.requestSegmentV1(ctx, seeder, req, b.plan)
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
func (s *Swarm) segmentRequestFor(b *blob, k int, whole bool) segmentRequest {
	return segmentRequest{
		digest: b.plan.digest, k: k, size: b.plan.size,
		segmentSize: b.plan.segmentSize, pieceLength: b.plan.pieceLength, rampSegments: b.plan.rampSegments,
		minSegments: b.plan.minSegments, registry: b.registry, repo: b.repo, peer: s.self, whole: whole,
	}
}

// errOldProtocol: the seeder does not know protocol 2.
var errOldProtocol = errors.New("seeder speaks an older control protocol")

// errSeederSilent: the seeder stopped sending heartbeats. It counts as a timeout (see
// isTimeout): the seeder may be stopped or only overloaded, and the probes decide which.
var errSeederSilent = fmt.Errorf("seeder sent nothing for %s: %w", controlSilence, os.ErrDeadlineExceeded)

func (s *Swarm) requestSegmentV2(ctx context.Context, seeder netip.AddrPort, req segmentRequest) (*segmentAnswer, error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	u := url.URL{Scheme: "http", Host: seeder.String(), Path: segmentPathV2, RawQuery: req.query().Encode()}
	httpReq, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, err
	}
	httpReq.Header.Set(protocolHeader, strconv.Itoa(protocolVersion))
	resp, err := s.control.Do(httpReq)
	if err != nil {
		return nil, fmt.Errorf("ask %s for segment %d: %w", seeder, req.k, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusNotFound && resp.Header.Get(protocolHeader) == "" {
		return nil, errOldProtocol
	}
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		return nil, &seederError{status: resp.StatusCode, msg: string(body)}
	}
	silence := time.AfterFunc(controlSilence, func() { cancel(errSeederSilent) })
	defer silence.Stop()
	body := &heartbeatReader{r: io.LimitReader(resp.Body, 4<<20), silence: silence}
	var answer segmentAnswer
	if err := json.NewDecoder(body).Decode(&answer); err != nil {
		if cause := context.Cause(ctx); errors.Is(cause, errSeederSilent) {
			err = cause
		}
		return nil, fmt.Errorf("answer of %s for segment %d: %w", seeder, req.k, err)
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
		h.silence.Reset(controlSilence)
	}
	return n, err
}

func (s *Swarm) requestSegmentV1(ctx context.Context, seeder netip.AddrPort, req segmentRequest, p plan) (*segmentAnswer, error) {
	switch {
	case req.whole, req.reseed:
		return nil, &seederError{status: http.StatusNotImplemented, msg: "an agent of the previous release cannot seed a whole blob or seed a segment again", code: codeSeedFailed}
	case !p.legacyCut():
		return nil, &seederError{status: http.StatusConflict, msg: "an agent of the previous release cuts this blob into other segments", code: codeSeedFailed}
	}
	req.minSegments = 0 // unknown to protocol 1
	ctx, cancel := context.WithTimeout(ctx, v1AnswerTimeout)
	defer cancel()
	u := url.URL{Scheme: "http", Host: seeder.String(), Path: segmentPathV1, RawQuery: req.query().Encode()}
	httpReq, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, err
	}
	resp, err := s.controlV1.Do(httpReq)
	if err != nil {
		return nil, fmt.Errorf("ask %s for segment %d: %w", seeder, req.k, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return nil, fmt.Errorf("ask %s for segment %d: %w", seeder, req.k, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, &seederError{status: resp.StatusCode, msg: string(body)}
	}
	var answer segmentAnswer
	if err := json.Unmarshal(body, &answer); err != nil {
		return nil, fmt.Errorf("answer of %s for segment %d: %w", seeder, req.k, err)
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
	return protocolVersion
}

// protocolFallback records that peer speaks only version v, once per peer, visibly.
func (s *Swarm) protocolFallback(peer netip.AddrPort, v int) {
	if _, loaded := s.protocols.Swap(peer, v); loaded {
		return
	}
	s.metrics.protocolFallbacks.Inc()
	s.log.Warn("a peer speaks an older control protocol (an agent of the previous release?); falling back to it until the rollout of the new release reaches it",
		"peer", peer, "protocol", v, "ours", protocolVersion)
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
	return errors.Is(err, upstream.ErrRangeUnsupported) || (errors.As(err, &se) && se.code == codeRangeUnsupported)
}
