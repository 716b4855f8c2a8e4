package main

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/shoal-dev/shoal/agent/membership"
)

// The flag types below parse a flag's text straight into the field of the configuration it
// sets, so that a bad value is refused while the command line (or the environment, see env.go)
// is read, with the flag's name, and no raw text is left to parse later.

// quantityValue is a byte count or rate written as a Kubernetes quantity: 50Mi, 1.5Gi, 20M, 0.
type quantityValue struct{ dst *int64 }

func newQuantityValue(dst *int64, value int64) *quantityValue {
	*dst = value
	return &quantityValue{dst: dst}
}

func (q *quantityValue) Set(s string) error {
	v, err := resource.ParseQuantity(s)
	if err != nil {
		return fmt.Errorf("%q is not a quantity: want one such as 50Mi, 1Gi or 0", s)
	}
	*q.dst = v.Value()
	return nil
}

func (q *quantityValue) String() string {
	return resource.NewQuantity(*q.dst, resource.BinarySI).String()
}

func (*quantityValue) Type() string { return "quantity" }

// endpointsValue is --registry-endpoint: REGISTRY=URL, repeatable, into a map from registry to
// URL. Only the syntax is checked here; agent.Config.Validate checks registry and URL.
type endpointsValue struct{ dst *map[string]string }

func newEndpointsValue(dst *map[string]string) *endpointsValue {
	return &endpointsValue{dst: dst}
}

// Set adds one REGISTRY=URL.
func (e *endpointsValue) Set(s string) error { return e.Append(s) }

func (e *endpointsValue) Append(s string) error {
	registry, url, ok := strings.Cut(s, "=")
	registry, url = strings.TrimSpace(registry), strings.TrimSpace(url)
	if !ok || registry == "" || url == "" {
		return fmt.Errorf("%q: want REGISTRY=URL, e.g. registry.test=http://127.0.0.1:5000", s)
	}
	if *e.dst == nil {
		*e.dst = map[string]string{}
	}
	if _, dup := (*e.dst)[registry]; dup {
		return fmt.Errorf("%s is given twice", registry)
	}
	(*e.dst)[registry] = url
	return nil
}

func (e *endpointsValue) Replace(values []string) error {
	*e.dst = nil
	for _, v := range values {
		if err := e.Append(v); err != nil {
			return err
		}
	}
	return nil
}

func (e *endpointsValue) GetSlice() []string {
	s := make([]string, 0, len(*e.dst))
	for _, registry := range slices.Sorted(maps.Keys(*e.dst)) {
		s = append(s, registry+"="+(*e.dst)[registry])
	}
	return s
}

func (e *endpointsValue) String() string { return strings.Join(e.GetSlice(), ",") }

func (*endpointsValue) Type() string { return "registry=url" }

// addrPortValue is an IP:PORT; "" leaves it unset (the zero netip.AddrPort).
type addrPortValue struct{ dst *netip.AddrPort }

func (a addrPortValue) Set(s string) error {
	if s == "" {
		*a.dst = netip.AddrPort{}
		return nil
	}
	addr, err := netip.ParseAddrPort(s)
	if err != nil {
		return fmt.Errorf("%q: want IP:PORT: %w", s, err)
	}
	*a.dst = addr
	return nil
}

func (a addrPortValue) String() string {
	if !a.dst.IsValid() {
		return ""
	}
	return a.dst.String()
}

func (addrPortValue) Type() string { return "ip:port" }

// peersValue is --peers: IP:PORT entries, comma-separated, in one flag or several; the whole
// list is checked again at each addition, so a peer given twice is refused wherever it is.
type peersValue struct {
	dst     *[]netip.AddrPort
	entries []string
}

func (p *peersValue) Set(s string) error { return p.Append(s) }

func (p *peersValue) Append(s string) error {
	return p.Replace(append(slices.Clone(p.entries), s))
}

func (p *peersValue) Replace(entries []string) error {
	peers, err := membership.ParsePeers(strings.Join(entries, ","))
	if err != nil {
		return err
	}
	p.entries, *p.dst = entries, peers
	return nil
}

func (p *peersValue) GetSlice() []string {
	s := make([]string, len(*p.dst))
	for i, peer := range *p.dst {
		s[i] = peer.String()
	}
	return s
}

func (p *peersValue) String() string { return strings.Join(p.GetSlice(), ",") }

func (*peersValue) Type() string { return "ip:port,..." }
