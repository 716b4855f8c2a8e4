// Package membership knows which agents a node swarms with and which of them are alive. Static
// is the membership of a fixed list of peers (--peers), probed over the agents' control API; the
// Kubernetes membership is its sibling.
package membership

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/shoal-dev/shoal/internal/promreg"
)

// Membership is the set of agents a node swarms with. Every agent must see the same members
// (up to liveness) for rendezvous hashing to agree on owners. Implementations are safe for
// concurrent use.
type Membership interface {
	// Self is this node's --p2p-addr, the address the other members reach it at.
	Self() netip.AddrPort
	// Members returns every member, alive or not, self included, sorted by address, in a slice
	// the caller may keep and modify. Work is shared out over it, so that a member that dies
	// moves only its own share.
	Members() []netip.AddrPort
	// Live returns the members believed alive, self included, sorted by address, in a slice
	// the caller may keep and modify.
	Live() []netip.AddrPort
	// Allowed reports whether addr may connect to this node: whether it is the IP of any
	// configured member, alive or not.
	Allowed(addr netip.Addr) bool
	// ReportFailure says that a request to addr just failed, so that addr is treated as dead
	// at once and a dead member costs one failed request rather than one per request until
	// the next probe notices. The member comes back when a later probe reaches it.
	ReportFailure(addr netip.AddrPort)
	// ReportAlive says that the member at IP addr just answered a request, made one or sent
	// data, so that checking its liveness separately can wait. It does not revive a member taken
	// for dead.
	ReportAlive(addr netip.Addr)
}

var _ Membership = (*Static)(nil)

// Probe defaults; see WithProbeInterval and WithProbeTimeout.
const (
	// DefaultProbeInterval spaces probe rounds: each round opens a connection to every other
	// member it has not heard from within the interval, so the cost grows with the square of the
	// cluster (at 32 nodes and one round a second the probes took 5 % of the agents' CPU in a
	// rollout). Requests that are refused mark a member dead at once, so the rounds only have to
	// catch members that vanish silently.
	DefaultProbeInterval = 3 * time.Second
	// DefaultProbeTimeout outlasts one lost SYN (Linux retransmits it after a second): on a
	// saturated link a live member must not look dead, which would move its segments.
	DefaultProbeTimeout = 1500 * time.Millisecond
)

// Static is the Membership of a fixed peer list (--peers), the same list on every node. Peers
// start alive, so that a cold start does not wait for probes, and Run keeps their liveness up
// to date by probing them.
type Static struct {
	self    netip.AddrPort
	members []netip.AddrPort // sorted, self included
	ips     map[netip.Addr]struct{}
	// heard holds, for the IP of every other member, when it was last heard from (ReportAlive,
	// in Unix nanoseconds): a live member heard from within the probe interval is not probed.
	// The map is built once; ReportAlive is called for every chunk a peer sends, so it takes
	// no lock.
	heard    map[netip.Addr]*atomic.Int64
	probe    func(ctx context.Context, addr netip.AddrPort) error
	interval time.Duration
	timeout  time.Duration
	after    func(time.Duration) <-chan time.Time
	log      *slog.Logger
	reg      prometheus.Registerer
	gauge    *prometheus.GaugeVec   // nil: no metrics
	probes   *prometheus.CounterVec // nil: no metrics
	now      func() time.Time

	mu    sync.Mutex
	state map[netip.AddrPort]*memberState // every member but self
	live  []netip.AddrPort                // sorted, rebuilt on every change
}

type memberState struct {
	dead bool
	// reports counts ReportFailure calls. A probe that succeeds revives the member only if no
	// failure was reported while it ran: its connection may predate the failure.
	reports uint64
	// failedProbes counts consecutive failed probes.
	failedProbes int
}

// probeFailuresToDie is how many probes in a row must fail before a member is taken for dead.
const probeFailuresToDie = 2

// StaticOption configures a Static.
type StaticOption func(*Static)

