package main

import (
	"context"
	"fmt"
	"io"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/shoal-dev/shoal/test/harness"
	"github.com/shoal-dev/shoal/test/testbed"
)

// swarmStory is the multi-node part of the demo: nodes on network namespaces behind a shaped
// bridge, each with its own containerd and agent, pull the same new image at once; the agents
// swarm it, so the registry sends about one copy whatever the number of nodes.
func swarmStory(ctx context.Context, out io.Writer, cfg config, bin string) error {
	fmt.Fprintf(out, "\n--- swarm: %d nodes (links %d Mbit/s, registry %d Mbit/s), each with containerd and an agent ---\n",
		cfg.nodes, cfg.rateMbit, 4*cfg.rateMbit)
	tb, err := testbed.New(ctx, cfg.nodes, testbed.WithContainerd(), testbed.WithShoalBinary(bin),
		testbed.WithNodeRate(testbed.Rate(cfg.rateMbit)*testbed.Mbit), testbed.WithRegistryRate(testbed.Rate(4*cfg.rateMbit)*testbed.Mbit))
	if err != nil {
		return err
	}
	defer tb.Close()
	for _, node := range tb.Nodes() {
		if _, err := node.StartAgent(ctx, node.SwarmArgs()...); err != nil {
			return err
		}
	}
	if err := tb.WaitForSwarm(ctx, time.Minute); err != nil {
		return err
	}
	img, err := harness.PushImage(ctx, tb.RegistryHost(), "demo/swarm:v1", harness.ImageSpec{Layers: cfg.layers, LayerSize: cfg.layerMiB << 20})
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "pulling %s (%s) on every node at the same moment through CRI...\n\n", img.Name(testbed.RegistryName), mib(img.BlobBytes()))

	took := make([]time.Duration, cfg.nodes)
	errs := make([]error, cfg.nodes)
	var wg sync.WaitGroup
	start := time.Now()
	for i, node := range tb.Nodes() {
		wg.Go(func() {
			_, errs[i] = node.PullImage(ctx, img.Name(testbed.RegistryName))
			took[i] = time.Since(start)
		})
	}
	wg.Wait()

	if err := tb.Registry().Sync(ctx); err != nil {
		return err
	}
	requests, err := tb.Registry().Requests()
	if err != nil {
		return err
	}
	var registryBytes int64
	for _, sent := range harness.BlobBytes(requests) {
		registryBytes += sent
	}
	var peerBytes float64
	w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "NODE\tRESULT\tTIME\tFROM PEERS\tFETCHED UPSTREAM")
	ok := true
	for i, node := range tb.Nodes() {
		peer, _ := node.Agent().Metric(ctx, "shoal_swarm_peer_bytes_total", nil)
		up, _ := node.Agent().Metric(ctx, "shoal_swarm_fetched_bytes_total", map[string]string{"source": "upstream"})
		peerBytes += peer
		result := "ok"
		if errs[i] != nil {
			result, ok = "FAILED: "+errs[i].Error(), false
		}
		fmt.Fprintf(w, "%s\t%s\t%.1fs\t%s\t%s\n", node.Name(), result, took[i].Seconds(), mib(int64(peer)), mib(int64(up)))
	}
	if err := w.Flush(); err != nil {
		return err
	}
	copies := float64(registryBytes) / float64(img.BlobBytes())
	fmt.Fprintf(out, "\nthe registry sent %s for %d pulls of %s: %.2f copies; peers exchanged %s\n",
		mib(registryBytes), cfg.nodes, mib(img.BlobBytes()), copies, mib(int64(peerBytes)))
	verdict := func(pass bool, what string) {
		mark := "PASS"
		if !pass {
			mark = "FAIL"
		}
		fmt.Fprintf(out, "%s  %s\n", mark, what)
	}
	verdict(ok, fmt.Sprintf("every one of the %d nodes pulled the image", cfg.nodes))
	verdict(copies <= 1.25, "the registry sent about one copy of the image, not one per node")
	if !ok || copies > 1.25 {
		return fmt.Errorf("the swarm part of the demo failed")
	}
	return nil
}
