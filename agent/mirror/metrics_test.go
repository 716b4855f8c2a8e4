package mirror

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/agent/store"
	"github.com/shoal-dev/shoal/agent/upstream"
)

// requestSeries returns every series of shoal_mirror_requests_total as its labels and value.
func (tm *testMirror) requestSeries(t *testing.T) map[[3]string]float64 {
	t.Helper()
	mfs, err := tm.metrics.Gather()
	if err != nil {
		t.Fatal(err)
	}
	series := map[[3]string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != "shoal_mirror_requests_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if len(labels) != 3 {
				t.Fatalf("series with labels %v, want kind, source and result", labels)
			}
			series[[3]string{labels["kind"], labels["source"], labels["result"]}] = m.GetCounter().GetValue()
		}
	}
	return series
}

// waitRequests waits until shoal_mirror_requests_total is want. A request is counted once its
// answer is complete, which may be just after the client has read the last byte.
func (tm *testMirror) waitRequests(t *testing.T, what string, want map[[3]string]float64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got := tm.requestSeries(t)
		if fmt.Sprint(got) == fmt.Sprint(want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: requests_total = %v, want %v", what, got, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// bytesFrom returns shoal_mirror_bytes_total{source}.
func (tm *testMirror) bytesFrom(t *testing.T, source string) float64 {
	t.Helper()
	mfs, err := tm.metrics.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "shoal_mirror_bytes_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			if len(m.GetLabel()) == 1 && m.GetLabel()[0].GetValue() == source {
				return m.GetCounter().GetValue()
			}
		}
	}
	return 0
}

