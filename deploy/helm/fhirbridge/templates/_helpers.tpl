{{/* Names and labels */}}
{{- define "fhirbridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fhirbridge.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "fhirbridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fhirbridge.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "fhirbridge.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
{{ include "fhirbridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: fhirbridge
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* the release's pods, whatever their component */}}
{{- define "fhirbridge.releaseSelector" -}}
app.kubernetes.io/name: {{ include "fhirbridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fhirbridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fhirbridge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "fhirbridge.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* A PostgreSQL URL without a password: libpq reads it from the passfile, checks the server's certificate */}}
{{- define "fhirbridge.dbUrl" -}}
{{- $db := .ctx.Values.database -}}
{{- printf "postgresql://%s@%s:%v/%s?sslmode=%s&sslrootcert=/run/secrets/fhirbridge/pg-ca/ca.crt&passfile=/run/secrets/fhirbridge/pgpass/pgpass" $db.user $db.host $db.port .name $db.sslMode -}}
{{- end -}}

{{/* Environment of every fhirbridge container: no secret values, only paths */}}
{{- define "fhirbridge.env.common" -}}
- name: FHIRBRIDGE_DATA_DIR
  value: /var/lib/fhirbridge
- name: FHIRBRIDGE_LOG_LEVEL
  value: {{ .ctx.Values.logLevel | quote }}
- name: FHIRBRIDGE_LOG_FORMAT
  value: json
- name: FHIRBRIDGE_TRUST_REGISTRY
  value: /etc/fhirbridge/trust/trust.json
{{- range $k, $v := .ctx.Values.extraEnv }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- range $k, $v := .values.extraEnv }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- end -}}

{{/* Kafka client: mutual TLS with the component's KafkaUser certificate (mounted files) */}}
{{- define "fhirbridge.env.kafka" -}}
{{- $k := .ctx.Values.kafka -}}
- name: KAFKA_BOOTSTRAP_SERVERS
  value: {{ $k.bootstrapServers | quote }}
- name: FHIRBRIDGE_KAFKA_SECURITY_PROTOCOL
  value: {{ $k.securityProtocol | quote }}
{{- if or (eq $k.securityProtocol "SSL") (eq $k.securityProtocol "SASL_SSL") }}
- name: FHIRBRIDGE_KAFKA_SSL_CAFILE
  value: /run/secrets/fhirbridge/kafka-ca/ca.crt
- name: FHIRBRIDGE_KAFKA_SSL_CERTFILE
  value: /run/secrets/fhirbridge/kafka-user/user.crt
- name: FHIRBRIDGE_KAFKA_SSL_KEYFILE
  value: /run/secrets/fhirbridge/kafka-user/user.key
{{- end }}
- name: FHIRBRIDGE_TOPIC_BUNDLES
  value: {{ $k.topics.bundles | quote }}
- name: FHIRBRIDGE_TOPIC_DEADLETTER
  value: {{ $k.topics.deadletter | quote }}
- name: FHIRBRIDGE_TOPIC_RECEIPTS
  value: {{ $k.topics.receipts | quote }}
- name: FHIRBRIDGE_TOPIC_MPI
  value: {{ $k.topics.mpi | quote }}
- name: FHIRBRIDGE_PARTITIONS
  value: {{ $k.partitions | quote }}
- name: FHIRBRIDGE_REPLICATION
  value: {{ $k.replication | quote }}
{{- end -}}

{{/* The Kafka secrets of a component: the cluster CA and its KafkaUser's certificate */}}
{{- define "fhirbridge.kafkaSecrets" -}}
{{- $k := .ctx.Values.kafka -}}
- name: kafka-ca
  secret: {{ $k.clusterCaSecret.name }}
  items: [{key: {{ $k.clusterCaSecret.key }}, path: ca.crt}]
- name: kafka-user
  secret: {{ .user }}
  items: [{key: user.crt, path: user.crt}, {key: user.key, path: user.key}]
{{- end -}}

{{- define "fhirbridge.dbSecrets" -}}
{{- $d := .Values.database -}}
- name: pg-ca
  secret: {{ $d.caSecret.name }}
  items: [{key: {{ $d.caSecret.key }}, path: ca.crt}]
- name: pgpass
  secret: {{ $d.passfileSecret.name }}
  items: [{key: {{ $d.passfileSecret.key }}, path: pgpass}]
{{- end -}}

{{/*
Secrets as files. Each Secret is a volume (defaultMode 0440, group fsGroup) read only by the init
container `secrets`, which copies its files with mode 0400 into a memory-backed emptyDir mounted at
/run/secrets/fhirbridge/<name>/ in the main container: fhirbridge refuses private keys that group or
others may read (bridge/tls.py), libpq ignores such a passfile, and Kubernetes gives Secret files
group read whenever fsGroup is set. A rotated Secret takes effect on the next rollout.
*/}}
{{- define "fhirbridge.secretVolumes" -}}
{{- range .secrets }}
- name: src-{{ .name }}
  secret:
    secretName: {{ .secret }}
    defaultMode: 0440
    {{- with .items }}
    items:
      {{- toYaml . | nindent 6 }}
    {{- end }}
{{- end }}
- name: secrets
  emptyDir:
    medium: Memory
    sizeLimit: 4Mi
{{- end -}}

{{- define "fhirbridge.secretInit" -}}
- name: secrets
  image: {{ include "fhirbridge.image" .ctx }}
  imagePullPolicy: {{ .ctx.Values.image.pullPolicy }}
  command: ["/bin/sh", "-ec"]
  args:
    - |
      cd /secret-sources
      for dir in *; do
        mkdir -p "/run/secrets/fhirbridge/$dir"
        for file in "$dir"/*; do install -m 0400 "$file" "/run/secrets/fhirbridge/$file"; done
      done
  securityContext:
    {{- toYaml .ctx.Values.containerSecurityContext | nindent 4 }}
  resources:
    requests: {cpu: 10m, memory: 16Mi}
    limits: {cpu: 100m, memory: 64Mi}
  volumeMounts:
    - name: secrets
      mountPath: /run/secrets/fhirbridge
    {{- range .secrets }}
    - name: src-{{ .name }}
      mountPath: /secret-sources/{{ .name }}
      readOnly: true
    {{- end }}
{{- end -}}

{{/*
The pod spec of a fhirbridge component. Arguments (dict): ctx, component, values (the component's
values), args, env (YAML list), secrets (list of {name, secret, items}), ports (YAML list), probes
(YAML), instanceId (bool: static group membership from the pod name), volumes, volumeMounts (YAML).
*/}}
{{- define "fhirbridge.podSpec" -}}
{{- $ctx := .ctx -}}
serviceAccountName: {{ include "fhirbridge.serviceAccountName" $ctx }}
automountServiceAccountToken: false
enableServiceLinks: false
terminationGracePeriodSeconds: {{ .grace | default 30 }}
{{- with $ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $ctx.Values.podSecurityContext | nindent 2 }}
{{- with $ctx.Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $ctx.Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if $ctx.Values.topologySpread.enabled }}
topologySpreadConstraints:
  - maxSkew: {{ $ctx.Values.topologySpread.maxSkew }}
    topologyKey: {{ $ctx.Values.topologySpread.topologyKey }}
    whenUnsatisfiable: {{ $ctx.Values.topologySpread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "fhirbridge.selectorLabels" (dict "ctx" $ctx "component" .component) | nindent 8 }}
{{- end }}
{{- with .restartPolicy }}
restartPolicy: {{ . }}
{{- end }}
{{- if .secrets }}
initContainers:
  {{- include "fhirbridge.secretInit" (dict "ctx" $ctx "secrets" .secrets) | trim | nindent 2 }}
{{- end }}
containers:
  - name: {{ .component }}
    image: {{ include "fhirbridge.image" $ctx }}
    imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
    args:
      {{- toYaml .args | nindent 6 }}
    env:
      {{- include "fhirbridge.env.common" (dict "ctx" $ctx "values" .values) | nindent 6 }}
      {{- if .instanceId }}
      - name: FHIRBRIDGE_CONSUMER_INSTANCE_ID
        valueFrom:
          fieldRef:
            fieldPath: metadata.name
      {{- end }}
      {{- with .env }}
      {{- . | nindent 6 }}
      {{- end }}
    {{- with .ports }}
    ports:
      {{- . | nindent 6 }}
    {{- end }}
    {{- with .probes }}
    {{- . | trim | nindent 4 }}
    {{- end }}
    resources:
      {{- toYaml .values.resources | nindent 6 }}
    securityContext:
      {{- toYaml $ctx.Values.containerSecurityContext | nindent 6 }}
    volumeMounts:
      - name: data
        mountPath: /var/lib/fhirbridge
      - name: tmp
        mountPath: /tmp
      - name: trust
        mountPath: /etc/fhirbridge/trust
        readOnly: true
      {{- if .secrets }}
      - name: secrets
        mountPath: /run/secrets/fhirbridge
        readOnly: true
      {{- end }}
      {{- with .volumeMounts }}
      {{- . | nindent 6 }}
      {{- end }}
volumes:
  {{- if not .dataVolumeClaim }}
  - name: data
    emptyDir:
      sizeLimit: {{ .dataSize | default "1Gi" }}
  {{- end }}
  - name: tmp
    emptyDir:
      sizeLimit: 256Mi
  - name: trust
    configMap:
      name: {{ $ctx.Values.trustRegistry.configMap }}
      items: [{key: trust.json, path: trust.json}]
  {{- if .secrets }}
  {{- include "fhirbridge.secretVolumes" (dict "secrets" .secrets) | trim | nindent 2 }}
  {{- end }}
  {{- with .volumes }}
  {{- . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* Probes of a process served by bridge/health.py (the consumers' `--metrics-port`, mllp's
`--health-port`: .port, default probes.port), with a fallback when probes are off */}}
{{- define "fhirbridge.healthProbes" -}}
{{- $p := .ctx.Values.probes -}}
{{- $port := .port | default $p.port -}}
{{- if $p.enabled }}
livenessProbe:
  httpGet: {path: {{ $p.livenessPath }}, port: {{ $port }}}
  initialDelaySeconds: {{ $p.initialDelaySeconds }}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: {{ $p.failureThreshold }}
readinessProbe:
  httpGet: {path: {{ $p.readinessPath }}, port: {{ $port }}}
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: 3
{{- else if .fallback }}
{{- .fallback }}
{{- end }}
{{- end -}}
