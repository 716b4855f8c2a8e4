package controllers

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/events"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	v1 "github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/internal/promreg"
)

// Finalizer holds a deleted Prewarm until no node's NodeCache holds content that only it
// asked for: the agents have been told to unpin it.
const Finalizer = "shoal.dev/unpin"

// Resolver resolves one reference of a Prewarm: the repository, tag, digest and, for an index,
// the manifests of the platforms asked (all when platforms is empty). pullSecrets are the
// .dockerconfigjson contents of the Prewarm's imagePullSecrets.
type Resolver interface {
	Resolve(ctx context.Context, ref string, artifact bool, platforms []string, pullSecrets [][]byte) (v1.ResolvedReference, error)
}

// PrewarmReconciler resolves each Prewarm's references (tags again every refreshInterval),
// rolls the selected nodes' NodeCaches up into its status, and holds a deleted one until its
// content is released.
type PrewarmReconciler struct {
	Client   client.Client
	Resolver Resolver
	Recorder events.EventRecorder
	// APIReader reads pull Secrets from the API server itself (default: the manager's), so
	// that the controller keeps no cache of Secrets and needs only get on them.
	APIReader client.Reader
	// Policy says which Prewarms may reach nodes (default: all); it must be the NodeCache
	// reconciler's.
	Policy Policy
	// Registerer registers the reconciler's metrics (nil: none).
	Registerer prometheus.Registerer
	// Now returns the time (default time.Now); tests move it.
	Now func() time.Time
	// Tokens exchanges the imagePullSecrets of Prewarms for the pull tokens agents use; nil:
	// agents pull with their own credentials only.
	Tokens *PullTokens

	nodes *prometheus.GaugeVec // nil: no metrics
	// retries spaces out the retries of references that failed to resolve and of pull tokens
	// that could not be had.
	retries     *backoff
	retriesOnce sync.Once
}

// +kubebuilder:rbac:groups=shoal.dev,resources=prewarms,verbs=get;list;watch;update;patch
// +kubebuilder:rbac:groups=shoal.dev,resources=prewarms/status,verbs=get;update;patch
// +kubebuilder:rbac:groups=shoal.dev,resources=prewarms/finalizers,verbs=update
// +kubebuilder:rbac:groups=shoal.dev,resources=nodecaches,verbs=get;list;watch
// +kubebuilder:rbac:groups="",resources=secrets,verbs=get

// Reconcile brings one Prewarm's status up to date.
func (r *PrewarmReconciler) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	var p v1.Prewarm
	if err := r.Client.Get(ctx, req.NamespacedName, &p); err != nil {
		if apierrors.IsNotFound(err) && r.nodes != nil {
			r.nodes.DeletePartialMatch(prometheus.Labels{"namespace": req.Namespace, "name": req.Name})
		}
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	if p.DeletionTimestamp != nil {
		return r.release(ctx, &p)
	}
	if controllerutil.AddFinalizer(&p, Finalizer) {
		if err := r.Client.Update(ctx, &p); err != nil {
			return reconcile.Result{}, err
		}
	}

	var nodes corev1.NodeList
	if err := r.Client.List(ctx, &nodes); err != nil {
		return reconcile.Result{}, err
	}
	var caches v1.NodeCacheList
	if err := r.Client.List(ctx, &caches); err != nil {
		return reconcile.Result{}, err
	}
	byName := make(map[string]*v1.NodeCache, len(caches.Items))
	for i := range caches.Items {
		byName[caches.Items[i].Name] = &caches.Items[i]
	}
	ptrs := make([]*corev1.Node, len(nodes.Items))
	for i := range nodes.Items {
		ptrs[i] = &nodes.Items[i]
	}

	before := p.Status.DeepCopy()
	now := r.now()
	if !r.Policy.Allows(&p) {
		// No registry traffic and no node for a Prewarm the admins do not allow.
		return reconcile.Result{}, r.refuse(ctx, &p, before, now)
	}
	// The pull secrets are read from the API server at most once, and only if something needs
	// them: a resolution or a new pull token.
	secrets := sync.OnceValue(func() [][]byte { return r.pullSecrets(ctx, &p) })
	next := r.resolve(ctx, &p, platformsFor(&p, ptrs), secrets, now)
	next = minPositive(next, r.ensureTokens(ctx, &p, secrets, now))
	next = minPositive(next, Rollup(&p, ptrs, byName, metav1.NewTime(now)))
	p.Status.Seeders = ChooseSeeders(&p, ptrs)
	p.Status.ObservedGeneration = p.Generation
	if r.nodes != nil {
		for state, n := range map[string]int32{"desired": p.Status.Nodes.Desired, "ready": p.Status.Nodes.Ready, "failed": p.Status.Nodes.Failed} {
			r.nodes.WithLabelValues(p.Namespace, p.Name, state).Set(float64(n))
		}
	}

	if !equality.Semantic.DeepEqual(before, &p.Status) {
		if err := r.Client.Status().Update(ctx, &p); err != nil {
			return reconcile.Result{}, err
		}
		r.eventOnChange(&p, before)
	}
	if next > 0 {
		return reconcile.Result{RequeueAfter: next}, nil
	}
	return reconcile.Result{}, nil
}

