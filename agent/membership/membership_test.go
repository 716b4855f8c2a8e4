package membership

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// testWait bounds every wait in these tests so that a bug fails them instead of hanging them.
const testWait = 10 * time.Second

func TestParsePeers(t *testing.T) {
	ap := netip.MustParseAddrPort
	tests := []struct {
		in      string
		want    []netip.AddrPort
		wantErr string // substring of the error; "" means no error
	}{
		{in: "", want: nil},
		{in: "  ", want: nil},
		{in: "10.0.0.1:7070", want: []netip.AddrPort{ap("10.0.0.1:7070")}},
		{in: "10.0.0.1:7070,10.0.0.2:7070", want: []netip.AddrPort{ap("10.0.0.1:7070"), ap("10.0.0.2:7070")}},
		{in: " 10.0.0.2:7070 , 10.0.0.1:7070 ", want: []netip.AddrPort{ap("10.0.0.2:7070"), ap("10.0.0.1:7070")}},
		{in: "[fd00::1]:7070,10.0.0.1:7070", want: []netip.AddrPort{ap("[fd00::1]:7070"), ap("10.0.0.1:7070")}},
		{in: "10.0.0.1:7070,10.0.0.1:7071", want: []netip.AddrPort{ap("10.0.0.1:7070"), ap("10.0.0.1:7071")}},
		{in: "[::ffff:10.0.0.1]:7070", want: []netip.AddrPort{ap("10.0.0.1:7070")}},
		{in: "10.0.0.1:7070,,10.0.0.2:7070", wantErr: "peer 2 of 3: empty entry"},
		{in: "10.0.0.1:7070,", wantErr: "peer 2 of 2: empty entry"},
		{in: "10.0.0.1", wantErr: `peer 1 of 1: "10.0.0.1" is not IP:PORT`},
		{in: "node-a:7070", wantErr: `"node-a:7070" is not IP:PORT (host names are not resolved`},
		{in: "fd00::1:7070", wantErr: `"fd00::1:7070" is not IP:PORT`},
		{in: "10.0.0.1:70700", wantErr: `"10.0.0.1:70700" is not IP:PORT`},
		{in: "10.0.0.1:0", wantErr: "port 0"},
		{in: "0.0.0.0:7070", wantErr: "unspecified address"},
		{in: "[::]:7070", wantErr: "unspecified address"},
		{in: "10.0.0.1:7070,10.0.0.2:7070,10.0.0.1:7070", wantErr: "peer 3 of 3: 10.0.0.1:7070 is listed twice (also peer 1)"},
		{in: "10.0.0.1:7070,[::ffff:10.0.0.1]:7070", wantErr: "listed twice"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := ParsePeers(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParsePeers(%q) = %v, %v; want error containing %q", tt.in, got, err, tt.wantErr)
				}
				return
			}
			if err != nil || !slices.Equal(got, tt.want) {
				t.Fatalf("ParsePeers(%q) = %v, %v; want %v", tt.in, got, err, tt.want)
			}
		})
	}
}

// probeCall is one probe, waiting for the test to answer it.
type probeCall struct {
	ctx   context.Context
	addr  netip.AddrPort
	reply chan error
}

// fakeProbes gives the test every probe through a channel and a clock it ticks by hand. A
// tick is received only once a probe round has ended and applied its results, so after
// sending one the test sees a settled state until it answers the next round's probes.
type fakeProbes struct {
	calls chan probeCall
	ticks chan time.Time
}

func newFakeProbes() *fakeProbes {
	return &fakeProbes{calls: make(chan probeCall), ticks: make(chan time.Time)}
}

func (f *fakeProbes) options() []ProbedOption {
	return []ProbedOption{
		WithProbe(func(ctx context.Context, addr netip.AddrPort) error {
			reply := make(chan error, 1)
			select {
			case f.calls <- probeCall{ctx, addr, reply}:
			case <-ctx.Done():
				return ctx.Err()
			}
			select {
			case err := <-reply:
				return err
			case <-ctx.Done():
				return ctx.Err()
			}
		}),
		WithClock(func(time.Duration) <-chan time.Time { return f.ticks }),
		WithProbeTimeout(time.Hour), // only the test ends a probe
	}
}

