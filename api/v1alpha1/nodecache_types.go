package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// MaxNodeCacheItems bounds a NodeCache's spec and status. An item costs about 300 bytes in the
// spec and 400 in the status, so a full object stays near 400 KiB, far below etcd's 1.5 MiB
// request limit, and a node rarely holds more than a few dozen prewarmed images.
const MaxNodeCacheItems = 512

// NodeCacheItem is one piece of content a node must hold: a manifest, by digest, and every blob
// it references.
type NodeCacheItem struct {
	// Reference names the content by digest, with its tag when it has one:
	// registry.example/team/app:1.4@sha256:<64 hex digits>. For an image it is the manifest of
	// the node's platform; for an artifact, the manifest (or index) the tag resolved to.
	// +kubebuilder:validation:MaxLength=512
	// +kubebuilder:validation:XValidation:rule="self.matches('^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:[.][a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*(?::[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,127})?@sha256:[a-f0-9]{64}$')",message="a NodeCache item names its content by digest: registry/repository[:tag]@sha256:<64 lowercase hex digits>"
	Reference string `json:"reference"`

	// Pin keeps the content complete in the agent's store and protected from its eviction.
	// +optional
	Pin bool `json:"pin,omitempty"`

	// RuntimeImport imports the image into the node's container runtime through CRI and pins
	// it there. Only for images.
	// +optional
	RuntimeImport bool `json:"runtimeImport,omitempty"`

	// PullSecretName names a Secret in Shoal's own namespace that holds a short-lived pull
	// token for the reference's repository, written by the controller. Empty: anonymous, or
	// the agent's own registry credentials.
	// +optional
	// +kubebuilder:validation:MaxLength=253
	PullSecretName string `json:"pullSecretName,omitempty"`

	// SeedGroup names the spec's seed group whose nodes seed the content's segments: the nodes
	// that hold it anyway, so that no other node spends disk on it. Empty: any member.
	// +optional
	// +kubebuilder:validation:MaxLength=63
	SeedGroup string `json:"seedGroup,omitempty"`
}

// MaxSeedGroups bounds a NodeCache's seed groups, and MaxSeedGroupNodes each group.
const (
	MaxSeedGroups     = 16
	MaxSeedGroupNodes = 8
)

// SeedGroup is a set of nodes that seed some content's segments for each other.
type SeedGroup struct {
	// Name identifies the group in the items; it changes with its nodes.
	// +kubebuilder:validation:MaxLength=63
	Name string `json:"name"`
	// Nodes are the names of the nodes.
	// +kubebuilder:validation:MinItems=1
	// +kubebuilder:validation:MaxItems=8
	// +kubebuilder:validation:items:MaxLength=253
	Nodes []string `json:"nodes"`
}

// NodeCacheSpec is what the node must hold, written by the controller from the Prewarms that
// select the node.
type NodeCacheSpec struct {
	// Items is the content the node must hold, one item per manifest digest.
	// +optional
	// +listType=map
	// +listMapKey=reference
	// +kubebuilder:validation:MaxItems=512
	Items []NodeCacheItem `json:"items,omitempty"`

	// Refused is content that the Prewarms selecting the node ask for and that the cluster's
	// per-node budget for pinned content leaves out (the controller's
	// --max-pinned-bytes-per-node): the node neither fetches nor pins it. The controller writes
	// it so that the Prewarms can say why; the agent ignores it.
	// +optional
	// +listType=map
	// +listMapKey=reference
	// +kubebuilder:validation:MaxItems=512
	Refused []RefusedItem `json:"refused,omitempty"`

	// SeedGroups are the seed groups the items name.
	// +optional
	// +listType=map
	// +listMapKey=name
	// +kubebuilder:validation:MaxItems=16
	SeedGroups []SeedGroup `json:"seedGroups,omitempty"`
}

// RefusedItem is content left out of a node by the per-node budget.
type RefusedItem struct {
	// Reference names the content as a NodeCacheItem would.
	// +kubebuilder:validation:MaxLength=512
	Reference string `json:"reference"`
	// Bytes is the content's size.
	// +kubebuilder:validation:Minimum=0
	Bytes int64 `json:"bytes"`
	// BudgetBytes is the per-node budget that it would pass.
	// +kubebuilder:validation:Minimum=0
	BudgetBytes int64 `json:"budgetBytes"`
}

// ItemState is how far a node is with one item.
// +kubebuilder:validation:Enum=Pending;Fetching;Ready;Failed
type ItemState string

