package piecewire

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"time"
)

// The haves stream of a blob is a sequence of frames, each a type byte and its payload:
//
//	'B' uint32 n, then ceil(n/8) bytes   the pieces verified so far (bit 7 of byte 0 is piece 0)
//	'H' uint32 i                         piece i is verified now
//	'K'                                  keepalive: nothing new
//
// A node sends the bitfield first, then a frame for each piece as it is verified, in batches, and
// a keepalive when nothing happened for havesKeepalive. Integers are big-endian.
const (
	frameBitfield  = 'B'
	frameHave      = 'H'
	frameKeepalive = 'K'
)

// havesKeepalive is how often an idle haves stream sends a keepalive; a follower that hears
// nothing for havesDeadTimeout reconnects.
const (
	havesKeepalive   = 5 * time.Second
	havesDeadTimeout = 3 * havesKeepalive
)

// stream is a haves stream served to a peer.
type stream struct {
	peer   netip.Addr
	cancel context.CancelFunc
}

// serveHaves streams the blob's haves to peer until it goes, is refused (Node.CloseRefused), or
// the blob is dropped.
func (b *Blob) serveHaves(w http.ResponseWriter, r *http.Request, peer netip.Addr) {
	flusher, ok := w.(http.Flusher)
	if !ok {
		http.Error(w, "streaming unsupported", http.StatusInternalServerError)
		return
	}
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	st := &stream{peer: peer, cancel: cancel}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.WriteHeader(http.StatusOK)
	bw := bufio.NewWriter(w)

	b.mu.Lock()
	b.streams[st] = struct{}{}
	defer func() {
		b.mu.Lock()
		delete(b.streams, st)
		b.mu.Unlock()
	}()
	field := make([]byte, 5+(b.pieces+7)/8)
	field[0] = frameBitfield
	binary.BigEndian.PutUint32(field[1:], uint32(b.pieces))
	for i, c := range b.complete {
		if c {
			field[5+i/8] |= 0x80 >> (i % 8)
		}
	}
	sent, ch := len(b.log), b.grew
	b.mu.Unlock()
	if _, err := bw.Write(field); err != nil || bw.Flush() != nil {
		return
	}
	flusher.Flush()

	keepalive := time.NewTicker(havesKeepalive)
	defer keepalive.Stop()
	var frame [5]byte
	frame[0] = frameHave
	for {
		select {
		case <-ch:
		case <-keepalive.C:
			if err := bw.WriteByte(frameKeepalive); err != nil || bw.Flush() != nil {
				return
			}
			flusher.Flush()
			continue
		case <-ctx.Done():
			return
		case <-b.ctx.Done():
			return
		}
		b.mu.Lock()
		fresh := b.log[sent:len(b.log):len(b.log)]
		sent, ch = len(b.log), b.grew
		b.mu.Unlock()
		if len(fresh) == 0 {
			continue
		}
		for _, i := range fresh {
			binary.BigEndian.PutUint32(frame[1:], i)
			if _, err := bw.Write(frame[:]); err != nil {
				return
			}
		}
		if bw.Flush() != nil {
			return
		}
		flusher.Flush()
		keepalive.Reset(havesKeepalive)
	}
}

// follow keeps p's haves stream open while the blob lives and this node wants pieces, and
// records what p has; after a failure it waits and opens it again (the bitfield then replaces
// what p was thought to have).
func (b *Blob) follow(p *peer) {
	backoff := 200 * time.Millisecond
	for {
		err := b.followOnce(p)
		b.mu.Lock()
		p.following = false
		b.mu.Unlock()
		if p.ctx.Err() != nil {
			return
		}
		select {
		case <-b.done:
			return // complete: nothing more to fetch
		default:
		}
		b.n.cfg.Logger.Debug("haves stream ended", "blob", b.name, "peer", p.addr, "err", err)
		select {
		case <-time.After(backoff):
		case <-p.ctx.Done():
			return
		case <-b.done:
			return
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

var errHavesDead = errors.New("haves stream silent")

func (b *Blob) followOnce(p *peer) error {
	ctx, cancel := context.WithCancelCause(p.ctx)
	defer cancel(nil)
	go func() { // stop following once the blob is complete here
		select {
		case <-b.done:
			cancel(nil)
		case <-ctx.Done():
		}
	}()
	url := fmt.Sprintf("http://%s%s?blob=%s", p.addr, HavesPath, b.name)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	dead := time.AfterFunc(havesDeadTimeout, func() { cancel(errHavesDead) })
	defer dead.Stop()
	resp, err := b.n.cfg.Client.Do(req)
	if err != nil {
		return orCause(ctx, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("haves of %s: %s", p.addr, resp.Status)
	}
	b.mu.Lock()
	p.following = true
	b.mu.Unlock()
	br := bufio.NewReader(resp.Body)
	for {
		f, err := readFrame(br, b.pieces)
		if err != nil {
			return orCause(ctx, fmt.Errorf("haves of %s: %w", p.addr, err))
		}
		dead.Reset(havesDeadTimeout)
		switch f.kind {
		case frameBitfield:
			b.mu.Lock()
			for i := range b.pieces {
				b.setHasLocked(p, i, f.field[i/8]&(0x80>>(i%8)) != 0)
			}
			b.mu.Unlock()
		case frameHave:
			b.mu.Lock()
			b.setHasLocked(p, f.piece, true)
			b.mu.Unlock()
		}
	}
}

// frame is one frame of a haves stream.
type frame struct {
	kind  byte
	piece int    // of a have
	field []byte // of a bitfield
}

// readFrame reads the next frame of the haves stream of a blob of pieces pieces, and refuses
// one that does not fit that blob.
func readFrame(br *bufio.Reader, pieces int) (frame, error) {
	t, err := br.ReadByte()
	if err != nil {
		return frame{}, err
	}
	var head [4]byte
	switch t {
	case frameKeepalive:
		return frame{kind: t}, nil
	case frameBitfield:
		if _, err := io.ReadFull(br, head[:]); err != nil {
			return frame{}, err
		}
		if n := binary.BigEndian.Uint32(head[:]); uint64(n) != uint64(pieces) {
			return frame{}, fmt.Errorf("bitfield of %d pieces, the blob has %d", n, pieces)
		}
		field := make([]byte, (pieces+7)/8)
		if _, err := io.ReadFull(br, field); err != nil {
			return frame{}, err
		}
		return frame{kind: t, field: field}, nil
	case frameHave:
		if _, err := io.ReadFull(br, head[:]); err != nil {
			return frame{}, err
		}
		i := binary.BigEndian.Uint32(head[:])
		if uint64(i) >= uint64(pieces) {
			return frame{}, fmt.Errorf("have of piece %d of a blob of %d", i, pieces)
		}
		return frame{kind: t, piece: int(i)}, nil
	}
	return frame{}, fmt.Errorf("unknown frame type %q", t)
}
