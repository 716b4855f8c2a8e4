package controllers

import (
	"container/list"
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
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/shoal-dev/shoal/api/v1alpha1"
	"github.com/shoal-dev/shoal/controllers/resolve"
	"github.com/shoal-dev/shoal/internal/promreg"
)

const (
	// DefaultSeedTTL is how long a SwarmSeed lives: long enough for a rollout's pods to pull
	// (agents keep what they fetched in their stores after it goes), short enough that the
	// open SwarmSeeds an agent lists when it starts are few.
	DefaultSeedTTL = 10 * time.Minute

	// seedClaim is how long an image being resolved for one pod is left alone by the others
	// (until the resolution ends, which the resolver's timeout bounds): the pods of a rollout
	// would otherwise each ask the registry at once.
	seedClaim = time.Minute
	// seedMemoSize bounds each of the reconciler's memories (images handled, manifests
	// seeded). Forgetting costs a repeated resolution or an AlreadyExists, never a second
	// SwarmSeed.
	seedMemoSize = 4096
	// podSeedWorkers is how many pods are reconciled at once: a registry that answers slowly
	// must not hold up the images of other registries.
	podSeedWorkers = 4
)

// ImageResolver resolves an image reference into its manifests and their blobs;
// *resolve.Resolver is one.
type ImageResolver interface {
	Resolve(ctx context.Context, ref string, opts resolve.Options) (*resolve.Result, error)
}

// PodSeedReconciler writes one SwarmSeed per distinct image manifest that pending pods are
// about to pull, so that the agents start fetching its blobs from the registry before the
// kubelets ask for them. It never touches a pod, and its writes grow with the number of
// distinct new manifests, not with the number of pods: a manifest seeded recently is
// remembered, and a SwarmSeed is named after its manifest digest, so a second create is
// refused by the API server (see SwarmSeedName). SwarmSeedTTLReconciler deletes them.
//
// Images are resolved with the pod's imagePullSecrets (read from its namespace) for the
// platform of the pod's Node, or, before the pod is bound, for the platforms of the Nodes
// its nodeSelector matches. An image that does not resolve is counted and left alone for one
// namespace and set of pull secrets, for a delay that grows with each failure in a row (5 s
// doubling to 5 minutes, with jitter: backoff); its pods are pulled as they would be without
// Shoal.
type PodSeedReconciler struct {
	// Client reads Pods, Nodes and SwarmSeeds (from the manager's cache) and creates SwarmSeeds.
	Client client.Client
	// APIReader reads pull Secrets from the API server itself (default: the manager's), so
	// that the controller caches no Secret and needs only get on them.
	APIReader client.Reader
	// Resolver resolves images; results are cached there (tags briefly, digests for good).
	Resolver ImageResolver
	// TTL is how long a SwarmSeed lives (default DefaultSeedTTL): a manifest seeded less than
	// TTL ago is not seeded again.
	TTL time.Duration
	// Registerer registers the metrics (nil: not registered).
	Registerer prometheus.Registerer
	// Now returns the time (default time.Now); tests move it.
	Now func() time.Time
	// Tokens exchanges the pull secrets of pods for the pull tokens agents use, kept for the
	// seeds' lifetime; nil: agents seed with their own credentials only.
	Tokens *PullTokens

	once      sync.Once
	metrics   *seedMetrics
	images    *recent  // image, namespace, pull secrets and platforms handled
	manifests *recent  // manifest digests seeded, or being seeded
	retries   *backoff // images that failed to resolve, by the same keys as images
}

// +kubebuilder:rbac:groups="",resources=pods,verbs=get;list;watch
// +kubebuilder:rbac:groups="",resources=nodes,verbs=get;list;watch
// +kubebuilder:rbac:groups="",resources=secrets,verbs=get
// +kubebuilder:rbac:groups=shoal.dev,resources=swarmseeds,verbs=get;list;watch;create;delete

func (r *PodSeedReconciler) setup() {
	r.once.Do(func() {
		r.metrics = newSeedMetrics(r.Registerer)
		r.images = newRecent(seedMemoSize)
		r.manifests = newRecent(seedMemoSize)
		r.retries = newBackoff(retryKeys, nil)
		if r.TTL <= 0 {
			r.TTL = DefaultSeedTTL
		}
		if r.Now == nil {
			r.Now = time.Now
		}
		if r.APIReader == nil {
			r.APIReader = r.Client
		}
	})
}

