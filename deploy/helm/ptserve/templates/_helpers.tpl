{{/* Names are cut to 63 characters: the limit of a DNS label and of a label value. */}}
{{- define "ptserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ptserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "<fullname>-server" and "<fullname>-worker", leaving room for the suffix. */}}
{{- define "ptserve.server.fullname" -}}
{{- printf "%s-server" (include "ptserve.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{- define "ptserve.worker.fullname" -}}
{{- printf "%s-worker" (include "ptserve.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{- define "ptserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ptserve.labels" -}}
helm.sh/chart: {{ include "ptserve.chart" . }}
{{ include "ptserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ptserve
{{- end }}

{{- define "ptserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ptserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of one component; call with (dict "root" $ "component" "server"). */}}
{{- define "ptserve.componentSelectorLabels" -}}
{{ include "ptserve.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "ptserve.componentLabels" -}}
{{ include "ptserve.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "ptserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ptserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image of a component: the CUDA variant where it runs on GPUs. Call with (dict "root" $ "gpu" bool). */}}
{{- define "ptserve.image" -}}
{{- $tag := .root.Values.image.tag | default .root.Chart.AppVersion }}
{{- if .gpu }}
{{- $tag = .root.Values.image.cudaTag | default (printf "%s-cuda" $tag) }}
{{- end }}
{{- printf "%s:%s" .root.Values.image.repository $tag }}
{{- end }}

{{/* Which form of Redis the values give: url, sentinel or cluster; exactly one. */}}
{{- define "ptserve.redis.mode" -}}
{{- $r := .Values.redis }}
{{- $modes := list }}
{{- if $r.url }}{{ $modes = append $modes "url" }}{{ end }}
{{- if $r.sentinel.hosts }}{{ $modes = append $modes "sentinel" }}{{ end }}
{{- if $r.cluster.nodes }}{{ $modes = append $modes "cluster" }}{{ end }}
{{- if ne (len $modes) 1 }}
{{- fail (printf "set exactly one of redis.url, redis.sentinel.hosts or redis.cluster.nodes (got: %s)" (join ", " $modes | default "none")) }}
{{- end }}
{{- first $modes }}
{{- end }}

{{/* The password part of a built URL: Kubernetes expands $(REDIS_PASSWORD), defined just before. */}}
{{- define "ptserve.redis.userinfo" -}}
{{- if .Values.redis.auth.existingSecret }}:$(REDIS_PASSWORD)@{{ end }}
{{- end }}

{{/* PTSERVE_STORE. The sentinel and cluster forms are ptserve's redis+sentinel:// and redis+cluster://. */}}
{{- define "ptserve.redis.storeUrl" -}}
{{- $r := .Values.redis }}
{{- $mode := include "ptserve.redis.mode" . }}
{{- if eq $mode "url" }}
{{- $r.url }}
{{- else if eq $mode "sentinel" }}
{{- printf "redis+sentinel://%s%s/%s/%d" (include "ptserve.redis.userinfo" .) (join "," $r.sentinel.hosts) $r.sentinel.serviceName (int $r.db) }}
{{- else }}
{{- printf "redis+cluster://%s%s" (include "ptserve.redis.userinfo" .) (join "," $r.cluster.nodes) }}
{{- end }}
{{- end }}

{{/* The job stream of prompts/jobs.py ({prefix}:jobs:stream); on a Redis Cluster the prefix is a hash tag. */}}
{{- define "ptserve.jobStream" -}}
{{- if .Values.worker.autoscaling.stream }}
{{- .Values.worker.autoscaling.stream }}
{{- else if eq (include "ptserve.redis.mode" .) "cluster" }}
{{- print "{ptserve}:jobs:stream" }}
{{- else }}
{{- print "ptserve:jobs:stream" }}
{{- end }}
{{- end }}

{{- define "ptserve.apiKeysSecretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-api-keys" (include "ptserve.fullname" .)) }}
{{- end }}

{{- define "ptserve.trainingDataClaimName" -}}
{{- .Values.trainingData.existingClaim | default (printf "%s-training-data" (include "ptserve.fullname" .)) }}
{{- end }}

{{/*
Environment both components share. Order matters: REDIS_PASSWORD comes before PTSERVE_STORE, which
references it as $(REDIS_PASSWORD); Kubernetes expands only variables defined earlier in the list.
Only the service gets the API keys: the worker answers no requests.
Call with (dict "root" $ "server" bool "gpu" bool "dtype" string-or-empty).
*/}}
{{- define "ptserve.env" -}}
{{- $v := .root.Values }}
{{- if $v.redis.auth.existingSecret }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $v.redis.auth.existingSecret }}
      key: {{ $v.redis.auth.existingSecretPasswordKey }}
{{- end }}
- name: PTSERVE_STORE
  value: {{ include "ptserve.redis.storeUrl" .root | quote }}
{{- if .server }}
- name: PTSERVE_AUTH
  value: {{ ternary "on" "off" $v.auth.enabled | quote }}
{{- end }}
{{- if and .server $v.auth.enabled }}
- name: PTSERVE_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "ptserve.apiKeysSecretName" .root }}
      key: {{ if $v.auth.existingSecret }}{{ $v.auth.existingSecretKey }}{{ else }}api-keys{{ end }}
{{- end }}
- name: PTSERVE_DEVICE
  value: {{ ternary "cuda" "cpu" .gpu | quote }}
{{- if and .gpu .dtype }}
- name: PTSERVE_DTYPE
  value: {{ .dtype | quote }}
{{- end }}
{{- if $v.model.path }}
- name: PTSERVE_MODEL
  value: {{ $v.model.path | quote }}
{{- end }}
{{- if $v.trainingData.enabled }}
- name: PTSERVE_DATA_ROOT
  value: {{ $v.trainingData.mountPath | quote }}
{{- end }}
{{- /* The root filesystem is read-only: caches (torch, matplotlib, Hugging Face) go to the /tmp emptyDir. */}}
- name: HOME
  value: /tmp
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volumes and mounts both components share: /tmp, the model, the training data. */}}
{{- define "ptserve.volumes" -}}
- name: tmp
  emptyDir: {}
{{- with .Values.model.volume }}
- name: model
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .Values.trainingData.enabled }}
- name: training-data
  persistentVolumeClaim:
    claimName: {{ include "ptserve.trainingDataClaimName" . }}
    readOnly: true
{{- end }}
{{- end }}

{{- define "ptserve.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.model.volume }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- if .Values.trainingData.enabled }}
- name: training-data
  mountPath: {{ .Values.trainingData.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* A pod annotation that rolls the pods when the settings change. */}}
{{- define "ptserve.checksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end }}

{{/* terminationGracePeriodSeconds of the service: request timeout + preStop sleep + margin. */}}
{{- define "ptserve.server.terminationGrace" -}}
{{- if kindIs "invalid" .Values.server.terminationGracePeriodSeconds }}
{{- $timeout := .Values.config.PTSERVE_REQUEST_TIMEOUT_S | default "60" | float64 | ceil | int }}
{{- add $timeout .Values.server.preStopSleepSeconds 10 }}
{{- else }}
{{- .Values.server.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}
