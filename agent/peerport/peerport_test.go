package peerport

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"

	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/shoal-dev/shoal/agent/membership"
	"github.com/shoal-dev/shoal/internal/leakcheck"
)

const btHandshake = "\x13BitTorrent protocol\x00\x00\x00\x00\x00\x10\x00\x05"

// splitTestbed is a Split of a real loopback listener with an HTTP server on its http side.
type splitTestbed struct {
	addr     string
	bt, http net.Listener
	reg      *prometheus.Registry
	client   *http.Client
}

// testWait bounds waits that should end at once.
const testWait = 10 * time.Second

func newSplitTestbed(t *testing.T, allowed func(netip.Addr) bool, opts ...SplitOption) *splitTestbed {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tb := &splitTestbed{addr: l.Addr().String(), reg: prometheus.NewRegistry()}
	tb.bt, tb.http = Split(l, allowed, append(opts, WithSplitRegisterer(tb.reg))...)
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "hello %s from %s", r.RemoteAddr, r.Context().Value(http.LocalAddrContextKey))
		}),
		ReadHeaderTimeout: testWait,
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(tb.http) }()
	tb.client = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: testWait}
	t.Cleanup(func() {
		srv.Close() // closes the http side
		tb.bt.Close()
		if err := <-served; !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
	})
	return tb
}

func allowAll(netip.Addr) bool { return true }

func (tb *splitTestbed) get(t *testing.T) (string, error) {
	t.Helper()
	resp, err := tb.client.Get("http://" + tb.addr + "/")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return string(body), err
}

// dial connects from the loopback address from (127.0.0.1 if empty).
func (tb *splitTestbed) dial(t *testing.T, from string) net.Conn {
	t.Helper()
	d := net.Dialer{Timeout: testWait}
	if from != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(from)}
	}
	c, err := d.Dial("tcp", tb.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// accept returns the next connection on l, failing the test if none comes.
func accept(t *testing.T, l net.Listener) net.Conn {
	t.Helper()
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		c, err := l.Accept()
		ch <- result{c, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			t.Fatalf("Accept: %v", r.err)
		}
		t.Cleanup(func() { r.c.Close() })
		return r.c
	case <-time.After(testWait):
		t.Fatalf("no connection accepted")
		return nil
	}
}

// wantClosedByServer reads from c until the server closes it.
func wantClosedByServer(t *testing.T, c net.Conn) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(testWait))
	n, err := c.Read(make([]byte, 1))
	var ne net.Error
	if err == nil || errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("connection not closed by the server: read %d bytes, %v", n, err)
	}
}

func TestSplitRoutesHTTP(t *testing.T) {
	tb := newSplitTestbed(t, allowAll)
	body, err := tb.get(t)
	if err != nil {
		t.Fatal(err)
	}
	// The handler sees the real addresses through the wrapped connection.
	if want := "hello 127.0.0.1:"; !strings.HasPrefix(body, want) || !strings.HasSuffix(body, " from "+tb.addr) {
		t.Errorf("body = %q, want %q...%q", body, want, " from "+tb.addr)
	}
}

func TestSplitRoutesBitTorrent(t *testing.T) {
	tb := newSplitTestbed(t, allowAll)
	c := tb.dial(t, "")
	payload := btHandshake + "and the rest of the stream"
	if _, err := io.WriteString(c, payload); err != nil {
		t.Fatal(err)
	}
	sc := accept(t, tb.bt)
	if sc.RemoteAddr().String() != c.LocalAddr().String() || sc.LocalAddr().String() != c.RemoteAddr().String() {
		t.Errorf("accepted conn %v -> %v, dialled %v -> %v", sc.RemoteAddr(), sc.LocalAddr(), c.LocalAddr(), c.RemoteAddr())
	}
	if _, ok := sc.RemoteAddr().(*net.TCPAddr); !ok {
		t.Errorf("RemoteAddr is a %T, want *net.TCPAddr", sc.RemoteAddr())
	}
	got := make([]byte, len(payload))
	_ = sc.SetReadDeadline(time.Now().Add(testWait))
	if _, err := io.ReadFull(sc, got); err != nil || string(got) != payload {
		t.Fatalf("read %q, %v; want %q", got, err, payload)
	}
	// Writes go straight through.
	if _, err := io.Copy(sc, bytes.NewReader([]byte("reply"))); err != nil {
		t.Fatal(err)
	}
	back := make([]byte, 5)
	_ = c.SetReadDeadline(time.Now().Add(testWait))
	if _, err := io.ReadFull(c, back); err != nil || string(back) != "reply" {
		t.Fatalf("client read %q, %v", back, err)
	}
	// HTTP still works beside it.
	if _, err := tb.get(t); err != nil {
		t.Errorf("HTTP beside BitTorrent: %v", err)
	}
}

