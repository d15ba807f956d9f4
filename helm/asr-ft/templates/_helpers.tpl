{{/*
Names, labels and the pipeline file. Object names follow k8s/README.md with the release's fullname as
prefix: for the release "asr-ft" they are exactly the plain manifests' names (asr-ft, asr-ft-orchestrator,
asr-ft-artifacts, asr-ft-pipeline, asr-ft-s3).
*/}}

{{- define "asr-ft.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release> when it already contains the chart name, else <release>-<chart>; at most 40 characters so
that "<fullname>-orchestrator" and the other suffixed names stay valid DNS labels. */}}
{{- define "asr-ft.fullname" -}}
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

{{- define "asr-ft.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object; callers add app.kubernetes.io/component. app.kubernetes.io/name is "asr-ft"
as on the step Jobs the orchestrator creates, so one selector finds them all. */}}
{{- define "asr-ft.labels" -}}
helm.sh/chart: {{ include "asr-ft.chart" . }}
app.kubernetes.io/name: {{ include "asr-ft.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "asr-ft.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "asr-ft.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "asr-ft.roleName" -}}
{{- printf "%s-orchestrator" (include "asr-ft.fullname" .) }}
{{- end }}

{{- define "asr-ft.claimName" -}}
{{- default (printf "%s-artifacts" (include "asr-ft.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{- define "asr-ft.configMapName" -}}
{{- printf "%s-pipeline" (include "asr-ft.fullname" .) }}
{{- end }}

{{- define "asr-ft.jobName" -}}
{{- printf "%s-pipeline" (include "asr-ft.fullname" .) }}
{{- end }}

{{- define "asr-ft.serveName" -}}
{{- printf "%s-serve" (include "asr-ft.fullname" .) }}
{{- end }}

{{/* What the serve Service selects: the serve pods of this release only. */}}
{{- define "asr-ft.serveSelector" -}}
app.kubernetes.io/name: {{ include "asr-ft.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: serve
{{- end }}

{{/* The Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY: the existing one, else the chart's. */}}
{{- define "asr-ft.s3SecretName" -}}
{{- default (printf "%s-s3" (include "asr-ft.fullname" .)) .Values.s3.existingSecret }}
{{- end }}

{{- define "asr-ft.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "asr-ft.gpuImage" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-cuda" $tag) .Values.image.gpuTag) }}
{{- end }}

{{/* Fail early on combinations that cannot work, with what to change. */}}
{{- define "asr-ft.check" -}}
{{- $artifacts := toString (default "" .Values.pipeline.artifacts) }}
{{- if and .Values.s3.enabled (not (hasPrefix "s3://" $artifacts)) }}
{{- fail (printf "s3.enabled is true but pipeline.artifacts is %q: set pipeline.artifacts to s3://bucket/prefix" $artifacts) }}
{{- end }}
{{- if and (hasPrefix "s3://" $artifacts) (not .Values.s3.enabled) }}
{{- fail "pipeline.artifacts is s3://…: set s3.enabled=true and s3.existingSecret (or s3.accessKeyId/secretAccessKey)" }}
{{- end }}
{{- if and (not .Values.persistence.enabled) (not (hasPrefix "s3://" $artifacts)) }}
{{- fail "persistence.enabled is false: the artifacts need a PVC or S3; set pipeline.artifacts to s3://bucket/prefix with s3.enabled=true" }}
{{- end }}
{{- if and .Values.s3.enabled (not .Values.s3.existingSecret) (not (and .Values.s3.accessKeyId .Values.s3.secretAccessKey)) }}
{{- fail "s3.enabled needs credentials: s3.existingSecret (a Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), or both s3.accessKeyId and s3.secretAccessKey" }}
{{- end }}
{{- end }}

{{/* The pipeline file the orchestrator runs: .Values.pipeline with run.executor=k8s and run.k8s =
.Values.k8s + pipeline.run.k8s + what the chart manages (wins), the artifacts path and the S3 settings. */}}
{{- define "asr-ft.pipeline" -}}
{{- $p := deepCopy .Values.pipeline }}
{{- $run := deepCopy (default dict (index $p "run")) }}
{{- $managed := dict
      "image" (include "asr-ft.image" .)
      "gpu_image" (include "asr-ft.gpuImage" .)
      "image_pull_policy" .Values.image.pullPolicy
      "pvc" (ternary (include "asr-ft.claimName" .) "" .Values.persistence.enabled)
      "mount_path" .Values.persistence.mountPath }}
{{- if .Values.imagePullSecrets }}
{{- $names := list }}
{{- range .Values.imagePullSecrets }}{{ $names = append $names .name }}{{ end }}
{{- $_ := set $managed "image_pull_secrets" $names }}
{{- end }}
{{- if .Values.s3.enabled }}
{{- $_ := set $managed "s3_secret" (include "asr-ft.s3SecretName" .) }}
{{- end }}
{{- $k8s := merge $managed (deepCopy (default dict (index $run "k8s"))) (deepCopy .Values.k8s) }}
{{- $_ := set $run "executor" "k8s" }}
{{- $_ := set $run "k8s" $k8s }}
{{- $_ := set $p "run" $run }}
{{- if not (hasPrefix "s3://" (toString (default "" $p.artifacts))) }}
{{- $_ := set $p "artifacts" .Values.persistence.mountPath }}
{{- end }}
{{- if or .Values.s3.endpointUrl .Values.s3.region }}
{{- $s3 := deepCopy (default dict (index $p "s3")) }}
{{- if .Values.s3.endpointUrl }}{{ $_ := set $s3 "endpoint_url" .Values.s3.endpointUrl }}{{ end }}
{{- if .Values.s3.region }}{{ $_ := set $s3 "region" .Values.s3.region }}{{ end }}
{{- $_ := set $p "s3" $s3 }}
{{- end }}
{{- toYaml $p }}
{{- end }}