// Reconcile seeds the images one pending pod is about to pull.
func (r *PodSeedReconciler) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	r.setup()
	var pod corev1.Pod
	if err := r.Client.Get(ctx, req.NamespacedName, &pod); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	if !pending(&pod) {
		return reconcile.Result{}, nil
	}
	defer r.metrics.pods.Inc() // once the pod has been dealt with
	images := imagesToSeed(&pod)
	if len(images) == 0 {
		return reconcile.Result{}, nil
	}
	platforms, err := r.platforms(ctx, &pod)
	if err != nil {
		return reconcile.Result{}, err
	}

	now := r.Now()
	secretNames := make([]string, 0, len(pod.Spec.ImagePullSecrets))
	for _, s := range pod.Spec.ImagePullSecrets {
		secretNames = append(secretNames, s.Name)
	}
	var secrets [][]byte
	secretsRead := false
	for _, image := range images {
		key := strings.Join([]string{pod.Namespace, strings.Join(secretNames, ","), image, strings.Join(platforms, ",")}, "|")
		// Claimed before resolving, so that the pods of a rollout reconciled at the same time
		// leave the image to the first of them.
		if !r.images.claim(key, now, now.Add(seedClaim)) {
			continue
		}
		if !secretsRead {
			secrets, secretsRead = r.pullSecrets(ctx, &pod), true
		}
		res, err := r.resolve(ctx, image, platforms, secrets)
		if err != nil {
			reason := failureLabel(err)
			r.metrics.failures.WithLabelValues(reason).Inc()
			retry := r.retries.failed(key, now)
			log.FromContext(ctx).V(1).Info("image not seeded", "image", image, "reason", reason, "error", err.Error(), "retryIn", retry)
			r.images.add(key, now.Add(retry))
			continue
		}
		r.retries.succeeded(key)
		r.metrics.resolved.Inc()
		repository := res.Repository.Name()
		token := r.token(ctx, repository, secrets, now)
		for _, m := range res.Manifests {
			expires, err := r.seed(ctx, &pod, repository, token, m, now)
			if err != nil {
				r.images.forget(key)
				return reconcile.Result{}, err
			}
			if token != "" && !expires.IsZero() {
				// The token lives as long as the SwarmSeeds that name it, which SwarmSeedTTLReconciler
				// deletes by their creation time: that of the API server, written after the
				// resolution above.
				r.Tokens.Hold(repository, secrets, expires)
			}
		}
		// A tag is looked at again as soon as the resolver would resolve it again; a digest
		// names the same manifests for good.
		remember := resolve.DefaultTagTTL
		if hasDigest(image) {
			remember = r.TTL
		}
		r.images.add(key, now.Add(remember))
	}
	return reconcile.Result{}, nil
}

// resolve resolves image for platforms. An index lacking some of them resolves to the others;
// a single image manifest of another platform resolves all the same, as container runtimes
// pull it whatever the node's platform.
func (r *PodSeedReconciler) resolve(ctx context.Context, image string, platforms []string, secrets [][]byte) (*resolve.Result, error) {
	res, err := r.Resolver.Resolve(ctx, image, resolve.Options{Platforms: platforms, PullSecrets: secrets})
	if res != nil && len(res.Manifests) == 0 && !res.MediaType.IsIndex() && len(platforms) > 0 {
		res, err = r.Resolver.Resolve(ctx, image, resolve.Options{PullSecrets: secrets})
	}
	if res == nil || len(res.Manifests) == 0 {
		if err == nil {
			err = fmt.Errorf("resolve %s: no manifest to run", image)
		}
		return nil, err
	}
	return res, nil
}

// token returns the name of the pull token for a repository that a pod with pull secrets pulls
// from, held for TTL from now, and by Reconcile for as long as the seeds that name it live (""
// for a pod without pull secrets, a registry that needs none, or when it could not be had: the
// seeders then use their own credentials).
func (r *PodSeedReconciler) token(ctx context.Context, repository string, secrets [][]byte, now time.Time) string {
	if r.Tokens == nil || len(secrets) == 0 {
		return ""
	}
	tok, err := r.Tokens.Ensure(ctx, repository, func() [][]byte { return secrets })
	if err != nil {
		log.FromContext(ctx).Info("no pull token; seeders use their own credentials", "repository", repository, "error", err.Error())
		return ""
	}
	if tok.Name != "" {
		r.Tokens.Hold(repository, secrets, now.Add(r.TTL))
	}
	return tok.Name
}

