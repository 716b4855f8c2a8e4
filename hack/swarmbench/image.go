package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/shoal-dev/shoal/test/harness"
	"github.com/shoal-dev/shoal/test/testbed"
)

// The image scenarios have every node's containerd pull a realistic multi-layer image through
// CRI, as kubelet does, and time PullImage until it returns (the image fetched, verified and
// unpacked): image-direct straight from the registry, image-cold through fresh agents that
// hold nothing, image-warm after node 0 pulled it first. After each run, node 0 removes the
// image and pulls it again from its agent's store, alone on an idle machine: the time
// containerd needs to take in and unpack the image when the bytes cost nothing, the floor
// the swarm's times are judged against.
const (
	scenarioImageDirect = "image-direct"
	scenarioImageCold   = "image-cold"
	scenarioImageWarm   = "image-warm"
	imageRepo           = "bench/image"
)

var allScenarios = []string{scenarioDirect, scenarioCold, scenarioWarm, scenarioImageDirect, scenarioImageCold, scenarioImageWarm}

func isDirect(sc string) bool { return sc == scenarioDirect || sc == scenarioImageDirect }

func isImage(sc string) bool {
	return sc == scenarioImageDirect || sc == scenarioImageCold || sc == scenarioImageWarm
}

func wantsImages(cfg config) bool { return slices.ContainsFunc(cfg.scenarios, isImage) }

// benchImages runs the image scenarios on tb: image-direct once, image-cold and image-warm
// -runs times, each on a new image (nobody holds any of it), appending to results.
func benchImages(ctx context.Context, log *slog.Logger, cfg config, tb *testbed.Testbed, swarm bool, b, r testbed.Rate, results *[]*result) error {
	if !wantsImages(cfg) {
		return nil
	}
	n := len(tb.Nodes())
	var errs []error
	seq := 0
	for run := 1; run <= cfg.runs && ctx.Err() == nil; run++ {
		for _, sc := range cfg.scenarios {
			if !isImage(sc) || (sc == scenarioImageDirect && run > 1) || ctx.Err() != nil {
				continue
			}
			seq++
			log.Info("building image", "mib", cfg.imageSize>>20, "scenario", sc, "run", run)
			img, err := harness.RealisticImage(harness.RealisticImageSpec{Size: cfg.imageSize, Seed: uint64(n)<<32 | uint64(seq)})
			if err != nil {
				return err
			}
			desc, err := harness.PushV1Image(ctx, tb.RegistryHost(), fmt.Sprintf("%s:n%d-%d", imageRepo, n, seq), img)
			if err != nil {
				return err
			}
			log.Info("scenario", "scenario", sc, "image_bytes", desc.BlobBytes(), "layers", len(desc.Layers), "run", run)
			res, err := runScenario(ctx, log, cfg, tb, sc, swarm, imageWorkload(tb, sc, desc), b, r)
			res.Run, res.Layers = run, len(desc.Layers)
			*results = append(*results, res)
			if err != nil {
				res.Error = err.Error()
				errs = append(errs, fmt.Errorf("%s, run %d: %w", sc, run, err))
			}
			// Every node's containerd holds the image, packed and unpacked, about 3 × its size:
			// a grid of runs filled the disk before the images were removed after each.
			for _, node := range tb.Nodes() {
				if err := node.Containerd().CRI().RemoveImage(context.WithoutCancel(ctx), desc.Name(testbed.RegistryName)); err != nil {
					log.Warn("remove image", "node", node.Name(), "err", err)
				}
			}
			log.Info("scenario done", "scenario", sc, "run", run, "ok", fmt.Sprintf("%d/%d", res.OK, res.Asked),
				"p99", round(res.P99), "max", round(res.Max), "unpack_floor_s", round(res.FloorSeconds), "upstream", round(res.UpstreamLink))
		}
	}
	return errors.Join(errs...)
}

// imageWorkload has the nodes pull img through CRI.
func imageWorkload(tb *testbed.Testbed, sc string, img *harness.Image) workload {
	ref := img.Name(testbed.RegistryName)
	pull := func(ctx context.Context, node *testbed.Node) error {
		_, err := node.PullImage(ctx, ref)
		return err
	}
	w := workload{
		size: img.BlobBytes(), digests: img.Blobs(),
		seedFirst: func(ctx context.Context, timeout time.Duration) error {
			ctx, cancel := context.WithTimeout(ctx, timeout)
			defer cancel()
			if err := pull(ctx, tb.Node(0)); err != nil {
				return fmt.Errorf("node 0 could not pull the image first: %w", err)
			}
			return nil
		},
		fetch: func(ctx context.Context, first int, start time.Time, timeout time.Duration) ([]testbed.FetchResult, error) {
			out := make([]testbed.FetchResult, len(tb.Nodes()))
			var wg sync.WaitGroup
			for i, node := range tb.Nodes() {
				out[i].Node = node.Name()
				if i < first {
					continue
				}
				wg.Go(func() {
					time.Sleep(time.Until(start))
					ctx, cancel := context.WithTimeout(ctx, timeout)
					defer cancel()
					err := pull(ctx, node)
					out[i].Seconds = time.Since(start).Seconds()
					if err != nil {
						out[i].Error = err.Error()
						return
					}
					out[i].OK, out[i].Bytes = true, img.BlobBytes()
				})
			}
			wg.Wait()
			return out, ctx.Err()
		},
	}
	if sc == scenarioImageDirect {
		w.direct = func() (func(), error) { return pointAtRegistry(tb) }
	} else {
		w.floor = func(ctx context.Context) (float64, error) {
			node := tb.Node(0)
			if err := node.Containerd().CRI().RemoveImage(ctx, ref); err != nil {
				return 0, err
			}
			if node.Containerd().HasContent(img.Layers[0]) {
				return 0, errors.New("containerd kept the image's content after removing it: a second pull would not take it in again")
			}
			time.Sleep(time.Second) // let the machine settle after the run
			start := time.Now()
			if err := pull(ctx, node); err != nil {
				return 0, err
			}
			return time.Since(start).Seconds(), nil
		}
	}
	return w
}

// pointAtRegistry writes every node a hosts.toml that sends registry.test to the registry
// itself (no agent runs in the direct scenario to write one), and returns what removes them.
func pointAtRegistry(tb *testbed.Testbed) (func(), error) {
	var paths []string
	undo := func() {
		for _, p := range paths {
			_ = os.Remove(p)
		}
	}
	for _, node := range tb.Nodes() {
		dir := filepath.Join(node.HostsDir(), testbed.RegistryName)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			undo()
			return nil, err
		}
		p := filepath.Join(dir, "hosts.toml")
		body := fmt.Sprintf("server = %q\n\n[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n", tb.RegistryURL(), tb.RegistryURL())
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			undo()
			return nil, err
		}
		paths = append(paths, p)
	}
	return undo, nil
}
