// Command pause is the local cluster's sandbox process, the one every pod's sandbox runs: it
// reaps the zombies it inherits as PID 1 and exits on SIGINT or SIGTERM. The cluster builds
// it into the sandbox image it pushes to its registry (there is no internet to pull one from).
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range sigs {
		if sig != syscall.SIGCHLD {
			return
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
