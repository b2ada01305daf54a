{{/* Keep in step with src/ingate/kube/render.py: tests/unit/test_helm_chart.py compares the two. */}}

{{/* The picker's objects are named <release>-epp, as upstream. */}}
{{- define "ingate.name" -}}
{{- printf "%s-epp" (.Release.Name | lower | trim | trunc 40) -}}
{{- end -}}

{{- define "ingate.labels" -}}
app.kubernetes.io/name: {{ include "ingate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: ingate
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "ingate.selectorLabels" -}}
inferencepool: {{ include "ingate.name" . }}
{{- end -}}

{{/* "true" when leader election is on: more than one replica, unless the flag turns it off. */}}
{{- define "ingate.leader" -}}
{{- $flags := .Values.router.epp.flags | default dict -}}
{{- $le := gt (int .Values.router.epp.replicas) 1 -}}
{{- if and $le (hasKey $flags "ha-enable-leader-election") -}}
{{- $le = ne (lower (toString (index $flags "ha-enable-leader-election"))) "false" -}}
{{- end -}}
{{- if $le }}true{{ end -}}
{{- end -}}

{{/* "true" when the picker serves TLS (upstream default). */}}
{{- define "ingate.secure" -}}
{{- $flags := .Values.router.epp.flags | default dict -}}
{{- if or (not (hasKey $flags "secure-serving")) (ne (lower (toString (index $flags "secure-serving"))) "false") }}true{{ end -}}
{{- end -}}

{{/* The picker's engine mapping for router.modelServers.type. */}}
{{- define "ingate.engine" -}}
{{- $engines := dict "vllm" "vllm" "sglang" "sglang" "tgi" "tgi" "trtllm-serve" "trtllm" "triton-tensorrt-llm" "triton-trtllm" -}}
{{- $t := .Values.router.modelServers.type -}}
{{- if not (hasKey $engines $t) -}}
{{- fail (printf "router.modelServers.type %q is not one of [sglang tgi triton-tensorrt-llm trtllm-serve vllm]" $t) -}}
{{- end -}}
{{- index $engines $t -}}
{{- end -}}

{{- define "ingate.validate" -}}
{{- if not .Values.router.modelServers.matchLabels -}}
{{- fail "router.modelServers.matchLabels is required (the model-server pods' labels)" -}}
{{- end -}}
{{- $ports := .Values.router.modelServers.targetPorts | default list -}}
{{- if or (eq (len $ports) 0) (gt (len $ports) 8) -}}
{{- fail "router.modelServers.targetPorts needs 1 to 8 ports" -}}
{{- end -}}
{{- $_ := include "ingate.engine" . -}}
{{- $p := lower (toString .Values.provider.name) -}}
{{- if not (has $p (list "none" "istio" "gke")) -}}
{{- fail (printf "provider.name %q is not one of none, istio, gke" $p) -}}
{{- end -}}
{{- $file := .Values.router.epp.pluginsConfigFile -}}
{{- if and (ne $file "config.yaml") (not (hasKey (.Values.router.epp.pluginsCustomConfig | default dict) $file)) -}}
{{- fail (printf "router.epp.pluginsConfigFile %q is neither \"config.yaml\" nor a key of router.epp.pluginsCustomConfig" $file) -}}
{{- end -}}
{{- if and (not .Values.router.inferencePool.create) .Values.router.inferenceObjectives -}}
{{- fail "router.inferenceObjectives needs router.inferencePool.create=true" -}}
{{- end -}}
{{- end -}}

{{- /* Active-active prefix sharing is on ("true") or off (""); fails where it cannot work. */}}
{{- define "ingate.prefixSharing" -}}
{{- if .Values.router.epp.prefixSharing.enabled -}}
{{- if or (le (int .Values.router.epp.replicas) 1) (include "ingate.leader" .) -}}
{{- fail "router.epp.prefixSharing.enabled needs active-active pickers: router.epp.replicas > 1 and router.epp.flags.ha-enable-leader-election=false" -}}
{{- end -}}
true
{{- end -}}
{{- end }}
