// Package controllers holds Shoal's reconcilers, run by `shoal controller`: NodeCaches follow
// the Nodes and the Prewarms that select them; Prewarms get their references resolved and
// their progress rolled up; pending pods get their images' blobs seeded into the swarm through
// SwarmSeeds, which expire (docs/kubernetes.md).
package controllers