// TestSplitClearsSniffDeadline: a BitTorrent peer may go quiet for longer than the sniff
// timeout once routed.
func TestSplitClearsSniffDeadline(t *testing.T) {
	tb := newSplitTestbed(t, allowAll, WithSniffTimeout(20*time.Millisecond))
	c := tb.dial(t, "")
	if _, err := c.Write([]byte{btHandshakeFirstByte}); err != nil {
		t.Fatal(err)
	}
	sc := accept(t, tb.bt)
	read := make(chan error, 1)
	go func() {
		buf := make([]byte, len(btHandshake))
		_, err := io.ReadFull(sc, buf)
		if err == nil && string(buf) != btHandshake {
			err = fmt.Errorf("read %q", buf)
		}
		read <- err
	}()
	// A silent connection dialled now is dropped once the sniff timeout has passed, so when
	// it is, the first connection's sniff deadline has passed too; no sleep needed. A few in
	// a row leave the runtime time to fire the first deadline's timer (kept per CPU).
	for range 3 {
		wantClosedByServer(t, tb.dial(t, ""))
	}
	if _, err := io.WriteString(c, btHandshake[1:]); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-read:
		if err != nil {
			t.Fatalf("read after a pause longer than the sniff timeout: %v", err)
		}
	case <-time.After(testWait):
		t.Fatal("read did not return")
	}
}

func TestSplitRejectsNonMembers(t *testing.T) {
	tests := []struct {
		name    string
		allowed func(netip.Addr) bool
	}{
		{"nobody allowed", func(netip.Addr) bool { return false }},
		{"only 127.0.0.2 allowed", func(a netip.Addr) bool { return a == netip.MustParseAddr("127.0.0.2") }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tb := newSplitTestbed(t, tt.allowed)
			for _, payload := range []string{btHandshake, "GET / HTTP/1.1\r\nHost: x\r\n\r\n"} {
				c := tb.dial(t, "127.0.0.1")
				if _, err := io.WriteString(c, payload); err != nil {
					t.Fatal(err)
				}
				wantClosedByServer(t, c)
			}
			if _, err := tb.get(t); err == nil {
				t.Errorf("HTTP request from a non-member succeeded")
			}
			if got := counterValue(t, tb.reg, "shoal_swarm_rejected_connections_total"); got != 3 {
				t.Errorf("rejected connections = %v, want 3", got)
			}
			// Nothing reached the bt side: closing it now must not find a connection waiting.
			accepted := make(chan net.Conn, 1)
			go func() {
				c, _ := tb.bt.Accept()
				accepted <- c
			}()
			tb.bt.Close()
			if c := <-accepted; c != nil {
				c.Close()
				t.Errorf("a rejected connection from %v reached the bt side", c.RemoteAddr())
			}
		})
	}
}

func TestSplitAllowsMemberFromOtherLoopbackIP(t *testing.T) {
	allowed := func(a netip.Addr) bool { return a == netip.MustParseAddr("127.0.0.2") }
	tb := newSplitTestbed(t, allowed)
	bad := tb.dial(t, "127.0.0.1")
	if _, err := io.WriteString(bad, btHandshake+"from .1"); err != nil {
		t.Fatal(err)
	}
	wantClosedByServer(t, bad)
	good := tb.dial(t, "127.0.0.2")
	if _, err := io.WriteString(good, btHandshake+"from .2"); err != nil {
		t.Fatal(err)
	}
	sc := accept(t, tb.bt)
	if got := sc.RemoteAddr().String(); !strings.HasPrefix(got, "127.0.0.2:") {
		t.Fatalf("accepted a connection from %s", got)
	}
	buf := make([]byte, len(btHandshake)+7)
	_ = sc.SetReadDeadline(time.Now().Add(testWait))
	if _, err := io.ReadFull(sc, buf); err != nil || string(buf) != btHandshake+"from .2" {
		t.Fatalf("read %q, %v", buf, err)
	}
	if got := counterValue(t, tb.reg, "shoal_swarm_rejected_connections_total"); got != 1 {
		t.Errorf("rejected connections = %v, want 1", got)
	}
}

