// Package membershiptest is the conformance suite of membership.Membership: every
// implementation, and every fake that other packages' tests use in its place, runs it, so that
// they keep the same contract.
package membershiptest

import (
	"net/netip"
	"slices"
	"sync"
	"testing"

	"github.com/shoal-dev/shoal/agent/membership"
)

// Subject is an implementation under test.
type Subject struct {
	membership.Membership
	// Revive makes the implementation learn, its own way, that a member it took for dead is
	// reachable again, and returns once Live includes it (or fails t).
	Revive func(t *testing.T, addr netip.AddrPort)
	// SetPeers replaces the peers, as the implementation's owner does when members join or
	// leave (the implementations' SetPeers method).
	SetPeers func(peers []netip.AddrPort)
}

// New builds a Subject of self and peers, every member alive, for one test.
type New func(t *testing.T, self netip.AddrPort, peers []netip.AddrPort) Subject

// Run checks the Membership contract against the implementation that newSubject builds.
func Run(t *testing.T, newSubject New) {
	self := netip.MustParseAddrPort("127.0.0.2:7070")
	a := netip.MustParseAddrPort("127.0.0.3:7070")
	b := netip.MustParseAddrPort("127.0.0.1:7071")
	mappedA := netip.AddrPortFrom(netip.AddrFrom16(a.Addr().As16()), a.Port())
	// The list every node is given: self included, one peer twice (once IPv4-mapped).
	peers := []netip.AddrPort{a, self, b, mappedA}
	want := []netip.AddrPort{b, self, a} // sorted, unmapped, once each

	t.Run("Members", func(t *testing.T) {
		m := newSubject(t, self, peers)
		if got := m.Self(); got != self {
			t.Errorf("Self() = %v, want %v", got, self)
		}
		got := m.Members()
		if !slices.Equal(got, want) {
			t.Errorf("Members() = %v, want %v: sorted, self included, each once, unmapped", got, want)
		}
		got[0] = netip.MustParseAddrPort("10.9.9.9:1")
		if again := m.Members(); !slices.Equal(again, want) {
			t.Errorf("changing the slice Members returned changed the membership: %v", again)
		}
	})

	t.Run("EveryMemberStartsAlive", func(t *testing.T) {
		m := newSubject(t, self, peers)
		live := m.Live()
		if !slices.Equal(live, want) {
			t.Errorf("Live() = %v, want every member %v", live, want)
		}
		live[0] = netip.MustParseAddrPort("10.9.9.9:1")
		if again := m.Live(); !slices.Equal(again, want) {
			t.Errorf("changing the slice Live returned changed the membership: %v", again)
		}
	})

	t.Run("Allowed", func(t *testing.T) {
		m := newSubject(t, self, peers)
		for _, tc := range []struct {
			addr netip.Addr
			want bool
		}{
			{a.Addr(), true},
			{mappedA.Addr(), true},
			{b.Addr(), true},
			{self.Addr(), true},
			{netip.MustParseAddr("127.0.0.9"), false},
			{netip.MustParseAddr("::1"), false},
		} {
			if got := m.Allowed(tc.addr); got != tc.want {
				t.Errorf("Allowed(%v) = %v, want %v", tc.addr, got, tc.want)
			}
		}
	})

	t.Run("ReportFailureKillsAtOnce", func(t *testing.T) {
		m := newSubject(t, self, peers)
		m.ReportFailure(mappedA) // reported in the form a dual-stack socket gives
		if live := m.Live(); slices.Contains(live, a) || !slices.Contains(live, b) {
			t.Errorf("Live() = %v after a failure of %v, want it without %v only", live, a, a)
		}
		if !slices.Equal(m.Members(), want) || !m.Allowed(a.Addr()) {
			t.Errorf("a dead member must stay a member and stay allowed: Members() = %v, Allowed = %v", m.Members(), m.Allowed(a.Addr()))
		}
	})

	t.Run("ReportsAboutSelfOrStrangersAreIgnored", func(t *testing.T) {
		m := newSubject(t, self, peers)
		m.ReportFailure(self)
		m.ReportFailure(netip.MustParseAddrPort("127.0.0.9:7070"))
		m.ReportFailure(netip.AddrPortFrom(a.Addr(), a.Port()+1)) // a member's IP, not its address
		if live := m.Live(); !slices.Equal(live, want) {
			t.Errorf("Live() = %v, want every member %v", live, want)
		}
	})

	t.Run("ReportAliveDoesNotRevive", func(t *testing.T) {
		m := newSubject(t, self, peers)
		m.ReportFailure(a)
		m.ReportAlive(a.Addr())
		if live := m.Live(); slices.Contains(live, a) {
			t.Errorf("Live() = %v: ReportAlive revived a member reported failed", live)
		}
	})

	t.Run("ReviveBringsBack", func(t *testing.T) {
		m := newSubject(t, self, peers)
		m.ReportFailure(a)
		m.Revive(t, a)
		if live := m.Live(); !slices.Equal(live, want) {
			t.Errorf("Live() = %v after reviving %v, want %v", live, a, want)
		}
	})

	c := netip.MustParseAddrPort("127.0.0.4:7070") // not in peers

	t.Run("JoinStartsAlive", func(t *testing.T) {
		m := newSubject(t, self, peers)
		changes := m.Changes()
		m.SetPeers(append(slices.Clone(peers), c))
		wantAll := []netip.AddrPort{b, self, a, c}
		if got := m.Members(); !slices.Equal(got, wantAll) {
			t.Errorf("Members() = %v after %v joined, want %v", got, c, wantAll)
		}
		if got := m.Live(); !slices.Equal(got, wantAll) {
			t.Errorf("Live() = %v after %v joined, want %v: a member that joins starts alive", got, c, wantAll)
		}
		if !m.Allowed(c.Addr()) {
			t.Errorf("Allowed(%v) = false after it joined", c.Addr())
		}
		wantClosed(t, changes, "a member joined")
	})

	t.Run("LeaveRemovesAtOnce", func(t *testing.T) {
		m := newSubject(t, self, peers)
		changes := m.Changes()
		m.SetPeers([]netip.AddrPort{self, a})
		wantLeft := []netip.AddrPort{self, a}
		if got := m.Members(); !slices.Equal(got, wantLeft) {
			t.Errorf("Members() = %v after %v left, want %v", got, b, wantLeft)
		}
		if got := m.Live(); !slices.Equal(got, wantLeft) {
			t.Errorf("Live() = %v after %v left, want %v", got, b, wantLeft)
		}
		if m.Allowed(b.Addr()) {
			t.Errorf("Allowed(%v) = true after it left", b.Addr())
		}
		wantClosed(t, changes, "a member left")
		m.ReportFailure(b) // about a member that left: ignored
		if got := m.Live(); !slices.Equal(got, wantLeft) {
			t.Errorf("Live() = %v after a report about a member that left, want %v", got, wantLeft)
		}
		m.SetPeers(peers) // back: a new member, alive
		if got := m.Live(); !slices.Equal(got, want) {
			t.Errorf("Live() = %v after %v came back, want %v", got, b, want)
		}
	})

	t.Run("MemberThatStaysKeepsItsLiveness", func(t *testing.T) {
		m := newSubject(t, self, peers)
		m.ReportFailure(a)
		m.SetPeers([]netip.AddrPort{a, b, c})
		if got, wantLive := m.Live(), []netip.AddrPort{b, self, c}; !slices.Equal(got, wantLive) {
			t.Errorf("Live() = %v, want %v: %v was dead before the change and is still a member", got, wantLive, a)
		}
	})

	t.Run("SelfCannotLeave", func(t *testing.T) {
		m := newSubject(t, self, peers)
		m.SetPeers(nil)
		only := []netip.AddrPort{self}
		if got := m.Members(); !slices.Equal(got, only) {
			t.Errorf("Members() = %v after SetPeers(nil), want %v", got, only)
		}
		if got := m.Live(); !slices.Equal(got, only) {
			t.Errorf("Live() = %v after SetPeers(nil), want %v", got, only)
		}
		if !m.Allowed(self.Addr()) || m.Allowed(a.Addr()) {
			t.Errorf("Allowed(self) = %v, Allowed(%v) = %v after SetPeers(nil), want true, false", m.Allowed(self.Addr()), a.Addr(), m.Allowed(a.Addr()))
		}
	})

	t.Run("SameSetChangesNothing", func(t *testing.T) {
		m := newSubject(t, self, peers)
		changes := m.Changes()
		m.ReportFailure(a) // liveness is not the member set
		m.SetPeers([]netip.AddrPort{mappedA, b})
		m.SetPeers([]netip.AddrPort{b, self, a})
		select {
		case <-changes:
			t.Error("Changes' channel closed although the member set stayed the same")
		default:
		}
		if got := m.Members(); !slices.Equal(got, want) {
			t.Errorf("Members() = %v, want %v", got, want)
		}
	})

	t.Run("ConcurrentUse", func(t *testing.T) {
		m := newSubject(t, self, peers)
		withC := append(slices.Clone(peers), c)
		var wg sync.WaitGroup
		for i := range 10 {
			wg.Go(func() {
				for j := range 100 {
					switch i % 5 {
					case 0:
						m.ReportFailure(b)
					case 1:
						m.ReportAlive(a.Addr())
					case 2:
						_ = m.Live()
						_ = m.Members()
					case 3:
						_ = m.Allowed(b.Addr())
						_ = m.Changes()
					default:
						if j%2 == 0 {
							m.SetPeers(withC)
						} else {
							m.SetPeers(peers)
						}
					}
				}
			})
		}
		wg.Wait()
		if live := m.Live(); slices.Contains(live, b) || !slices.Contains(live, a) {
			t.Errorf("Live() = %v, want every member but %v", live, b)
		}
	})
}

// wantClosed fails t unless ch is closed.
func wantClosed(t *testing.T, ch <-chan struct{}, why string) {
	t.Helper()
	select {
	case <-ch:
	default:
		t.Errorf("Changes' channel is still open although %s", why)
	}
}

// Addrs returns n distinct member addresses (10.x.y.z:7070, never dialled), sorted, for tests
// of what is computed over a member list.
func Addrs(n int) []netip.AddrPort {
	ms := make([]netip.AddrPort, n)
	for i := range ms {
		ms[i] = netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 7070)
	}
	return ms
}