// round answers one probe per peer (concurrently waiting probes: they all arrive before any is
// answered) with results[addr] (nil if absent), then ticks, returning when the round is over.
func (f *fakeProbes) round(t *testing.T, peers int, results map[netip.AddrPort]error) {
	t.Helper()
	calls := f.await(t, peers)
	for _, c := range calls {
		c.reply <- results[c.addr]
	}
	f.tick(t)
}

func (f *fakeProbes) await(t *testing.T, n int) []probeCall {
	t.Helper()
	var calls []probeCall
	for range n {
		select {
		case c := <-f.calls:
			calls = append(calls, c)
		case <-time.After(testWait):
			t.Fatalf("got %d of %d probes of a round: probes do not run concurrently?", len(calls), n)
		}
	}
	slices.SortFunc(calls, func(a, b probeCall) int { return a.addr.Compare(b.addr) })
	for i := 1; i < len(calls); i++ {
		if calls[i].addr == calls[i-1].addr {
			t.Fatalf("%v probed twice in one round", calls[i].addr)
		}
	}
	return calls
}

func (f *fakeProbes) tick(t *testing.T) {
	t.Helper()
	select {
	case f.ticks <- time.Time{}:
	case <-time.After(testWait):
		t.Fatalf("the probe round did not end")
	}
}

// startProbed runs s until the test ends.
func startProbed(t *testing.T, s *Probed) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = s.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(testWait):
			t.Errorf("Run did not return after its context ended")
		}
	})
}

var (
	selfAddr = netip.MustParseAddrPort("10.0.0.1:7070")
	peerB    = netip.MustParseAddrPort("10.0.0.2:7070")
	peerC    = netip.MustParseAddrPort("10.0.0.3:7070")
	errDown  = fmt.Errorf("%s: %w", "connection refused", syscall.ECONNREFUSED)
)

func TestProbedMembers(t *testing.T) {
	// The same list on every node, in any order, self included or not.
	for _, peers := range [][]netip.AddrPort{
		{peerC, selfAddr, peerB},
		{peerB, peerC},
		{peerC, peerB, peerC, netip.AddrPortFrom(netip.AddrFrom16(selfAddr.Addr().As16()), selfAddr.Port())},
	} {
		s := NewProbed(selfAddr, peers)
		if got, want := s.Live(), []netip.AddrPort{selfAddr, peerB, peerC}; !slices.Equal(got, want) {
			t.Errorf("NewProbed(%v).Live() = %v, want %v", peers, got, want)
		}
		if s.Self() != selfAddr {
			t.Errorf("Self() = %v", s.Self())
		}
	}
}

func TestProbedLiveIsACopy(t *testing.T) {
	s := NewProbed(selfAddr, []netip.AddrPort{peerB, peerC})
	live := s.Live()
	live[0] = netip.MustParseAddrPort("192.0.2.1:1")
	if got := s.Live(); got[0] != selfAddr {
		t.Errorf("modifying Live's result changed the membership: %v", got)
	}
}

func TestProbedAllowed(t *testing.T) {
	other := netip.MustParseAddrPort("[fd00::9]:7070")
	s := NewProbed(selfAddr, []netip.AddrPort{peerB, peerC, other})
	s.ReportFailure(peerB) // dead members may still connect: they may be coming back
	tests := []struct {
		addr string
		want bool
	}{
		{"10.0.0.1", true}, // self: its own probes and loopback-free local tests
		{"10.0.0.2", true},
		{"10.0.0.3", true},
		{"::ffff:10.0.0.3", true}, // as a dual-stack socket reports it
		{"fd00::9", true},
		{"10.0.0.4", false},
		{"127.0.0.1", false},
		{"fd00::10", false},
	}
	for _, tt := range tests {
		if got := s.Allowed(netip.MustParseAddr(tt.addr)); got != tt.want {
			t.Errorf("Allowed(%s) = %v, want %v", tt.addr, got, tt.want)
		}
	}
}