// refuse writes the status of a Prewarm the policy does not allow.
func (r *PrewarmReconciler) refuse(ctx context.Context, p *v1.Prewarm, before *v1.PrewarmStatus, now time.Time) error {
	st := &p.Status
	st.ObservedGeneration = p.Generation
	st.Nodes, st.BytesReady, st.FailingNodes, st.Ready = v1.NodeCounts{}, 0, nil, "0/0"
	msg := "Prewarms in namespace " + p.Namespace + " are not allowed by the cluster's Shoal policy (the controller's --prewarm-namespaces)"
	for _, c := range []metav1.Condition{
		{Type: ConditionReady, Status: metav1.ConditionFalse, Reason: "NamespaceNotAllowed", Message: msg},
		{Type: ConditionProgressing, Status: metav1.ConditionFalse, Reason: "NamespaceNotAllowed", Message: msg},
		{Type: ConditionDegraded, Status: metav1.ConditionTrue, Reason: "NamespaceNotAllowed", Message: msg},
	} {
		c.ObservedGeneration, c.LastTransitionTime = p.Generation, metav1.NewTime(now)
		meta.SetStatusCondition(&st.Conditions, c)
	}
	if equality.Semantic.DeepEqual(before, st) {
		return nil
	}
	if err := r.Client.Status().Update(ctx, p); err != nil {
		return err
	}
	if r.Recorder != nil && !meta.IsStatusConditionTrue(before.Conditions, ConditionDegraded) {
		r.Recorder.Eventf(p, nil, corev1.EventTypeWarning, "NamespaceNotAllowed", "Reconcile", "%s", msg)
	}
	return nil
}

// backoff is the reconciler's retries, made on first use unless a test set them.
func (r *PrewarmReconciler) backoff() *backoff {
	r.retriesOnce.Do(func() {
		if r.retries == nil {
			r.retries = newBackoff(retryKeys, nil)
		}
	})
	return r.retries
}

// retryKey names one thing of one generation of a Prewarm that the reconciler retries: an
// edit of the Prewarm is tried at once.
func retryKey(p *v1.Prewarm, what string) string {
	return string(p.UID) + "/" + strconv.FormatInt(p.Generation, 10) + "|" + what
}

func (r *PrewarmReconciler) now() time.Time {
	if r.Now != nil {
		return r.Now()
	}
	return time.Now()
}