// WithProbe sets how a peer is probed (default: a TCP connection to its address, closed at
// once). probe must return when ctx ends: a probe round waits for all its probes.
func WithProbe(probe func(ctx context.Context, addr netip.AddrPort) error) StaticOption {
	return func(s *Static) { s.probe = probe }
}

// WithProbeInterval sets the time between the starts of two probe rounds (default
// DefaultProbeInterval; zero or less keeps it). A round that takes longer delays the next
// one: rounds never overlap.
func WithProbeInterval(d time.Duration) StaticOption {
	return func(s *Static) {
		if d > 0 {
			s.interval = d
		}
	}
}

// WithProbeTimeout bounds each probe (default DefaultProbeTimeout; zero or less keeps it). A
// peer that does not answer within it counts as dead.
func WithProbeTimeout(d time.Duration) StaticOption {
	return func(s *Static) {
		if d > 0 {
			s.timeout = d
		}
	}
}

// WithStaticClock sets how Run waits between probe rounds (default time.After); tests pass a
// function returning a channel they control.
func WithStaticClock(after func(time.Duration) <-chan time.Time) StaticOption {
	return func(s *Static) { s.after = after }
}

// WithStaticLogger sets the logger for liveness changes (default: discard).
func WithStaticLogger(l *slog.Logger) StaticOption {
	return func(s *Static) {
		if l != nil {
			s.log = l
		}
	}
}

// WithStaticRegisterer registers the gauge shoal_swarm_members{state="live"|"dead"} with reg
// (nil: not registered). A process has one membership; a second Static given the same
// registerer shares the gauge.
func WithStaticRegisterer(reg prometheus.Registerer) StaticOption {
	return func(s *Static) { s.reg = reg }
}

// NewStatic returns the membership of self and peers; peers may include self, as when every
// node is given the same list. Call Run to probe the peers.
func NewStatic(self netip.AddrPort, peers []netip.AddrPort, opts ...StaticOption) *Static {
	s := &Static{
		self:     unmapAddrPort(self),
		probe:    pingProbe(self),
		interval: DefaultProbeInterval,
		timeout:  DefaultProbeTimeout,
		after:    time.After,
		now:      time.Now,
		log:      slog.New(slog.DiscardHandler),
		ips:      map[netip.Addr]struct{}{},
		state:    map[netip.AddrPort]*memberState{},
	}
	for _, opt := range opts {
		opt(s)
	}
	if s.reg != nil {
		s.gauge = promreg.Shared(s.reg, prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "shoal", Subsystem: "swarm", Name: "members",
			Help: "Swarm members (this node included) by whether they are believed alive.",
		}, []string{"state"}))
		s.probes = promreg.Shared(s.reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "swarm", Name: "member_probes_total",
			Help: "Liveness checks of swarm members by result: ok, failed, or skipped because the member was heard from within the probe interval.",
		}, []string{"result"}))
	}
	s.members = append(s.members, s.self)
	for _, p := range peers {
		p = unmapAddrPort(p)
		if p == s.self || s.state[p] != nil {
			continue
		}
		s.state[p] = &memberState{}
		s.members = append(s.members, p)
	}
	slices.SortFunc(s.members, netip.AddrPort.Compare)
	s.heard = map[netip.Addr]*atomic.Int64{}
	for _, m := range s.members {
		s.ips[plainAddr(m.Addr())] = struct{}{}
		if m != s.self {
			s.heard[plainAddr(m.Addr())] = new(atomic.Int64)
		}
	}
	s.mu.Lock()
	s.updateLocked()
	s.mu.Unlock()
	return s
}

// Self implements Membership.
func (s *Static) Self() netip.AddrPort { return s.self }

// Live implements Membership.
func (s *Static) Live() []netip.AddrPort {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.live)
}

// Members implements Membership.
func (s *Static) Members() []netip.AddrPort { return slices.Clone(s.members) }

// Allowed implements Membership.
func (s *Static) Allowed(addr netip.Addr) bool {
	_, ok := s.ips[plainAddr(addr)]
	return ok
}

