// Package leakcheck finds the goroutines that are running a package's code at one instant, for
// tests that a component's Close returns only once its goroutines have ended. goleak, which the
// packages' TestMain run, retries for a while before it reports a goroutine, so it cannot tell a
// Close that waits from one that returns just before its goroutines end; this can.
package leakcheck

import (
	"bytes"
	"runtime"
	"strings"
)

// Running returns the stacks of the goroutines, the caller's aside, with a frame whose function
// name contains any of funcs (for example "agent/swarm.(*Swarm).").
func Running(funcs ...string) []string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var found []string
	for i, g := range bytes.Split(buf, []byte("\n\n")) {
		if i == 0 {
			continue // the caller's goroutine comes first
		}
		stack := string(g)
		for _, f := range funcs {
			if strings.Contains(stack, f) {
				found = append(found, stack)
				break
			}
		}
	}
	return found
}