// resolve brings status.references in line with the spec: a reference by digest is resolved
// once, one by tag again once refreshInterval has passed. It returns when the next tag falls
// due (0: none). A reference that fails keeps its last resolution, with the error beside it,
// so that nodes keep what they hold, and is tried again after a delay that grows with each
// failure in a row (backoff), whatever else makes the Prewarm reconcile meanwhile.
func (r *PrewarmReconciler) resolve(ctx context.Context, p *v1.Prewarm, platforms []string, secrets func() [][]byte, now time.Time) (next time.Duration) {
	refresh := 10 * time.Minute
	if p.Spec.RefreshInterval != nil && p.Spec.RefreshInterval.Duration >= time.Minute {
		refresh = p.Spec.RefreshInterval.Duration
	}
	old := map[string]v1.ResolvedReference{}
	for _, ref := range p.Status.References {
		old[ref.Reference] = ref
	}
	var refs []v1.ResolvedReference
	want := func(ref string, artifact bool) {
		prev, had := old[ref]
		byDigest := hasDigest(ref)
		due := !had || prev.Digest == "" || prev.Artifact != artifact || prev.ResolvedAt == nil ||
			(!byDigest && now.Sub(prev.ResolvedAt.Time) >= refresh) ||
			(len(prev.Platforms) > 0 && !coversPlatforms(prev.Platforms, platforms))
		if !due {
			refs = append(refs, prev)
			if !byDigest {
				next = minPositive(next, prev.ResolvedAt.Add(refresh).Sub(now))
			}
			return
		}
		key := retryKey(p, "resolve "+ref)
		if artifact {
			key += " artifact"
		}
		if wait := r.backoff().wait(key, now); wait > 0 && had && prev.Error != "" {
			refs = append(refs, prev) // the last attempt failed; its retry is not due yet
			next = minPositive(next, wait)
			return
		}
		got, err := r.Resolver.Resolve(ctx, ref, artifact, platforms, secrets())
		at := metav1.NewTime(now)
		if err != nil {
			retry := r.backoff().failed(key, now)
			log.FromContext(ctx).Info("reference not resolved", "reference", ref, "error", err.Error(), "retryIn", retry)
			prev.Reference, prev.Artifact, prev.Error = ref, artifact, err.Error()
			refs = append(refs, prev)
			next = minPositive(next, retry)
			return
		}
		r.backoff().succeeded(key)
		got.Reference, got.Artifact, got.ResolvedAt, got.Error = ref, artifact, &at, ""
		if had && prev.Digest != "" && prev.Digest != got.Digest && r.Recorder != nil {
			r.Recorder.Eventf(p, nil, corev1.EventTypeNormal, "TagMoved", "Resolve", "%s moved from %s to %s", ref, prev.Digest, got.Digest)
		}
		refs = append(refs, got)
		if !byDigest {
			next = minPositive(next, refresh)
		}
	}
	for _, ref := range p.Spec.Images {
		want(ref, false)
	}
	for _, ref := range p.Spec.Artifacts {
		want(ref, true)
	}
	p.Status.References = refs
	return next
}

