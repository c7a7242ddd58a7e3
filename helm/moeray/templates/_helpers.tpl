{{/*
Helpers of the moeray chart: names, labels, images, the checks that JSON Schema cannot express,
and the pieces every Ray pod shares (env, volumes, probes).
*/}}

{{- define "moeray.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's base name, at most 40 characters: KubeRay appends suffixes to it. */}}
{{- define "moeray.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "moeray.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moeray.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "moeray.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "moeray.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The image of a Ray group: the CUDA image when the group has GPUs. Arg: dict root gpus. */}}
{{- define "moeray.image" -}}
{{- $v := .root.Values.image }}
{{- $repo := ternary $v.cudaRepository $v.repository (gt (int .gpus) 0) }}
{{- printf "%s:%s" $repo (default .root.Chart.AppVersion $v.tag) }}
{{- end }}

{{/* Worker group name of a tier: engine-<tier>, "_" -> "-" (group names end up in pod names). */}}
{{- define "moeray.engineGroupName" -}}
{{- printf "engine-%s" (replace "_" "-" .) }}
{{- end }}

{{/* Settings of one tier's engine group: engineDefaults merged with engines.<tier>. Arg: dict root tier. */}}
{{- define "moeray.engineGroup" -}}
{{- $override := get .root.Values.engines .tier | default dict }}
{{- toYaml (mergeOverwrite (deepCopy .root.Values.engineDefaults) (deepCopy $override)) }}
{{- end }}

{{/* True when some tier shards its experts: the expert group is rendered. */}}
{{- define "moeray.expertsEnabled" -}}
{{- $on := false }}
{{- range .Values.moeray.tiers }}
{{- if gt (int (dig "experts" "shards" 0 .)) 0 }}{{ $on = true }}{{ end }}
{{- end }}
{{- if $on }}true{{ end }}
{{- end }}

{{- define "moeray.autoscalerEnabled" -}}
{{- $v := .Values.rayAutoscaler.enabled }}
{{- if kindIs "invalid" $v }}{{ include "moeray.expertsEnabled" . }}{{ else if $v }}true{{ end }}
{{- end }}

{{/* Names of the Secrets. */}}
{{- define "moeray.rayTokenSecret" -}}
{{- default (printf "%s-ray-token" (include "moeray.fullname" .)) .Values.rayAuth.existingSecret }}
{{- end }}

{{- define "moeray.redisSecret" -}}
{{- default (printf "%s-redis" (include "moeray.fullname" .)) .Values.redis.internal.existingSecret }}
{{- end }}

{{- define "moeray.redisHost" -}}
{{- printf "%s-redis" (include "moeray.fullname" .) }}
{{- end }}

{{/*
The checks values.schema.json cannot make (relations between keys). Each fails with the key.
*/}}
{{- define "moeray.validate" -}}
{{- $m := .Values.moeray }}
{{- $serve := $m.serve }}
{{- if $m.state.redis_url }}
{{- fail "moeray.state.redis_url must stay null: the chart gives the app the Redis URL through a Secret (see redis.mode)" }}
{{- end }}
{{- $reserved := dict "6379" "Ray's GCS" "8080" "Ray's metrics" "8265" "Ray's dashboard" "10001" "Ray's client server" "52365" "Ray's dashboard agent" }}
{{- $_ := set $reserved (toString .Values.rayService.serveProxyPort) "rayService.serveProxyPort" }}
{{- range $key := list "grpc_port" "http_port" }}
{{- $port := get $serve $key | int }}
{{- if eq $port 0 }}
{{- fail (printf "moeray.serve.%s must be a fixed port (not 0): the front-door Service targets it" $key) }}
{{- end }}
{{- if hasKey $reserved (toString $port) }}
{{- fail (printf "moeray.serve.%s %d is taken by %s on the Ray pods; choose another port" $key $port (get $reserved (toString $port))) }}
{{- end }}
{{- end }}
{{- if eq (int $serve.grpc_port) (int $serve.http_port) }}
{{- fail "moeray.serve.grpc_port and moeray.serve.http_port must differ" }}
{{- end }}
{{- if ne $serve.host "0.0.0.0" }}
{{- fail (printf "moeray.serve.host must be 0.0.0.0 on Kubernetes (got %q): the front-door Service reaches the router through the pod's IP" $serve.host) }}
{{- end }}
{{- if not (get $serve "router_resource") }}
{{- fail "moeray.serve.router_resource must name a custom Ray resource (e.g. moeray_router): the front-door Service selects the pods that advertise it" }}
{{- end }}
{{- if and (not .Values.routerGroup.enabled) (gt (int (get $serve "router_replicas" | default 1)) 1) }}
{{- fail "moeray.serve.router_replicas must be 1 when routerGroup.enabled is false (one router replica per pod, and there is one head)" }}
{{- end }}
{{- $groups := dict }}
{{- range $i, $t := $m.tiers }}
{{- $g := include "moeray.engineGroupName" $t.name }}
{{- if hasKey $groups $g }}
{{- fail (printf "moeray.tiers[%d].name %q gives worker group %s, as tier %q does: tier names must differ beyond _ and -" $i $t.name $g (get $groups $g)) }}
{{- end }}
{{- $_ := set $groups $g $t.name }}
{{- if and (ne $.Values.models.source "image") (not (hasPrefix (printf "%s/" (trimSuffix "/" $.Values.models.mountPath)) $t.model)) }}
{{- fail (printf "moeray.tiers[%d].model %q must lie under models.mountPath %q (models.source %s)" $i $t.model $.Values.models.mountPath $.Values.models.source) }}
{{- end }}
{{- $e := $t.experts | default dict }}
{{- if lt (int (get $e "max_replicas" | default 4)) (int (get $e "min_replicas" | default 1)) }}
{{- fail (printf "moeray.tiers[%d].experts.max_replicas must be >= moeray.tiers[%d].experts.min_replicas" $i $i) }}
{{- end }}
{{- end }}
{{- range $name, $_ := .Values.engines }}
{{- $found := false }}
{{- range $m.tiers }}{{ if eq .name $name }}{{ $found = true }}{{ end }}{{ end }}
{{- if not $found }}
{{- fail (printf "engines.%s names no tier in moeray.tiers" $name) }}
{{- end }}
{{- end }}
{{- if eq .Values.redis.mode "external" }}
{{- if not .Values.redis.external.existingSecret }}
{{- fail "redis.external.existingSecret must name the Secret that holds the Redis URL (redis.mode external)" }}
{{- end }}
{{- end }}
{{- if and .Values.gcsFaultTolerance.enabled (eq .Values.redis.mode "external") (not .Values.gcsFaultTolerance.redisAddress) }}
{{- fail "gcsFaultTolerance.redisAddress must give host:port of Redis when redis.mode is external" }}
{{- end }}
{{- end }}

{{/*
Environment of every Ray container. MOERAY_REDIS_URL is the only thing the app reads from it
(state.redis_url stays null in the config); the password never enters the RayService spec.
*/}}
{{- define "moeray.rayEnv" -}}
{{- if eq .Values.redis.mode "external" }}
- name: MOERAY_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.urlKey }}
{{- else }}
- name: MOERAY_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "moeray.redisSecret" . }}
      key: {{ .Values.redis.internal.passwordKey }}
