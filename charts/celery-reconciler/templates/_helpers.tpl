{{/* Names and labels shared by every template. */}}

{{- define "celery-reconciler.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name: release name + chart name, unless the release name already contains it.
Truncated to 63 characters because some Kubernetes name fields are limited to that.
*/}}
{{- define "celery-reconciler.fullname" -}}
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

{{- define "celery-reconciler.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object of the release. */}}
{{- define "celery-reconciler.labels" -}}
helm.sh/chart: {{ include "celery-reconciler.chart" . }}
app.kubernetes.io/name: {{ include "celery-reconciler.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: celery-reconciler
{{- end }}

{{/* Labels that select the operator pods; never change them (Deployment selectors are immutable). */}}
{{- define "celery-reconciler.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "celery-reconciler.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "celery-reconciler.operator.labels" -}}
{{ include "celery-reconciler.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "celery-reconciler.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "celery-reconciler.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "celery-reconciler.peeringName" -}}
{{- default (include "celery-reconciler.fullname" .) .Values.peering.name }}
{{- end }}

{{- define "celery-reconciler.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
A CRD from files/crds/ (the one source) with the release's labels and, when crds.keep,
helm.sh/resource-policy: keep. Call with (dict "root" $ "file" "files/crds/x.yaml").
*/}}
{{- define "celery-reconciler.crd" -}}
{{- $crd := .root.Files.Get .file | fromYaml }}
{{- $meta := dict "labels" (include "celery-reconciler.labels" .root | fromYaml) }}
{{- if .root.Values.crds.keep }}
{{- $_ := set $meta "annotations" (dict "helm.sh/resource-policy" "keep") }}
{{- end }}
{{- $_ := set $crd "metadata" (mergeOverwrite (deepCopy $crd.metadata) $meta) }}
{{- toYaml $crd }}
{{- end }}

{{/*
RBAC rules the operator needs inside each namespace it serves; a ClusterRole grants them
everywhere (watch.namespaces empty), a Role in each listed namespace otherwise.
Nothing here is for convenience: each rule names the code that uses it.
*/}}
{{- define "celery-reconciler.rbac.namespacedRules" -}}
# kopf lists and watches policies and patches them (finalizer, last-handled annotations);
# kube.remove_policy_annotation patches away the sweep-now / retry-dead annotations.
- apiGroups: [celery-reconciler.io]
  resources: [processingpolicies]
  verbs: [list, watch, patch]
# kube.patch_policy_status: conditions, observedGeneration, lastSweepTime.
- apiGroups: [celery-reconciler.io]
  resources: [processingpolicies/status]
  verbs: [patch]
# kube.write_processing_status patches, and creates on the first sweep. It sets an owner
# reference, which clusters with the OwnerReferencesPermissionEnforcement admission plugin
# allow only to who may delete the object; blockOwnerDeletion is false, so no finalizers
# right on the policy is needed.
- apiGroups: [celery-reconciler.io]
  resources: [processingstatuses]
  verbs: [create, patch, delete]
# DSN and broker URL are read by name when a sweep needs them: GET only, never list/watch,
# so the operator cannot enumerate or stream the namespace's other Secrets.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
# Pod-restart hooks (kube.watch_worker_pods): list, then watch, a policy's worker pods; get
# one by name (kube.look_up_worker_pod) to confirm that a silent worker's Pod is gone.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
# kube.post_event and kopf's own error events: core/v1 Events, created only.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end }}

{{/* kopf peering: watch the peering object and patch this replica's heartbeat into it. */}}
{{- define "celery-reconciler.rbac.peeringRule" -}}
- apiGroups: [kopf.dev]
  resources: [{{ . }}]
  verbs: [list, watch, patch]
{{- end }}

{{/* kopf discovers CRDs (and notices them being added or removed) by watching them. */}}
{{- define "celery-reconciler.rbac.crdRule" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- end }}
