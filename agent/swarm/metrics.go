package swarm

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Why a read went to upstream, as the reason label of shoal_swarm_stalls_total.
const (
	stallNoProgress = "no_progress"
	stallLatePiece  = "late_piece"
)

// Where the bytes of a blob came from, as metric labels.
const (
	sourcePeer     = "peer"
	sourceUpstream = "upstream"
	sourceLocal    = "local"
)

type metrics struct {
	bytes          *prometheus.CounterVec
	seederFailures prometheus.Counter
	// seederBusy counts segment requests asked again because their silent seeder showed life.
	seederBusy   prometheus.Counter
	stalls       *prometheus.CounterVec
	kicks        prometheus.Counter
	focuses      prometheus.Counter
	bans         prometheus.Counter
	retired      *prometheus.CounterVec
	filesRemoved prometheus.Counter
	completion   prometheus.Histogram
	// protocolFallbacks counts peers found to speak an older control protocol.
	protocolFallbacks prometheus.Counter
	// wholeBlobs counts blobs fetched whole because upstream ignores Range.
	wholeBlobs prometheus.Counter
	// rescues counts segments whose seeder stopped answering and that another member seeded again.
	rescues prometheus.Counter
	// prefetched counts segments this node started to seed ahead of readers (Prefetch).
	prefetched prometheus.Counter
}

