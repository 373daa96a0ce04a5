{{/*
Names and labels, in the style of the prometheus-community charts.
*/}}

{{- define "auto-trace.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "auto-trace.fullname" -}}
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

{{- define "auto-trace.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* A name of at most 63 characters: "<fullname>-<suffix>", shortened with a hash if needed. */}}
{{- define "auto-trace.componentName" -}}
{{- $full := printf "%s-%s" (include "auto-trace.fullname" .root) .suffix }}
{{- if gt (len $full) 63 }}
{{- printf "%s-%s" ($full | trunc 54 | trimSuffix "-") (sha256sum $full | trunc 8) }}
{{- else }}
{{- $full }}
{{- end }}
{{- end }}

{{- define "auto-trace.selectorLabels" -}}
app.kubernetes.io/name: {{ include "auto-trace.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "auto-trace.labels" -}}
helm.sh/chart: {{ include "auto-trace.chart" . }}
{{ include "auto-trace.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: auto-trace
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "auto-trace.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "auto-trace.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "auto-trace.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion }}
{{- if .Values.image.digest }}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* Where the configuration file is mounted in every container. */}}
{{- define "auto-trace.configDir" -}}/etc/auto-trace{{- end }}
{{- define "auto-trace.configPath" -}}/etc/auto-trace/config.yaml{{- end }}

{{/* The auto-trace configuration file, exactly as the ConfigMaps hold it. */}}
{{- define "auto-trace.configYaml" -}}
{{- toYaml .Values.config }}
{{- end }}

{{- define "auto-trace.metricsPort" -}}
{{- $metrics := .Values.config.metrics | default dict }}
{{- if hasKey $metrics "port" }}{{ $metrics.port | int }}{{ else }}9108{{ end }}
{{- end }}

{{- define "auto-trace.topicPrefix" -}}
{{- $topics := .Values.config.topics | default dict }}
{{- $topics.prefix | default "auto-trace" }}
{{- end }}

{{/*
Seconds (rounded up) of an auto-trace duration: 500ms, 5s, 30m, 1h, 1d, or a number of seconds.
*/}}
{{- define "auto-trace.seconds" -}}
{{- $value := . }}
{{- if kindIs "string" $value }}
{{- if not (regexMatch "^\\s*[0-9]+(\\.[0-9]+)?\\s*(ms|s|m|h|d)\\s*$" $value) }}
{{- fail (printf "config: %q is not a duration such as 500ms, 5s, 30m or 1h" $value) }}
{{- end }}
{{- $number := regexFind "[0-9]+(\\.[0-9]+)?" $value | float64 }}
{{- $unit := regexFind "(ms|s|m|h|d)\\s*$" $value | trim }}
{{- $scale := get (dict "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0 "d" 86400.0) $unit }}
{{- mulf $number $scale | ceil | int }}
{{- else }}
{{- $value | float64 | ceil | int }}
{{- end }}
{{- end }}

{{- define "auto-trace.terminationGracePeriodSeconds" -}}
{{- $shutdown := .Values.config.shutdown | default dict }}
{{- $grace := include "auto-trace.seconds" (hasKey $shutdown "grace" | ternary $shutdown.grace "30s") | int }}
{{- add $grace (.Values.terminationGraceMarginSeconds | int) }}
{{- end }}

{{/*
Deep merge of .src into .dst (a map changed in place): maps merge key by key, anything else
(lists, scalars, false, 0, null) replaces. Unlike mergeOverwrite, false and 0 do override.
*/}}
{{- define "auto-trace.deepMerge" -}}
{{- $dst := .dst }}
{{- range $key, $value := .src }}
{{- if and (kindIs "map" $value) (kindIs "map" (get $dst $key)) }}
{{- include "auto-trace.deepMerge" (dict "dst" (get $dst $key) "src" $value) }}
{{- else }}
{{- $_ := set $dst $key $value }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The stages this release runs, appended to .out.stages as dicts:
  {component, key, adapter, name, args, group, topic, settings}
`settings` is the stage's block of values (for a sink: `sink` deep-merged with
`sink.overrides.<adapter>`).
Usage: {{- $out := dict "stages" list }}{{- include "auto-trace.stages" (dict "root" . "out" $out) }}
*/}}
{{- define "auto-trace.stages" -}}
{{- $root := .root }}
{{- $values := $root.Values }}
{{- $prefix := include "auto-trace.topicPrefix" $root }}
{{- $input := $values.config.input | default dict }}
{{- $delay := $values.config.delay | default dict }}
{{- $stages := list }}
{{- if $values.ingest.enabled }}
{{- $stages = append $stages (dict "component" "ingest" "key" "ingest" "adapter" "" "name" (include "auto-trace.componentName" (dict "root" $root "suffix" "ingest")) "args" (list "run" "--role" "ingest") "group" ($input.group | default "auto-trace-ingest") "topic" ($input.topic | default "trade.closed") "settings" $values.ingest) }}
{{- end }}
{{- if $values.release.enabled }}
{{- $stages = append $stages (dict "component" "release" "key" "release" "adapter" "" "name" (include "auto-trace.componentName" (dict "root" $root "suffix" "release")) "args" (list "run" "--role" "release") "group" ($delay.group | default "auto-trace-release") "topic" (printf "%s.delay" $prefix) "settings" $values.release) }}
{{- end }}
{{- if $values.sink.enabled }}
{{- $overrides := $values.sink.overrides | default dict }}
{{- range $adapter := $values.config.adapters | default list }}
{{- if ne (toString (get $adapter "enabled")) "false" }}
{{- $settings := omit (deepCopy $values.sink) "overrides" "enabled" }}
{{- include "auto-trace.deepMerge" (dict "dst" $settings "src" (deepCopy (get $overrides $adapter.name | default dict))) }}
{{- $key := printf "sink-%s" ($adapter.name | replace "_" "-") }}
{{- $stages = append $stages (dict "component" "sink" "key" $key "adapter" $adapter.name "name" (include "auto-trace.componentName" (dict "root" $root "suffix" $key)) "args" (list "run" "--role" "sink" "--adapter" $adapter.name) "group" (printf "%s-sink-%s" $prefix $adapter.name) "topic" (printf "%s.sink.%s" $prefix $adapter.name) "settings" $settings) }}
{{- end }}
{{- end }}
{{- end }}
{{- $_ := set .out "stages" $stages }}
{{- end }}

{{- define "auto-trace.stageSelectorLabels" -}}
{{ include "auto-trace.selectorLabels" .root }}
app.kubernetes.io/component: {{ .stage.component }}
{{- if .stage.adapter }}
auto-trace/adapter: {{ .stage.adapter | quote }}
{{- end }}
{{- end }}

{{/*
Every secret reference ({env: NAME} or {file: PATH}) in a piece of the configuration, collected
into .refs (a dict: "env:NAME" / "file:PATH" -> the path in the configuration).
*/}}
{{- define "auto-trace.collectSecretRefs" -}}
{{- $node := .node }}
{{- if kindIs "map" $node }}
{{- if and (eq (len $node) 1) (or (hasKey $node "env") (hasKey $node "file")) }}
{{- range $kind, $value := $node }}
{{- $_ := set $.refs (printf "%s:%v" $kind $value) $.path }}
{{- end }}
{{- else }}
{{- range $key, $value := $node }}
{{- include "auto-trace.collectSecretRefs" (dict "node" $value "path" (printf "%s.%s" $.path $key) "refs" $.refs) }}
{{- end }}
{{- end }}
{{- else if kindIs "slice" $node }}
{{- range $index, $value := $node }}
{{- include "auto-trace.collectSecretRefs" (dict "node" $value "path" (printf "%s.%d" $.path $index) "refs" $.refs) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Checks that fail `helm install` with a clear message, before anything reaches the cluster:
no secret written inline, and every secret reference backed by an existing Secret.
*/}}
{{- define "auto-trace.validate" -}}
{{- $config := .Values.config }}
{{- $kafka := $config.kafka | default dict }}
{{- range $key, $_ := $kafka.client | default dict }}
{{- if regexMatch "(?i)(password|passphrase|secret|key\\.pem$|^sasl\\.oauthbearer\\.config$|^ssl_key$)" $key }}
{{- fail (printf "config.kafka.client.%s looks like a secret: never write it in values. Put it in config.kafka.client_secrets as {env: NAME} (with secretEnv) or {file: PATH} (with secretMounts)." $key) }}
{{- end }}
{{- end }}
{{- $input := $config.input | default dict }}
{{- if and $input.schema_registry_url (regexMatch "://[^/]*@" (toString $input.schema_registry_url)) }}
{{- fail "config.input.schema_registry_url carries credentials: use config.input.schema_registry_secrets (basic.auth.user.info: {env: NAME}) with secretEnv instead." }}
{{- end }}
{{- range $i, $adapter := $config.adapters | default list }}
{{- if not (kindIs "map" $adapter) }}
{{- fail (printf "config.adapters.%d: each adapter is a mapping with at least name and type" $i) }}
{{- end }}
{{- range $header, $_ := $adapter.headers | default dict }}
{{- if has (lower $header) (list "authorization" "proxy-authorization" "cookie" "x-api-key" "api-key") }}
{{- fail (printf "config.adapters.%d.headers.%s: headers are not secret (they appear in configuration dumps); a credential must not be written in values" $i $header) }}
{{- end }}
{{- end }}
{{- range $field := list "url" "base_url" "path" "s3_endpoint_url" }}
{{- if regexMatch "://[^/]*@" (toString (get $adapter $field)) }}
{{- fail (printf "config.adapters.%d.%s carries credentials in the URL: use the adapter's secret references instead" $i $field) }}
{{- end }}
{{- end }}
{{- end }}
{{- $names := dict }}
{{- range $adapter := $config.adapters | default list }}
{{- $key := $adapter.name | toString | replace "_" "-" }}
{{- if hasKey $names $key }}
{{- fail (printf "config.adapters: %q and %q would both be named sink-%s in Kubernetes; rename one" (get $names $key) $adapter.name $key) }}
{{- end }}
{{- $_ := set $names $key $adapter.name }}
{{- end }}
{{- $adapterNames := list }}
{{- range $adapter := $config.adapters | default list }}
{{- $adapterNames = append $adapterNames (toString $adapter.name) }}
{{- end }}
{{- range $name, $_ := .Values.sink.overrides | default dict }}
{{- if not (has $name $adapterNames) }}
{{- fail (printf "sink.overrides.%s: no adapter of that name in config.adapters (known: %s)" $name (join ", " $adapterNames)) }}
{{- end }}
{{- end }}
{{- /* A file adapter writing locally needs a writable volume: the root filesystem is read-only. */}}
{{- range $i, $adapter := $config.adapters | default list }}
{{- if and (eq (toString $adapter.type) "file") (not (hasPrefix "s3://" (toString $adapter.path))) (ne (toString (get $adapter "enabled")) "false") }}
{{- $override := get ($.Values.sink.overrides | default dict) (toString $adapter.name) | default dict }}
{{- $writable := false }}
{{- range $mount := concat (list (dict "mountPath" "/tmp")) ($.Values.extraVolumeMounts | default list) ($.Values.sink.extraVolumeMounts | default list) ($override.extraVolumeMounts | default list) }}
{{- $dir := trimSuffix "/" (toString $mount.mountPath) }}
{{- if and (not $mount.readOnly) (or (eq (trimSuffix "/" (toString $adapter.path)) $dir) (hasPrefix (printf "%s/" $dir) (toString $adapter.path))) }}
{{- $writable = true }}
{{- end }}
{{- end }}
{{- if not $writable }}
{{- fail (printf "config.adapters.%d (%s) writes files to %s, but no volume is mounted there and the root filesystem is read-only: add sink.overrides.%s.extraVolumes / extraVolumeMounts (e.g. a PersistentVolumeClaim)" $i $adapter.name $adapter.path $adapter.name) }}
{{- end }}
{{- end }}
{{- end }}
{{- $metricsHost := toString (($config.metrics | default dict).host | default "0.0.0.0") }}
{{- if or (hasPrefix "127." $metricsHost) (eq $metricsHost "localhost") (eq $metricsHost "::1") }}
{{- fail (printf "config.metrics.host %s is only reachable from inside the pod: the probes and Prometheus need 0.0.0.0 (or ::)" $metricsHost) }}
{{- end }}
{{- if eq (include "auto-trace.metricsPort" . | int) 0 }}
{{- fail "config.metrics.port must not be 0 in Kubernetes: the probes use /healthz and /readyz on it" }}
{{- end }}
{{- $refs := dict }}
{{- include "auto-trace.collectSecretRefs" (dict "node" $config "path" "config" "refs" $refs) }}
{{- $plainEnv := dict }}
{{- range $item := .Values.extraEnv | default list }}
{{- $_ := set $plainEnv $item.name true }}
{{- end }}
{{- range $ref, $where := $refs }}
{{- $kind := regexFind "^(env|file)" $ref }}
{{- $target := trimPrefix (printf "%s:" $kind) $ref }}
{{- if eq $kind "env" }}
{{- if not (or (hasKey ($.Values.secretEnv | default dict) $target) (hasKey $plainEnv $target)) }}
{{- fail (printf "%s refers to the environment variable %s, but secretEnv has no entry for it: add secretEnv.%s: {secretName: ..., key: ...}" $where $target $target) }}
{{- end }}
{{- else }}
{{- $mounted := false }}
{{- range $_, $mount := $.Values.secretMounts }}
{{- if hasPrefix (printf "%s/" (trimSuffix "/" $mount.mountPath)) $target }}
{{- $mounted = true }}
{{- end }}
{{- end }}
{{- range $mount := $.Values.extraVolumeMounts | default list }}
{{- if hasPrefix (printf "%s/" (trimSuffix "/" $mount.mountPath)) $target }}
{{- $mounted = true }}
{{- end }}
{{- end }}
{{- if not $mounted }}
{{- fail (printf "%s refers to the file %s, which no secretMounts entry mounts: add secretMounts.<name>: {secretName: ..., mountPath: ...}" $where $target) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The secret references one container's own work reads, collected into .refs like
auto-trace.collectSecretRefs: Kafka's for everyone, the input's (Schema Registry) for ingest, the
adapter's for its sink. auto-trace checks the same at start-up (consumer.config.secret_refs), so
a pod holds only its own credentials: ingest never sees a tracker's password.
*/}}
{{- define "auto-trace.scopeRefs" -}}
{{- $config := .root.Values.config | default dict }}
{{- include "auto-trace.collectSecretRefs" (dict "node" ($config.kafka | default dict) "path" "config.kafka" "refs" .refs) }}
{{- if eq .component "ingest" }}
{{- include "auto-trace.collectSecretRefs" (dict "node" ($config.input | default dict) "path" "config.input" "refs" .refs) }}
{{- end }}
{{- if eq .component "sink" }}
{{- range $i, $adapter := $config.adapters | default list }}
{{- if eq (toString $adapter.name) (toString $.adapter) }}
{{- include "auto-trace.collectSecretRefs" (dict "node" $adapter "path" (printf "config.adapters.%d" $i) "refs" $.refs) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
"true" if a secretMounts entry (.mount) belongs in a container whose own references are .scope:
one of them lies under its mountPath, or no reference of the whole configuration does (a mount
the configuration does not name is for something else, and goes to every container).
*/}}
{{- define "auto-trace.mountWanted" -}}
{{- $dir := printf "%s/" (trimSuffix "/" (toString .mount.mountPath)) }}
{{- $all := dict }}
{{- include "auto-trace.collectSecretRefs" (dict "node" (.root.Values.config | default dict) "path" "config" "refs" $all) }}
{{- $named := false }}
{{- range $ref, $_ := $all }}
{{- if hasPrefix (printf "file:%s" $dir) $ref }}
{{- $named = true }}
{{- end }}
{{- end }}
{{- $mine := false }}
{{- range $ref, $_ := .scope }}
{{- if hasPrefix (printf "file:%s" $dir) $ref }}
{{- $mine = true }}
{{- end }}
{{- end }}
{{- if or $mine (not $named) }}true{{ end }}
{{- end }}

{{/*
Environment of an auto-trace container: the secretEnv entries its own work refers to (.scope,
from auto-trace.scopeRefs), and those the configuration does not name at all (for something
else, e.g. a cloud SDK's credentials: every container gets them); then extraEnv.
*/}}
{{- define "auto-trace.env" -}}
{{- $all := dict }}
{{- include "auto-trace.collectSecretRefs" (dict "node" (.root.Values.config | default dict) "path" "config" "refs" $all) }}
{{- range $name, $ref := .root.Values.secretEnv }}
{{- $key := printf "env:%s" $name }}
{{- if or (hasKey $.scope $key) (not (hasKey $all $key)) }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ required (printf "secretEnv.%s.secretName is required" $name) $ref.secretName | quote }}
      key: {{ required (printf "secretEnv.%s.key is required" $name) $ref.key | quote }}
      {{- if hasKey $ref "optional" }}
      optional: {{ $ref.optional }}
      {{- end }}
{{- end }}
{{- end }}
{{- with .root.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- with .extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volume mounts of an auto-trace container (secret mounts as auto-trace.mountWanted says). */}}
{{- define "auto-trace.volumeMounts" -}}
- name: config
  mountPath: {{ include "auto-trace.configDir" .root }}
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- range $name, $mount := .root.Values.secretMounts }}
{{- if include "auto-trace.mountWanted" (dict "root" $.root "mount" $mount "scope" $.scope) }}
- name: secret-{{ $name }}
  mountPath: {{ required (printf "secretMounts.%s.mountPath is required" $name) $mount.mountPath | quote }}
  readOnly: true
{{- end }}
{{- end }}
{{- with .root.Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- with .extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volumes of an auto-trace pod; .configMap names the ConfigMap holding config.yaml. */}}
{{- define "auto-trace.volumes" -}}
- name: config
  configMap:
    name: {{ .configMap }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .root.Values.tmpSizeLimit | quote }}
{{- range $name, $mount := .root.Values.secretMounts }}
{{- if include "auto-trace.mountWanted" (dict "root" $.root "mount" $mount "scope" $.scope) }}
- name: secret-{{ $name }}
  secret:
    secretName: {{ required (printf "secretMounts.%s.secretName is required" $name) $mount.secretName | quote }}
    defaultMode: {{ $mount.defaultMode | default 0440 }}
    {{- with $mount.items }}
    items:
      {{- toYaml . | nindent 6 }}
    {{- end }}
{{- end }}
{{- end }}
{{- with .root.Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- with .extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}