// ReportFailure implements Membership. Reports about self or about non-members are ignored.
func (s *Static) ReportFailure(addr netip.AddrPort) {
	addr = unmapAddrPort(addr)
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.state[addr]
	if m == nil {
		return
	}
	m.reports++
	if !m.dead {
		s.log.Info("swarm member marked dead after a failed request", "member", addr)
		m.dead = true
		s.updateLocked()
	}
}

// ReportAlive implements Membership: every member at that IP counts as heard from (self aside).
func (s *Static) ReportAlive(addr netip.Addr) {
	if h := s.heard[plainAddr(addr)]; h != nil {
		h.Store(s.now().UnixNano())
	}
}

// Run probes every peer each probe interval, starting at once, until ctx ends, and returns nil
// once its probes have returned. Call it once. Probes run concurrently, each bounded by the
// probe timeout, so a peer that black-holes packets delays nobody else; a round ends when all
// its probes have returned.
func (s *Static) Run(ctx context.Context) error {
	peers := make([]netip.AddrPort, 0, len(s.state))
	for _, m := range s.members {
		if m != s.self {
			peers = append(peers, m)
		}
	}
	for ctx.Err() == nil {
		next := s.after(s.interval)
		s.probeRound(ctx, peers)
		select {
		case <-ctx.Done():
		case <-next:
		}
	}
	return nil
}

func (s *Static) probeRound(ctx context.Context, peers []netip.AddrPort) {
	var wg sync.WaitGroup
	now := s.now()
	for _, p := range peers {
		s.mu.Lock()
		m := s.state[p]
		reports := m.reports
		// A live member that sent data, or made or answered a request, within the interval needs
		// no probe: in a rollout, members talk to each other constantly. A dead one is always
		// probed, the only way back to life.
		skip := !m.dead && now.UnixNano()-s.heard[plainAddr(p.Addr())].Load() < s.interval.Nanoseconds()
		s.mu.Unlock()
		if skip {
			s.countProbe("skipped")
			continue
		}
		wg.Go(func() {
			pctx, cancel := context.WithTimeout(ctx, s.timeout)
			err := s.probe(pctx, p)
			cancel()
			if ctx.Err() != nil {
				return // shutting down: the probe failed because of that, not because of p
			}
			s.setProbed(p, reports, err)
		})
	}
	wg.Wait()
}

// setProbed records the result of a probe of p started when p's report count was reports.
func (s *Static) setProbed(p netip.AddrPort, reports uint64, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.state[p]
	if err != nil {
		m.failedProbes++
		s.countProbe("failed")
	} else {
		m.failedProbes = 0
		s.countProbe("ok")
	}
	switch {
	case err != nil && !m.dead && m.failedProbes >= probeFailuresToDie:
		// One failed probe may be a busy node, or one starting at the same time as this one
		// (agents of a DaemonSet start together); requests that fail mark a member dead at
		// once through ReportFailure anyway.
		s.log.Warn("swarm member unreachable", "member", p, "error", err)
		m.dead = true
	case err == nil && m.dead && m.reports == reports:
		s.log.Info("swarm member reachable again", "member", p)
		m.dead = false
	default:
		return
	}
	s.updateLocked()
}

func (s *Static) countProbe(result string) {
	if s.probes != nil {
		s.probes.WithLabelValues(result).Inc()
	}
}

// updateLocked rebuilds the live list and the gauge from the member states.
func (s *Static) updateLocked() {
	s.live = s.live[:0:0] // a new array: Live's callers may hold the old one
	for _, m := range s.members {
		if st := s.state[m]; st == nil || !st.dead {
			s.live = append(s.live, m)
		}
	}
	if s.gauge != nil {
		s.gauge.WithLabelValues("live").Set(float64(len(s.live)))
		s.gauge.WithLabelValues("dead").Set(float64(len(s.members) - len(s.live)))
	}
}

