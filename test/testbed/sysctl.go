package testbed

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/shoal-dev/shoal/test/harness"
)

// The kernel's neighbour (ARP) table is shared by all network namespaces, and its hard limit
// (gc_thresh3) defaults to 1024 entries: a testbed of N nodes where every node talks to every
// other needs about N² of them, so at 32 nodes new neighbours are refused ("neighbor table
// overflow") and connections time out at dial. The limits can only be set from the machine's
// own namespace.
var neighbourLimits = map[string]int{
	"/proc/sys/net/ipv4/neigh/default/gc_thresh1": 4096,
	"/proc/sys/net/ipv4/neigh/default/gc_thresh2": 16384,
	"/proc/sys/net/ipv4/neigh/default/gc_thresh3": 32768,
}

// RaiseNeighbourLimits is a harness.BeforeIsolation hook that raises the kernel's neighbour
// table limits (never lowers them) so that testbeds of up to about 128 nodes fit.
func RaiseNeighbourLimits() harness.IsolateOption {
	return harness.BeforeIsolation(func(context.Context, string) ([]string, error) {
		for path, want := range neighbourLimits {
			b, err := os.ReadFile(path)
			if err != nil {
				return nil, fmt.Errorf("raise neighbour table limit: %w", err)
			}
			have, err := strconv.Atoi(strings.TrimSpace(string(b)))
			if err != nil || have >= want {
				continue
			}
			if err := os.WriteFile(path, []byte(strconv.Itoa(want)), 0o644); err != nil {
				return nil, fmt.Errorf("raise neighbour table limit %s to %d: %w", path, want, err)
			}
		}
		return nil, nil
	})
}
