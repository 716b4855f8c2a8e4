// Package sockwater lets a reader of a long TCP body be woken once per many kilobytes instead
// of once per arriving segment, with the socket's receive low water mark (SO_RCVLOWAT).
//
// At link rates of 100 Mbit/s a reader woken for every segment reads a few kilobytes per system
// call and pays a wakeup for each: on 8 agents the piece fetches' reads were a fifth of their
// CPU, and a seeder's reads of its segments from the registry cost more than the segments'
// SHA-1. A mark must never exceed what is still to arrive, or the last read waits for bytes
// that never come, and a connection must go back to its pool with the mark at 1, or the next
// response on it waits for bytes that may never come. Callers ask Next before each read, which
// gives the mark and how much that read may take: the read that ends a body (and hands its
// connection back, inside the read) always runs with the mark at 1.
package sockwater

import (
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// Default is the low water mark while plenty of a body is still to come.
const Default = 64 << 10

// Next returns the low water mark to set before a read of up to n bytes while rem bytes of a
// body are still to arrive, and how many bytes that read may take. The mark is Default unless
// fewer than twice that remain; the margin covers what the reader's buffers may already hold
// (an HTTP client's few kilobytes), so the mark never exceeds what is left on the wire. A read
// under the raised mark leaves the last 2 × Default bytes, so that the mark is 1 again before
// the read that ends the body.
func Next(rem int64, n int) (mark, limit int) {
	if rem > 2*Default {
		return Default, int(min(int64(n), rem-2*Default))
	}
	return 1, n
}

// Socket is the TCP socket under conn (a TLS connection's too), or nil when there is none.
func Socket(conn net.Conn) syscall.RawConn {
	// A TLS connection, or one wrapped to replay bytes read to route it (agent/peerport), says
	// which connection it runs on.
	for range 4 {
		w, ok := conn.(interface{ NetConn() net.Conn })
		if !ok {
			break
		}
		conn = w.NetConn()
	}
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return nil
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return raw
}

// Set sets the socket's SO_RCVLOWAT to n bytes. Lowering it wakes a reader waiting for more
// than n bytes if n are there.
func Set(sock syscall.RawConn, n int) {
	if sock == nil {
		return
	}
	_ = sock.Control(func(fd uintptr) {
		_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVLOWAT, n)
	})
}

// Queued is how many received bytes wait in the socket to be read (SIOCINQ), or -1 if unknown.
func Queued(sock syscall.RawConn) int {
	if sock == nil {
		return -1
	}
	n := -1
	_ = sock.Control(func(fd uintptr) {
		if v, err := unix.IoctlGetInt(int(fd), unix.SIOCINQ); err == nil {
			n = v
		}
	})
	return n
}