func TestProbedLiveness(t *testing.T) {
	f := newFakeProbes()
	reg := prometheus.NewRegistry()
	s := NewProbed(selfAddr, []netip.AddrPort{selfAddr, peerB, peerC}, append(f.options(), WithRegisterer(reg))...)
	all := []netip.AddrPort{selfAddr, peerB, peerC}
	if got := s.Live(); !slices.Equal(got, all) {
		t.Fatalf("before any probe Live() = %v, want everyone %v", got, all)
	}
	wantGauge(t, reg, 3, 0)
	startProbed(t, s)

	steps := []struct {
		name    string
		results map[netip.AddrPort]error
		want    []netip.AddrPort
	}{
		{"one failed probe is not enough", map[netip.AddrPort]error{peerC: errDown}, all},
		{"second failed probe", map[netip.AddrPort]error{peerC: errDown}, []netip.AddrPort{selfAddr, peerB}},
		{"still down", map[netip.AddrPort]error{peerC: errDown}, []netip.AddrPort{selfAddr, peerB}},
		{"back, another fails once", map[netip.AddrPort]error{peerB: errDown}, all},
		{"the other fails twice", map[netip.AddrPort]error{peerB: errDown}, []netip.AddrPort{selfAddr, peerC}},
		{"both fail", map[netip.AddrPort]error{peerB: errDown, peerC: errDown}, []netip.AddrPort{selfAddr, peerC}},
		{"all down but self", map[netip.AddrPort]error{peerB: errDown, peerC: errDown}, []netip.AddrPort{selfAddr}},
		{"all back", nil, all},
	}
	for _, step := range steps {
		f.round(t, 2, step.results)
		if got := s.Live(); !slices.Equal(got, step.want) {
			t.Fatalf("%s: Live() = %v, want %v", step.name, got, step.want)
		}
		wantGauge(t, reg, len(step.want), len(all)-len(step.want))
	}
}

func TestProbedReportFailure(t *testing.T) {
	f := newFakeProbes()
	s := NewProbed(selfAddr, []netip.AddrPort{peerB, peerC}, f.options()...)
	startProbed(t, s)
	f.round(t, 2, nil)

	s.ReportFailure(peerB)
	s.ReportFailure(selfAddr)                                         // self is always live
	s.ReportFailure(netip.MustParseAddrPort("10.0.0.9:7070"))         // not a member: ignored
	s.ReportFailure(netip.AddrPortFrom(peerC.Addr(), peerC.Port()+1)) // another port: not a member
	if got, want := s.Live(), []netip.AddrPort{selfAddr, peerC}; !slices.Equal(got, want) {
		t.Fatalf("after ReportFailure(%v) Live() = %v, want %v", peerB, got, want)
	}

	// A probe that was already under way when the failure was reported does not revive the
	// member: its connection may predate the failure. (This round may have started before
	// or after ReportFailure(peerB), so peerB's probe fails to keep the outcome certain.)
	calls := f.await(t, 2)
	s.ReportFailure(peerC)
	calls[0].reply <- errDown // peerB
	calls[1].reply <- nil     // peerC
	f.tick(t)
	if got, want := s.Live(), []netip.AddrPort{selfAddr}; !slices.Equal(got, want) {
		t.Fatalf("after a round that started before ReportFailure(%v): Live() = %v, want %v", peerC, got, want)
	}

	// The next successful probe does.
	f.round(t, 2, nil)
	if got, want := s.Live(), []netip.AddrPort{selfAddr, peerB, peerC}; !slices.Equal(got, want) {
		t.Fatalf("after a successful probe Live() = %v, want %v", got, want)
	}
}

// TestProbedSlowProbe: a probe that hangs holds up neither the other probes of its round nor,
// once its timeout passes, the membership; the next round waits for it.
func TestProbedSlowProbe(t *testing.T) {
	f := newFakeProbes()
	s := NewProbed(selfAddr, []netip.AddrPort{peerB, peerC}, f.options()...)
	startProbed(t, s)

	calls := f.await(t, 2) // both probes are running at once
	calls[1].reply <- nil  // peerC answers; peerB hangs
	select {
	case f.ticks <- time.Time{}:
		t.Fatalf("a new round could start while a probe of the previous one was running")
	default:
	}
	calls[0].reply <- errDown
	f.tick(t)
	// The round ended only now; peerB failed once, which is not yet enough to be dead.
	if got, want := s.Live(), []netip.AddrPort{selfAddr, peerB, peerC}; !slices.Equal(got, want) {
		t.Fatalf("Live() = %v, want %v", got, want)
	}
}