// ensureTokens keeps a pull token for each repository of a Prewarm with imagePullSecrets,
// names it in the references, and returns when to renew the first (0: none). A token that
// could not be had keeps the last one named, and is asked for again after a delay that grows
// with each failure in a row (backoff).
func (r *PrewarmReconciler) ensureTokens(ctx context.Context, p *v1.Prewarm, pullSecrets func() [][]byte, now time.Time) (next time.Duration) {
	if r.Tokens == nil || len(p.Spec.ImagePullSecrets) == 0 {
		return 0
	}
	byRepo := map[string]string{}
	for i := range p.Status.References {
		ref := &p.Status.References[i]
		if ref.Repository == "" {
			continue
		}
		name, done := byRepo[ref.Repository]
		if !done {
			key := retryKey(p, "token "+ref.Repository)
			if wait := r.backoff().wait(key, now); wait > 0 {
				// The last exchange failed and its retry is not due: keep the last token.
				byRepo[ref.Repository] = ref.PullSecretName
				next = minPositive(next, wait)
				continue
			}
			tok, err := r.Tokens.Ensure(ctx, ref.Repository, pullSecrets)
			if err == nil {
				r.backoff().succeeded(key)
			}
			switch {
			case err != nil:
				retry := r.backoff().failed(key, now)
				log.FromContext(ctx).Info("no pull token", "repository", ref.Repository, "error", err.Error(), "retryIn", retry)
				if r.Recorder != nil {
					r.Recorder.Eventf(p, nil, corev1.EventTypeWarning, "PullToken", "Exchange", "pull token for %s: %v", ref.Repository, err)
				}
				tok = Token{Name: ref.PullSecretName, RenewIn: retry} // keep the last one
			case tok.WroteBasic && r.Recorder != nil:
				r.Recorder.Eventf(p, nil, corev1.EventTypeWarning, "PullCredentialsShared", "Exchange",
					"the registry of %s offers no tokens: the pull secret's credentials for it are in Secret %s/%s, which every agent may read",
					ref.Repository, r.Tokens.Namespace, tok.Name)
			}
			name = tok.Name
			byRepo[ref.Repository] = name
			next = minPositive(next, tok.RenewIn)
		}
		ref.PullSecretName = name
	}
	return next
}

// platformsFor is the platforms to resolve a Prewarm's indexes for: its spec.platforms, or
// else the platforms of the nodes it selects, so that an index of many platforms is resolved
// for the ones the cluster runs.
func platformsFor(p *v1.Prewarm, nodes []*corev1.Node) []string {
	if len(p.Spec.Platforms) > 0 {
		return p.Spec.Platforms
	}
	var out []string
	for _, n := range nodes {
		if pl := NodePlatform(n); pl != "" && Selects(p, n) && !slices.Contains(out, pl) {
			out = append(out, pl)
		}
	}
	slices.Sort(out)
	return out
}

// coversPlatforms reports whether a resolution has a manifest for every platform wanted.
func coversPlatforms(have []v1.PlatformManifest, want []string) bool {
	for _, w := range want {
		if matchPlatform(have, w) == "" {
			return false
		}
	}
	return true
}

// pullSecrets reads the Prewarm's imagePullSecrets from its namespace; a missing or
// malformed one is reported as an event and skipped (the registry may not need it).
func (r *PrewarmReconciler) pullSecrets(ctx context.Context, p *v1.Prewarm) [][]byte {
	var out [][]byte
	for _, ref := range p.Spec.ImagePullSecrets {
		var s corev1.Secret
		err := r.APIReader.Get(ctx, types.NamespacedName{Namespace: p.Namespace, Name: ref.Name}, &s)
		if err == nil && s.Type != corev1.SecretTypeDockerConfigJson {
			err = fmt.Errorf("type %s, want %s", s.Type, corev1.SecretTypeDockerConfigJson)
		}
		if err != nil {
			if r.Recorder != nil {
				r.Recorder.Eventf(p, nil, corev1.EventTypeWarning, "PullSecret", "Resolve", "imagePullSecret %s: %v", ref.Name, err)
			}
			continue
		}
		out = append(out, s.Data[corev1.DockerConfigJsonKey])
	}
	return out
}

