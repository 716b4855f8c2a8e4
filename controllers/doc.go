// Package controllers holds Shoal's reconcilers, run by `shoal controller`: NodeCaches follow
// the Nodes and the Prewarms that select them, Prewarms get their references resolved and
// their progress rolled up (docs/kubernetes.md).
package controllers