// TestProbedProbeTimeout: a probe that ignores everything but its context is cut off by the
// probe timeout and its peer counts as dead.
func TestProbedProbeTimeout(t *testing.T) {
	ticks := make(chan time.Time)
	s := NewProbed(selfAddr, []netip.AddrPort{peerB, peerC},
		WithProbe(func(ctx context.Context, addr netip.AddrPort) error {
			if addr == peerB {
				<-ctx.Done() // black-holed
				return ctx.Err()
			}
			return nil
		}),
		WithProbeTimeout(time.Millisecond),
		WithClock(func(time.Duration) <-chan time.Time { return ticks }),
	)
	startProbed(t, s)
	nextRound := func() {
		t.Helper()
		select {
		case ticks <- time.Time{}:
		case <-time.After(testWait):
			t.Fatalf("the probe timeout did not end the hanging probe")
		}
	}
	nextRound()
	// One timeout may be a busy node: still live.
	if got, want := s.Live(), []netip.AddrPort{selfAddr, peerB, peerC}; !slices.Equal(got, want) {
		t.Fatalf("after one timed-out probe Live() = %v, want %v", got, want)
	}
	nextRound()
	if got, want := s.Live(), []netip.AddrPort{selfAddr, peerC}; !slices.Equal(got, want) {
		t.Fatalf("after two timed-out probes Live() = %v, want %v", got, want)
	}
}

func TestProbedRunStopsAndIgnoresProbesCutByShutdown(t *testing.T) {
	f := newFakeProbes()
	s := NewProbed(selfAddr, []netip.AddrPort{peerB}, f.options()...)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = s.Run(ctx)
	}()
	c := f.await(t, 1)[0]
	cancel() // the probe returns ctx.Err(): that says nothing about peerB
	select {
	case <-done:
	case <-time.After(testWait):
		t.Fatalf("Run did not return after its context ended")
	}
	if err := c.ctx.Err(); err == nil {
		t.Errorf("the probe's context did not end with Run's")
	}
	if got, want := s.Live(), []netip.AddrPort{selfAddr, peerB}; !slices.Equal(got, want) {
		t.Errorf("Live() = %v, want %v", got, want)
	}
}

// TestProbedConcurrentUse is for -race: readers and reporters while probes flip states.
func TestProbedConcurrentUse(t *testing.T) {
	f := newFakeProbes()
	peers := testMembers(8)
	s := NewProbed(peers[0], peers, append(f.options(), WithRegisterer(prometheus.NewRegistry()))...)
	startProbed(t, s)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Go(func() {
			for j := 0; ; j++ {
				select {
				case <-stop:
					return
				default:
				}
				live := s.Live()
				if len(live) == 0 || !slices.Contains(live, peers[0]) {
					t.Errorf("Live() = %v lacks self", live)
					return
				}
				s.Allowed(peers[j%len(peers)].Addr())
				if j%16 == 0 {
					s.ReportFailure(peers[(i+j)%len(peers)])
				}
			}
		})
	}
	for r := range 20 {
		results := map[netip.AddrPort]error{}
		for i, p := range peers {
			if (i+r)%3 == 0 {
				results[p] = errDown
			}
		}
		f.round(t, len(peers)-1, results)
	}
	close(stop)
	wg.Wait()
}

// TestPingProbe checks that a member counts as alive only if its control API answers: a port
// that completes handshakes but never answers (a stopped process) fails the probe.
func TestPingProbe(t *testing.T) {
	answering, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+PingPath, func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusNoContent) })
	server := &http.Server{Handler: mux, ReadHeaderTimeout: time.Second}
	go func() { _ = server.Serve(answering) }()
	defer server.Close()
	silent, err := net.Listen("tcp", "127.0.0.1:0") // never accepts: the kernel still handshakes
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	self := netip.MustParseAddrPort("127.0.0.1:1")
	probe := pingProbe(self)
	ctx, cancel := context.WithTimeout(context.Background(), testWait)
	defer cancel()
	if err := probe(ctx, netip.MustParseAddrPort(answering.Addr().String())); err != nil {
		t.Errorf("probe of an answering member: %v", err)
	}
	short, cancelShort := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancelShort()
	if err := probe(short, netip.MustParseAddrPort(silent.Addr().String())); err == nil {
		t.Error("probe of a port that accepts but never answers succeeded")
	}
	addr := netip.MustParseAddrPort(answering.Addr().String())
	_ = server.Close()
	if err := probe(ctx, addr); err == nil {
		t.Error("probe of a closed port succeeded")
	}
}