// release removes the finalizer once no NodeCache holds an item that only this Prewarm asked
// for. The NodeCache reconciler drops them when it sees the deletion; until then, check again.
func (r *PrewarmReconciler) release(ctx context.Context, p *v1.Prewarm) (reconcile.Result, error) {
	if !controllerutil.ContainsFinalizer(p, Finalizer) {
		return reconcile.Result{}, nil
	}
	var nodes corev1.NodeList
	if err := r.Client.List(ctx, &nodes); err != nil {
		return reconcile.Result{}, err
	}
	var prewarms v1.PrewarmList
	if err := r.Client.List(ctx, &prewarms); err != nil {
		return reconcile.Result{}, err
	}
	others := slices.DeleteFunc(prewarms.Items, func(o v1.Prewarm) bool { return o.UID == p.UID })
	alone := *p
	alone.DeletionTimestamp = nil // the items it would ask for, were it alive
	for i := range nodes.Items {
		node := &nodes.Items[i]
		var nc v1.NodeCache
		if err := r.Client.Get(ctx, types.NamespacedName{Name: node.Name}, &nc); err != nil {
			if client.IgnoreNotFound(err) != nil {
				return reconcile.Result{}, err
			}
			continue
		}
		mine := DesiredItems(node, []v1.Prewarm{alone}, nil, 0).Items
		theirs := DesiredItems(node, others, nil, 0).Items
		for _, it := range mine {
			if containsRef(nc.Spec.Items, it.Reference) && !containsRef(theirs, it.Reference) {
				log.FromContext(ctx).V(1).Info("waiting for the node to release the content", "node", node.Name, "reference", it.Reference)
				return reconcile.Result{RequeueAfter: 2 * time.Second}, nil
			}
		}
	}
	controllerutil.RemoveFinalizer(p, Finalizer)
	if err := r.Client.Update(ctx, p); err != nil {
		return reconcile.Result{}, err
	}
	return reconcile.Result{}, nil
}

func containsRef(items []v1.NodeCacheItem, ref string) bool {
	return slices.ContainsFunc(items, func(it v1.NodeCacheItem) bool { return it.Reference == ref })
}

func (r *PrewarmReconciler) eventOnChange(p *v1.Prewarm, before *v1.PrewarmStatus) {
	if r.Recorder == nil {
		return
	}
	was := meta.IsStatusConditionTrue(before.Conditions, ConditionReady)
	if now := meta.IsStatusConditionTrue(p.Status.Conditions, ConditionReady); now && !was {
		r.Recorder.Eventf(p, nil, corev1.EventTypeNormal, "Ready", "Rollup", "%s nodes hold the content", p.Status.Ready)
	}
	if before.Nodes.Failed == 0 && p.Status.Nodes.Failed > 0 {
		f := p.Status.FailingNodes[0]
		r.Recorder.Eventf(p, nil, corev1.EventTypeWarning, "NodesFailed", "Rollup", "%d nodes failed; %s: %s %s",
			p.Status.Nodes.Failed, f.Node, f.Reason, f.Message)
	}
}

// SetupWithManager registers the reconciler: Prewarms, the NodeCaches of the nodes they
// select, and Nodes (labels decide what a Prewarm selects, readiness whether a node can
// fetch).
func (r *PrewarmReconciler) SetupWithManager(mgr ctrl.Manager) error {
	if r.Resolver == nil {
		return errors.New("PrewarmReconciler needs a Resolver")
	}
	if r.APIReader == nil {
		r.APIReader = mgr.GetAPIReader()
	}
	if r.Registerer != nil {
		r.nodes = promreg.Shared(r.Registerer, prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "shoal", Subsystem: "controller", Name: "prewarm_nodes",
			Help: "Nodes a Prewarm selects (desired), that hold its content as asked (ready), and that failed.",
		}, []string{"namespace", "name", "state"}))
	}
	return ctrl.NewControllerManagedBy(mgr).
		Named("prewarm").
		For(&v1.Prewarm{}).
		Watches(&v1.NodeCache{}, handler.EnqueueRequestsFromMapFunc(prewarmsOfNodeCache(r.Client))).
		Watches(&corev1.Node{}, handler.EnqueueRequestsFromMapFunc(enqueueAll(r.Client, &v1.PrewarmList{})),
			builder.WithPredicates(nodeChangesSelection)).
		Complete(r)
}

// hasDigest reports whether a reference names its content by digest (never moves).
func hasDigest(ref string) bool {
	i := strings.LastIndex(ref, "@")
	return i >= 0 && strings.HasPrefix(ref[i+1:], "sha256:")
}

// minPositive is the smaller of a and b, ignoring a zero a.
func minPositive(a, b time.Duration) time.Duration {
	if a <= 0 || b < a {
		return b
	}
	return a
}