// The states of an item.
const (
	ItemPending  ItemState = "Pending"
	ItemFetching ItemState = "Fetching"
	ItemReady    ItemState = "Ready"
	ItemFailed   ItemState = "Failed"
)

// RuntimeState is where an item stands in the node's container runtime.
// +kubebuilder:validation:Enum=NotImported;Imported;Pinned
type RuntimeState string

// The runtime states of an item.
const (
	// RuntimeNotImported: the item is not (yet) in the runtime, or was not asked to be.
	RuntimeNotImported RuntimeState = "NotImported"
	// RuntimeImported: the image is in the runtime but not pinned (containerd 1.6 cannot pin
	// through CRI), so kubelet's image garbage collection may remove it.
	RuntimeImported RuntimeState = "Imported"
	// RuntimePinned: the image is in the runtime and pinned there.
	RuntimePinned RuntimeState = "Pinned"
)

// NodeCacheItemStatus is what the agent holds of one item.
type NodeCacheItemStatus struct {
	// Reference is the item's reference, as in the spec.
	// +kubebuilder:validation:MaxLength=512
	Reference string `json:"reference"`
	// State is Pending, Fetching, Ready or Failed.
	State ItemState `json:"state"`
	// Bytes is how much of the content the store holds, verified.
	// +optional
	Bytes int64 `json:"bytes,omitempty"`
	// TotalBytes is the size of the manifest and every blob it references, once known.
	// +optional
	TotalBytes int64 `json:"totalBytes,omitempty"`
	// Runtime says whether the image is in the container runtime, and pinned there.
	// +optional
	Runtime RuntimeState `json:"runtime,omitempty"`
	// Reason is why the item failed, one of a fixed set.
	// +optional
	Reason FailureReason `json:"reason,omitempty"`
	// Message says more, for a human.
	// +optional
	// +kubebuilder:validation:MaxLength=256
	Message string `json:"message,omitempty"`
}

// StoreUsage is the size and use of the agent's content store.
type StoreUsage struct {
	// CapacityBytes is the store's configured size.
	CapacityBytes int64 `json:"capacityBytes"`
	// UsedBytes is what the store's blobs take.
	UsedBytes int64 `json:"usedBytes"`
	// PinnedBytes is what pinned blobs take (never evicted).
	PinnedBytes int64 `json:"pinnedBytes"`
}

// NodeCacheStatus is what the node's agent holds, written by that agent only, and only when it
// changes (coalesced, bounded in rate).
type NodeCacheStatus struct {
	// ObservedGeneration is the generation of the spec the agent last acted on.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`
	// AgentVersion is the version of the agent that wrote this status.
	// +optional
	// +kubebuilder:validation:MaxLength=64
	AgentVersion string `json:"agentVersion,omitempty"`
	// PeerAddress is the address (host:port) on which the agent serves its peers.
	// +optional
	// +kubebuilder:validation:MaxLength=64
	PeerAddress string `json:"peerAddress,omitempty"`
	// Ready is the number of items held as asked over the number of items, for kubectl get.
	// +optional
	// +kubebuilder:validation:MaxLength=16
	Ready string `json:"ready,omitempty"`
	// Store is the size and use of the agent's store.
	// +optional
	Store *StoreUsage `json:"store,omitempty"`
	// Items is the state of each spec item.
	// +optional
	// +listType=map
	// +listMapKey=reference
	// +kubebuilder:validation:MaxItems=512
	Items []NodeCacheItemStatus `json:"items,omitempty"`
	// Conditions: Ready (every item is held as asked) and Degraded (some item failed).
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// NodeCache is what one node must hold (spec, from the controller) and holds (status, from the
// node's agent). It is named after its Node and owned by it, so it goes when the Node goes.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Cluster,categories=shoal
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.ready`
// +kubebuilder:printcolumn:name="Used",type=integer,JSONPath=`.status.store.usedBytes`
// +kubebuilder:printcolumn:name="Pinned",type=integer,JSONPath=`.status.store.pinnedBytes`
// +kubebuilder:printcolumn:name="Agent",type=string,JSONPath=`.status.agentVersion`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type NodeCache struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// +optional
	Spec NodeCacheSpec `json:"spec,omitempty"`
	// +optional
	Status NodeCacheStatus `json:"status,omitempty"`
}

// NodeCacheList is a list of NodeCaches.
//
// +kubebuilder:object:root=true
type NodeCacheList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []NodeCache `json:"items"`
}
