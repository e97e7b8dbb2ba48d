{{- define "cepheid.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "cepheid.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "cepheid.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "cepheid.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The configuration file every process reads (JSON, layered over the compiled-in defaults). */}}
{{- define "cepheid.config" -}}
{{- $cfg := dict
  "engine" .Values.engine
  "redis" (dict "url" .Values.redis.url "prefix" .Values.redis.prefix)
  "kafka" (dict "bootstrap" .Values.kafka.bootstrap "properties" .Values.kafka.properties)
  "ingest" (dict "listen" (printf "0.0.0.0:%v" .Values.ingest.port) "events_partitions" .Values.topics.events)
  "router" (dict "listen" (printf "0.0.0.0:%v" .Values.router.port) "events_partitions" .Values.topics.events "keyed_partitions" .Values.topics.keyed)
  "shard" (dict "listen" (printf "0.0.0.0:%v" .Values.shard.port) "keyed_partitions" .Values.topics.keyed "matches_partitions" .Values.topics.matches "checkpoint_interval_ms" .Values.shard.checkpointIntervalMs "passivate_after_ms" .Values.shard.passivateAfterMs "max_running_keys" .Values.shard.maxRunningKeys "threads" .Values.shard.threads)
  "notifier_service" (dict "listen" (printf "0.0.0.0:%v" .Values.notifier.port) "matches_partitions" .Values.topics.matches)
  "telemetry" (dict "otlp_endpoint" .Values.telemetry.otlpEndpoint "sample_ratio" .Values.telemetry.sampleRatio "log_format" .Values.telemetry.logFormat "log_level" .Values.telemetry.logLevel)
-}}
{{- $cfg = mergeOverwrite $cfg (deepCopy .Values.config) -}}
{{- toPrettyJson $cfg -}}
{{- end -}}

{{/* Environment every process gets: secrets as CEPHEID__… variables. */}}
{{- define "cepheid.env" -}}
{{- if .Values.redis.existingSecret }}
- name: CEPHEID__REDIS__URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.existingSecretKey }}
{{- end }}
{{- if .Values.kafka.saslPasswordSecret.name }}
- name: CEPHEID__KAFKA__SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.saslPasswordSecret.name }}
      key: {{ .Values.kafka.saslPasswordSecret.key }}
{{- end }}
{{- end -}}

{{/* One container of a service. Arguments: root, component, binary, port, resources. */}}
{{- define "cepheid.container" -}}
- name: {{ .component }}
  image: {{ include "cepheid.image" .root }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  args: ["/etc/cepheid/cepheid.json"]
  command: [{{ .binary | quote }}]
  ports:
    - name: http
      containerPort: {{ .port }}
      protocol: TCP
  {{- $env := include "cepheid.env" .root | trim }}
  {{- if or $env .extraEnv }}
  env:
    {{- with $env }}
    {{- . | nindent 4 }}
    {{- end }}
    {{- with .extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  livenessProbe:
    httpGet: {path: /healthz, port: http}
    periodSeconds: 10
    failureThreshold: 3
  readinessProbe:
    httpGet: {path: /readyz, port: http}
    periodSeconds: 5
    failureThreshold: 3
  resources:
    {{- toYaml .resources | nindent 4 }}
  securityContext:
    {{- toYaml .root.Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: config
      mountPath: /etc/cepheid
      readOnly: true
    - name: tmp
      mountPath: /tmp
    {{- if .root.Values.kafka.tlsSecret }}
    - name: kafka-tls
      mountPath: /etc/cepheid/kafka-tls
      readOnly: true
    {{- end }}
{{- end -}}

{{- define "cepheid.volumes" -}}
- name: config
  configMap:
    name: {{ include "cepheid.fullname" . }}-config
- name: tmp
  emptyDir: {}
{{- if .Values.kafka.tlsSecret }}
- name: kafka-tls
  secret:
    secretName: {{ .Values.kafka.tlsSecret }}
{{- end }}
{{- end -}}

{{- define "cepheid.podSpecCommon" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  {{- include "cepheid.volumes" . | nindent 2 }}
{{- end -}}