func newMetrics(reg prometheus.Registerer, s *Swarm) *metrics {
	m := &metrics{
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "swarm", Name: "fetched_bytes_total",
			Help: "Blob bytes this node fetched itself, by source: upstream registry (seeding a segment or reading one directly) or the local store (seeding a segment of a blob it holds). Bytes from peers are shoal_swarm_peer_bytes_total.",
		}, []string{"source"}),
		seederFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "swarm", Name: "seeder_failures_total",
			Help: "Seeders that failed to answer for a segment; the next ranked member was asked.",
		}),
		seederBusy: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "swarm", Name: "seeder_busy_retries_total",
			Help: "Segment requests asked again of a seeder that timed out but showed life (sent data lately or answered a ping), instead of moving to the next member, which would fetch the segment from upstream again.",
		}),
		stalls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "swarm", Name: "stalls_total",
			Help: "Reads the swarm could not serve in time and that went to upstream instead, by reason: no_progress (the blob's torrent moved no byte for the stall timeout: the rest of the segment is read from upstream) or late_piece (the torrent progresses but one piece does not come: that piece alone is read from upstream).",
		}, []string{"reason"}),
		kicks: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "swarm", Name: "piece_kicks_total",
			Help: "Times a reader, waiting for a piece that a connected peer has and of which no byte had come, made the torrent client reconsider whom to ask for it.",
		}),
		focuses: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "swarm", Name: "reader_focuses_total",
			Help: "Times a reader held its node's other downloads of a blob back until the piece it waited for was in: a piece that at most two peers have and that crawled in beside the others for the stall timeout, or a late piece read from upstream.",
		}),
		bans: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "swarm", Name: "peers_banned_total",
			Help: "Peers banned because a block they sent differed from its piece once the piece verified (the torrent client also bans the only sender of a piece that fails by itself).",
		}),
		retired: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "swarm", Name: "blobs_retired_total",
			Help: "Blobs whose swarm state was dropped after the idle timeout, by reason: delivered (handed to the content store) or undelivered (its reader went away before the end, or the node only seeded it for peers).",
		}, []string{"reason"}),
		filesRemoved: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "swarm", Name: "working_files_removed_total",
			Help: "Working files no blob used (left by an earlier run and not resumed) removed after the idle timeout.",
		}),
		completion: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: "shoal", Subsystem: "swarm", Name: "blob_completion_seconds",
			Help:    "Time from the first request of a blob on this node until its last byte was read.",
			Buckets: prometheus.ExponentialBuckets(0.25, 2, 14),
		}),
		protocolFallbacks: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "swarm", Name: "protocol_fallbacks_total",
			Help: "Peers found to speak an older control protocol than this agent (an agent of the previous release during a rolling upgrade); this node speaks theirs with them.",
		}),
		wholeBlobs: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "swarm", Name: "whole_blob_fallbacks_total",
			Help: "Blobs this node learned must be fetched whole because their registry ignores Range (one member fetches the whole blob and the swarm trades it).",
		}),
		rescues: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "swarm", Name: "segment_rescues_total",
			Help: "Segments a reader waited for whose seeder did not answer a ping (stopped or wedged): the next member by rank seeded them again from upstream.",
		}),
		prefetched: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "swarm", Name: "prefetched_segments_total",
			Help: "Segments this node began to seed ahead of any reader, because pods were about to pull their blob (SwarmSeed).",
		}),
	}
	for _, reason := range []string{stallNoProgress, stallLatePiece} {
		m.stalls.WithLabelValues(reason)
	}
	if reg == nil {
		return m
	}
	stats := func(f func(cs statsView) float64) func() float64 {
		return func() float64 { return f(s.stats()) }
	}
	reg.MustRegister(m.bytes, m.seederFailures, m.seederBusy, m.stalls, m.kicks, m.focuses, m.bans, m.retired, m.filesRemoved, m.completion,
		m.protocolFallbacks, m.wholeBlobs, m.rescues, m.prefetched,
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "swarm", Name: "peer_bytes_total",
			Help: "Useful blob bytes received from peers.",
		}, stats(func(v statsView) float64 { return float64(v.peerBytesRead) })),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "swarm", Name: "uploaded_bytes_total",
			Help: "Blob bytes sent to peers.",
		}, stats(func(v statsView) float64 { return float64(v.bytesWritten) })),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "swarm", Name: "pieces_verified_total",
			Help: "Pieces received from peers that passed their hash check.",
		}, stats(func(v statsView) float64 { return float64(v.piecesGood) })),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "swarm", Name: "pieces_failed_total",
			Help: "Pieces received from peers that failed their hash check (their senders are banned).",
		}, stats(func(v statsView) float64 { return float64(v.piecesBad) })),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "swarm", Name: "pieces_read_back_total",
			Help: "Piece checks that read their piece back from disk, because its chunks did not arrive once each and in order (or it was resumed).",
		}, stats(func(v statsView) float64 { return float64(v.piecesReadBack) })),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "swarm", Name: "endgame_fetches_total",
			Help: "Second fetches of a piece in flight, from another peer, once every piece a blob needs was complete or being fetched (pieces data path).",
		}, stats(func(v statsView) float64 { return float64(v.duplicates) })),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "swarm", Name: "endgame_fetches_won_total",
			Help: "Endgame fetches that completed their piece before the first fetch did (pieces data path).",
		}, stats(func(v statsView) float64 { return float64(v.duplicatesWon) })),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: "shoal", Subsystem: "swarm", Name: "peers_connected",
			Help: "Established peer connections, summed over blob torrents.",
		}, stats(func(v statsView) float64 { return float64(v.peers) })),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: "shoal", Subsystem: "swarm", Name: "torrents",
			Help: "Segment torrents this node takes part in.",
		}, stats(func(v statsView) float64 { return float64(v.torrents) })),
	)
	return m
}

// statsView is a snapshot of the torrent client's counters.
type statsView struct {
	peerBytesRead, bytesWritten int64
	piecesGood, piecesBad       int64
	piecesReadBack              int64
	duplicates, duplicatesWon   int64
	peers, torrents             int
}

func (s *Swarm) stats() statsView {
	cs := s.client.Stats()
	return statsView{
		peerBytesRead:  cs.PeerBytesRead,
		bytesWritten:   cs.BytesWritten,
		piecesGood:     cs.PiecesGood,
		piecesBad:      cs.PiecesBad,
		piecesReadBack: cs.PiecesReadBack,
		duplicates:     cs.Duplicates,
		duplicatesWon:  cs.DuplicatesWon,
		torrents:       cs.Torrents,
		peers:          cs.Peers,
	}
}