// seed writes the SwarmSeeds of one manifest, unless it was seeded less than TTL ago. It
// returns when the last of the manifest's SwarmSeeds it wrote or found falls due for deletion
// (creation + TTL; zero when it wrote none and found none).
func (r *PodSeedReconciler) seed(ctx context.Context, pod *corev1.Pod, repository, token string, m resolve.Manifest, now time.Time) (time.Time, error) {
	digest := m.Digest.String()
	// Claimed before the writes, so that pods of the same image reconciled at the same time
	// do not write it too.
	if !r.manifests.claim(digest, now, now.Add(r.TTL)) {
		return time.Time{}, nil
	}
	created := false
	var expires time.Time
	for _, seed := range swarmSeeds(repository, digest, seedBlobs(m)) {
		seed.Spec.PullSecretName = token
		ok, createdAt, err := r.create(ctx, &seed)
		if err != nil {
			r.manifests.forget(digest)
			return time.Time{}, fmt.Errorf("seed %s@%s: %w", repository, digest, err)
		}
		created = created || ok
		if !createdAt.IsZero() && createdAt.Add(r.TTL).After(expires) {
			expires = createdAt.Add(r.TTL)
		}
	}
	if created {
		if !pod.CreationTimestamp.IsZero() {
			r.metrics.latency.Observe(max(0, r.Now().Sub(pod.CreationTimestamp.Time).Seconds()))
		}
		log.FromContext(ctx).V(1).Info("SwarmSeed created", "repository", repository, "manifest", digest, "blobs", len(m.Blobs))
	}
	return expires, nil
}

// create creates seed unless it exists, and reports whether it did and the creation time of
// the SwarmSeed created or found (zero when the API server refused it as existing: it was
// then created before now).
func (r *PodSeedReconciler) create(ctx context.Context, seed *v1alpha1.SwarmSeed) (bool, time.Time, error) {
	var existing v1alpha1.SwarmSeed
	err := r.Client.Get(ctx, client.ObjectKeyFromObject(seed), &existing)
	if err == nil {
		return false, existing.CreationTimestamp.Time, nil
	}
	if !apierrors.IsNotFound(err) {
		return false, time.Time{}, err
	}
	if err := r.Client.Create(ctx, seed); err != nil {
		if apierrors.IsAlreadyExists(err) {
			return false, time.Time{}, nil // another replica, or this one before a restart
		}
		return false, time.Time{}, err
	}
	r.metrics.created.Inc()
	r.metrics.blobs.Add(float64(len(seed.Spec.Blobs)))
	return true, seed.CreationTimestamp.Time, nil
}

// platforms are the os/arch the pod's images are resolved for: see podPlatforms.
func (r *PodSeedReconciler) platforms(ctx context.Context, pod *corev1.Pod) ([]string, error) {
	if pod.Spec.NodeName != "" {
		var node corev1.Node
		err := r.Client.Get(ctx, types.NamespacedName{Name: pod.Spec.NodeName}, &node)
		if err == nil {
			if p := NodePlatform(&node); p != "" {
				return []string{p}, nil
			}
		} else if !apierrors.IsNotFound(err) {
			return nil, err
		}
	}
	var nodes corev1.NodeList
	// Read only: the cache's Nodes are not copied, which matters with thousands of them.
	if err := r.Client.List(ctx, &nodes, client.UnsafeDisableDeepCopy); err != nil {
		return nil, err
	}
	return podPlatforms(pod, nodes.Items), nil
}

