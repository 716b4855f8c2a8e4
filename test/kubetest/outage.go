package kubetest

import (
	"io"
	"net"
	"net/url"
	"sync"
	"testing"

	"k8s.io/client-go/rest"
)

// Outage stands between clients and the API server, on loopback, and can make the API server
// unreachable for them: Down closes every connection and refuses new ones, as a crashed or
// partitioned API server would, while the API server itself keeps running for the test's own
// client (which makes changes the cut-off clients must catch up with once Up).
type Outage struct {
	target string // the API server's host:port
	addr   string // where clients connect

	mu    sync.Mutex
	ln    net.Listener // nil while down
	conns map[net.Conn]bool
	wg    sync.WaitGroup
}

// NewOutage starts an Outage in front of env's API server and returns it with a REST config that
// reaches the API server through it. It is torn down when the test ends.
func NewOutage(t testing.TB, env *Env) (*Outage, *rest.Config) {
	t.Helper()
	u, err := url.Parse(env.Config.Host)
	if err != nil {
		t.Fatal(err)
	}
	host, _, err := net.SplitHostPort(u.Host)
	if err != nil {
		t.Fatal(err)
	}
	// The serving certificate names the API server's IP, whatever the port.
	ln, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Fatal(err)
	}
	o := &Outage{target: u.Host, addr: ln.Addr().String(), conns: map[net.Conn]bool{}}
	o.serve(ln)
	t.Cleanup(func() {
		o.Down()
		o.wg.Wait()
	})
	cfg := rest.CopyConfig(env.Config)
	cfg.Host = "https://" + o.addr
	return o, cfg
}

// Down closes the listener and every open connection: clients see their watches and requests
// fail and new connections refused, until Up.
func (o *Outage) Down() {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.ln != nil {
		_ = o.ln.Close()
		o.ln = nil
	}
	for c := range o.conns {
		_ = c.Close()
	}
}

// Up listens again on the same address.
func (o *Outage) Up() error {
	ln, err := net.Listen("tcp", o.addr)
	if err != nil {
		return err
	}
	o.serve(ln)
	return nil
}

func (o *Outage) serve(ln net.Listener) {
	o.mu.Lock()
	o.ln = ln
	o.mu.Unlock()
	o.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			o.wg.Go(func() { o.forward(c) })
		}
	})
}

// forward copies between c and a new connection to the API server until either side ends or
// Down closes them.
func (o *Outage) forward(c net.Conn) {
	up, err := net.Dial("tcp", o.target)
	if err != nil {
		_ = c.Close()
		return
	}
	o.mu.Lock()
	if o.ln == nil { // went down meanwhile
		o.mu.Unlock()
		_ = c.Close()
		_ = up.Close()
		return
	}
	o.conns[c], o.conns[up] = true, true
	o.mu.Unlock()
	var wg sync.WaitGroup
	pipe := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src) // ends with either side, or with Down
		_ = dst.Close()
		_ = src.Close()
	}
	wg.Go(func() { pipe(up, c) })
	wg.Go(func() { pipe(c, up) })
	wg.Wait()
	o.mu.Lock()
	delete(o.conns, c)
	delete(o.conns, up)
	o.mu.Unlock()
}
