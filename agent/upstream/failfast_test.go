package upstream_test

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/shoal-dev/shoal/agent/upstream"
)

var someDigest = v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("cd", 32)}

// tiny timeouts: the tests assert only the kind of error; the generous test context keeps a
// broken client from hanging the test.
var tiny = upstream.Timeouts{Dial: time.Second, ResponseHeader: 300 * time.Millisecond, Manifest: 2 * time.Second, BlobIdle: 300 * time.Millisecond}

// calls exercises every operation of the client against registry.test.
func calls(c *upstream.Client) map[string]func(t *testing.T) error {
	return map[string]func(t *testing.T) error{
		"manifest": func(t *testing.T) error {
			_, err := c.Manifest(testContext(t), "registry.test", "test/app", "v1", nil)
			return err
		},
		"head manifest": func(t *testing.T) error {
			_, err := c.HeadManifest(testContext(t), "registry.test", "test/app", "v1", nil)
			return err
		},
		"blob": func(t *testing.T) error {
			body, _, err := c.Blob(testContext(t), "registry.test", "test/app", someDigest, 0, -1)
			if err == nil {
				body.Close()
			}
			return err
		},
		"head blob": func(t *testing.T) error {
			_, err := c.HeadBlob(testContext(t), "registry.test", "test/app", someDigest)
			return err
		},
	}
}

func TestConnectionRefused(t *testing.T) {
	addr := freeAddr(t) // nothing listens there any more
	for name, call := range calls(newClient(addr)) {
		t.Run(name, func(t *testing.T) {
			if err := call(t); !errors.Is(err, upstream.ErrUnavailable) {
				t.Errorf("err = %v, want ErrUnavailable", err)
			}
		})
	}
}

// blackHole accepts connections and never answers.
func blackHole(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, conn)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	return l.Addr().String()
}

func TestNoAnswer(t *testing.T) {
	c := newClient(blackHole(t), upstream.WithTimeouts(tiny))
	for name, call := range calls(c) {
		t.Run(name, func(t *testing.T) {
			err := call(t)
			if !errors.Is(err, upstream.ErrUnavailable) {
				t.Errorf("err = %v, want ErrUnavailable", err)
			}
		})
	}
}

// fakeRegistry is an httptest registry whose /v2/ answers 200 (no auth) and whose other paths
// are served by handle.
func fakeRegistry(t *testing.T, handle http.HandlerFunc) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v2/" {
			w.WriteHeader(http.StatusOK)
			return
		}
		handle(w, r)
	}))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

func TestNoAnswerAfterHandshake(t *testing.T) {
	release := make(chan struct{})
	host := fakeRegistry(t, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	t.Cleanup(func() { close(release) }) // runs before the server closes
	c := newClient(host, upstream.WithTimeouts(tiny))
	for name, call := range calls(c) {
		t.Run(name, func(t *testing.T) {
			if err := call(t); !errors.Is(err, upstream.ErrUnavailable) {
				t.Errorf("err = %v, want ErrUnavailable", err)
			}
		})
	}
}

// A registry that stops sending in the middle of a body is cut off after BlobIdle, with every
// byte it sent returned; a large body is read with the socket's low water mark raised (see
// sockwater), a small one without.
func TestStalledBlobBody(t *testing.T) {
	for _, c := range []struct {
		name         string
		length, sent int
	}{{"small", 1000, 100}, {"large", 1 << 20, 300 << 10}} {
		t.Run(c.name, func(t *testing.T) {
			release := make(chan struct{})
			host := fakeRegistry(t, func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Length", strconv.Itoa(c.length))
				w.WriteHeader(http.StatusOK)
				_, _ = w.Write(make([]byte, c.sent))
				_ = http.NewResponseController(w).Flush()
				select { // and then nothing
				case <-release:
				case <-r.Context().Done():
				}
			})
			t.Cleanup(func() { close(release) })
			client := newClient(host, upstream.WithTimeouts(tiny))
			body, total, err := client.Blob(testContext(t), "registry.test", "test/app", someDigest, 0, -1)
			if err != nil {
				t.Fatal(err)
			}
			defer body.Close()
			if total != int64(c.length) {
				t.Errorf("total = %d, want %d", total, c.length)
			}
			n, err := readInBigReads(body)
			if n != c.sent || !errors.Is(err, upstream.ErrUnavailable) {
				t.Errorf("read %d bytes, err = %v; want %d bytes, then ErrUnavailable", n, err, c.sent)
			}
		})
	}
}

