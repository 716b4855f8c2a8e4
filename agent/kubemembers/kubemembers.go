// Package kubemembers tells the swarm whom it swarms with in a Kubernetes cluster: it announces
// this agent with its SwarmMember object, watches every agent's, and keeps the last list it saw
// on disk for a start while the API server is unreachable (docs/kubernetes.md).
package kubemembers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	toolscache "k8s.io/client-go/tools/cache"

	v1alpha1 "github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/internal/kubeclient"
)

// Config says who this agent is and where it keeps the last member list.
type Config struct {
	// NodeName is the agent's Node (from the downward API): its SwarmMember's name and owner.
	NodeName string
	// Self is where peers reach this agent.
	Self netip.AddrPort
	// ProtocolVersion and AgentVersion are announced in the SwarmMember.
	ProtocolVersion int
	AgentVersion    string
	// StateFile keeps the last member list seen, for a start without the API server; "" = none.
	StateFile string
	// Bootstrap is the member list to use until the API server answers when StateFile holds
	// none (--peers); it may be empty.
	Bootstrap []netip.AddrPort
	// Logger receives the source's logs (default: discard).
	Logger *slog.Logger
}

// The agent's rights for its membership (generated into config/rbac/agent). It may write only
// its own SwarmMember: the admission policy in config/policy holds it to that.
// +kubebuilder:rbac:groups=shoal.dev,resources=swarmmembers,verbs=get;list;watch;create;update
// +kubebuilder:rbac:groups="",resources=nodes,verbs=get

// Source keeps a membership in step with the cluster's SwarmMembers.
type Source struct {
	cfg  Config
	rest *rest.Config
	log  *slog.Logger
	// retry is the first wait after a failed announcement; it doubles up to maxRetry.
	retry, maxRetry time.Duration
	// announced, when set (tests), is called with the result of every announcement attempt.
	announced func(error)

	mu     sync.Mutex
	byName map[string]netip.AddrPort // the members by node name, as last watched
}

// Addrs returns the swarm addresses of the named nodes' agents that the watch knows, in the
// order given; nil before the watch has listed the members.
func (s *Source) Addrs(nodes []string) []netip.AddrPort {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []netip.AddrPort
	for _, n := range nodes {
		if a, ok := s.byName[n]; ok {
			out = append(out, a)
		} else if n == s.cfg.NodeName {
			out = append(out, s.cfg.Self)
		}
	}
	return out
}

// New returns a Source that reaches the API server with restCfg.
func New(restCfg *rest.Config, cfg Config) (*Source, error) {
	if cfg.NodeName == "" {
		return nil, errors.New("kubemembers: no node name (set it from the downward API: spec.nodeName)")
	}
	if !cfg.Self.IsValid() || cfg.Self.Port() == 0 {
		return nil, fmt.Errorf("kubemembers: invalid peer address %v", cfg.Self)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Source{cfg: cfg, rest: restCfg, log: log, retry: time.Second, maxRetry: time.Minute}, nil
}

// Run sets the members to the last saved list (or the bootstrap list) at once, then to the
// cluster's SwarmMembers whenever they change, until ctx ends. It announces this agent in the
// meantime, retrying with backoff while the API server does not answer; the data path never
// waits for it. It returns nil when ctx ends, an error only for a configuration it cannot use.
func (s *Source) Run(ctx context.Context, set func([]netip.AddrPort)) error {
	if saved, err := s.load(); err != nil {
		s.log.Warn("last member list unreadable; starting from the bootstrap list", "path", s.cfg.StateFile, "error", err)
	} else if len(saved) > 0 {
		s.log.Info("members from the last list saved", "members", len(saved), "path", s.cfg.StateFile)
		set(saved)
	} else if len(s.cfg.Bootstrap) > 0 {
		set(s.cfg.Bootstrap)
	}

	members, nodes, err := s.clients()
	if err != nil {
		return err
	}
	inf, changed, err := kubeclient.Informer(members, "swarmmembers", &v1alpha1.SwarmMember{}, fields.Everything())
	if err != nil {
		return fmt.Errorf("kubemembers: %w", err)
	}

	// Run returns only once the watch and the announcement have stopped. While the API server
	// does not answer, the watch retries with backoff and the members stay as they are.
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	wg.Go(func() { inf.RunWithContext(ctx) })
	wg.Go(func() { s.announce(ctx, members, nodes) })
	if !toolscache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		return nil // ctx ended before the API server answered
	}
	s.log.Info("watching SwarmMembers")
	var last []netip.AddrPort
	for {
		if peers := s.peers(inf.GetStore().List()); !slices.Equal(peers, last) {
			last = peers
			set(slices.Clone(peers))
			if err := s.save(peers); err != nil {
				s.log.Warn("save the member list", "path", s.cfg.StateFile, "error", err)
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		}
	}
}

// clients returns a REST client for SwarmMembers and one for Nodes. Neither reaches the API
// server before it is used: an agent starts while the API server is down.
func (s *Source) clients() (rest.Interface, corev1client.NodeInterface, error) {
	members, err := kubeclient.Shoal(s.rest)
	if err != nil {
		return nil, nil, fmt.Errorf("kubemembers: %w", err)
	}
	core, err := corev1client.NewForConfig(s.rest)
	if err != nil {
		return nil, nil, fmt.Errorf("kubemembers: client: %w", err)
	}
	return members, core.Nodes(), nil
}

// peers is the sorted member list of the cached SwarmMembers, self always included, invalid
// entries skipped.
func (s *Source) peers(items []any) []netip.AddrPort {
	peers := []netip.AddrPort{s.cfg.Self}
	byName := map[string]netip.AddrPort{s.cfg.NodeName: s.cfg.Self}
	defer func() {
		s.mu.Lock()
		s.byName = byName
		s.mu.Unlock()
	}()
	for _, o := range items {
		m, ok := o.(*v1alpha1.SwarmMember)
		if !ok {
			continue
		}
		p, err := addrOf(&m.Spec)
		if err != nil {
			s.log.Warn("SwarmMember skipped", "name", m.Name, "error", err)
			continue
		}
		if m.Name != s.cfg.NodeName {
			byName[m.Name] = p
		}
		if !slices.Contains(peers, p) {
			peers = append(peers, p)
		}
	}
	slices.SortFunc(peers, netip.AddrPort.Compare)
	return peers
}

func addrOf(spec *v1alpha1.SwarmMemberSpec) (netip.AddrPort, error) {
	ip, err := netip.ParseAddr(spec.IP)
	if err != nil {
		return netip.AddrPort{}, err
	}
	if spec.Port <= 0 || spec.Port > 65535 {
		return netip.AddrPort{}, fmt.Errorf("port %d out of range", spec.Port)
	}
	return netip.AddrPortFrom(ip.Unmap(), uint16(spec.Port)), nil
}

// announce writes this agent's SwarmMember, retrying with backoff and jitter until it succeeds
// or ctx ends.
func (s *Source) announce(ctx context.Context, members rest.Interface, nodes corev1client.NodeInterface) {
	wait := s.retry
	for {
		err := s.announceOnce(ctx, members, nodes)
		if s.announced != nil {
			s.announced(err)
		}
		if err == nil || ctx.Err() != nil {
			return
		}
		s.log.Warn("announce this agent's SwarmMember; retrying", "node", s.cfg.NodeName, "retry_in", wait, "error", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait/2 + rand.N(wait/2+1)):
		}
		wait = min(2*wait, s.maxRetry)
	}
}

