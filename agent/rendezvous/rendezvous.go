// Package rendezvous ranks members for a key by rendezvous (highest-random-weight) hashing, and
// assigns keys to members by that ranking, balanced by load: pure functions that every agent
// computes alike, so that agents agree on who seeds what, and whom each node connects to,
// without talking.
package rendezvous

import (
	"crypto/sha256"
	"encoding/binary"
	"net/netip"
	"slices"
)

// Rank orders members by their rendezvous (highest-random-weight) weight for key, highest
// first, in a new slice; members is not modified. The swarm ranks "sha256:<hex>/segment/<i>"
// to break ties between seeders of a segment; the runners-up are the fallbacks, in order, when
// the first choice is dead.
//
// The ranking is part of the wire contract: every agent must compute the same one from the
// same member set, whatever its version or the order it learnt the members in. A member's
// weight is the first 8 bytes, read as a big-endian uint64, of
//
//	sha256(key + "\x00" + member.String())
//
// where an IPv4-mapped IPv6 address is first unmapped (so "[::ffff:10.0.0.1]:7070" weighs the
// same as "10.0.0.1:7070"). Equal weights, which only an address listed twice can really
// produce, are ordered by netip.AddrPort.Compare. Removing a member from the set leaves the
// order of the others unchanged, which is why only the keys a leaving member owned move, each
// to its second choice, and a newcomer takes keys only from their previous owners.
func Rank(key string, members []netip.AddrPort) []netip.AddrPort {
	buf := hashPrefix(key)
	ws := make([]weighted, len(members))
	for i, m := range members {
		ws[i] = weighted{m, weight(buf, m)}
	}
	slices.SortFunc(ws, func(a, b weighted) int { return a.before(b) })
	ranked := make([]netip.AddrPort, len(ws))
	for i, w := range ws {
		ranked[i] = w.member
	}
	return ranked
}

// Owner is Rank(key, members)[0], found without sorting; ok is false if members is empty.
func Owner(key string, members []netip.AddrPort) (owner netip.AddrPort, ok bool) {
	if len(members) == 0 {
		return netip.AddrPort{}, false
	}
	buf := hashPrefix(key)
	best := weighted{members[0], weight(buf, members[0])}
	for _, m := range members[1:] {
		if w := (weighted{m, weight(buf, m)}); w.before(best) < 0 {
			best = w
		}
	}
	return best.member, true
}

type weighted struct {
	member netip.AddrPort
	weight uint64
}

// before orders by weight, highest first, then by address.
func (a weighted) before(b weighted) int {
	switch {
	case a.weight > b.weight:
		return -1
	case a.weight < b.weight:
		return 1
	}
	return a.member.Compare(b.member)
}

// hashPrefix returns key + "\x00" with room for a member's address after it, so that weighing
// a member does not allocate.
func hashPrefix(key string) []byte {
	buf := make([]byte, 0, len(key)+1+len("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%zone]:65535"))
	buf = append(buf, key...)
	return append(buf, 0)
}

// weight hashes prefix (from hashPrefix) followed by m's address, reusing prefix's capacity.
func weight(prefix []byte, m netip.AddrPort) uint64 {
	sum := sha256.Sum256(unmap(m).AppendTo(prefix))
	return binary.BigEndian.Uint64(sum[:8])
}

// Neighbours returns the members of candidates (other than x) that x swarms with for key: the
// degree ones whose pair weight with x is highest. A pair's weight is the same from both ends,
// so most choices are mutual and a node ends up with between degree and about twice that many
// connections per torrent, whatever the number of nodes: the torrent client never has to drop
// connections to make room for new ones, and a segment's data still reaches everyone through
// a random graph of that degree. The choice is stable: x keeps its neighbours as others join,
// unless a newcomer outranks one of them.
func Neighbours(key string, x netip.AddrPort, candidates []netip.AddrPort, degree int) []netip.AddrPort {
	ws := make([]weighted, 0, len(candidates))
	for _, c := range candidates {
		if c != x {
			ws = append(ws, weighted{c, pairWeight(key, x, c)})
		}
	}
	slices.SortFunc(ws, func(a, b weighted) int { return a.before(b) })
	out := make([]netip.AddrPort, 0, min(degree, len(ws)))
	for _, w := range ws[:min(degree, len(ws))] {
		out = append(out, w.member)
	}
	return out
}

// pairWeight is the rendezvous weight of the unordered pair {a, b} for key.
func pairWeight(key string, a, b netip.AddrPort) uint64 {
	a, b = unmap(a), unmap(b)
	if b.Compare(a) < 0 {
		a, b = b, a
	}
	return weight(append(a.AppendTo(hashPrefix(key)), 0), b)
}

func unmap(p netip.AddrPort) netip.AddrPort { return netip.AddrPortFrom(p.Addr().Unmap(), p.Port()) }