// PingPath is the control API's liveness endpoint: every agent answers it with 204.
const PingPath = "/swarm/v1/ping"

// NewPinger returns a function that pings a member's control API from self's IP and fails unless
// it answers 204 before the context ends: what a probe does, for callers that must decide at
// once whether a member is stopped.
func NewPinger(self netip.AddrPort) func(ctx context.Context, addr netip.AddrPort) error {
	return pingProbe(self)
}

// LocalAddr is the source address of connections to other members: the node's p2p IP (any
// port), so that members, which admit each other by IP, recognise the node on multi-homed
// hosts too.
func LocalAddr(self netip.AddrPort) *net.TCPAddr {
	return net.TCPAddrFromAddrPort(netip.AddrPortFrom(self.Addr(), 0))
}

// Unmap returns p with an IPv4-in-IPv6 address unmapped, as members are compared.
func Unmap(p netip.AddrPort) netip.AddrPort { return unmapAddrPort(p) }

// pingProbe returns the default probe: a member is alive if its control API answers
// GET /swarm/v1/ping within the probe's deadline. A TCP connection alone proves nothing: the
// kernel of a stopped or wedged process still completes handshakes. Connections come from
// self's IP, by which members admit each other.
func pingProbe(self netip.AddrPort) func(ctx context.Context, addr netip.AddrPort) error {
	client := &http.Client{Transport: &http.Transport{
		DialContext:       (&net.Dialer{LocalAddr: LocalAddr(self)}).DialContext,
		DisableKeepAlives: true, // a probe must open a connection, as a peer would
	}}
	return func(ctx context.Context, addr netip.AddrPort) error {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr.String()+PingPath, nil)
		if err != nil {
			return err
		}
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusNoContent {
			return fmt.Errorf("ping %s: status %d", addr, resp.StatusCode)
		}
		return nil
	}
}

// ParsePeers parses a --peers value: comma-separated IP:PORT entries, IPv6 addresses in
// brackets ("10.0.0.1:7070,[fd00::2]:7070"). Blanks around entries are ignored; an empty
// string is an empty list. Host names are rejected (membership must not depend on DNS), as
// are unspecified addresses, port 0 and duplicates. IPv4-mapped IPv6 addresses are unmapped.
func ParsePeers(s string) ([]netip.AddrPort, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	entries := strings.Split(s, ",")
	peers := make([]netip.AddrPort, 0, len(entries))
	seen := make(map[netip.AddrPort]int, len(entries))
	for i, e := range entries {
		e = strings.TrimSpace(e)
		p, err := parsePeer(e)
		if err != nil {
			return nil, fmt.Errorf("peer %d of %d: %w", i+1, len(entries), err)
		}
		if first, dup := seen[p]; dup {
			return nil, fmt.Errorf("peer %d of %d: %s is listed twice (also peer %d)", i+1, len(entries), p, first)
		}
		seen[p] = i + 1
		peers = append(peers, p)
	}
	return peers, nil
}

func parsePeer(e string) (netip.AddrPort, error) {
	if e == "" {
		return netip.AddrPort{}, errors.New("empty entry (stray comma?)")
	}
	p, err := netip.ParseAddrPort(e)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%q is not IP:PORT (host names are not resolved; write IPv6 addresses as [IP]:PORT): %w", e, err)
	}
	p = unmapAddrPort(p)
	switch {
	case p.Addr().IsUnspecified():
		return netip.AddrPort{}, fmt.Errorf("%q: give the address peers reach the node at, not an unspecified address", e)
	case p.Port() == 0:
		return netip.AddrPort{}, fmt.Errorf("%q: port 0 is not a port peers can reach", e)
	}
	return p, nil
}

// plainAddr drops what does not identify a host for Allowed: the IPv4-in-IPv6 mapping a
// dual-stack socket reports, and an IPv6 zone.
func plainAddr(a netip.Addr) netip.Addr { return a.Unmap().WithZone("") }

func unmapAddrPort(p netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(p.Addr().Unmap(), p.Port())
}