// wantGauge checks shoal_swarm_members.
func wantGauge(t *testing.T, reg *prometheus.Registry, live, dead int) {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != "shoal_swarm_members" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "state" {
					got[l.GetValue()] = m.GetGauge().GetValue()
				}
			}
		}
	}
	if got["live"] != float64(live) || got["dead"] != float64(dead) {
		t.Errorf("shoal_swarm_members = %v, want live %d, dead %d", got, live, dead)
	}
}

// fakeNow is a clock that moves only when told to.
type fakeNow struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeNow) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeNow) set(t time.Time) {
	c.mu.Lock()
	c.t = t
	c.mu.Unlock()
}

// TestProbedSkipsMembersHeardFrom: a live member that answered or made a request within the
// probe interval is not probed (a round that probed it anyway would not end: nobody answers
// that probe); one heard from longer ago is, and so is a dead one, whatever was heard.
func TestProbedSkipsMembersHeardFrom(t *testing.T) {
	f := newFakeProbes()
	reg := prometheus.NewRegistry()
	s := NewProbed(selfAddr, []netip.AddrPort{peerB, peerC}, append(f.options(), WithRegisterer(reg))...)
	t0 := time.Unix(1000, 0)
	clock := &fakeNow{t: t0}
	s.now = clock.now
	s.ReportAlive(peerB.Addr())
	s.ReportAlive(selfAddr.Addr())                 // self: ignored
	s.ReportAlive(netip.MustParseAddr("10.0.0.9")) // not a member: ignored
	startProbed(t, s)

	for i, at := range []time.Duration{2 * time.Second, DefaultProbeInterval} {
		calls := f.await(t, 1)
		if calls[0].addr != peerC {
			t.Fatalf("round %d probed %v, want only %v", i+1, calls[0].addr, peerC)
		}
		calls[0].reply <- nil
		clock.set(t0.Add(at)) // the time of the next round
		if i == 1 {
			s.ReportAlive(peerC.Addr())
			s.ReportFailure(peerC)
		}
		f.tick(t)
	}
	if got := testutil.ToFloat64(s.probes.WithLabelValues("skipped")); got != 2 {
		t.Errorf("skipped probes = %v, want 2", got)
	}

	// peerB was heard from a whole interval ago: probed again. peerC is dead: probed although
	// it was just heard from, and revived by the probe.
	if got, want := s.Live(), []netip.AddrPort{selfAddr, peerB}; !slices.Equal(got, want) {
		t.Fatalf("after ReportFailure(%v) Live() = %v, want %v", peerC, got, want)
	}
	f.round(t, 2, nil)
	if got, want := s.Live(), []netip.AddrPort{selfAddr, peerB, peerC}; !slices.Equal(got, want) {
		t.Fatalf("after a successful probe of the dead member Live() = %v, want %v", got, want)
	}
	if got := testutil.ToFloat64(s.probes.WithLabelValues("ok")); got != 4 {
		t.Errorf("successful probes = %v, want 4", got)
	}
}

// testMembers returns n member addresses, 10.x.y.z:7070.
func testMembers(n int) []netip.AddrPort {
	ms := make([]netip.AddrPort, n)
	for i := range ms {
		ms[i] = netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 7070)
	}
	return ms
}

// logRecords is a slog.Handler that keeps every record.
type logRecords struct {
	mu   sync.Mutex
	recs []slog.Record
}

func (l *logRecords) Enabled(context.Context, slog.Level) bool { return true }
func (l *logRecords) WithAttrs([]slog.Attr) slog.Handler       { return l }
func (l *logRecords) WithGroup(string) slog.Handler            { return l }

