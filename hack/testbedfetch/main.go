// Command testbedfetch is the testbed's load client: run inside a node's network namespace, it waits
// until an absolute start time (so that every node starts together), GETs one blob URL, reads
// the body with a 1 MiB buffer while hashing it, checks the sha256 against the digest, and
// prints one JSON line: {"node","bytes","ttfb_s","seconds","ok","error","progress_bytes"},
// times counted from the start time; progress_bytes[i] is how many body bytes had arrived
// i+1 seconds after the start (the delivery curve). It exits 1 when the fetch failed (the line is printed all the same), 2 on
// bad usage. It is deliberately tiny: no retries, no proxy, no compression.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"
)

// report is the JSON line; test/testbed.FetchResult reads it.
type report struct {
	Node    string  `json:"node"`
	Bytes   int64   `json:"bytes"`
	TTFB    float64 `json:"ttfb_s"`
	Seconds float64 `json:"seconds"`
	OK      bool    `json:"ok"`
	Error   string  `json:"error,omitempty"`
	// Progress[i] is the body bytes received by i+1 seconds after the start; the last entry
	// is the total at the end.
	Progress []int64 `json:"progress_bytes,omitempty"`
}

func main() {
	node := flag.String("node", "", "node name to report")
	url := flag.String("url", "", "blob URL to GET")
	digest := flag.String("digest", "", "expected digest, sha256:<hex>")
	startAt := flag.String("start", "", "RFC 3339 time to send the request at (default: now)")
	timeout := flag.Duration("timeout", 10*time.Minute, "give up this long after the start time")
	flag.Parse()

	want, ok := strings.CutPrefix(*digest, "sha256:")
	if *url == "" || !ok || len(want) != 64 {
		fmt.Fprintln(os.Stderr, "usage: fetch -url URL -digest sha256:<hex> [-node NAME] [-start RFC3339] [-timeout D]")
		os.Exit(2)
	}
	start := time.Now()
	if *startAt != "" {
		t, err := time.Parse(time.RFC3339Nano, *startAt)
		if err != nil {
			fmt.Fprintf(os.Stderr, "-start %q: %v\n", *startAt, err)
			os.Exit(2)
		}
		start = t
	}

	r := fetch(start, *timeout, *url, want)
	r.Node = *node
	if err := json.NewEncoder(os.Stdout).Encode(r); err != nil {
		os.Exit(1)
	}
	if !r.OK {
		os.Exit(1)
	}
}

func fetch(start time.Time, timeout time.Duration, url, wantHex string) report {
	ctx, cancel := context.WithDeadline(context.Background(), start.Add(timeout))
	defer cancel()
	var r report
	fail := func(err error) report {
		r.Seconds = time.Since(start).Seconds()
		r.Error = err.Error()
		return r
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return fail(err)
	}
	client := &http.Client{Transport: &http.Transport{
		Proxy:              nil,
		DialContext:        (&net.Dialer{Timeout: 10 * time.Second}).DialContext,
		DisableCompression: true,
	}}
	// Sleep until the start time; a late start counts against this node, as it should.
	select {
	case <-time.After(time.Until(start)):
	case <-ctx.Done():
		return fail(ctx.Err())
	}
	resp, err := client.Do(req)
	if err != nil {
		return fail(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fail(fmt.Errorf("GET %s: %s", url, resp.Status))
	}
	h := sha256.New()
	buf := make([]byte, 1<<20)
	for {
		n, err := resp.Body.Read(buf)
		if n > 0 {
			if r.Bytes == 0 {
				r.TTFB = time.Since(start).Seconds()
			}
			r.Progress = recordProgress(r.Progress, time.Since(start), r.Bytes)
			r.Bytes += int64(n)
			h.Write(buf[:n])
		}
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fail(fmt.Errorf("read body after %d bytes: %w", r.Bytes, err))
		}
	}
	r.Seconds = time.Since(start).Seconds()
	r.Progress = append(recordProgress(r.Progress, time.Since(start), r.Bytes), r.Bytes)
	if got := hex.EncodeToString(h.Sum(nil)); got != wantHex {
		r.Error = fmt.Sprintf("digest mismatch: got sha256:%s after %d bytes", got, r.Bytes)
		return r
	}
	r.OK = true
	return r
}

// recordProgress fills in progress up to elapsed: every whole second that ended by then and
// has no entry yet gets total, the bytes that had arrived before elapsed.
func recordProgress(progress []int64, elapsed time.Duration, total int64) []int64 {
	for len(progress) < int(elapsed/time.Second) {
		progress = append(progress, total)
	}
	return progress
}