// TestRequestsBySourceAndResult sends requests of every outcome the mirror can reach without a
// deadline and checks the one series each lands in: source says where the content came from or
// was sought, result how the request ended, and neither ever holds the other's values.
func TestRequestsBySourceAndResult(t *testing.T) {
	type series = [3]string
	tm := newTestMirror(t)
	content := randomBytes(t, 100<<10)
	d := tm.upstream.addBlob(content)
	manifest := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}`)
	tm.upstream.addManifest("v1", manifest)
	missing := digestOf([]byte("missing"))

	steps := []struct {
		name         string
		method, path string
		header       http.Header
		status       int
		want         series
	}{
		{"cold blob", http.MethodGet, blobPath(d), nil, http.StatusOK, series{"blob", sourceUpstream, resultOK}},
		{"warm blob", http.MethodGet, blobPath(d), nil, http.StatusOK, series{"blob", sourceLocal, resultOK}},
		{"warm blob, range past the end", http.MethodGet, blobPath(d), http.Header{"Range": {"bytes=200000-"}},
			http.StatusRequestedRangeNotSatisfiable, series{"blob", sourceLocal, resultInvalid}},
		{"manifest by tag", http.MethodGet, "/v2/app/manifests/v1?ns=registry.test", nil, http.StatusOK, series{"manifest", sourceUpstream, resultOK}},
		{"unknown blob", http.MethodGet, blobPath(missing), nil, http.StatusNotFound, series{"blob", sourceUpstream, resultNotFound}},
		{"unknown blob, HEAD", http.MethodHead, blobPath(missing), nil, http.StatusNotFound, series{"blob", sourceUpstream, resultNotFound}},
		{"registry not mirrored", http.MethodGet, "/v2/app/blobs/" + d.String() + "?ns=other.test", nil, http.StatusNotFound, series{"blob", sourceNone, resultNotFound}},
		{"method not allowed", http.MethodDelete, blobPath(d), nil, http.StatusMethodNotAllowed, series{"invalid", sourceNone, resultInvalid}},
		{"malformed digest", http.MethodGet, "/v2/app/blobs/sha256:xyz?ns=registry.test", nil, http.StatusBadRequest, series{"invalid", sourceNone, resultInvalid}},
	}
	want := map[series]float64{}
	for _, st := range steps {
		resp, _, err := tm.get(t, st.method, st.path, st.header)
		if err != nil || resp.StatusCode != st.status {
			t.Fatalf("%s: status %v err %v, want %d", st.name, statusOf(resp), err, st.status)
		}
		if st.name == "cold blob" {
			tm.waitStored(t, d)
		}
		want[st.want]++
		tm.waitRequests(t, "after "+st.name, want)
	}
	if got := tm.bytesFrom(t, sourceUpstream); got != float64(len(content)+len(manifest)) {
		t.Errorf("bytes_total{source=upstream} = %v, want %d (the cold blob and the manifest)", got, len(content)+len(manifest))
	}
	if got := tm.bytesFrom(t, sourceLocal); got != float64(len(content)) {
		t.Errorf("bytes_total{source=local} = %v, want %d (the warm blob; error bodies are not content)", got, len(content))
	}
}

// TestUpstreamFailuresByResult checks that each class of upstream failure is counted under
// source upstream with its own result.
func TestUpstreamFailuresByResult(t *testing.T) {
	tests := []struct {
		err    error
		result string
	}{
		{fmt.Errorf("token: %w", upstream.ErrUnauthorized), resultDenied},
		{fmt.Errorf("dial: %w", upstream.ErrUnavailable), resultError},
		{context.DeadlineExceeded, resultError},
		{fmt.Errorf("gone: %w", context.Canceled), resultCanceled},
	}
	for _, tt := range tests {
		t.Run(tt.result, func(t *testing.T) {
			tm := newTestMirror(t)
			tm.upstream.SetFailure(tt.err)
			for _, path := range []string{blobPath(digestOf([]byte("x"))), "/v2/app/manifests/v1?ns=registry.test"} {
				if _, _, err := tm.get(t, http.MethodGet, path, nil); err != nil {
					t.Fatal(err)
				}
			}
			tm.waitRequests(t, "after a blob and a manifest", map[[3]string]float64{
				{"blob", sourceUpstream, tt.result}:     1,
				{"manifest", sourceUpstream, tt.result}: 1,
			})
		})
	}
}

// TestSwarmSource checks that blobs fetched through WithBlobSource are counted as the swarm's.
func TestSwarmSource(t *testing.T) {
	var tm *testMirror
	viaPeers := func(registry, repo string, d v1.Hash) store.Source {
		return func(ctx context.Context) (io.ReadCloser, int64, error) {
			return tm.upstream.Blob(ctx, registry, repo, d, 0, -1)
		}
	}
	tm = newTestMirrorWith(t, nil, []Option{WithBlobSource(viaPeers)})
	content := randomBytes(t, 10<<10)
	d := tm.upstream.addBlob(content)
	if resp, _, err := tm.get(t, http.MethodGet, blobPath(d), nil); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET: status %v err %v", statusOf(resp), err)
	}
	tm.waitRequests(t, "after a blob from peers", map[[3]string]float64{{"blob", sourceSwarm, resultOK}: 1})
	if got := tm.bytesFrom(t, sourceSwarm); got != float64(len(content)) {
		t.Errorf("bytes_total{source=swarm} = %v, want %d", got, len(content))
	}
}

func TestResultOf(t *testing.T) {
	tests := map[int]string{
		0: resultOK, http.StatusOK: resultOK, http.StatusPartialContent: resultOK, http.StatusNotModified: resultOK,
		http.StatusNotFound: resultNotFound, http.StatusForbidden: resultDenied,
		http.StatusBadRequest: resultInvalid, http.StatusMethodNotAllowed: resultInvalid,
		http.StatusRequestedRangeNotSatisfiable: resultInvalid, statusClientClosed: resultCanceled,
		http.StatusBadGateway: resultError, http.StatusServiceUnavailable: resultError,
	}
	for status, want := range tests {
		if got := resultOf(status); got != want {
			t.Errorf("resultOf(%d) = %q, want %q", status, got, want)
		}
	}
}