// TestSplitFollowsMembershipChanges: a member that joins after Split started is admitted, and
// one that leaves is refused from then on: Split asks the membership about every connection.
func TestSplitFollowsMembershipChanges(t *testing.T) {
	self := netip.MustParseAddrPort("127.0.0.1:7070")
	early, late := netip.MustParseAddrPort("127.0.0.2:7070"), netip.MustParseAddrPort("127.0.0.3:7070")
	members := membership.NewMemory(self, []netip.AddrPort{early})
	tb := newSplitTestbed(t, members.Allowed)
	send := func(from netip.AddrPort) net.Conn {
		c := tb.dial(t, from.Addr().String())
		if _, err := io.WriteString(c, btHandshake+"from "+from.Addr().String()); err != nil {
			t.Fatal(err)
		}
		return c
	}
	wantAccepted := func(from netip.AddrPort) {
		t.Helper()
		send(from)
		sc := accept(t, tb.bt)
		if got := sc.RemoteAddr().String(); !strings.HasPrefix(got, from.Addr().String()+":") {
			t.Fatalf("accepted a connection from %s, want one from %v", got, from.Addr())
		}
	}
	wantAccepted(early)
	wantClosedByServer(t, send(late)) // not a member yet

	members.SetPeers([]netip.AddrPort{late}) // late joins, early leaves
	wantAccepted(late)
	wantClosedByServer(t, send(early))
	if got := counterValue(t, tb.reg, "shoal_swarm_rejected_connections_total"); got != 2 {
		t.Errorf("rejected connections = %v, want 2", got)
	}
}

// TestSplitSilentConnectionDoesNotBlockOthers: with a sniff timeout far longer than the test,
// requests still get through while a silent connection is open.
func TestSplitSilentConnectionDoesNotBlockOthers(t *testing.T) {
	tb := newSplitTestbed(t, allowAll, WithSniffTimeout(time.Hour))
	tb.dial(t, "") // silent
	tb.dial(t, "") // silent
	if _, err := tb.get(t); err != nil {
		t.Fatalf("HTTP request while silent connections are open: %v", err)
	}
	c := tb.dial(t, "")
	if _, err := io.WriteString(c, btHandshake); err != nil {
		t.Fatal(err)
	}
	accept(t, tb.bt)
}

func TestSplitClosesSilentConnection(t *testing.T) {
	tb := newSplitTestbed(t, allowAll, WithSniffTimeout(10*time.Millisecond))
	wantClosedByServer(t, tb.dial(t, ""))
	if got := counterValue(t, tb.reg, "shoal_swarm_rejected_connections_total"); got != 0 {
		t.Errorf("a silent member counted as rejected: %v", got)
	}
}

func TestSplitClose(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	bt, httpL := Split(l, allowAll)
	if bt.Addr().String() != addr || httpL.Addr().String() != addr {
		t.Errorf("Addr() = %v and %v, want %v", bt.Addr(), httpL.Addr(), addr)
	}

	// An Accept blocked when its side closes returns net.ErrClosed.
	errc := make(chan error, 1)
	go func() {
		_, err := bt.Accept()
		errc <- err
	}()
	if err := bt.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := bt.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	select {
	case err := <-errc:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("Accept on a closed side: %v, want net.ErrClosed", err)
		}
	case <-time.After(testWait):
		t.Fatal("Accept did not return after Close")
	}
	if _, err := bt.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Accept after Close: %v, want net.ErrClosed", err)
	}

	// The other side still works; connections for the closed one are closed.
	tb := &splitTestbed{addr: addr}
	c := tb.dial(t, "")
	if _, err := io.WriteString(c, btHandshake); err != nil {
		t.Fatal(err)
	}
	wantClosedByServer(t, c)
	c = tb.dial(t, "")
	if _, err := io.WriteString(c, "GET"); err != nil {
		t.Fatal(err)
	}
	sc := accept(t, httpL)
	buf := make([]byte, 3)
	if _, err := io.ReadFull(sc, buf); err != nil || string(buf) != "GET" {
		t.Fatalf("read %q, %v", buf, err)
	}

	// Closing the second side closes the listener.
	if err := httpL.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if _, err := httpL.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Accept after Close: %v, want net.ErrClosed", err)
	}
	if c, err := net.DialTimeout("tcp", addr, testWait); err == nil {
		c.Close()
		t.Errorf("the shared listener still accepts connections after both sides closed")
	}
}

