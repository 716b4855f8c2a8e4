package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"sync"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/agent/mirror"
	"github.com/shoal-dev/shoal/agent/store"
)

// faultHooks stands between the mirror and the content store when fault injection is on
// (--fault-injection, for tests only). Wedged, every store call the mirror makes blocks, ignoring
// its context, as a deadlock inside the agent would; containerd must still fall back in bounded
// time, which the mirror's own deadlines guarantee.
type faultHooks struct {
	store mirror.BlobStore
	log   *slog.Logger

	mu      sync.Mutex
	release chan struct{} // nil when not wedged; closed to let blocked calls through
}

func newFaultHooks(s mirror.BlobStore, log *slog.Logger) *faultHooks {
	return &faultHooks{store: s, log: log}
}

// wait blocks while the store is wedged.
func (f *faultHooks) wait() {
	f.mu.Lock()
	release := f.release
	f.mu.Unlock()
	if release != nil {
		<-release
	}
}

// wedge blocks (on) or releases (off) the store calls.
func (f *faultHooks) wedge(on bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	switch {
	case on && f.release == nil:
		f.release = make(chan struct{})
	case !on && f.release != nil:
		close(f.release)
		f.release = nil
	}
}

func (f *faultHooks) Get(d v1.Hash) (store.Blob, error) {
	f.wait()
	return f.store.Get(d)
}

func (f *faultHooks) Fetch(ctx context.Context, d v1.Hash, src store.Source) (store.Blob, error) {
	f.wait()
	return f.store.Fetch(ctx, d, src)
}

// serveWedge handles POST /debug/faults/wedge?on=true|false.
func (f *faultHooks) serveWedge(w http.ResponseWriter, r *http.Request) {
	on, err := strconv.ParseBool(r.URL.Query().Get("on"))
	if err != nil {
		http.Error(w, fmt.Sprintf("on=%q: want true or false", r.URL.Query().Get("on")), http.StatusBadRequest)
		return
	}
	f.wedge(on)
	f.log.Warn("fault injection", "wedged", on)
	w.WriteHeader(http.StatusNoContent)
}
