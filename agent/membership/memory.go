package membership

import (
	"net/netip"
	"slices"
	"sync"
)

var _ Membership = (*Memory)(nil)

// Memory is a Membership whose members' liveness its owner sets (SetAlive) instead of probing:
// for unit tests of the packages that use a Membership, and for swarms inside one process. It
// keeps the contract Static keeps (membershiptest checks both), so that what passes against it
// holds against Static.
type Memory struct {
	self    netip.AddrPort
	members []netip.AddrPort // sorted, self included
	ips     map[netip.Addr]struct{}

	mu   sync.Mutex
	dead map[netip.AddrPort]bool
}

// NewMemory returns the membership of self and peers, all alive; peers may include self.
func NewMemory(self netip.AddrPort, peers []netip.AddrPort) *Memory {
	m := &Memory{self: unmapAddrPort(self), ips: map[netip.Addr]struct{}{}, dead: map[netip.AddrPort]bool{}}
	m.members = append(m.members, m.self)
	for _, p := range peers {
		if p = unmapAddrPort(p); !slices.Contains(m.members, p) {
			m.members = append(m.members, p)
		}
	}
	slices.SortFunc(m.members, netip.AddrPort.Compare)
	for _, p := range m.members {
		m.ips[plainAddr(p.Addr())] = struct{}{}
	}
	return m
}

// SetAlive marks a member alive or dead, as Static's probes would; self and non-members are
// ignored.
func (m *Memory) SetAlive(addr netip.AddrPort, alive bool) {
	addr = unmapAddrPort(addr)
	if addr == m.self || !slices.Contains(m.members, addr) {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if alive {
		delete(m.dead, addr)
	} else {
		m.dead[addr] = true
	}
}

// Self implements Membership.
func (m *Memory) Self() netip.AddrPort { return m.self }

// Members implements Membership.
func (m *Memory) Members() []netip.AddrPort { return slices.Clone(m.members) }

// Live implements Membership.
func (m *Memory) Live() []netip.AddrPort {
	m.mu.Lock()
	defer m.mu.Unlock()
	live := make([]netip.AddrPort, 0, len(m.members))
	for _, p := range m.members {
		if !m.dead[p] {
			live = append(live, p)
		}
	}
	return live
}

// Allowed implements Membership.
func (m *Memory) Allowed(addr netip.Addr) bool {
	_, ok := m.ips[plainAddr(addr)]
	return ok
}

// ReportFailure implements Membership: the member is dead until SetAlive revives it.
func (m *Memory) ReportFailure(addr netip.AddrPort) { m.SetAlive(addr, false) }

// ReportAlive implements Membership; it revives nobody, as Static's does not.
func (m *Memory) ReportAlive(netip.Addr) {}
