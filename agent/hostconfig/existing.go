package hostconfig

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	"github.com/pelletier/go-toml/v2"
)

// TLS is what a hosts.toml says about reaching one host over TLS: containerd's ca, client and
// skip_verify, with relative paths made absolute against the registry's directory, as
// containerd makes them. The files are named, not read.
type TLS struct {
	// CA are files of PEM CA certificates the host's certificate may chain to, trusted in
	// addition to the system roots.
	CA []string
	// Client are the client certificates offered when the host asks for one, as certificate
	// and key files; the key is "" when it is in the certificate file.
	Client [][2]string
	// SkipVerify accepts whatever certificate the host presents.
	SkipVerify bool
	// Source is where the settings were read: a hosts.toml (Shoal's backup of it once Shoal
	// merged into it), or a registry directory whose certificate files containerd uses as they
	// are because it has no hosts.toml.
	Source string
}

// Empty reports whether t changes nothing: the system roots verify the host, and no client
// certificate is offered.
func (t TLS) Empty() bool { return len(t.CA) == 0 && len(t.Client) == 0 && !t.SkipVerify }

// ExistingServer returns the server containerd would use for registry were Shoal not installed:
// the `server` of the hosts.toml containerd would read for it (its own directory, else
// _default), looking through Shoal's files to the user's original. It returns "" when there is
// no such file or it sets no server. As in containerd, a server without a scheme means https.
func ExistingServer(dir, registry string) (string, error) {
	o, err := findOriginal(dir, registry)
	if err != nil || o.content == nil {
		return "", err
	}
	f, err := parseHostsFile(o.path, o.content)
	if err != nil {
		return "", err
	}
	return withScheme(f.Server), nil
}

// ExistingTLS returns the TLS settings containerd would use for endpoint (scheme://host[:port],
// e.g. https://registry.test:5000) when pulling from registry were Shoal not installed, in the
// file ExistingServer reads: those of the first of the user's hosts, the [host] tables in file
// order and then the server, whose scheme and host are endpoint's (a default port and the case
// of the host name do not matter). The top-level ca, client and skip_verify belong to the
// server; a file that sets no server, or a registry directory with certificate files and no
// hosts.toml, gives them to the registry's default endpoint, as containerd does. Shoal's mirror
// host is never among the user's hosts. The result is empty when no host matches.
func ExistingTLS(dir, registry, endpoint string) (TLS, error) {
	o, err := findOriginal(dir, registry)
	if err != nil {
		return TLS{}, err
	}
	want, err := hostKey(endpoint)
	if err != nil {
		return TLS{}, fmt.Errorf("endpoint: %w", err)
	}
	hosts, err := o.hosts(registry)
	if err != nil {
		return TLS{}, err
	}
	for _, h := range hosts {
		if key, err := hostKey(h.url); err == nil && key == want {
			return h.tls, nil
		}
	}
	return TLS{}, nil
}

// original is the configuration containerd read for a registry before Shoal: a hosts.toml, or
// a registry directory without one, whose certificate files containerd then uses.
type original struct {
	path    string // the user's hosts.toml, or Shoal's backup of it
	content []byte // nil: no hosts.toml
	certDir string // the registry directory, when there was no hosts.toml (or an empty one)
}

// findOriginal looks up the directory containerd reads for registry (its own, else _default)
// and finds what it held before Shoal: the user's file, the backup of it, or nothing.
func findOriginal(dir, registry string) (original, error) {
	if err := ValidateRegistry(registry); err != nil {
		return original{}, err
	}
	for _, name := range lookupOrder(registry) {
		regDir := filepath.Join(dir, name)
		if _, err := os.Stat(regDir); errors.Is(err, fs.ErrNotExist) {
			continue
		} else if err != nil {
			return original{}, err
		}
		// containerd stops at the first directory that exists.
		hostsPath := filepath.Join(regDir, hostsFile)
		content, err := readOptional(hostsPath)
		if err != nil {
			return original{}, err
		}
		state, ours := parseMarker(content)
		switch {
		case !ours && len(content) > 0:
			return original{path: hostsPath, content: content}, nil
		case !ours, state == stateNewFile:
			// No hosts.toml before Shoal, or an empty one, which containerd treats as absent.
			return original{certDir: regDir}, nil
		case state == stateMerged:
			backupPath := filepath.Join(regDir, backupFile)
			content, err := os.ReadFile(backupPath)
			if err != nil {
				return original{}, fmt.Errorf("read the original of %s: %w", hostsPath, err)
			}
			if len(content) == 0 {
				return original{certDir: regDir}, nil
			}
			return original{path: backupPath, content: content}, nil
		case state == stateNewDir:
			continue // the directory exists only because of Shoal
		default:
			return original{}, nil // a file of Shoal's that does not say what was there before
		}
	}
	return original{}, nil
}

// hostTLS is one host containerd tries for a registry and its TLS settings.
type hostTLS struct {
	url string
	tls TLS
}