// TestSplitListenerFailure: if the shared listener dies under it, both sides report it.
func TestSplitListenerFailure(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	bt, httpL := Split(l, allowAll)
	defer bt.Close()
	defer httpL.Close()
	l.Close()
	for _, side := range []net.Listener{bt, httpL} {
		errc := make(chan error, 1)
		go func() {
			_, err := side.Accept()
			errc <- err
		}()
		select {
		case err := <-errc:
			if !errors.Is(err, net.ErrClosed) {
				t.Errorf("Accept: %v, want the listener's error", err)
			}
		case <-time.After(testWait):
			t.Fatal("Accept did not return")
		}
	}
}

func TestSplitConcurrentConnections(t *testing.T) {
	tb := newSplitTestbed(t, allowAll)
	const n = 20
	go func() {
		for range n {
			c, err := tb.bt.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c) // echo
			}()
		}
	}()
	errc := make(chan error, 2*n)
	for i := range n {
		go func() {
			_, err := tb.get(t)
			errc <- err
		}()
		go func() {
			errc <- func() error {
				c, err := net.DialTimeout("tcp", tb.addr, testWait)
				if err != nil {
					return err
				}
				defer c.Close()
				msg := fmt.Sprintf("%s%d", btHandshake, i)
				if _, err := io.WriteString(c, msg); err != nil {
					return err
				}
				_ = c.SetReadDeadline(time.Now().Add(testWait))
				buf := make([]byte, len(msg))
				if _, err := io.ReadFull(c, buf); err != nil {
					return err
				}
				if string(buf) != msg {
					return fmt.Errorf("echo %q, want %q", buf, msg)
				}
				return nil
			}()
		}()
	}
	for range 2 * n {
		if err := <-errc; err != nil {
			t.Error(err)
		}
	}
}

func counterValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

// TestSplitCloseWaitsForItsGoroutines: once the second side is closed, no goroutine of the
// split is left, not even one still waiting (for an hour) for a silent connection's first byte,
// and that connection is closed.
func TestSplitCloseWaitsForItsGoroutines(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tb := &splitTestbed{addr: l.Addr().String()}
	bt, httpL := Split(l, allowAll, WithSniffTimeout(time.Hour))
	silent := tb.dial(t, "")
	deadline := time.Now().Add(testWait)
	for len(leakcheck.Running("agent/peerport.(*splitter).route")) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the silent connection was never accepted")
		}
		time.Sleep(time.Millisecond)
	}
	_ = bt.Close()
	if err := httpL.Close(); err != nil {
		t.Fatal(err)
	}
	if left := leakcheck.Running("agent/peerport.(*splitter)."); len(left) > 0 {
		t.Errorf("%d goroutines of the split still running after both sides closed; the first:\n%s", len(left), left[0])
	}
	wantClosedByServer(t, silent)
}

// TestSniffedConnSetDeadlineAfterClose: a delivered connection closed on this side meanwhile
// still takes a deadline (the torrent client panics otherwise), and reads from it fail.
func TestSniffedConnSetDeadlineAfterClose(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	client, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	c := &sniffedConn{Conn: server}
	if err := c.SetDeadline(time.Now().Add(time.Second)); err != nil {
		t.Fatalf("SetDeadline on an open connection: %v", err)
	}
	server.Close()
	if err := server.SetDeadline(time.Now()); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("the closed connection itself says %v: the case below proves nothing", err)
	}
	if err := c.SetDeadline(time.Now().Add(time.Second)); err != nil {
		t.Errorf("SetDeadline after close: %v, want nil", err)
	}
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Read after close: %v, want net.ErrClosed", err)
	}
}

// TestSplitCloseBetweenSniffRegistrationAndDeadline: when both sides close after a new
// connection is registered as being sniffed but before its sniff deadline is set, the close
// still ends the sniff at once (a past deadline set by the close would be replaced by the
// sniff's own, an hour away here, and the close would wait for it).
func TestSplitCloseBetweenSniffRegistrationAndDeadline(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := make(chan struct{})
	hook := func(s *splitter) {
		s.sniffHook = func() {
			go func() {
				_ = s.bt.Close()
				_ = s.http.Close()
				close(closed)
			}()
			<-s.done // the close has passed over the connections being sniffed
		}
	}
	Split(l, allowAll, WithSniffTimeout(time.Hour), hook)
	c := (&splitTestbed{addr: l.Addr().String()}).dial(t, "")
	select {
	case <-closed:
	case <-time.After(testWait):
		t.Fatal("closing the split waits for a silent connection's sniff timeout")
	}
	wantClosedByServer(t, c)
}
