package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// SwarmMemberSpec is where an agent's peers reach it.
type SwarmMemberSpec struct {
	// IP is the address peers reach the agent at (the node's address: agents use the host
	// network). Loopback addresses are allowed for clusters on one machine.
	// +kubebuilder:validation:MaxLength=45
	// +kubebuilder:validation:XValidation:rule="isIP(self) && !ip(self).isUnspecified()",message="ip must be an IPv4 or IPv6 address, not unspecified"
	IP string `json:"ip"`

	// Port is the agents' peer port (BitTorrent and the control API share it).
	// +kubebuilder:validation:Minimum=1
	// +kubebuilder:validation:Maximum=65535
	Port int32 `json:"port"`

	// ProtocolVersion is the newest version of the agents' peer protocol this agent speaks.
	// +optional
	// +kubebuilder:validation:Minimum=0
	ProtocolVersion int32 `json:"protocolVersion,omitempty"`

	// AgentVersion is the agent's release.
	// +optional
	// +kubebuilder:validation:MaxLength=64
	AgentVersion string `json:"agentVersion,omitempty"`
}

// SwarmMember announces one agent to the others: every agent watches SwarmMembers to know whom
// it swarms with. Each agent writes its own, named after its Node and owned by it, when it
// starts (and only when something in it changed), and never deletes it on an ordinary
// restart: a member that stops is dead to the others' liveness checks until it is back, and
// its segments do not move. The Node's deletion removes it. Whether a member is alive is the
// swarm's business (it probes its peers), not the API server's, so the object does not change
// with the agent's health and a watch event reaches every agent only when a node joins, leaves,
// or changes address.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Cluster,categories=shoal
// +kubebuilder:printcolumn:name="IP",type=string,JSONPath=`.spec.ip`
// +kubebuilder:printcolumn:name="Port",type=integer,JSONPath=`.spec.port`
// +kubebuilder:printcolumn:name="Agent",type=string,JSONPath=`.spec.agentVersion`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type SwarmMember struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec SwarmMemberSpec `json:"spec"`
}

// SwarmMemberList is a list of SwarmMembers.
//
// +kubebuilder:object:root=true
type SwarmMemberList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []SwarmMember `json:"items"`
}
