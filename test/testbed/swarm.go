package testbed

import (
	"context"
	"fmt"
	"time"
)

// WaitForSwarm waits until every node's agent sees all the testbed's agents as live members.
// Agents started together first find each other refusing connections; a measurement that
// starts before their views agree would measure start-up, not the swarm.
func (tb *Testbed) WaitForSwarm(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for _, node := range tb.nodes {
		agent := node.Agent()
		if agent == nil {
			return fmt.Errorf("node %s: no agent", node.name)
		}
		for {
			live, err := agent.Metric(ctx, "shoal_swarm_members", map[string]string{"state": "live"})
			if err == nil && int(live) == len(tb.nodes) {
				break
			}
			if time.Now().After(deadline) {
				if err != nil {
					return fmt.Errorf("node %s: read its agent's members: %w", node.name, err)
				}
				return fmt.Errorf("node %s: its agent sees %v live members of %d", node.name, live, len(tb.nodes))
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	return nil
}
