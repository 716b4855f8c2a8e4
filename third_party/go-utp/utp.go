// Package utp stands in for github.com/anacrolix/go-utp, which the Go module proxy does not
// serve. Shoal never uses uTP (the swarm runs BitTorrent over its own TCP listener), so every
// constructor fails; the torrent client only needs the package to build.
package utp

import (
	"context"
	"errors"
	"log/slog"
	"net"
)

// Default names the implementation in the torrent client's error messages.
const Default = "uTP (not built into Shoal)"

// FirewallCallback decides whether a remote address may connect.
type FirewallCallback func(net.Addr) bool

// Option configures a Socket.
type Option func()

// WithLogger would set a socket's logger.
func WithLogger(*slog.Logger) Option { return func() {} }

// Socket is a uTP socket.
type Socket interface {
	net.PacketConn
	Accept() (net.Conn, error)
	Addr() net.Addr
	DialContext(ctx context.Context, network, addr string) (net.Conn, error)
	SetFirewallCallback(FirewallCallback)
}

var errUnavailable = errors.New("uTP is not available in this build")

// NewSocket fails: uTP is not available.
func NewSocket(network, addr string, opts ...Option) (Socket, error) { return nil, errUnavailable }

// NewSocketFromPacketConn fails: uTP is not available.
func NewSocketFromPacketConn(pc net.PacketConn, opts ...Option) (Socket, error) {
	return nil, errUnavailable
}