// podPlatforms is the platforms (os/arch, sorted) of the nodes that an unbound pod may land
// on: those its nodeSelector matches, or every node when it matches none. Affinity and
// taints are not evaluated: they could only narrow the set, at the cost of a scheduler's
// work. Nodes without the well-known os and arch labels are left out; with none at all the
// result is empty, which resolves every platform of an index.
func podPlatforms(pod *corev1.Pod, nodes []corev1.Node) []string {
	sel := labels.SelectorFromSet(pod.Spec.NodeSelector)
	var all, selected []string
	for i := range nodes {
		p := NodePlatform(&nodes[i])
		if p == "" {
			continue
		}
		if !slices.Contains(all, p) {
			all = append(all, p)
		}
		if sel.Matches(labels.Set(nodes[i].Labels)) && !slices.Contains(selected, p) {
			selected = append(selected, p)
		}
	}
	if len(selected) == 0 {
		selected = all
	}
	slices.Sort(selected)
	return selected
}

// pullSecrets reads the pod's imagePullSecrets from its namespace, as kubelet would use them;
// one that is missing, unreadable or malformed is skipped (the registry may not need it).
func (r *PodSeedReconciler) pullSecrets(ctx context.Context, pod *corev1.Pod) [][]byte {
	var out [][]byte
	for _, ref := range pod.Spec.ImagePullSecrets {
		if ref.Name == "" {
			continue
		}
		var s corev1.Secret
		err := r.APIReader.Get(ctx, types.NamespacedName{Namespace: pod.Namespace, Name: ref.Name}, &s)
		var data []byte
		if err == nil {
			switch s.Type {
			case corev1.SecretTypeDockerConfigJson:
				data = s.Data[corev1.DockerConfigJsonKey]
			case corev1.SecretTypeDockercfg:
				data = s.Data[corev1.DockerConfigKey]
			default:
				err = fmt.Errorf("type %s is not %s or %s", s.Type, corev1.SecretTypeDockerConfigJson, corev1.SecretTypeDockercfg)
			}
		}
		if err == nil {
			_, err = resolve.NewKeychain(data)
		}
		if err != nil {
			log.FromContext(ctx).V(1).Info("imagePullSecret skipped", "secret", ref.Name, "error", err.Error())
			continue
		}
		out = append(out, data)
	}
	return out
}

// SetupWithManager registers the reconciler: pending Pods. The manager's cache should strip
// Pods with PodCacheTransform.
func (r *PodSeedReconciler) SetupWithManager(mgr ctrl.Manager) error {
	if r.Resolver == nil {
		return errors.New("PodSeedReconciler needs a Resolver")
	}
	if r.APIReader == nil {
		r.APIReader = mgr.GetAPIReader()
	}
	r.setup()
	isPending := func(o client.Object) bool {
		pod, ok := o.(*corev1.Pod)
		return ok && pending(pod)
	}
	return ctrl.NewControllerManagedBy(mgr).
		Named("podseed").
		For(&corev1.Pod{}).
		WithEventFilter(predicate.Funcs{
			CreateFunc:  func(e event.CreateEvent) bool { return isPending(e.Object) },
			UpdateFunc:  func(e event.UpdateEvent) bool { return isPending(e.ObjectNew) },
			DeleteFunc:  func(event.DeleteEvent) bool { return false },
			GenericFunc: func(event.GenericEvent) bool { return false },
		}).
		WithOptions(controller.Options{MaxConcurrentReconciles: podSeedWorkers}).
		Complete(r)
}

// pending reports whether a pod may still pull images: not yet running all its containers,
// and not being deleted.
func pending(pod *corev1.Pod) bool {
	return pod.Status.Phase == corev1.PodPending && pod.DeletionTimestamp == nil
}

// imagesToSeed is the distinct images of a pod's init, ordinary and ephemeral containers, in
// that order, leaving out those that a container's status says were pulled (imageID set): the
// node holds them, for the pod's other containers too.
func imagesToSeed(pod *corev1.Pod) []string {
	pulledBy := map[string]bool{} // container names
	for _, statuses := range [][]corev1.ContainerStatus{
		pod.Status.InitContainerStatuses, pod.Status.ContainerStatuses, pod.Status.EphemeralContainerStatuses,
	} {
		for _, st := range statuses {
			if st.ImageID != "" {
				pulledBy[st.Name] = true
			}
		}
	}
	type container struct{ name, image string }
	var all []container
	for _, c := range pod.Spec.InitContainers {
		all = append(all, container{c.Name, c.Image})
	}
	for _, c := range pod.Spec.Containers {
		all = append(all, container{c.Name, c.Image})
	}
	for _, c := range pod.Spec.EphemeralContainers {
		all = append(all, container{c.Name, c.Image})
	}
	pulled := map[string]bool{} // images
	for _, c := range all {
		if pulledBy[c.name] {
			pulled[c.image] = true
		}
	}
	var out []string
	for _, c := range all {
		if c.image != "" && !pulled[c.image] && !slices.Contains(out, c.image) {
			out = append(out, c.image)
		}
	}
	return out
}