// hosts lists the hosts of the original configuration in containerd's order, the server (or
// the registry's default endpoint) last.
func (o original) hosts(registry string) ([]hostTLS, error) {
	if o.content == nil {
		var t TLS
		if o.certDir != "" {
			certs, err := findCertFiles(o.certDir)
			if err != nil {
				return nil, err
			}
			t.Source = o.certDir
			for _, ca := range certs.cas {
				t.CA = append(t.CA, filepath.Join(o.certDir, ca))
			}
			for _, pair := range certs.clients {
				t.Client = append(t.Client, [2]string{filepath.Join(o.certDir, pair[0]), filepath.Join(o.certDir, pair[1])})
			}
		}
		return []hostTLS{{url: defaultUpstream(registry), tls: t}}, nil
	}
	f, err := parseHostsFile(o.path, o.content)
	if err != nil {
		return nil, err
	}
	lay, err := parseLayout(o.content)
	if err != nil {
		return nil, fmt.Errorf("parse %s: %w", o.path, err)
	}
	baseDir := filepath.Dir(o.path)
	var hosts []hostTLS
	for _, h := range lay.hosts {
		t, err := f.Host[h].resolve(o.path, baseDir)
		if err != nil {
			return nil, fmt.Errorf("%s: [host.%s]: %w", o.path, quote(h), err)
		}
		hosts = append(hosts, hostTLS{url: h, tls: t})
	}
	t, err := f.resolve(o.path, baseDir) // the top-level keys: the server's
	if err != nil {
		return nil, fmt.Errorf("%s: %w", o.path, err)
	}
	server := withScheme(f.Server)
	if server == "" {
		server = defaultUpstream(registry)
	}
	return append(hosts, hostTLS{url: server, tls: t}), nil
}

// tlsKeys are the TLS keys of a host in a hosts.toml, typed as containerd 1.6 accepts them.
type tlsKeys struct {
	CA         any   `toml:"ca"`     // a path or a list of paths
	Client     any   `toml:"client"` // a path, a list of paths, or a list of [cert, key] pairs
	SkipVerify *bool `toml:"skip_verify"`
}

// hostsFileKeys are the keys of a hosts.toml the agent uses.
type hostsFileKeys struct {
	Server string             `toml:"server"`
	Host   map[string]tlsKeys `toml:"host"`
	tlsKeys
}

func parseHostsFile(path string, content []byte) (hostsFileKeys, error) {
	var f hostsFileKeys
	if err := toml.Unmarshal(content, &f); err != nil {
		return hostsFileKeys{}, fmt.Errorf("parse %s: %w", path, err)
	}
	return f, nil
}

// resolve checks the keys' types and makes their paths absolute against baseDir.
func (k tlsKeys) resolve(source, baseDir string) (TLS, error) {
	t := TLS{Source: source, SkipVerify: k.SkipVerify != nil && *k.SkipVerify}
	abs := func(p string) string {
		if p == "" || filepath.IsAbs(p) {
			return p
		}
		return filepath.Join(baseDir, p)
	}
	switch ca := k.CA.(type) {
	case nil:
	case string:
		t.CA = []string{abs(ca)}
	case []any:
		for _, v := range ca {
			p, ok := v.(string)
			if !ok {
				return TLS{}, fmt.Errorf("ca: %v is not a path", v)
			}
			t.CA = append(t.CA, abs(p))
		}
	default:
		return TLS{}, fmt.Errorf("ca is a %T; want a path or a list of paths", ca)
	}
	switch client := k.Client.(type) {
	case nil:
	case string:
		t.Client = [][2]string{{abs(client), ""}}
	case []any:
		for _, v := range client {
			switch c := v.(type) {
			case string:
				t.Client = append(t.Client, [2]string{abs(c), ""})
			case []any:
				cert, certOK := pairElem(c, 0)
				key, keyOK := pairElem(c, 1)
				if len(c) != 2 || !certOK || !keyOK || cert == "" {
					return TLS{}, fmt.Errorf("client: %v is not a [certificate, key] pair of paths", c)
				}
				t.Client = append(t.Client, [2]string{abs(cert), abs(key)})
			default:
				return TLS{}, fmt.Errorf("client: %v is neither a path nor a [certificate, key] pair", v)
			}
		}
	default:
		return TLS{}, fmt.Errorf("client is a %T; want a path, a list of paths or a list of [certificate, key] pairs", client)
	}
	return t, nil
}

func pairElem(pair []any, i int) (string, bool) {
	if i >= len(pair) {
		return "", false
	}
	s, ok := pair[i].(string)
	return s, ok
}

// withScheme adds https:// to a server without a scheme, as containerd does.
func withScheme(server string) string {
	if server != "" && !strings.HasPrefix(server, "http") {
		return "https://" + server
	}
	return server
}

// hostKey reduces a host URL to what identifies the host: scheme://host:port, the host in
// lower case and the port always written out. Paths do not matter.
func hostKey(raw string) (string, error) {
	u, err := url.Parse(withScheme(raw))
	if err != nil {
		return "", err
	}
	if u.Scheme != "http" && u.Scheme != "https" || u.Host == "" {
		return "", fmt.Errorf("%q is not an http or https URL", raw)
	}
	port := u.Port()
	if port == "" {
		port = "443"
		if u.Scheme == "http" {
			port = "80"
		}
	}
	return u.Scheme + "://" + net.JoinHostPort(strings.ToLower(u.Hostname()), port), nil
}

// ExistingMirrors returns the hosts that the hosts.toml containerd would read for registry,
// were Shoal not installed, lists besides the registry's own endpoint (its server): other
// mirrors, such as k3s's embedded registry (Spegel) or a pull-through cache. Shoal puts itself
// before them, and containerd tries them after Shoal and before the registry.
func ExistingMirrors(dir, registry string) ([]string, error) {
	o, err := findOriginal(dir, registry)
	if err != nil {
		return nil, err
	}
	hosts, err := o.hosts(registry)
	if err != nil || len(hosts) == 0 {
		return nil, err
	}
	server, err := hostKey(hosts[len(hosts)-1].url) // the server comes last
	if err != nil {
		return nil, err
	}
	var mirrors []string
	for _, h := range hosts[:len(hosts)-1] {
		if key, err := hostKey(h.url); err != nil || key != server {
			mirrors = append(mirrors, h.url)
		}
	}
	return mirrors, nil
}
