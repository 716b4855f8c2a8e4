// Package membership keeps the set of agents a node swarms with, as it changes, and which of them
// are alive.
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
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/shoal-dev/shoal/internal/promreg"
)

// Membership is the set of agents a node swarms with. Every agent must see the same members
// (up to liveness) for rendezvous hashing to agree on owners. The set may change while the
// agent runs (nodes join and leave); Changes tells when. Implementations are safe for
// concurrent use.
type Membership interface {
	// Self is this node's --p2p-addr, the address the other members reach it at. It is always a
	// member.
	Self() netip.AddrPort
	// Members returns every member, alive or not, self included, sorted by address, in a slice
	// the caller may keep and modify. Work is shared out over it, so that a member that dies
	// moves only its own share.
	Members() []netip.AddrPort
	// Live returns the members believed alive, self included, sorted by address, in a slice
	// the caller may keep and modify.
	Live() []netip.AddrPort
	// Allowed reports whether addr may connect to this node: whether it is the IP of any
	// current member, alive or not. A member that has left is refused from then on.
	Allowed(addr netip.Addr) bool
	// ReportFailure says that a request to addr just failed, so that addr is treated as dead
	// at once and a dead member costs one failed request rather than one per request until
	// the next probe notices. The member comes back when a later probe reaches it.
	ReportFailure(addr netip.AddrPort)
	// ReportAlive says that the member at IP addr just answered a request, made one or sent
	// data, so that checking its liveness separately can wait. It does not revive a member taken
	// for dead.
	ReportAlive(addr netip.Addr)
	// Changes returns a channel that is closed when the member set next changes: a member joins
	// or leaves (liveness does not count). A consumer that keeps something computed from Members
	// takes the channel before it reads Members, and knows its result stale once the channel is
	// closed; one that must act on a change waits on it, then takes the next one.
	Changes() <-chan struct{}
}

var _ Membership = (*Probed)(nil)

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

// Probed is the Membership the agent runs: its peers are given (the --peers list at start, then
// SetPeers whenever the source of the list changes it), the same on every node, and Run keeps
// their liveness up to date by probing them. Peers start alive, so that a cold start or a join
// does not wait for probes.
type Probed struct {
	self netip.AddrPort
	// set is the current member set, replaced whole by SetPeers: Members, Allowed and
	// ReportAlive, called for every connection and every chunk a peer sends, take no lock.
	set      atomic.Pointer[memberSet]
	probe    func(ctx context.Context, addr netip.AddrPort) error
	interval time.Duration
	timeout  time.Duration
	after    func(time.Duration) <-chan time.Time
	log      *slog.Logger
	reg      prometheus.Registerer
	gauge    *prometheus.GaugeVec   // nil: no metrics
	probes   *prometheus.CounterVec // nil: no metrics
	now      func() time.Time

	mu    sync.Mutex                      // also orders the replacements of set
	state map[netip.AddrPort]*memberState // every member but self
	live  []netip.AddrPort                // sorted, rebuilt on every change
}

// memberSet is one version of the member set. It does not change once published.
type memberSet struct {
	members []netip.AddrPort // sorted, self included
	ips     map[netip.Addr]struct{}
	// heard holds, for the IP of every other member, when it was last heard from (ReportAlive,
	// in Unix nanoseconds): a live member heard from within the probe interval is not probed.
	// A member that stays in the set keeps its entry.
	heard   map[netip.Addr]*atomic.Int64
	changed chan struct{} // closed when the set is replaced
}

// newMemberSet returns the set of members (from memberList), keeping prev's heard entries
// for the IPs still in it.
func newMemberSet(self netip.AddrPort, members []netip.AddrPort, prev *memberSet) *memberSet {
	set := &memberSet{members: members, ips: make(map[netip.Addr]struct{}, len(members)),
		heard: make(map[netip.Addr]*atomic.Int64, len(members)), changed: make(chan struct{})}
	for _, m := range members {
		ip := plainAddr(m.Addr())
		set.ips[ip] = struct{}{}
		if m == self || set.heard[ip] != nil {
			continue
		}
		if prev != nil && prev.heard[ip] != nil {
			set.heard[ip] = prev.heard[ip]
		} else {
			set.heard[ip] = new(atomic.Int64)
		}
	}
	return set
}