// PodCacheTransform strips a Pod, before the manager's cache stores it, to what
// PodSeedReconciler reads: name, namespace, uid, resourceVersion, creation and deletion
// times; spec.nodeName, nodeSelector, imagePullSecrets and each container's name and image;
// status.phase and each container status's name, image and imageID. A pod's env, volumes,
// labels, annotations and managed fields are most of its size, and a large cluster holds
// tens of thousands of pods. Install it for Pods (cache.Options.ByObject) only where nothing
// else reads Pods from that cache. Other objects pass unchanged.
func PodCacheTransform(obj any) (any, error) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil
	}
	out := &corev1.Pod{
		TypeMeta: pod.TypeMeta,
		ObjectMeta: metav1.ObjectMeta{
			Name:              pod.Name,
			Namespace:         pod.Namespace,
			UID:               pod.UID,
			ResourceVersion:   pod.ResourceVersion,
			CreationTimestamp: pod.CreationTimestamp,
			DeletionTimestamp: pod.DeletionTimestamp,
		},
		Spec: corev1.PodSpec{
			NodeName:         pod.Spec.NodeName,
			NodeSelector:     pod.Spec.NodeSelector,
			ImagePullSecrets: pod.Spec.ImagePullSecrets,
			InitContainers:   containerImages(pod.Spec.InitContainers),
			Containers:       containerImages(pod.Spec.Containers),
		},
		Status: corev1.PodStatus{
			Phase:                      pod.Status.Phase,
			InitContainerStatuses:      statusImages(pod.Status.InitContainerStatuses),
			ContainerStatuses:          statusImages(pod.Status.ContainerStatuses),
			EphemeralContainerStatuses: statusImages(pod.Status.EphemeralContainerStatuses),
		},
	}
	for _, c := range pod.Spec.EphemeralContainers {
		out.Spec.EphemeralContainers = append(out.Spec.EphemeralContainers, corev1.EphemeralContainer{
			EphemeralContainerCommon: corev1.EphemeralContainerCommon{Name: c.Name, Image: c.Image},
		})
	}
	return out, nil
}

func containerImages(cs []corev1.Container) []corev1.Container {
	if cs == nil {
		return nil
	}
	out := make([]corev1.Container, len(cs))
	for i, c := range cs {
		out[i] = corev1.Container{Name: c.Name, Image: c.Image}
	}
	return out
}

func statusImages(ss []corev1.ContainerStatus) []corev1.ContainerStatus {
	if ss == nil {
		return nil
	}
	out := make([]corev1.ContainerStatus, len(ss))
	for i, s := range ss {
		out[i] = corev1.ContainerStatus{Name: s.Name, Image: s.Image, ImageID: s.ImageID}
	}
	return out
}

// SwarmSeedName is the name of part 0, 1, … of the SwarmSeeds of a manifest:
// "sha256-<hex>", then "sha256-<hex>-1", "sha256-<hex>-2" for a manifest with more than
// MaxSeedBlobs blobs. It follows from the digest alone, so that every replica of the
// controller, before and after a restart, writes the same object, and the API server refuses
// a second one.
func SwarmSeedName(manifest string, part int) string {
	name := strings.Replace(manifest, ":", "-", 1)
	if part > 0 {
		name += "-" + strconv.Itoa(part)
	}
	return name
}

// seedBlobs is the blobs of m that the swarm fetches: its config and layers, each once, with
// sha256 digests (the only ones a SwarmSeed holds), and none that a registry does not serve
// (foreign layers come from their own URLs).
func seedBlobs(m resolve.Manifest) []v1alpha1.SeedBlob {
	var out []v1alpha1.SeedBlob
	for _, b := range m.Blobs {
		if b.Digest.Algorithm != "sha256" || !b.MediaType.IsDistributable() {
			continue
		}
		d := b.Digest.String()
		if slices.ContainsFunc(out, func(s v1alpha1.SeedBlob) bool { return s.Digest == d }) {
			continue
		}
		out = append(out, v1alpha1.SeedBlob{Digest: d, Size: b.Size})
	}
	return out
}

