package harness

import (
	"io"
	"log/slog"
)

// Option tunes how a component is started.
type Option func(*options)

type options struct {
	logger      *slog.Logger
	binary      string
	snapshotter string
	netns       string
	mountns     string // WithMountNamespace
	listenAddr  string
	tlsCert     string // WithTLS
	tlsKey      string
	authUser    string // WithBasicAuth
	authPass    string
	storage     string // WithStorage
	configPath  string // WithConfigPath
}

func newOptions(defaultBinary string, opts []Option) options {
	o := options{
		logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		binary: defaultBinary,
	}
	for _, opt := range opts {
		opt(&o)
	}
	return o
}

// WithLogger reports what the harness does (processes started and stopped) to l.
// The components' own output always goes to log files in their directories.
func WithLogger(l *slog.Logger) Option {
	return func(o *options) {
		if l != nil {
			o.logger = l
		}
	}
}

// WithBinary runs the component from path instead of its default executable.
func WithBinary(path string) Option {
	return func(o *options) { o.binary = path }
}

// WithSnapshotter makes containerd use the named snapshotter instead of the one the harness
// detects (overlayfs when the kernel allows it here, else native). Only StartContainerd reads it.
func WithSnapshotter(name string) Option {
	return func(o *options) { o.snapshotter = name }
}

// WithNetns runs the component's process inside the network namespace at path (for example
// /run/netns/NAME), by starting it under `nsenter --net=path`. Only the network namespace
// changes: the process shares this one's file system, so its directories, logs and unix
// sockets stay where the harness reads them, and nsenter execs it in place, so PID is its own.
func WithNetns(path string) Option {
	return func(o *options) { o.netns = path }
}

// WithListenAddr makes the registry listen on addr ("IP:PORT") instead of a free port on
// 127.0.0.1. The harness dials a non-loopback address only inside RunIsolated's namespace.
// Only StartRegistry reads it.
func WithListenAddr(addr string) Option {
	return func(o *options) { o.listenAddr = addr }
}

// WithMountNamespace also runs the component's process inside the mount namespace at path (for
// example /proc/PID/ns/mnt of a process that holds it), by adding --mount to nsenter. The
// local cluster's nodes use it: each node's daemons see their own /run, /var and containerd
// paths. Only StartContainerd reads it.
func WithMountNamespace(path string) Option {
	return func(o *options) { o.mountns = path }
}

// WithStorage makes the registry keep its content in dir instead of under its own directory, so
// that a second registry can serve the same content (over HTTPS beside one over HTTP, say).
// Only StartRegistry reads it.
func WithStorage(dir string) Option {
	return func(o *options) { o.storage = dir }
}

// WithConfigPath writes path into containerd's config_path instead of the hosts directory given
// to StartContainerd: the same directory as containerd names it when it runs in a mount
// namespace of its own (the local cluster's nodes see theirs at /etc/containerd/certs.d).
// Only StartContainerd reads it.
func WithConfigPath(path string) Option {
	return func(o *options) { o.configPath = path }
}
