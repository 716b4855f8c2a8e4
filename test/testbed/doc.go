// Package testbed builds a cluster of simulated nodes on one machine, for the swarm's
// end-to-end tests and benchmarks: one network namespace per node and one for the registry,
// joined by a bridge, each link rate-limited with tc tbf, with a real registry, one shoal agent
// per node and, where a scenario needs it, one containerd per node.
//
// Everything hangs off a bridge inside the namespace test/harness.RunIsolated makes, which has
// no link to the machine's own network: New refuses to run anywhere else. Node i has the
// address 10.99.0.(10+i) on its eth0, the registry 10.99.0.1, and the isolated namespace
// itself 10.99.255.254 on the bridge, which is how this process reaches the registry and the
// agents' metrics endpoints. Load that has to cross the shaped links (Node.Fetch, CRI pulls)
// starts inside the node namespaces. Each agent's mirror listens on its node's own loopback,
// 127.0.0.1:5001, as in production.
//
// Close tears everything down: processes by PID, namespaces and links by name, directories.
// A run that was killed before Close leaves namespaces named after its PID; the next New
// removes those whose process is gone. One testbed at a time per isolated namespace.
package testbed
