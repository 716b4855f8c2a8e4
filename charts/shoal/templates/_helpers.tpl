{{/* The image of both roles. */}}
{{- define "shoal.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "shoal.labels" -}}
app.kubernetes.io/name: shoal
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* The rules of a generated role file's document of kind (ClusterRole or Role). */}}
{{- define "shoal.rules" -}}
{{- $kind := index . 1 -}}
{{- range $doc := splitList "\n---\n" (index . 0) -}}
{{- $obj := fromYaml $doc -}}
{{- if eq (get $obj "kind") $kind }}
{{- toYaml (get $obj "rules") }}
{{- end -}}
{{- end -}}
{{- end }}

{{/* KUBERNETES_SERVICE_HOST and _PORT for clusters without kube-proxy (kubernetesServiceHost). */}}
{{- define "shoal.apiServerEnv" -}}
{{- if .Values.kubernetesServiceHost }}
- name: KUBERNETES_SERVICE_HOST
  value: {{ .Values.kubernetesServiceHost | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ .Values.kubernetesServicePort | quote }}
{{- end }}
{{- end }}

{{/*
containerd's paths on the node: the values' own, or a distribution's preset. k3s and RKE2 run
their own containerd under /var/lib/rancher and /run/k3s.
*/}}
{{- define "shoal.containerd" -}}
{{- $c := .Values.agent.containerd -}}
{{- if eq $c.preset "k3s" -}}
hostsDir: /var/lib/rancher/k3s/agent/etc/containerd/certs.d
configFile: /var/lib/rancher/k3s/agent/etc/containerd/config.toml
socket: /run/k3s/containerd/containerd.sock
{{- else if eq $c.preset "rke2" -}}
hostsDir: /var/lib/rancher/rke2/agent/etc/containerd/certs.d
configFile: /var/lib/rancher/rke2/agent/etc/containerd/config.toml
socket: /run/k3s/containerd/containerd.sock
{{- else -}}
hostsDir: {{ $c.hostsDir }}
configFile: {{ $c.configFile }}
socket: {{ $c.socket }}
{{- end }}
{{- end }}