- name: MOERAY_REDIS_URL
  value: {{ printf "redis://:$(MOERAY_REDIS_PASSWORD)@%s:6379/0" (include "moeray.redisHost" .) | quote }}
{{- end }}
# Checkpoints are local paths: nothing may reach for a model hub.
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRANSFORMERS_OFFLINE
  value: "1"
{{- with .Values.pods.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volumes of every Ray pod: the models (read-only) and /dev/shm. Arg: dict root shmSize. */}}
{{- define "moeray.rayVolumes" -}}
- name: shared-mem
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
{{- $models := .root.Values.models }}
{{- if eq $models.source "pvc" }}
- name: models
  persistentVolumeClaim:
    claimName: {{ $models.pvc.claimName }}
    readOnly: true
{{- else if eq $models.source "hostPath" }}
- name: models
  hostPath:
    path: {{ $models.hostPath.path }}
    type: Directory
{{- end }}
{{- end }}

{{- define "moeray.rayVolumeMounts" -}}
- name: shared-mem
  mountPath: /dev/shm
{{- if ne .Values.models.source "image" }}
- name: models
  mountPath: {{ .Values.models.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
Probes of a Ray container. Liveness and startup ask the pod's own dashboard agent whether the
local raylet lives (GCS unreachable does not fail it), so they depend on no other pod and not on
Redis. Readiness: the head also checks its GCS; a router pod is ready when its router answers
gRPC health; other workers when their raylet lives. Setting readiness here also keeps KubeRay
from adding its Serve-proxy check to worker pods, which expert pods (no Serve replica) would
fail forever. Arg: dict root kind (head|router|worker) agentPort.
*/}}
{{- define "moeray.probes" -}}
{{- $p := .root.Values.probes }}
{{- $agent := .agentPort }}
livenessProbe:
  httpGet: {path: /api/local_raylet_healthz, port: {{ $agent }}}
  periodSeconds: {{ $p.liveness.periodSeconds }}
  timeoutSeconds: {{ $p.liveness.timeoutSeconds }}
  failureThreshold: {{ $p.liveness.failureThreshold }}