// memberList returns self and peers as members are kept: unmapped, sorted, each once, self
// included whether or not peers lists it. Invalid addresses are left out.
func memberList(self netip.AddrPort, peers []netip.AddrPort) []netip.AddrPort {
	members := make([]netip.AddrPort, 0, len(peers)+1)
	members = append(members, self)
	for _, p := range peers {
		if p.IsValid() {
			members = append(members, unmapAddrPort(p))
		}
	}
	slices.SortFunc(members, netip.AddrPort.Compare)
	return slices.Compact(members)
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

// ProbedOption configures a Probed.
type ProbedOption func(*Probed)

// WithProbe sets how a peer is probed (default: a TCP connection to its address, closed at
// once). probe must return when ctx ends: a probe round waits for all its probes.
func WithProbe(probe func(ctx context.Context, addr netip.AddrPort) error) ProbedOption {
	return func(s *Probed) { s.probe = probe }
}

// WithProbeInterval sets the time between the starts of two probe rounds (default
// DefaultProbeInterval; zero or less keeps it). A round that takes longer delays the next
// one: rounds never overlap.
func WithProbeInterval(d time.Duration) ProbedOption {
	return func(s *Probed) {
		if d > 0 {
			s.interval = d
		}
	}
}

// WithProbeTimeout bounds each probe (default DefaultProbeTimeout; zero or less keeps it). A
// peer that does not answer within it counts as dead.
func WithProbeTimeout(d time.Duration) ProbedOption {
	return func(s *Probed) {
		if d > 0 {
			s.timeout = d
		}
	}
}

// WithClock sets how Run waits between probe rounds (default time.After); tests pass a
// function returning a channel they control.
func WithClock(after func(time.Duration) <-chan time.Time) ProbedOption {
	return func(s *Probed) { s.after = after }
}

// WithLogger sets the logger for liveness and member changes (default: discard).
func WithLogger(l *slog.Logger) ProbedOption {
	return func(s *Probed) {
		if l != nil {
			s.log = l
		}
	}
}

// WithRegisterer registers the gauge shoal_swarm_members{state="live"|"dead"} with reg
// (nil: not registered). A process has one membership; a second Probed given the same
// registerer shares the gauge.
func WithRegisterer(reg prometheus.Registerer) ProbedOption {
	return func(s *Probed) { s.reg = reg }
}

// NewProbed returns the membership of self and peers; peers may include self, as when every
// node is given the same list. Call Run to probe the peers.
func NewProbed(self netip.AddrPort, peers []netip.AddrPort, opts ...ProbedOption) *Probed {
	s := &Probed{
		self:     unmapAddrPort(self),
		probe:    pingProbe(self),
		interval: DefaultProbeInterval,
		timeout:  DefaultProbeTimeout,
		after:    time.After,
		now:      time.Now,
		log:      slog.New(slog.DiscardHandler),
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
	set := newMemberSet(s.self, memberList(s.self, peers), nil)
	for _, m := range set.members {
		if m != s.self {
			s.state[m] = &memberState{}
		}
	}
	s.set.Store(set)
	s.mu.Lock()
	s.updateLocked()
	s.mu.Unlock()
	return s
}

// SetPeers makes self and peers the members, normalised as NewProbed does them: self stays
// a member whether or not peers lists it. Members that stay keep their liveness (a dead one
// stays dead until a probe reaches it); members that join start alive; members that leave are
// gone from Members, Live and Allowed when SetPeers returns, and Changes' channel is closed.
// The same set again changes nothing.
func (s *Probed) SetPeers(peers []netip.AddrPort) {
	members := memberList(s.self, peers)
	s.mu.Lock()
	defer s.mu.Unlock()
	prev := s.set.Load()
	if slices.Equal(members, prev.members) {
		return
	}
	var joined, left []netip.AddrPort
	for _, m := range members {
		if _, found := slices.BinarySearchFunc(prev.members, m, netip.AddrPort.Compare); !found {
			joined = append(joined, m)
			s.state[m] = &memberState{}
		}
	}
	for _, m := range prev.members {
		if _, found := slices.BinarySearchFunc(members, m, netip.AddrPort.Compare); !found {
			left = append(left, m)
			delete(s.state, m)
		}
	}
	s.set.Store(newMemberSet(s.self, members, prev))
	close(prev.changed)
	s.updateLocked()
	s.log.Info("swarm members changed", "members", len(members), "live", len(s.live),
		"joined", len(joined), "left", len(left), "joined_members", listAddrs(joined), "left_members", listAddrs(left))
}

// maxListed bounds the addresses a log record of a member change lists: a cluster created or
// torn down at once changes hundreds.
const maxListed = 10

// listAddrs formats addrs for a log record, listing at most maxListed of them.
func listAddrs(addrs []netip.AddrPort) string {
	var b strings.Builder
	for i, a := range addrs[:min(len(addrs), maxListed)] {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(a.String())
	}
	if len(addrs) > maxListed {
		b.WriteString(" and " + strconv.Itoa(len(addrs)-maxListed) + " more")
	}
	return b.String()
}

// Self implements Membership.
func (s *Probed) Self() netip.AddrPort { return s.self }

// Live implements Membership.
func (s *Probed) Live() []netip.AddrPort {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.live)
}

// Members implements Membership.
func (s *Probed) Members() []netip.AddrPort { return slices.Clone(s.set.Load().members) }

// Allowed implements Membership.
func (s *Probed) Allowed(addr netip.Addr) bool {
	_, ok := s.set.Load().ips[plainAddr(addr)]
	return ok
}

// Changes implements Membership.
func (s *Probed) Changes() <-chan struct{} { return s.set.Load().changed }

// ReportFailure implements Membership. Reports about self or about non-members are ignored.
func (s *Probed) ReportFailure(addr netip.AddrPort) {
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
func (s *Probed) ReportAlive(addr netip.Addr) {
	if h := s.set.Load().heard[plainAddr(addr)]; h != nil {
		h.Store(s.now().UnixNano())
	}
}

// Run probes every peer each probe interval, starting at once, until ctx ends, and returns nil
// once its probes have returned. Call it once. Each round probes the members of that moment.
// Probes run concurrently, each bounded by the probe timeout, so a peer that black-holes
// packets delays nobody else; a round ends when all its probes have returned.
func (s *Probed) Run(ctx context.Context) error {
	for ctx.Err() == nil {
		next := s.after(s.interval)
		s.probeRound(ctx)
		select {
		case <-ctx.Done():
		case <-next:
		}
	}
	return nil
}

func (s *Probed) probeRound(ctx context.Context) {
	var wg sync.WaitGroup
	set := s.set.Load()
	now := s.now()
	for _, p := range set.members {
		if p == s.self {
			continue
		}
		s.mu.Lock()
		m := s.state[p]
		if m == nil { // left since set was loaded
			s.mu.Unlock()
			continue
		}
		reports := m.reports
		// A live member that sent data, or made or answered a request, within the interval needs
		// no probe: in a rollout, members talk to each other constantly. A dead one is always
		// probed, the only way back to life.
		skip := !m.dead && now.UnixNano()-set.heard[plainAddr(p.Addr())].Load() < s.interval.Nanoseconds()
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
			s.setProbed(p, m, reports, err)
		})
	}
	wg.Wait()
}

// setProbed records the result of a probe of member p, whose state was m and its report count
// reports when the probe started. A member that left meanwhile (even if it is back) is not
// concerned: the probe was about its earlier membership.
func (s *Probed) setProbed(p netip.AddrPort, m *memberState, reports uint64, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.countProbe("failed")
	} else {
		s.countProbe("ok")
	}
	if s.state[p] != m {
		return
	}
	if err != nil {
		m.failedProbes++
	} else {
		m.failedProbes = 0
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

func (s *Probed) countProbe(result string) {
	if s.probes != nil {
		s.probes.WithLabelValues(result).Inc()
	}
}

// updateLocked rebuilds the live list and the gauge from the member set and states.
func (s *Probed) updateLocked() {
	members := s.set.Load().members
	s.live = s.live[:0:0] // a new array: Live's callers may hold the old one
	for _, m := range members {
		if st := s.state[m]; st == nil || !st.dead {
			s.live = append(s.live, m)
		}
	}
	if s.gauge != nil {
		s.gauge.WithLabelValues("live").Set(float64(len(s.live)))
		s.gauge.WithLabelValues("dead").Set(float64(len(members) - len(s.live)))
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
