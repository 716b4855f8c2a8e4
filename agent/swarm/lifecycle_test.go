package swarm

import (
	"bytes"
	"context"
	"io"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/internal/leakcheck"
)

// blockingUpstream answers HEAD at once and holds every body request until its context ends,
// as a wedged registry would, and then until release is closed, as a request slow to unwind
// would. started is closed when the first body request arrives, cancelled when the first one
// sees its context end.
type blockingUpstream struct {
	*memUpstream
	startOnce, cancelOnce       sync.Once
	started, cancelled, release chan struct{}
}

func (u *blockingUpstream) Blob(ctx context.Context, _, _ string, _ v1.Hash, _, _ int64) (io.ReadCloser, int64, error) {
	u.startOnce.Do(func() { close(u.started) })
	<-ctx.Done()
	u.cancelOnce.Do(func() { close(u.cancelled) })
	<-u.release
	return nil, 0, ctx.Err()
}

// TestCloseWaitsForItsGoroutines closes a swarm while it waits on a wedged upstream for a blob
// that a reader asked for and gave up on: Close must cancel the upstream request and wait for
// it, and when Close returns, none of the goroutines the swarm started (acquiring, seeding,
// fetching the segments) may still run.
func TestCloseWaitsForItsGoroutines(t *testing.T) {
	up := &blockingUpstream{memUpstream: newMemUpstream(),
		started: make(chan struct{}), cancelled: make(chan struct{}), release: make(chan struct{})}
	d := up.add(bytes.Repeat([]byte("x"), 4<<20))
	node := startNodesWith(t, 1, up, 1<<20, 256<<10)[0]

	ctx, cancel := context.WithCancel(context.Background())
	read := make(chan error, 1)
	go func() {
		_, err := readSource(ctx, node.swarm.Source("registry.test", "app", d))
		read <- err
	}()
	select {
	case <-up.started:
	case <-time.After(time.Minute):
		t.Fatal("the swarm never asked upstream for the blob")
	}
	cancel()
	if err := <-read; err == nil {
		t.Fatal("read a blob that upstream never sent")
	}
	if len(leakcheck.Running("agent/swarm.(*Swarm).", "agent/swarm.(*blob).")) == 0 {
		t.Fatal("no swarm goroutine was running before Close: the test shows nothing")
	}
	closed := make(chan error, 1)
	go func() { closed <- node.swarm.Close() }()
	select {
	case <-up.cancelled:
	case <-time.After(time.Minute):
		close(up.release)
		t.Fatal("Close did not cancel the swarm's upstream request")
	}
	// A Close that does not wait returns within milliseconds; one that waits stays blocked
	// until the request is released.
	select {
	case err := <-closed:
		t.Error("Close returned while a goroutine of the swarm was still in an upstream request")
		closed <- err
	case <-time.After(2 * time.Second):
	}
	close(up.release)
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	if left := leakcheck.Running("agent/swarm.(*Swarm).", "agent/swarm.(*blob)."); len(left) > 0 {
		t.Errorf("%d swarm goroutines still running after Close returned; the first:\n%s", len(left), left[0])
	}
}
