{{/* The image every container runs: culvert, culvert-cni and culvert-ca are in one image. */}}
{{- define "culvert.image" -}}
image: {{ printf "%s:%s" .Values.image.repository (toString .Values.image.tag) | quote }}
{{- with .Values.image.pullPolicy }}
imagePullPolicy: {{ . }}
{{- end }}
{{- end }}

{{/* The CA's address as the node file names it. */}}
{{- define "culvert.caAddress" -}}
{{- .Values.mesh.caAddress | default (printf "culvert-ca.%s.svc:15012" .Release.Namespace) -}}
{{- end }}

{{/* The CA's root ConfigMap, namespace/name. */}}
{{- define "culvert.caRoots" -}}
{{- .Values.mesh.caRoots | default (printf "%s/culvert-ca-root-cert" .Release.Namespace) -}}
{{- end }}

{{/* The node's CNI and netns paths: the platform's, then what the values set. */}}
{{- define "culvert.paths" -}}
{{- $platforms := dict
  "" (dict)
  "k3s" (dict "cniBinDir" "/var/lib/rancher/k3s/data/cni" "cniConfDir" "/var/lib/rancher/k3s/agent/etc/cni/net.d")
  "microk8s" (dict "cniBinDir" "/var/snap/microk8s/current/opt/cni/bin" "cniConfDir" "/var/snap/microk8s/current/args/cni-network")
  "minikube" (dict "netnsDir" "/var/run/docker/netns")
  "openshift" (dict "cniBinDir" "/var/lib/cni/bin" "cniConfDir" "/etc/cni/multus/net.d")
  "gke" (dict "cniBinDir" "/home/kubernetes/bin") -}}
{{- if not (hasKey $platforms .Values.platform) -}}
{{- fail (printf "platform %q is not one of k3s, microk8s, minikube, openshift, gke" .Values.platform) -}}
{{- end -}}
{{- $paths := merge (dict) (get $platforms .Values.platform) (dict "cniBinDir" "/opt/cni/bin" "cniConfDir" "/etc/cni/net.d" "netnsDir" "/run/netns") -}}
{{- range $key := list "cniBinDir" "cniConfDir" "netnsDir" -}}
{{- with get $.Values.node $key -}}
{{- $_ := set $paths $key . -}}
{{- end -}}
{{- end -}}
{{- toYaml $paths -}}
{{- end }}
