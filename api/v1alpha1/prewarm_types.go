package v1alpha1

import (
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// StorePolicy says how agents keep a Prewarm's content in their stores.
// +kubebuilder:validation:Enum=Pinned;Cached
type StorePolicy string

const (
	// StorePinned keeps the content complete and protected from the store's eviction for as
	// long as the Prewarm selects the node.
	StorePinned StorePolicy = "Pinned"
	// StoreCached fetches the content once; eviction may remove it like any cached blob, and
	// the next reconcile fetches it again.
	StoreCached StorePolicy = "Cached"
)

// RuntimeImport says whether images are also imported into the node's container runtime.
// +kubebuilder:validation:Enum=None;Pinned
type RuntimeImport string

const (
	// RuntimeImportNone leaves the container runtime alone: kubelet pulls through the mirror
	// when a pod needs the image, from the agent's store.
	RuntimeImportNone RuntimeImport = "None"
	// RuntimeImportPinned pulls each image into the runtime through CRI PullImage (the bytes
	// come from the agent's own store) and pins it there, so that kubelet's image garbage
	// collection keeps it. On a runtime that cannot pin (containerd 1.6) the image is imported
	// and the node's status says it is not pinned.
	RuntimeImportPinned RuntimeImport = "Pinned"
)

// PrewarmSpec is the content a set of nodes must hold, as desired state: nodes that start to
// match get it, content removed out of band comes back, nodes that stop matching release it.
//
// +kubebuilder:validation:XValidation:rule="size(self.images) + size(self.artifacts) > 0",message="a Prewarm needs at least one image or artifact"
type PrewarmSpec struct {
	// Images are container images, by tag or by digest: registry.example/team/app:1.4 or
	// registry.example/team/app@sha256:<64 hex digits>. Each node gets the manifest of its
	// own platform (or of spec.platforms) and its layers.
	// +optional
	// +listType=set
	// +kubebuilder:default={}
	// +kubebuilder:validation:MaxItems=64
	// +kubebuilder:validation:items:MaxLength=512
	// +kubebuilder:validation:XValidation:rule="self.all(r, r.matches('^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:[.][a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*(?::[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$'))",messageExpression="'not an image reference (registry/repository:tag or registry/repository@sha256:<64 lowercase hex digits>): ' + self.filter(r, !r.matches('^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:[.][a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*(?::[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$'))[0]"
	Images []string `json:"images,omitempty"`

	// Artifacts are OCI artifacts of any media type (a model, a dataset), by tag or digest: the
	// manifest and every blob it references. They are never imported into the runtime.
	// +optional
	// +listType=set
	// +kubebuilder:default={}
	// +kubebuilder:validation:MaxItems=64
	// +kubebuilder:validation:items:MaxLength=512
	// +kubebuilder:validation:XValidation:rule="self.all(r, r.matches('^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:[.][a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*(?::[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$'))",messageExpression="'not an artifact reference (registry/repository:tag or registry/repository@sha256:<64 lowercase hex digits>): ' + self.filter(r, !r.matches('^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:[.][a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*(?::[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$'))[0]"
	Artifacts []string `json:"artifacts,omitempty"`

	// NodeSelector selects the nodes, by their labels, that must hold the content. Empty or
	// absent selects every node.
	// +optional
	NodeSelector *NodeSelector `json:"nodeSelector,omitempty"`

	// ImagePullSecrets name Secrets of type kubernetes.io/dockerconfigjson in the Prewarm's
	// namespace, used to resolve and fetch its content. Agents never read them: the
	// controller hands them short-lived pull tokens.
	// +optional
	// +listType=map
	// +listMapKey=name
	// +kubebuilder:validation:MaxItems=16
	ImagePullSecrets []corev1.LocalObjectReference `json:"imagePullSecrets,omitempty"`

	// RefreshInterval is how often tags are resolved again; when a tag moves, each node keeps
	// the old digest pinned until the new one is ready there. References by digest never
	// change. At least one minute.
	// +optional
	// +kubebuilder:default="10m"
	// +kubebuilder:validation:XValidation:rule="duration(self) >= duration('1m')",message="refreshInterval must be at least 1m"
	RefreshInterval *metav1.Duration `json:"refreshInterval,omitempty"`

	// Store says whether the content stays pinned in the agents' stores (the default) or is
	// only cached.
	// +optional
	// +kubebuilder:default=Pinned
	Store StorePolicy `json:"store,omitempty"`

	// RuntimeImport says whether images are also imported into each node's container runtime
	// and pinned there. Off by default. A private image imported into a node can be run there
	// by pods that do not have its pull secret (docs/security.md).
	// +optional
	// +kubebuilder:default=None
	RuntimeImport RuntimeImport `json:"runtimeImport,omitempty"`

	// Platforms are the os/arch[/variant] of image manifests to fetch on every selected node,
	// e.g. linux/arm64/v8. Empty: each node's own kubernetes.io/os and kubernetes.io/arch.
	// +optional
	// +listType=set
	// +kubebuilder:validation:MaxItems=8
	// +kubebuilder:validation:items:MaxLength=64
	// +kubebuilder:validation:XValidation:rule="self.all(p, p.matches('^[a-z0-9]+/[a-z0-9_]+(?:/[a-z0-9]+)?$'))",message="a platform is os/arch or os/arch/variant in lowercase, e.g. linux/amd64 or linux/arm64/v8"
	Platforms []string `json:"platforms,omitempty"`
}

// NodeSelector is a label selector over Nodes, written as a metav1.LabelSelector is, with
// bounds on its size so that the API server can check it (LabelSelector converts it).
type NodeSelector struct {
	// MatchLabels selects nodes that have every one of these labels with these values.
	// +optional
	// +kubebuilder:validation:MaxProperties=32
	// +kubebuilder:validation:XValidation:rule="self.all(k, size(k) <= 317 && !format.qualifiedName().validate(k).hasValue())",message="nodeSelector.matchLabels: a label key must be a qualified name (name or prefix/name, e.g. example.com/gpu)"
	MatchLabels map[string]LabelValue `json:"matchLabels,omitempty"`
	// MatchExpressions selects nodes whose labels meet every requirement.
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=16
	MatchExpressions []NodeSelectorRequirement `json:"matchExpressions,omitempty"`
}

// LabelValue is the value of a label in a selector.
// +kubebuilder:validation:MaxLength=63
// +kubebuilder:validation:XValidation:rule="!format.labelValue().validate(self).hasValue()",message="nodeSelector.matchLabels: a label value is at most 63 characters, letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
type LabelValue string

// NodeSelectorRequirement is a requirement on one label, as in metav1.LabelSelectorRequirement.
// +kubebuilder:validation:XValidation:rule="(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)",message="nodeSelector: In and NotIn need at least one value, Exists and DoesNotExist take none"
type NodeSelectorRequirement struct {
	// Key is the label's key.
	// +kubebuilder:validation:MaxLength=317
	// +kubebuilder:validation:XValidation:rule="!format.qualifiedName().validate(self).hasValue()",message="nodeSelector.matchExpressions: a label key must be a qualified name (name or prefix/name, e.g. example.com/gpu)"
	Key string `json:"key"`
	// Operator is In, NotIn, Exists or DoesNotExist.
	// +kubebuilder:validation:Enum=In;NotIn;Exists;DoesNotExist
	Operator metav1.LabelSelectorOperator `json:"operator"`
	// Values are the label values In and NotIn compare with.
	// +optional
	// +listType=atomic
	// +kubebuilder:validation:MaxItems=64
	// +kubebuilder:validation:items:MaxLength=63
	// +kubebuilder:validation:XValidation:rule="self.all(v, !format.labelValue().validate(v).hasValue())",message="nodeSelector.matchExpressions: a label value is at most 63 characters, letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
	Values []string `json:"values,omitempty"`
}

// LabelSelector returns the selector as a metav1.LabelSelector; nil selects everything.
func (s *NodeSelector) LabelSelector() *metav1.LabelSelector {
	if s == nil {
		return &metav1.LabelSelector{}
	}
	ls := &metav1.LabelSelector{}
	if len(s.MatchLabels) > 0 {
		ls.MatchLabels = make(map[string]string, len(s.MatchLabels))
		for k, v := range s.MatchLabels {
			ls.MatchLabels[k] = string(v)
		}
	}
	for _, r := range s.MatchExpressions {
		ls.MatchExpressions = append(ls.MatchExpressions, metav1.LabelSelectorRequirement{
			Key: r.Key, Operator: r.Operator, Values: r.Values,
		})
	}
	return ls
}

// FailureReason is why a node does not hold a Prewarm's content: one of a fixed set, so that
// alerts and dashboards can count them.
// +kubebuilder:validation:Enum=ResolveFailed;Unauthorized;NotFound;PlatformUnavailable;StoreFull;PinLimitExceeded;FetchStalled;VerifyFailed;ImportFailed;AgentUnavailable
type FailureReason string

// The reasons a node can fail.
const (
	ReasonResolveFailed       FailureReason = "ResolveFailed"
	ReasonUnauthorized        FailureReason = "Unauthorized"
	ReasonNotFound            FailureReason = "NotFound"
	ReasonPlatformUnavailable FailureReason = "PlatformUnavailable"
	ReasonStoreFull           FailureReason = "StoreFull"
	ReasonPinLimitExceeded    FailureReason = "PinLimitExceeded"
	ReasonFetchStalled        FailureReason = "FetchStalled"
	ReasonVerifyFailed        FailureReason = "VerifyFailed"
	ReasonImportFailed        FailureReason = "ImportFailed"
	ReasonAgentUnavailable    FailureReason = "AgentUnavailable"
)

// PlatformManifest is the manifest of one platform of a resolved image.
type PlatformManifest struct {
	// Platform is os/arch[/variant].
	Platform string `json:"platform"`
	// Digest is the platform's manifest digest.
	Digest string `json:"digest"`
	// Size is the manifest's size plus the size of every blob it references, in bytes.
	Size int64 `json:"size"`
}

// MaxPrewarmSeeders bounds a Prewarm's seeders.
const MaxPrewarmSeeders = 8

// ResolvedReference is what a reference of the spec points at, as last resolved.
type ResolvedReference struct {
	// Reference is the reference as written in the spec.
	Reference string `json:"reference"`
	// Artifact is true for a reference of spec.artifacts, false for an image.
	// +optional
	Artifact bool `json:"artifact,omitempty"`
	// Repository is the reference's repository in full: registry.example/team/app, or
	// index.docker.io/library/nginx for nginx.
	// +optional
	Repository string `json:"repository,omitempty"`
	// Tag is the reference's tag, if it has one.
	// +optional
	Tag string `json:"tag,omitempty"`
	// Digest is the digest the reference resolved to (an index or a manifest).
	// +optional
	Digest string `json:"digest,omitempty"`
	// Size is the bytes one node holds for this reference (the largest platform of an image).
	// +optional
	Size int64 `json:"size,omitempty"`
	// Platforms are the per-platform manifests the selected nodes need, for an index.
	// +optional
	// +kubebuilder:validation:MaxItems=8
	Platforms []PlatformManifest `json:"platforms,omitempty"`
	// ResolvedAt is when the reference was last resolved.
	// +optional
	ResolvedAt *metav1.Time `json:"resolvedAt,omitempty"`
	// Error says why the reference could not be resolved, when it could not.
	// +optional
	Error string `json:"error,omitempty"`
	// PullSecretName names the Secret in Shoal's namespace that holds the short-lived pull
	// token (or, for a registry with basic authentication only, the credentials) agents use
	// for this repository, exchanged by the controller for the Prewarm's imagePullSecrets.
	// +optional
	// +kubebuilder:validation:MaxLength=253
	PullSecretName string `json:"pullSecretName,omitempty"`
}

// NodeFailure is one node that does not hold the content, and why.
type NodeFailure struct {
	// Node is the node's name.
	Node string `json:"node"`
	// Reason is one of a fixed set.
	Reason FailureReason `json:"reason"`
	// Message says more, for a human.
	// +optional
	// +kubebuilder:validation:MaxLength=512
	Message string `json:"message,omitempty"`
}

// NodeCounts counts the selected nodes by state.
type NodeCounts struct {
	// Desired is the number of nodes the selector matches.
	Desired int32 `json:"desired"`
	// Ready is the number of nodes that hold all of the content as the policy asks.
	Ready int32 `json:"ready"`
	// Failed is the number of nodes that report a failure for some of the content.
	Failed int32 `json:"failed"`
}

// PrewarmStatus is how far the selected nodes are.
type PrewarmStatus struct {
	// ObservedGeneration is the generation of the spec this status describes.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// References are the spec's images and artifacts, resolved.
	// +optional
	// +kubebuilder:validation:MaxItems=128
	References []ResolvedReference `json:"references,omitempty"`
	// Nodes counts the selected nodes by state.
	// +optional
	Nodes NodeCounts `json:"nodes,omitempty"`
	// Ready is Nodes.Ready/Nodes.Desired, for kubectl get.
	// +optional
	Ready string `json:"ready,omitempty"`
	// BytesReady is the bytes of the content held as asked, summed over the selected nodes.
	// +optional
	BytesReady int64 `json:"bytesReady,omitempty"`
	// FailingNodes lists some of the failing nodes (at most 10); Nodes.Failed counts all.
	// +optional
	// +kubebuilder:validation:MaxItems=10
	FailingNodes []NodeFailure `json:"failingNodes,omitempty"`
	// Seeders are the selected nodes (at most 8, chosen by rendezvous hashing on the Prewarm,
	// so that few change when nodes come and go) that seed the content's segments for the
	// others: nodes outside the selection spend no disk on it.
	// +optional
	// +kubebuilder:validation:MaxItems=8
	// +kubebuilder:validation:items:MaxLength=253
	Seeders []string `json:"seeders,omitempty"`
	// Conditions are Ready (every selected node holds the content), Progressing (some are
	// still fetching) and Degraded (some failed, or a reference cannot be resolved).
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// Prewarm declares images and OCI artifacts that a set of nodes must hold, fetched into the
// cluster once and spread peer to peer, optionally imported into the container runtime.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:categories=shoal
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.ready`
// +kubebuilder:printcolumn:name="Digest",type=string,JSONPath=`.status.references[0].digest`
// +kubebuilder:printcolumn:name="Reference",type=string,JSONPath=`.status.references[0].reference`,priority=1
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type Prewarm struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec   PrewarmSpec   `json:"spec"`
	Status PrewarmStatus `json:"status,omitempty"`
}

// PrewarmList is a list of Prewarms.
//
// +kubebuilder:object:root=true
type PrewarmList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []Prewarm `json:"items"`
}