// announceOnce creates the SwarmMember, or updates it when its spec or owner differ; an
// unchanged one is not written.
func (s *Source) announceOnce(ctx context.Context, members rest.Interface, nodes corev1client.NodeInterface) error {
	node, err := nodes.Get(ctx, s.cfg.NodeName, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("get node %s: %w", s.cfg.NodeName, err)
	}
	spec := v1alpha1.SwarmMemberSpec{
		IP:              s.cfg.Self.Addr().Unmap().String(),
		Port:            int32(s.cfg.Self.Port()),
		ProtocolVersion: int32(s.cfg.ProtocolVersion),
		AgentVersion:    s.cfg.AgentVersion,
	}
	owner := metav1.OwnerReference{APIVersion: "v1", Kind: "Node", Name: node.Name, UID: node.UID}
	var m v1alpha1.SwarmMember
	err = members.Get().Resource("swarmmembers").Name(s.cfg.NodeName).Do(ctx).Into(&m)
	switch {
	case apierrors.IsNotFound(err):
		m = v1alpha1.SwarmMember{
			ObjectMeta: metav1.ObjectMeta{Name: s.cfg.NodeName, OwnerReferences: []metav1.OwnerReference{owner}},
			Spec:       spec,
		}
		if err := members.Post().Resource("swarmmembers").Body(&m).Do(ctx).Error(); err != nil {
			return fmt.Errorf("create SwarmMember %s: %w", s.cfg.NodeName, err)
		}
		s.log.Info("SwarmMember created", "node", s.cfg.NodeName, "p2p_addr", s.cfg.Self)
		return nil
	case err != nil:
		return fmt.Errorf("get SwarmMember %s: %w", s.cfg.NodeName, err)
	}
	if m.Spec == spec && slices.Equal(m.OwnerReferences, []metav1.OwnerReference{owner}) {
		return nil
	}
	m.Spec, m.OwnerReferences = spec, []metav1.OwnerReference{owner}
	if err := members.Put().Resource("swarmmembers").Name(s.cfg.NodeName).Body(&m).Do(ctx).Error(); err != nil {
		return fmt.Errorf("update SwarmMember %s: %w", s.cfg.NodeName, err)
	}
	s.log.Info("SwarmMember updated", "node", s.cfg.NodeName, "p2p_addr", s.cfg.Self)
	return nil
}

// savedList is the state file's format.
type savedList struct {
	Members []netip.AddrPort `json:"members"`
}

func (s *Source) load() ([]netip.AddrPort, error) {
	if s.cfg.StateFile == "" {
		return nil, nil
	}
	b, err := os.ReadFile(s.cfg.StateFile)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var l savedList
	if err := json.Unmarshal(b, &l); err != nil {
		return nil, fmt.Errorf("%s: %w", s.cfg.StateFile, err)
	}
	return l.Members, nil
}

// save writes the list atomically: a crash leaves the old list or the new one.
func (s *Source) save(peers []netip.AddrPort) error {
	if s.cfg.StateFile == "" {
		return nil
	}
	b, err := json.Marshal(savedList{Members: peers})
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(s.cfg.StateFile), ".members-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), s.cfg.StateFile)
}
