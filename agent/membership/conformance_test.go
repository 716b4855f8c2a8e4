package membership_test

import (
	"context"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/shoal-dev/shoal/agent/membership"
	"github.com/shoal-dev/shoal/agent/membership/membershiptest"
)

func TestMemoryConformance(t *testing.T) {
	membershiptest.Run(t, func(_ *testing.T, self netip.AddrPort, peers []netip.AddrPort) membershiptest.Subject {
		m := membership.NewMemory(self, peers)
		return membershiptest.Subject{Membership: m, SetPeers: m.SetPeers,
			Revive: func(_ *testing.T, addr netip.AddrPort) { m.SetAlive(addr, true) }}
	})
}

// TestProbedConformance runs the suite against Probed with a fake probe that every member
// answers. Run starts only when the suite revives a member: its first round probes at once.
func TestProbedConformance(t *testing.T) {
	membershiptest.Run(t, func(t *testing.T, self netip.AddrPort, peers []netip.AddrPort) membershiptest.Subject {
		s := membership.NewProbed(self, peers,
			membership.WithProbe(func(context.Context, netip.AddrPort) error { return nil }),
			membership.WithClock(func(time.Duration) <-chan time.Time { return nil })) // one round only
		return membershiptest.Subject{Membership: s, SetPeers: s.SetPeers, Revive: func(t *testing.T, addr netip.AddrPort) {
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- s.Run(ctx) }()
			t.Cleanup(func() {
				cancel()
				if err := <-done; err != nil {
					t.Errorf("Run: %v", err)
				}
			})
			for deadline := time.Now().Add(10 * time.Second); !slices.Contains(s.Live(), addr); time.Sleep(time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatalf("%v not live 10 s after a probe round began that it answers", addr)
				}
			}
		}}
	})
}