// swarmSeeds are the SwarmSeeds of one manifest: its blobs in parts of at most MaxSeedBlobs.
// A manifest that is not sha256 or has no blob to fetch has none.
func swarmSeeds(repository, manifest string, blobs []v1alpha1.SeedBlob) []v1alpha1.SwarmSeed {
	if !strings.HasPrefix(manifest, "sha256:") {
		return nil
	}
	var out []v1alpha1.SwarmSeed
	for part := 0; len(blobs) > 0; part++ {
		n := min(len(blobs), v1alpha1.MaxSeedBlobs)
		out = append(out, v1alpha1.SwarmSeed{
			ObjectMeta: metav1.ObjectMeta{Name: SwarmSeedName(manifest, part)},
			Spec: v1alpha1.SwarmSeedSpec{
				Repository: repository,
				Manifest:   manifest,
				Blobs:      slices.Clone(blobs[:n]),
			},
		})
		blobs = blobs[n:]
	}
	return out
}

// failureLabel is the reason label of shoal_controller_seed_resolve_failures_total.
func failureLabel(err error) string {
	switch resolve.Reason(err) {
	case v1alpha1.ReasonUnauthorized:
		return "unauthorized"
	case v1alpha1.ReasonNotFound:
		return "not_found"
	case v1alpha1.ReasonPlatformUnavailable:
		return "platform_unavailable"
	}
	return "failed"
}

// SwarmSeedTTLReconciler deletes each SwarmSeed TTL after its creation: by then the pods that
// asked for it have pulled, and agents keep what they fetched in their stores. It goes by the
// creationTimestamp alone, so a restarted controller deletes on time too.
type SwarmSeedTTLReconciler struct {
	// Client reads and deletes SwarmSeeds.
	Client client.Client
	// TTL is how long a SwarmSeed lives (default DefaultSeedTTL).
	TTL time.Duration
	// Registerer registers the metrics (nil: not registered).
	Registerer prometheus.Registerer
	// Now returns the time (default time.Now); tests move it.
	Now func() time.Time

	once    sync.Once
	metrics *seedMetrics
}

func (r *SwarmSeedTTLReconciler) setup() {
	r.once.Do(func() {
		r.metrics = newSeedMetrics(r.Registerer)
		if r.TTL <= 0 {
			r.TTL = DefaultSeedTTL
		}
		if r.Now == nil {
			r.Now = time.Now
		}
	})
}

// Reconcile deletes one SwarmSeed if its time is up, or comes back when it will be.
func (r *SwarmSeedTTLReconciler) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	r.setup()
	var seed v1alpha1.SwarmSeed
	if err := r.Client.Get(ctx, req.NamespacedName, &seed); err != nil {
		return reconcile.Result{}, client.IgnoreNotFound(err)
	}
	if seed.DeletionTimestamp != nil {
		return reconcile.Result{}, nil
	}
	if left := seed.CreationTimestamp.Add(r.TTL).Sub(r.Now()); left > 0 {
		return reconcile.Result{RequeueAfter: left}, nil
	}
	// The UID precondition spares a SwarmSeed of the same name written again since the
	// cache last saw this one.
	err := r.Client.Delete(ctx, &seed, client.Preconditions{UID: &seed.UID})
	if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
		return reconcile.Result{}, nil
	}
	if err != nil {
		return reconcile.Result{}, err
	}
	r.metrics.deleted.Inc()
	log.FromContext(ctx).V(1).Info("SwarmSeed deleted", "manifest", seed.Spec.Manifest)
	return reconcile.Result{}, nil
}

// SetupWithManager registers the reconciler: SwarmSeeds.
func (r *SwarmSeedTTLReconciler) SetupWithManager(mgr ctrl.Manager) error {
	r.setup()
	return ctrl.NewControllerManagedBy(mgr).
		Named("swarmseed-ttl").
		For(&v1alpha1.SwarmSeed{}).
		Complete(r)
}

