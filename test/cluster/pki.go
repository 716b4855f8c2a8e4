package cluster

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// pki is the cluster's credentials: a CA, the API server's serving certificate, the service
// account signing key, and one static bearer token per identity. Static tokens keep the
// cluster small; nothing here leaves the test's directory.
type pki struct {
	dir    string
	ca     *x509.Certificate
	caKey  *ecdsa.PrivateKey
	tokens map[string]string // identity name -> token
}

// File names under pki.dir.
const (
	caFile            = "ca.crt"
	apiCertFile       = "apiserver.crt"
	apiKeyFile        = "apiserver.key"
	kubeletClientCert = "apiserver-kubelet-client.crt"
	kubeletClientKey  = "apiserver-kubelet-client.key"
	registryCertFile  = "registry.crt"
	registryKeyFile   = "registry.key"
	saKeyFile         = "sa.key"
	saPubFile         = "sa.pub"
	tokenFile         = "tokens.csv"
	adminIdentity     = "admin"
)

// newPKI writes the CA, the API server's certificate for the given addresses, the service
// account key pair, and a token file with an admin (system:masters) and one identity per node.
func newPKI(dir string, apiAddrs []net.IP, nodes []string) (*pki, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	p := &pki{dir: dir, tokens: map[string]string{}}
	var err error
	if p.caKey, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
		return nil, err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "shoal-local-cluster-ca"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(7 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &p.caKey.PublicKey, p.caKey)
	if err != nil {
		return nil, err
	}
	if p.ca, err = x509.ParseCertificate(der); err != nil {
		return nil, err
	}
	if err := writePEM(filepath.Join(dir, caFile), "CERTIFICATE", der); err != nil {
		return nil, err
	}

	if err := p.serverCert(apiCertFile, apiKeyFile, "kube-apiserver", apiAddrs,
		"kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local", "localhost"); err != nil {
		return nil, err
	}

	// The API server's client certificate for kubelets (logs, exec), which trust the CA.
	clientKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	clientTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(3),
		Subject:      pkix.Name{CommonName: "kube-apiserver-kubelet-client", Organization: []string{"system:masters"}},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(7 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if der, err = x509.CreateCertificate(rand.Reader, clientTmpl, p.ca, &clientKey.PublicKey, p.caKey); err != nil {
		return nil, err
	}
	if err := writePEM(filepath.Join(dir, kubeletClientCert), "CERTIFICATE", der); err != nil {
		return nil, err
	}
	if err := writeKey(filepath.Join(dir, kubeletClientKey), clientKey); err != nil {
		return nil, err
	}

	saKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	if err := writeKey(filepath.Join(dir, saKeyFile), saKey); err != nil {
		return nil, err
	}
	pub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return nil, err
	}
	if err := writePEM(filepath.Join(dir, saPubFile), "PUBLIC KEY", pub); err != nil {
		return nil, err
	}

	// token,user,uid,"group,..." — kubelets as system:node:NAME in system:nodes, which the Node
	// authorizer and NodeRestriction admission expect.
	var csv strings.Builder
	line := func(identity, user, groups string) error {
		tok, err := randomToken()
		if err != nil {
			return err
		}
		p.tokens[identity] = tok
		fmt.Fprintf(&csv, "%s,%s,%s,\"%s\"\n", tok, user, user, groups)
		return nil
	}
	if err := line(adminIdentity, "shoal-cluster-admin", "system:masters"); err != nil {
		return nil, err
	}
	for _, n := range nodes {
		if err := line("node/"+n, "system:node:"+n, "system:nodes"); err != nil {
			return nil, err
		}
	}
	if err := os.WriteFile(filepath.Join(dir, tokenFile), []byte(csv.String()), 0o600); err != nil {
		return nil, err
	}
	return p, nil
}

func (p *pki) path(name string) string { return filepath.Join(p.dir, name) }

// serverCert writes a serving certificate signed by the CA, for the addresses and names given,
// and its key, to the files named certFile and keyFile under the PKI's directory.
func (p *pki) serverCert(certFile, keyFile, cn string, ips []net.IP, names ...string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(7 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  ips,
		DNSNames:     names,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.ca, &key.PublicKey, p.caKey)
	if err != nil {
		return err
	}
	if err := writePEM(p.path(certFile), "CERTIFICATE", der); err != nil {
		return err
	}
	return writeKey(p.path(keyFile), key)
}

// kubeconfig writes a kubeconfig for identity against server to path.
func (p *pki) kubeconfig(path, server, identity string) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["local"] = &clientcmdapi.Cluster{Server: server, CertificateAuthority: p.path(caFile)}
	cfg.AuthInfos[identity] = &clientcmdapi.AuthInfo{Token: p.tokens[identity]}
	cfg.Contexts["local"] = &clientcmdapi.Context{Cluster: "local", AuthInfo: identity}
	cfg.CurrentContext = "local"
	return clientcmd.WriteToFile(*cfg, path)
}

func randomToken() (string, error) {
	b := make([]byte, 24)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return hex.EncodeToString(b), nil
}

func writePEM(path, kind string, der []byte) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600)
}

func writeKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	return writePEM(path, "PRIVATE KEY", der)
}