// readInBigReads reads body to its end in reads of 2 MiB, as a segment's copy does, and returns
// how many bytes it read and the error that ended it (nil at EOF).
func readInBigReads(body io.Reader) (int, error) {
	buf, n := make([]byte, 2<<20), 0
	for {
		m, err := body.Read(buf)
		n += m
		if errors.Is(err, io.EOF) {
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}

// A connection goes back to the client's pool with its low water mark at 1 byte, even when a
// single large read takes the rest of a body: the next response on it, a HEAD's headers of a
// few hundred bytes, must not wait for a mark's worth of bytes that never come.
func TestConnectionReusedAfterLargeBodyAnswersSmallResponses(t *testing.T) {
	data := make([]byte, 1<<20)
	var conns sync.Map
	host := fakeRegistry(t, func(w http.ResponseWriter, r *http.Request) {
		conns.Store(r.RemoteAddr, true)
		w.Header().Set("Content-Length", strconv.Itoa(len(data)))
		if r.Method == http.MethodHead {
			return
		}
		_, _ = w.Write(data)
	})
	c := newClient(host, upstream.WithTimeouts(tiny))
	for range 3 {
		body, _, err := c.Blob(testContext(t), "registry.test", "test/app", someDigest, 0, -1)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond) // the whole body in the socket: one read could take it
		n, err := readInBigReads(body)
		body.Close()
		if err != nil || n != len(data) {
			t.Fatalf("read %d bytes of %d: %v", n, len(data), err)
		}
		if _, err := c.HeadBlob(testContext(t), "registry.test", "test/app", someDigest); err != nil {
			t.Fatalf("HEAD on the connection the body came on: %v", err)
		}
	}
	n := 0
	conns.Range(func(any, any) bool { n++; return true })
	if n != 1 {
		t.Errorf("the requests came on %d connections, want 1 (this test is about a reused one)", n)
	}
}

// A registry that sends a large body slowly, in bits smaller than the socket's low water mark
// and less of it per BlobIdle than the mark, is slow, not stalled: the body is read whole.
func TestTricklingRegistryIsNotIdle(t *testing.T) {
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(i * 7)
	}
	host := fakeRegistry(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(len(data)))
		w.WriteHeader(http.StatusOK)
		rc := http.NewResponseController(w)
		off := 300 << 10
		_, _ = w.Write(data[:off])
		_ = rc.Flush()
		for range 16 { // 1 KiB per 100 ms: 3 KiB per BlobIdle
			time.Sleep(100 * time.Millisecond)
			_, _ = w.Write(data[off : off+1024])
			_ = rc.Flush()
			off += 1024
		}
		_, _ = w.Write(data[off:])
	})
	c := newClient(host, upstream.WithTimeouts(tiny))
	body, _, err := c.Blob(testContext(t), "registry.test", "test/app", someDigest, 0, -1)
	if err != nil {
		t.Fatal(err)
	}
	defer body.Close()
	got, err := io.ReadAll(body)
	if err != nil {
		t.Fatalf("after %d bytes: %v", len(got), err)
	}
	if !bytes.Equal(got, data) {
		t.Errorf("read %d bytes, not the %d sent", len(got), len(data))
	}
}

// A consumer that pauses between reads longer than BlobIdle is not cut off: only time spent
// waiting for the registry counts.
func TestSlowConsumerIsNotIdle(t *testing.T) {
	data := make([]byte, 3000)
	host := fakeRegistry(t, func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write(data)
	})
	c := newClient(host, upstream.WithTimeouts(tiny))
	body, _, err := c.Blob(testContext(t), "registry.test", "test/app", someDigest, 0, -1)
	if err != nil {
		t.Fatal(err)
	}
	defer body.Close()
	buf := make([]byte, 1000)
	total := 0
	for range 10 {
		time.Sleep(2 * tiny.BlobIdle)
		n, err := body.Read(buf)
		total += n
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("after %d bytes: %v", total, err)
		}
	}
	if total != len(data) {
		t.Errorf("read %d bytes, want %d", total, len(data))
	}
}

func TestStatusClassification(t *testing.T) {
	// An error code in the body decides when the status alone does not; a HEAD answer has no
	// body, so for those only the status counts.
	tests := []struct {
		status int
		body   string
		header map[string]string
		want   error
	}{
		{http.StatusNotFound, "", nil, upstream.ErrNotFound},
		{http.StatusBadRequest, `{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known to registry"}]}`, nil, upstream.ErrNotFound},
		{http.StatusUnauthorized, "", map[string]string{"WWW-Authenticate": `Basic realm="x"`}, upstream.ErrUnauthorized},
		{http.StatusForbidden, `{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}`, nil, upstream.ErrUnauthorized},
		{http.StatusTooManyRequests, `{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}`, nil, upstream.ErrUnavailable},
		{http.StatusInternalServerError, "oops", nil, upstream.ErrUnavailable},
		{http.StatusServiceUnavailable, "", nil, upstream.ErrUnavailable},
	}
	for _, tt := range tests {
		t.Run(http.StatusText(tt.status), func(t *testing.T) {
			host := fakeRegistry(t, func(w http.ResponseWriter, r *http.Request) {
				for k, v := range tt.header {
					w.Header().Set(k, v)
				}
				w.WriteHeader(tt.status)
				_, _ = io.WriteString(w, tt.body)
			})
			for name, call := range calls(newClient(host)) {
				if strings.HasPrefix(name, "head") && tt.status == http.StatusBadRequest {
					continue
				}
				err := call(t)
				if !errors.Is(err, tt.want) {
					t.Errorf("%s: err = %v, want %v", name, err, tt.want)
				}
				var uerr *upstream.Error
				if !errors.As(err, &uerr) || uerr.StatusCode != tt.status {
					t.Errorf("%s: err = %#v, want an *Error with status %d", name, err, tt.status)
				}
			}
		})
	}
}