startupProbe:
  httpGet: {path: /api/local_raylet_healthz, port: {{ $agent }}}
  periodSeconds: {{ $p.startup.periodSeconds }}
  timeoutSeconds: {{ $p.startup.timeoutSeconds }}
  failureThreshold: {{ $p.startup.failureThreshold }}
readinessProbe:
{{- if eq .kind "head" }}
  httpGet: {path: /api/healthz, port: {{ $agent }}}
{{- else if eq .kind "router" }}
  grpc: {port: {{ .root.Values.moeray.serve.grpc_port }}}
{{- else }}
  httpGet: {path: /api/local_raylet_healthz, port: {{ $agent }}}
{{- end }}
  periodSeconds: {{ $p.readiness.periodSeconds }}
  timeoutSeconds: {{ $p.readiness.timeoutSeconds }}
  failureThreshold: {{ $p.readiness.failureThreshold }}
{{- end }}

{{/* The front-door container ports of a pod that runs a router replica. */}}
{{- define "moeray.frontDoorPorts" -}}
- name: grpc
  containerPort: {{ .Values.moeray.serve.grpc_port }}
  protocol: TCP
- name: http
  containerPort: {{ .Values.moeray.serve.http_port }}
  protocol: TCP
{{- end }}

{{/* Pod labels of a Ray group. Arg: dict root component group. */}}
{{- define "moeray.podLabels" -}}
{{ include "moeray.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
moeray.io/group: {{ .group }}
moeray.io/ray: "true"
{{- with .root.Values.pods.labels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
One Ray container and its pod spec, shared by every group. Arg: dict root name kind params
(the group's rayStartParams) gpus gpuResourceName resources shmSize nodeSelector tolerations
affinity frontDoor (bool). Ports follow rayStartParams where they set them, as KubeRay does.
*/}}
{{- define "moeray.rayPodSpec" -}}
{{- $root := .root }}
{{- $params := .params | default dict }}
{{- $port := dict "gcs" (get $params "port" | default "6379") "dashboard" (get $params "dashboard-port" | default "8265") "client" (get $params "ray-client-server-port" | default "10001") "metrics" (get $params "metrics-export-port" | default "8080") "agent" (get $params "dashboard-agent-listen-port" | default "52365") }}
securityContext:
  {{- toYaml $root.Values.pods.podSecurityContext | nindent 2 }}
terminationGracePeriodSeconds: {{ $root.Values.pods.terminationGracePeriodSeconds }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
containers:
  - name: {{ .name }}
    image: {{ include "moeray.image" (dict "root" $root "gpus" .gpus) }}
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    securityContext:
      {{- toYaml $root.Values.pods.securityContext | nindent 6 }}
    env:
      {{- include "moeray.rayEnv" $root | trim | nindent 6 }}
    {{- $res := deepCopy .resources }}
    {{- if gt (int .gpus) 0 }}
    {{- $_ := set $res "limits" (merge (dict .gpuResourceName (toString .gpus)) ($res.limits | default dict)) }}
    {{- $_ := set $res "requests" (merge (dict .gpuResourceName (toString .gpus)) ($res.requests | default dict)) }}
    {{- end }}
    resources:
      {{- toYaml $res | nindent 6 }}
    ports:
      {{- if eq .kind "head" }}
      - {name: gcs-server, containerPort: {{ $port.gcs }}, protocol: TCP}
      - {name: dashboard, containerPort: {{ $port.dashboard }}, protocol: TCP}
      - {name: client, containerPort: {{ $port.client }}, protocol: TCP}
      - {name: serve, containerPort: {{ $root.Values.rayService.serveProxyPort }}, protocol: TCP}
      {{- end }}
      - {name: metrics, containerPort: {{ $port.metrics }}, protocol: TCP}
      {{- if .frontDoor }}
      {{- include "moeray.frontDoorPorts" $root | trim | nindent 6 }}
      {{- end }}
    {{- include "moeray.probes" (dict "root" $root "kind" (ternary "router" .kind (and .frontDoor (ne .kind "head"))) "agentPort" $port.agent) | trim | nindent 4 }}
    volumeMounts:
      {{- include "moeray.rayVolumeMounts" $root | trim | nindent 6 }}
volumes:
  {{- include "moeray.rayVolumes" (dict "root" $root "shmSize" .shmSize) | trim | nindent 2 }}
{{- end }}
