// Package harness runs Shoal's end-to-end scenarios against real components on one machine: it
// isolates the test process in its own network namespace, and starts and stops a registry
// (Debian's docker-registry), containerd with the CRI plugin, and the shoal agent as child
// processes whose state lives in temporary directories and which are stopped by PID.
//
// Every constructor returns an error and a value with Close, so the same pieces serve the e2e
// tests (which hand Close to t.Cleanup) and programs such as hack/demo. Listeners are on
// 127.0.0.1 by default, and the harness dials nothing but loopback unless it runs inside
// RunIsolated's namespace, where the only other addresses are those of network namespaces the
// process made itself (WithNetns and WithListenAddr place components there, for test/testbed).
package harness
