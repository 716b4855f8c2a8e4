package controllers

import (
	"slices"

	v1 "github.com/shoal-dev/shoal/api/v1alpha1"
)

// Policy is what cluster admins allow Prewarms to do. A Prewarm outside it reaches no node:
// its status says why.
type Policy struct {
	// Namespaces are the namespaces whose Prewarms are acted on; empty allows every namespace.
	// A Prewarm in any namespace must not be a way to fill every node's disk.
	Namespaces []string
	// MaxPinnedBytesPerNode bounds the bytes that Prewarms may pin on one node, whatever
	// their namespaces; 0 = no bound (the agents' own --max-pinned-share still holds). Content
	// past it is left out of the node's NodeCache, listed in its spec.refused, and reported
	// PinLimitExceeded in the Prewarms that ask for it.
	MaxPinnedBytesPerNode int64
}

// Allows reports whether the policy lets Prewarm p reach nodes.
func (pol Policy) Allows(p *v1.Prewarm) bool {
	return len(pol.Namespaces) == 0 || slices.Contains(pol.Namespaces, p.Namespace)
}

// allowed returns the Prewarms of ps that the policy allows.
func (pol Policy) allowed(ps []v1.Prewarm) []v1.Prewarm {
	if len(pol.Namespaces) == 0 {
		return ps
	}
	out := make([]v1.Prewarm, 0, len(ps))
	for i := range ps {
		if pol.Allows(&ps[i]) {
			out = append(out, ps[i])
		}
	}
	return out
}