func (l *logRecords) Handle(_ context.Context, r slog.Record) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.recs = append(l.recs, r.Clone())
	return nil
}

// withMessage returns the attributes, as strings, of the records with message msg.
func (l *logRecords) withMessage(level slog.Level, msg string) []map[string]string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []map[string]string
	for _, r := range l.recs {
		if r.Message != msg || r.Level != level {
			continue
		}
		attrs := map[string]string{}
		r.Attrs(func(a slog.Attr) bool {
			attrs[a.Key] = a.Value.String()
			return true
		})
		out = append(out, attrs)
	}
	return out
}

const membersChanged = "swarm members changed"

// TestProbedSetPeersLogsEachChangeOnce: a change is logged once, its addresses bounded, and the
// gauge follows; the same set again is not a change (no record, no new member set).
func TestProbedSetPeersLogsEachChangeOnce(t *testing.T) {
	logs := &logRecords{}
	reg := prometheus.NewRegistry()
	s := NewProbed(selfAddr, []netip.AddrPort{peerB}, WithLogger(slog.New(logs)), WithRegisterer(reg))
	s.ReportFailure(peerB)
	var joining []netip.AddrPort
	for i := range maxListed + 2 {
		joining = append(joining, netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, 1, byte(i)}), 7070))
	}
	s.SetPeers(append(slices.Clone(joining), peerB, selfAddr))
	recs := logs.withMessage(slog.LevelInfo, membersChanged)
	if len(recs) != 1 {
		t.Fatalf("%d records %q after one change, want 1", len(recs), membersChanged)
	}
	want := map[string]string{"members": "14", "live": "13", "joined": "12", "left": "0", "left_members": ""}
	for k, v := range want {
		if recs[0][k] != v {
			t.Errorf("%s = %q, want %q (record %v)", k, recs[0][k], v, recs[0])
		}
	}
	if got, suffix := recs[0]["joined_members"], " and 2 more"; !strings.HasPrefix(got, "10.0.1.0:7070, 10.0.1.1:7070") ||
		!strings.HasSuffix(got, suffix) || strings.Count(got, ":7070") != maxListed {
		t.Errorf("joined_members = %q, want %d addresses then %q", got, maxListed, suffix)
	}
	wantGauge(t, reg, 13, 1)

	set := s.set.Load()
	s.SetPeers(append([]netip.AddrPort{peerB}, joining...)) // the same set, self left out
	if s.set.Load() != set {
		t.Error("SetPeers with the same set replaced the member set")
	}
	if n := len(logs.withMessage(slog.LevelInfo, membersChanged)); n != 1 {
		t.Errorf("%d records %q after the same set again, want still 1", n, membersChanged)
	}

	s.SetPeers([]netip.AddrPort{peerC})
	recs = logs.withMessage(slog.LevelInfo, membersChanged)
	if len(recs) != 2 {
		t.Fatalf("%d records %q after two changes, want 2", len(recs), membersChanged)
	}
	if got := recs[1]; got["joined"] != "1" || got["left"] != "13" || got["members"] != "2" {
		t.Errorf("second change logged %v, want 1 joined, 13 left, 2 members", got)
	}
	wantGauge(t, reg, 2, 0)
}

// TestProbedRunProbesTheMembersOfEachRound: a member that joins after Run started is probed
// from the next round on; one that leaves is not probed again.
func TestProbedRunProbesTheMembersOfEachRound(t *testing.T) {
	f := newFakeProbes()
	s := NewProbed(selfAddr, []netip.AddrPort{peerB}, f.options()...)
	startProbed(t, s)

	calls := f.await(t, 1)
	s.SetPeers([]netip.AddrPort{peerB, peerC}) // while the first round runs
	calls[0].reply <- nil
	f.tick(t)

	calls = f.await(t, 2)
	if calls[0].addr != peerB || calls[1].addr != peerC {
		t.Fatalf("the round after %v joined probed %v and %v, want %v and %v", peerC, calls[0].addr, calls[1].addr, peerB, peerC)
	}
	s.SetPeers([]netip.AddrPort{peerC})
	for _, c := range calls {
		c.reply <- nil
	}
	f.tick(t)

	// A round that probed peerB too would not end: nobody answers that probe.
	calls = f.await(t, 1)
	if calls[0].addr != peerC {
		t.Fatalf("the round after %v left probed %v, want %v", peerB, calls[0].addr, peerC)
	}
	calls[0].reply <- nil
	f.tick(t)
}

