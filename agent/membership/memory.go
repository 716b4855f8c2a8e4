package membership

import (
	"net/netip"
	"slices"
	"sync"
)

var _ Membership = (*Memory)(nil)

// Memory is a Membership whose members' liveness its owner sets (SetAlive) instead of probing:
// for unit tests of the packages that use a Membership, and for swarms inside one process. It
// keeps the contract Probed keeps (membershiptest checks both), so that what passes against it
// holds against Probed.
type Memory struct {
	self netip.AddrPort

	mu      sync.Mutex
	members []netip.AddrPort // sorted, self included
	ips     map[netip.Addr]struct{}
	dead    map[netip.AddrPort]bool
	changed chan struct{} // closed when members change
}

// NewMemory returns the membership of self and peers, all alive; peers may include self.
func NewMemory(self netip.AddrPort, peers []netip.AddrPort) *Memory {
	m := &Memory{self: unmapAddrPort(self), dead: map[netip.AddrPort]bool{}}
	m.setLocked(memberList(m.self, peers))
	return m
}

// SetPeers makes self and peers the members, as Probed.SetPeers does: members that stay keep
// their liveness, members that join are alive, and the same set again changes nothing.
func (m *Memory) SetPeers(peers []netip.AddrPort) {
	members := memberList(m.self, peers)
	m.mu.Lock()
	defer m.mu.Unlock()
	if slices.Equal(members, m.members) {
		return
	}
	for p := range m.dead {
		if !slices.Contains(members, p) {
			delete(m.dead, p)
		}
	}
	close(m.changed)
	m.setLocked(members)
}

func (m *Memory) setLocked(members []netip.AddrPort) {
	m.members, m.ips, m.changed = members, map[netip.Addr]struct{}{}, make(chan struct{})
	for _, p := range members {
		m.ips[plainAddr(p.Addr())] = struct{}{}
	}
}

// SetAlive marks a member alive or dead, as Probed's probes would; self and non-members are
// ignored.
func (m *Memory) SetAlive(addr netip.AddrPort, alive bool) {
	addr = unmapAddrPort(addr)
	m.mu.Lock()
	defer m.mu.Unlock()
	if addr == m.self || !slices.Contains(m.members, addr) {
		return
	}
	if alive {
		delete(m.dead, addr)
	} else {
		m.dead[addr] = true
	}
}

// Self implements Membership.
func (m *Memory) Self() netip.AddrPort { return m.self }

// Members implements Membership.
func (m *Memory) Members() []netip.AddrPort {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.members)
}

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
	m.mu.Lock()
	defer m.mu.Unlock()
	_, ok := m.ips[plainAddr(addr)]
	return ok
}

// Changes implements Membership.
func (m *Memory) Changes() <-chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.changed
}

// ReportFailure implements Membership: the member is dead until SetAlive revives it.
func (m *Memory) ReportFailure(addr netip.AddrPort) { m.SetAlive(addr, false) }

// ReportAlive implements Membership; it revives nobody, as Probed's does not.
func (m *Memory) ReportAlive(netip.Addr) {}