// seedMetrics are the metrics of pod seeding, shared by both reconcilers.
type seedMetrics struct {
	pods     prometheus.Counter
	resolved prometheus.Counter
	failures *prometheus.CounterVec
	created  prometheus.Counter
	blobs    prometheus.Counter
	deleted  prometheus.Counter
	latency  prometheus.Histogram
}

func newSeedMetrics(reg prometheus.Registerer) *seedMetrics {
	m := &seedMetrics{
		pods: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "controller", Name: "seed_pods_total",
			Help: "Pending pods looked at for images to seed; a pod counts again when it changes while pending.",
		}),
		resolved: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "controller", Name: "seed_images_resolved_total",
			Help: "Images of pending pods resolved for seeding: each distinct image, namespace and set of " +
				"pull secrets once, again after 30 s for a tag.",
		}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "controller", Name: "seed_resolve_failures_total",
			Help: "Images of pending pods not seeded because they did not resolve, by reason: unauthorized, " +
				"not_found, platform_unavailable or failed. Each is left alone for a delay growing from 5 s to 5 minutes with each failure in a row.",
		}, []string{"reason"}),
		created: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "controller", Name: "swarmseeds_created_total",
			Help: "SwarmSeeds created (one per manifest, more for a manifest of over 256 blobs).",
		}),
		blobs: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "controller", Name: "seed_blobs_total",
			Help: "Blobs (configs and layers) listed in the SwarmSeeds created: what pending pods had the agents fetch ahead of their pulls.",
		}),
		deleted: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "shoal", Subsystem: "controller", Name: "swarmseeds_deleted_total",
			Help: "SwarmSeeds deleted once their time was up.",
		}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: "shoal", Subsystem: "controller", Name: "seed_latency_seconds",
			Help:    "Time from a pod's creation to the SwarmSeeds of a manifest it pulls being written, for each manifest seeded.",
			Buckets: prometheus.ExponentialBuckets(0.05, 2, 14), // 50ms .. ~7 min
		}),
	}
	if reg != nil {
		m.pods = promreg.Shared(reg, m.pods)
		m.resolved = promreg.Shared(reg, m.resolved)
		m.failures = promreg.Shared(reg, m.failures)
		m.created = promreg.Shared(reg, m.created)
		m.blobs = promreg.Shared(reg, m.blobs)
		m.deleted = promreg.Shared(reg, m.deleted)
		m.latency = promreg.Shared(reg, m.latency)
	}
	for _, reason := range []string{"unauthorized", "not_found", "platform_unavailable", "failed"} {
		m.failures.WithLabelValues(reason)
	}
	return m
}

// recent is a bounded set of keys, each held until a deadline. When full it forgets the key
// added longest ago. It is safe for concurrent use.
type recent struct {
	mu      sync.Mutex
	max     int
	order   *list.List // of *recentEntry, newest at the front
	entries map[string]*list.Element
}

type recentEntry struct {
	key   string
	until time.Time
}

func newRecent(maxEntries int) *recent {
	return &recent{max: maxEntries, order: list.New(), entries: map[string]*list.Element{}}
}

// has reports whether key is held at now.
func (s *recent) has(key string, now time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.held(key, now)
}

// claim holds key until the time given unless it is held at now, and reports whether it did.
func (s *recent) claim(key string, now, until time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.held(key, now) {
		return false
	}
	s.put(key, until)
	return true
}

// add holds key until the time given.
func (s *recent) add(key string, until time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.put(key, until)
}

// forget lets key go.
func (s *recent) forget(key string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if el, ok := s.entries[key]; ok {
		s.order.Remove(el)
		delete(s.entries, key)
	}
}

func (s *recent) held(key string, now time.Time) bool {
	el, ok := s.entries[key]
	if !ok {
		return false
	}
	e, _ := el.Value.(*recentEntry) // only *recentEntry values are stored
	if now.Before(e.until) {
		return true
	}
	s.order.Remove(el)
	delete(s.entries, key)
	return false
}

func (s *recent) put(key string, until time.Time) {
	if el, ok := s.entries[key]; ok {
		s.order.Remove(el)
	}
	s.entries[key] = s.order.PushFront(&recentEntry{key: key, until: until})
	for s.order.Len() > s.max {
		oldest := s.order.Back()
		s.order.Remove(oldest)
		e, _ := oldest.Value.(*recentEntry) // only *recentEntry values are stored
		delete(s.entries, e.key)
	}
}