// TestProbedSetPeersKeepsWhatWasHeard: a member that stays keeps the time it was last heard
// from, so the round after a change does not probe it (a round that did would not end).
func TestProbedSetPeersKeepsWhatWasHeard(t *testing.T) {
	f := newFakeProbes()
	s := NewProbed(selfAddr, []netip.AddrPort{peerB}, f.options()...)
	clock := &fakeNow{t: time.Unix(1000, 0)}
	s.now = clock.now
	s.ReportAlive(peerB.Addr())
	s.SetPeers([]netip.AddrPort{peerB, peerC})
	startProbed(t, s)
	calls := f.await(t, 1)
	if calls[0].addr != peerC {
		t.Fatalf("probed %v, want only %v: %v was heard from just before the change", calls[0].addr, peerC, peerB)
	}
	calls[0].reply <- nil
	f.tick(t)
}

// TestProbedProbeOfAMemberThatLeftIsDropped: the result of a probe that began before its member
// left counts neither for the member (nor for the same address come back as a new member).
func TestProbedProbeOfAMemberThatLeftIsDropped(t *testing.T) {
	f := newFakeProbes()
	s := NewProbed(selfAddr, []netip.AddrPort{peerB}, f.options()...)
	startProbed(t, s)

	calls := f.await(t, 1)
	s.SetPeers(nil)
	s.SetPeers([]netip.AddrPort{peerB}) // back, as a new member
	calls[0].reply <- errDown
	f.tick(t)
	// Had the first failure counted, this second one would make it dead.
	f.round(t, 1, map[netip.AddrPort]error{peerB: errDown})
	if got, want := s.Live(), []netip.AddrPort{selfAddr, peerB}; !slices.Equal(got, want) {
		t.Fatalf("Live() = %v after one failed probe since %v came back, want %v", got, peerB, want)
	}

	calls = f.await(t, 1)
	s.SetPeers(nil)
	calls[0].reply <- errDown // about a member that is gone
	f.tick(t)
	if got, want := s.Live(), []netip.AddrPort{selfAddr}; !slices.Equal(got, want) {
		t.Fatalf("Live() = %v, want %v", got, want)
	}
}

// TestProbedSetPeersConcurrentUse is for -race: the member set changes while probe rounds run
// back to back and readers and reporters use it.
func TestProbedSetPeersConcurrentUse(t *testing.T) {
	peers := testMembers(8)
	self := peers[0]
	s := NewProbed(self, peers,
		WithProbe(func(_ context.Context, addr netip.AddrPort) error {
			if addr.Addr().As4()[3]%3 == 0 {
				return errDown
			}
			return nil
		}),
		WithClock(func(time.Duration) <-chan time.Time {
			now := make(chan time.Time, 1)
			now <- time.Time{}
			return now
		}),
		WithRegisterer(prometheus.NewRegistry()))
	startProbed(t, s)
	var wg sync.WaitGroup
	for i := range 6 {
		wg.Go(func() {
			for j := range 500 {
				p := peers[(i+j)%len(peers)]
				switch i {
				case 0:
					s.SetPeers(peers[:len(peers)-j%4])
				case 1:
					s.ReportAlive(p.Addr())
					s.ReportFailure(p)
				case 2:
					if live := s.Live(); !slices.Contains(live, self) || !slices.IsSortedFunc(live, netip.AddrPort.Compare) {
						t.Errorf("Live() = %v, want it sorted and with self", live)
						return
					}
				case 3:
					if members := s.Members(); !slices.Contains(members, self) || !slices.IsSortedFunc(members, netip.AddrPort.Compare) {
						t.Errorf("Members() = %v, want it sorted and with self", members)
						return
					}
				case 4:
					_ = s.Changes()
					if !s.Allowed(self.Addr()) {
						t.Errorf("Allowed(self) = false")
						return
					}
					s.Allowed(p.Addr())
				default:
					s.SetPeers(peers)
				}
			}
		})
	}
	wg.Wait()
}
