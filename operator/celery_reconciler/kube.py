"""All Kubernetes I/O of the operator that kopf does not do for us.

kopf watches and patches the objects its handlers are attached to; everything else —
reading the Secrets a policy names, writing the ProcessingStatus object, patching a policy's
status from a long-running loop, watching the worker pods — goes through this module, so
the handlers stay thin and the API calls (and the RBAC they need) are listed in one place:

    secrets                         get
    processingstatuses              create, patch
    processingpolicies/status       patch
    processingpolicies              patch   (to clear the sweep-now / retry-dead annotations)
    pods                            list, watch   (the per-policy worker pod watch)
    events                          create

The ``celery-reconciler`` CLI uses the same module with the person's own credentials, found
the way kubectl finds them (``cluster_like_kubectl``), and needs: processingpolicies get,
list, patch; processingstatuses get, list; secrets get (``explain`` only).

The official client is synchronous; callers in the event loop use ``asyncio.to_thread``.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import kubernetes
import urllib3

from celery_reconciler import planning, watching
from celery_reconciler import policy as policy_module

logger = logging.getLogger(__name__)

GROUP = "celery-reconciler.io"
VERSION = "v1alpha1"
POLICIES = "processingpolicies"
STATUSES = "processingstatuses"


class SecretNotFound(Exception):
    """The Secret, or the key in it, that a policy names does not exist (yet)."""


class SecretInvalid(Exception):
    """A Secret's value is not what its spec field needs (not UTF-8 text, not a DSN or URL).

    The message names the Secret and key, never any of the value."""


class KubernetesUnavailable(Exception):
    """The API server refused or failed a call the operator needs."""


class PolicyGone(KubernetesUnavailable):
    """The ProcessingPolicy (or its namespace) no longer exists: writing its status again
    can never succeed, so the writer drops it instead of retrying."""


# Every request of the operator has a deadline, (connect, read) in seconds: a half-open
# connection to the API server must fail the call — a condition and a retry — rather than
# hang a policy's loop in a thread kopf cannot cancel.
REQUEST_TIMEOUT_SECONDS = (5.0, 20.0)


@dataclasses.dataclass(frozen=True)
class WorkerPod:
    name: str
    uid: str
    containers: tuple[planning.ContainerStatus, ...] = ()
    phase: str | None = None
    node_name: str | None = None


API_CONNECTION_POOL_SIZE = 64

# Set by the CLI (``use_api_client``): a client from an explicit kubeconfig replaces the
# operator's in-cluster-first one for every function of this module.
_selected_client: kubernetes.client.ApiClient | None = None


@functools.cache
def api_client() -> kubernetes.client.ApiClient:
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    configuration = kubernetes.client.Configuration.get_default_copy()
    # Many policies' loops call the API from as many threads at once (and each pod watch
    # holds a connection): a pool sized for the CPU count (5 per core) would only close
    # and reopen connections, warning each time.
    configuration.connection_pool_maxsize = API_CONNECTION_POOL_SIZE
    return kubernetes.client.ApiClient(configuration)


def _client() -> kubernetes.client.ApiClient:
    return _selected_client or api_client()


def _core() -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(_client())


def _custom() -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(_client())


# Secrets read within this long are answered from memory: hundreds of policies naming one
# Secret would otherwise read it twice per sweep each. A created, fixed or rotated Secret
# still shows within seconds.
SECRET_MAX_AGE_SECONDS = 10.0
_secrets_read: dict[tuple[str, str], tuple[float, dict[str, str] | None]] = {}


def read_secret_value(
    *, namespace: str, name: str, key: str, field: str, max_age_seconds: float = 0.0
) -> str:
    """The decoded value of one key of a Secret; errors name the spec field to fix. A read
    of the same Secret younger than ``max_age_seconds`` (the operator's loops) is reused."""
    data = _secret_data(namespace=namespace, name=name, max_age_seconds=max_age_seconds)
    if data is None:
        raise SecretNotFound(
            f'secret "{name}" not found in namespace "{namespace}" — create it or fix {field}'
        )
    if key not in data:
        raise SecretNotFound(
            f'secret "{name}" in namespace "{namespace}" has no key "{key}" — add it or fix {field}'
        )
    try:
        return base64.b64decode(data[key]).decode()
    except UnicodeDecodeError:
        raise SecretInvalid(
            f'the value of key "{key}" of secret "{name}" in namespace "{namespace}" is not '
            f"UTF-8 text — store the plain value under that key, or fix {field}"
        ) from None


def _secret_data(*, namespace: str, name: str, max_age_seconds: float) -> dict[str, str] | None:
    """The Secret's data, None when it does not exist; failures to ask are not kept.

    When the API server does not answer (unreachable, 5xx, 429) the last value read stands:
    the work is in the database, and a control-plane outage must not stop the sweeps that
    already know their credentials (a chaos run restarting the apiserver stalled every
    sweep on this read). A Secret never read, or read as missing, still fails."""
    seen = _secrets_read.get((namespace, name))
    if seen is not None and time.monotonic() - seen[0] < max_age_seconds:
        return seen[1]
    data: dict[str, str] | None
    doing = f'reading secret "{name}" in namespace "{namespace}"'
    try:
        secret = _core().read_namespaced_secret(
            name, namespace, _request_timeout=REQUEST_TIMEOUT_SECONDS
        )
        data = dict(secret.data or {})
    except kubernetes.client.ApiException as error:
        if error.status == 404:
            data = None
        else:
            failure = KubernetesUnavailable(f"{doing} failed: HTTP {error.status} {error.reason}")
            if (error.status or 0) >= 500 or error.status == 429:
                return _last_known_secret(seen, failure, namespace=namespace, name=name)
            raise failure from None
    except (urllib3.exceptions.HTTPError, OSError) as error:
        failure = _unreachable(error, doing=doing)
        return _last_known_secret(seen, failure, namespace=namespace, name=name)
    _secrets_read[(namespace, name)] = (time.monotonic(), data)
    return data


# When each Secret's stale value was last said to be in use: once a minute is enough.
_stale_secret_warned: dict[tuple[str, str], float] = {}
STALE_SECRET_WARNING_SECONDS = 60.0


def _last_known_secret(
    seen: tuple[float, dict[str, str] | None] | None,
    failure: KubernetesUnavailable,
    *,
    namespace: str,
    name: str,
) -> dict[str, str]:
    if seen is None or seen[1] is None:
        raise failure
    now = time.monotonic()
    if now - _stale_secret_warned.get((namespace, name), -STALE_SECRET_WARNING_SECONDS) >= (
        STALE_SECRET_WARNING_SECONDS
    ):
        _stale_secret_warned[(namespace, name)] = now
        logger.warning(
            "%s; using its value read %.0f s ago until the API server answers",
            failure,
            now - seen[0],
        )
    return seen[1]


def secret_value_description(*, namespace: str, name: str, key: str, field: str) -> str:
    """How errors about a Secret's value name it: where it is, never what it says."""
    return f'the value of key "{key}" of secret "{name}" in namespace "{namespace}" ({field})'


def patch_policy_status(*, namespace: str, name: str, status: Mapping[str, Any]) -> None:
    _call(
        _custom().patch_namespaced_custom_object_status,
        GROUP,
        VERSION,
        namespace,
        POLICIES,
        name,
        {"status": dict(status)},
        gone=f"ProcessingPolicy {namespace}/{name} no longer exists",
    )


def write_processing_status(
    *, namespace: str, name: str, owner_uid: str, status: Mapping[str, Any]
) -> None:
    """Create or update the ProcessingStatus named after its policy, owned by it (so it is
    garbage-collected with the policy)."""
    try:
        _custom().patch_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            STATUSES,
            name,
            {"status": dict(status)},
            _request_timeout=REQUEST_TIMEOUT_SECONDS,
        )
        return
    except kubernetes.client.ApiException as error:
        if error.status != 404:
            raise KubernetesUnavailable(
                f"updating ProcessingStatus {namespace}/{name} failed: HTTP {error.status}"
            ) from None
    except (urllib3.exceptions.HTTPError, OSError) as error:
        raise _unreachable(error, doing=f"updating ProcessingStatus {namespace}/{name}") from None
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ProcessingStatus",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "celery-reconciler"},
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "ProcessingPolicy",
                    "name": name,
                    "uid": owner_uid,
                    "controller": True,
                    "blockOwnerDeletion": False,
                }
            ],
        },
        "status": dict(status),
    }
    _call(
        _custom().create_namespaced_custom_object,
        GROUP,
        VERSION,
        namespace,
        STATUSES,
        body,
        gone=f"the namespace of ProcessingPolicy {namespace}/{name} is gone",
    )


def pod_from_body(body: Mapping[str, Any]) -> WorkerPod:
    """A WorkerPod from a raw pod body (snake_case from the client, camelCase from kopf)."""
    metadata = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    statuses = status.get("containerStatuses") or status.get("container_statuses") or []
    return WorkerPod(
        name=metadata.get("name", ""),
        uid=metadata.get("uid", ""),
        phase=status.get("phase"),
        containers=tuple(_container_status(raw) for raw in statuses),
        node_name=spec.get("nodeName") or spec.get("node_name"),
    )


def look_up_worker_pod(*, namespace: str, name: str) -> planning.PodLookup:
    """The Pod a silent worker process said it runs in, read by name (``get`` on pods).

    A 404 is an answer (the Pod object is gone: its processes are too); any other failure
    (forbidden, unreachable) proves nothing and is returned as such, never raised."""
    try:
        raw = _core().read_namespaced_pod(name, namespace, _request_timeout=REQUEST_TIMEOUT_SECONDS)
    except kubernetes.client.ApiException as error:
        if error.status == 404:
            return planning.PodLookup(found=False)
        hint = " — grant the operator get on pods" if error.status == 403 else ""
        return planning.PodLookup(
            found=False, failure=f"reading it fails with HTTP {error.status} {error.reason}{hint}"
        )
    except (urllib3.exceptions.HTTPError, OSError) as error:
        return planning.PodLookup(
            found=False, failure=f"the API server does not answer ({_network_reason(error)})"
        )
    pod = pod_from_body(raw.to_dict())
    return planning.PodLookup(
        found=True,
        uid=pod.uid,
        phase=pod.phase,
        node_name=pod.node_name,
        containers=pod.containers,
    )


def _container_status(raw: Mapping[str, Any]) -> planning.ContainerStatus:
    state = raw.get("state") or {}
    running = state.get("running") or {}
    last_state = raw.get("lastState") or raw.get("last_state") or {}
    # The kubelet reports the instance that ended last (while none runs) in ``state`` and
    # the one before the running or waiting instance in ``lastState``.
    ended = [
        terminated
        for terminated in (state.get("terminated"), last_state.get("terminated"))
        if terminated
    ]
    ended_ids = tuple(
        identifier
        for identifier in (_container_id(terminated) for terminated in ended)
        if identifier
    )
    ended_starts = [
        _timestamp(terminated.get("startedAt") or terminated.get("started_at"))
        for terminated in ended
    ]
    return planning.ContainerStatus(
        name=str(raw.get("name", "")),
        restart_count=int(raw.get("restartCount", raw.get("restart_count", 0)) or 0),
        container_id=_container_id(raw),
        started_at=_timestamp(running.get("startedAt") or running.get("started_at")),
        ended_ids=ended_ids,
        ended_started_at=max((start for start in ended_starts if start), default=None),
    )


def _container_id(raw: Mapping[str, Any]) -> str | None:
    """A container instance's id without its runtime scheme (``containerd://``)."""
    value = raw.get("containerID") or raw.get("container_id") or ""
    return str(value).split("://", 1)[-1] or None


def _timestamp(value: object) -> datetime.datetime | None:
    """An API timestamp: a datetime from the client's models, RFC 3339 text from a watch."""
    if isinstance(value, datetime.datetime):
        return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)
    if isinstance(value, str) and value:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return None


class InvalidLabelSelector(ValueError):
    """A selector part that is not Kubernetes label syntax; never sent to the API."""


def label_selector(workers: policy_module.Workers) -> str:
    """The worker selector as the API's ``labelSelector`` query string.

    The list and watch calls take only a string, so this is the one place that writes it:
    each key and value is checked against the Kubernetes label syntax first (which has no
    ``,``, ``=``, ``!``, ``(``, space or quote), so no part can change the selector's
    meaning — a key such as ``app,tier!=x`` raises instead of widening the watch.
    """
    terms = []
    for key, value in workers.match_labels:
        _check_label(key, value=value)
        terms.append(f"{key}={value}")
    for requirement in workers.match_expressions:
        for value in requirement.values:
            _check_label(requirement.key, value=value)
        _check_label(requirement.key)
        values = ",".join(requirement.values)
        match requirement.operator, bool(requirement.values):
            case "In", True:
                terms.append(f"{requirement.key} in ({values})")
            case "NotIn", True:
                terms.append(f"{requirement.key} notin ({values})")
            case "Exists", False:
                terms.append(requirement.key)
            case "DoesNotExist", False:
                terms.append(f"!{requirement.key}")
            case _:
                raise InvalidLabelSelector(
                    f"operator {requirement.operator!r} with {len(requirement.values)} values "
                    f"on key {requirement.key!r} is not a label selector requirement"
                )
    return ",".join(terms)


def _check_label(key: str, *, value: str | None = None) -> None:
    if not policy_module.is_label_key(key):
        raise InvalidLabelSelector(f"{key!r} is not a label key")
    if value is not None and not policy_module.is_label_value(value):
        raise InvalidLabelSelector(f"{value!r} is not a label value (key {key!r})")


def _call(method: Any, *args: Any, gone: str | None = None, **kwargs: Any) -> Any:
    """One API request of the operator, with a deadline; every failure is
    ``KubernetesUnavailable`` (an HTTP error, or no answer at all) — with ``gone`` given, a
    404 is ``PolicyGone`` with that message."""
    try:
        return method(*args, _request_timeout=REQUEST_TIMEOUT_SECONDS, **kwargs)
    except kubernetes.client.ApiException as error:
        if gone is not None and error.status == 404:
            raise PolicyGone(gone) from None
        raise KubernetesUnavailable(
            f"Kubernetes API call {getattr(method, '__name__', method)} failed: "
            f"HTTP {error.status} {error.reason}"
        ) from None
    except (urllib3.exceptions.HTTPError, OSError) as error:
        doing = f"Kubernetes API call {getattr(method, '__name__', method)}"
        raise _unreachable(error, doing=doing) from None


def _unreachable(error: Exception, *, doing: str) -> KubernetesUnreachable:
    """No answer from the API server (refused, reset, timed out): the message names the
    server, never the token."""
    return KubernetesUnreachable(
        f"{doing} failed: no answer from the Kubernetes API server at "
        f"{_client().configuration.host} ({_network_reason(error)}); retrying"
    )


def watch_worker_pods(
    *,
    namespace: str,
    label_selector: str,
    on_event: Callable[[str, WorkerPod], None],
    on_health: Callable[[str | None], None],
    stopping: threading.Event,
) -> None:
    """Stream ADDED/MODIFIED/DELETED pod events of one worker selector until ``stopping``.

    A watch per label selector (rather than one kopf handler for every pod in the cluster)
    keeps the operator's pod traffic, and its RBAC, to the pods it cares about; policies
    that name the same selector share it (``podwatch``). Runs in a thread: the official
    client's watch is blocking. Every (re)list replays the current pods as ADDED, so the
    caller's baseline survives watch expiry (``watching``).

    ``on_health`` hears what the policy's status must say: a failure text while the API
    refuses the listing or the watch (HTTP 400, 403...), None once a watch is accepted
    again — a watch that cannot run must not leave the policy saying Ready. A dropped
    connection is only retried: watches are cut routinely.
    """
    rights = "grant the operator list and watch on pods"

    def on_refused(refusal: watching.Refused | None) -> None:
        if refusal is None:
            on_health(None)
            return
        on_health(
            f"watching worker pods (selector {label_selector!r}) fails with {refusal.text()}"
            + (f": {rights}" if refusal.status == 403 else "")
            + "; until it works, dead workers are found by heartbeats and leases only, "
            "in minutes instead of seconds"
        )

    watching.list_then_watch(
        list_method=_core().list_namespaced_pod,
        namespace=namespace,
        label_selector=label_selector,
        what=f"pods {label_selector!r} in namespace {namespace}",
        consequence="until it works, workers' heartbeats alone tell the operator which died",
        rights=rights,
        on_event=lambda event_type, pod, _: on_event(event_type, pod_from_body(pod.to_dict())),
        on_refused=on_refused,
        stopping=stopping,
    )


def post_event(
    *,
    namespace: str,
    policy_name: str,
    policy_uid: str,
    event_type: str,
    reason: str,
    message: str,
) -> None:
    """A core/v1 Event on the policy, so ``kubectl describe processingpolicy`` tells the story.

    Best effort: an Event that cannot be written must never stop a sweep.
    """
    post_event_on(
        kubernetes.client.V1ObjectReference(
            api_version=f"{GROUP}/{VERSION}",
            kind="ProcessingPolicy",
            name=policy_name,
            namespace=namespace,
            uid=policy_uid,
        ),
        event_type=event_type,
        reason=reason,
        message=message,
    )


def post_event_on(
    involved: kubernetes.client.V1ObjectReference,
    *,
    event_type: str,
    reason: str,
    message: str,
    missing_right_hint: str = "grant the operator create on events",
) -> None:
    """A core/v1 Event on ``involved`` (in its namespace). Best effort: logged, never
    raised — an Event is never worth failing a sweep or a listing over."""
    now = datetime.datetime.now(datetime.UTC)
    namespace = str(involved.namespace)
    body = kubernetes.client.CoreV1Event(
        metadata=kubernetes.client.V1ObjectMeta(
            generate_name=f"{involved.name}.", namespace=namespace
        ),
        involved_object=involved,
        type=event_type,
        reason=reason,
        message=message[:1024],
        first_timestamp=now,
        last_timestamp=now,
        count=1,
        source=kubernetes.client.V1EventSource(component="celery-reconciler"),
        reporting_component="celery-reconciler",
        reporting_instance=os.environ.get("HOSTNAME", "celery-reconciler"),
    )
    try:
        _core().create_namespaced_event(namespace, body, _request_timeout=REQUEST_TIMEOUT_SECONDS)
    except kubernetes.client.ApiException as error:
        logger.warning(
            "could not post Event %s on %s %s/%s: HTTP %s %s%s",
            reason,
            involved.kind,
            namespace,
            involved.name,
            error.status,
            error.reason,
            f" — {missing_right_hint}" if error.status == 403 else "",
        )
    except Exception as error:  # an Event is never worth failing a sweep over
        logger.warning("could not post Event %s: %s", reason, type(error).__name__)


# --- the CLI: a person's credentials, found the way kubectl finds them ----------------------

IN_CLUSTER_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
DEFAULT_KUBECONFIG = "~/.kube/config"
CLI_REQUEST_TIMEOUT_SECONDS = 30.0


class KubeconfigInvalid(Exception):
    """No usable Kubernetes configuration: the message says where we looked."""


class KubernetesUnreachable(KubernetesUnavailable):
    """The API server did not answer at all (closed port, wrong address, network down)."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The API server a CLI command talks to, and the namespace a bare command means."""

    client: kubernetes.client.ApiClient
    server: str
    namespace: str
    source: str  # where the configuration came from, for error messages


def cluster_like_kubectl(
    *,
    kubeconfig: str | None = None,
    context: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Cluster:
    """Load credentials in kubectl's order: ``--kubeconfig``, ``$KUBECONFIG`` (a list of
    files, merged), ``~/.kube/config``, then the pod's ServiceAccount (in-cluster).

    The operator's ``api_client`` tries in-cluster first, which is right for a Deployment
    but wrong for a person whose shell happens to run in a pod with a kubeconfig.
    The namespace is the context's, else the pod's own (in-cluster), else ``default``.
    """
    env = os.environ if environ is None else environ
    configuration = kubernetes.client.Configuration()
    path, source = kubeconfig, "--kubeconfig"
    if not path and env.get("KUBECONFIG"):
        path, source = env["KUBECONFIG"], "KUBECONFIG"
    if not path and os.path.exists(os.path.expanduser(DEFAULT_KUBECONFIG)):
        path, source = os.path.expanduser(DEFAULT_KUBECONFIG), DEFAULT_KUBECONFIG
    if path:
        try:
            kubernetes.config.load_kube_config(
                config_file=path,
                context=context,
                client_configuration=configuration,
                persist_config=False,
            )
            contexts, active = kubernetes.config.list_kube_config_contexts(config_file=path)
        except (kubernetes.config.ConfigException, OSError, ValueError) as error:
            raise KubeconfigInvalid(
                f"cannot use the kubeconfig {path} (from {source}): {error} — fix it, or "
                "point --kubeconfig or KUBECONFIG at a working one"
            ) from None
        if context is not None:
            active = next((c for c in contexts if c.get("name") == context), active)
        namespace = (active.get("context") or {}).get("namespace") or "default"
    else:
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        except kubernetes.config.ConfigException:
            raise KubeconfigInvalid(
                "no Kubernetes configuration found: pass --kubeconfig, set KUBECONFIG or "
                f"create {DEFAULT_KUBECONFIG} (inside a pod, its ServiceAccount is used)"
            ) from None
        source = "in-cluster ServiceAccount"
        try:
            with open(IN_CLUSTER_NAMESPACE_FILE) as file:
                namespace = file.read().strip() or "default"
        except OSError:
            namespace = "default"
    return Cluster(
        client=kubernetes.client.ApiClient(configuration),
        server=str(configuration.host),
        namespace=namespace,
        source=source,
    )


def use_api_client(client: kubernetes.client.ApiClient | None) -> None:
    """Route every call of this module through ``client`` (the CLI's credentials);
    ``None`` goes back to the operator's own ``api_client()``."""
    global _selected_client
    _selected_client = client


def get_policy(*, namespace: str, name: str) -> dict[str, Any] | None:
    """The ProcessingPolicy object, or ``None`` when it does not exist."""
    return _get_custom(namespace=namespace, plural=POLICIES, name=name)


def get_processing_status(*, namespace: str, name: str) -> dict[str, Any] | None:
    """The ProcessingStatus object of a policy, or ``None`` before its first sweep."""
    return _get_custom(namespace=namespace, plural=STATUSES, name=name)


def list_policies(*, namespace: str | None) -> list[dict[str, Any]]:
    """ProcessingPolicies of one namespace, or of all (``namespace=None``)."""
    return _list_custom(namespace=namespace, plural=POLICIES)


def list_processing_statuses(*, namespace: str | None) -> list[dict[str, Any]]:
    return _list_custom(namespace=namespace, plural=STATUSES)


def annotate_policy(
    *, namespace: str, name: str, annotations: Mapping[str, str | None]
) -> dict[str, Any]:
    """Set (or, with ``None``, remove) annotations of a policy by a merge patch."""
    body = {"metadata": {"annotations": dict(annotations)}}
    result: dict[str, Any] = _cli_call(
        _custom().patch_namespaced_custom_object,
        GROUP,
        VERSION,
        namespace,
        POLICIES,
        name,
        body,
        doing=f"annotating processingpolicy {namespace}/{name}",
    )
    return result


def _get_custom(*, namespace: str, plural: str, name: str) -> dict[str, Any] | None:
    try:
        result: dict[str, Any] = _cli_call(
            _custom().get_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            plural,
            name,
            doing=f"reading {plural} {namespace}/{name}",
            not_found_is_error=False,
        )
    except _NotFound:
        return None
    return result


def _list_custom(*, namespace: str | None, plural: str) -> list[dict[str, Any]]:
    where = "every namespace" if namespace is None else f'namespace "{namespace}"'
    if namespace is None:
        listing = _cli_call(
            _custom().list_cluster_custom_object, GROUP, VERSION, plural, doing=f"listing {plural}"
        )
    else:
        listing = _cli_call(
            _custom().list_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            plural,
            doing=f"listing {plural} in {where}",
        )
    return list(listing.get("items") or [])


class _NotFound(Exception):
    pass


def _cli_call(
    method: Any, *args: Any, doing: str, not_found_is_error: bool = True, **kwargs: Any
) -> Any:
    """Call the API with a timeout; translate failures into messages a person can act on.

    Messages name the server URL, never the token (the client's headers stay inside it).
    """
    server = _client().configuration.host
    try:
        return method(*args, _request_timeout=CLI_REQUEST_TIMEOUT_SECONDS, **kwargs)
    except kubernetes.client.ApiException as error:
        if error.status == 404 and not not_found_is_error:
            raise _NotFound() from None
        raise KubernetesUnavailable(
            f"{doing} failed: HTTP {error.status} {error.reason}{_api_message(error)}"
        ) from None
    except urllib3.exceptions.HTTPError as error:
        raise KubernetesUnreachable(
            f"cannot reach the Kubernetes API server at {server} ({_network_reason(error)}) — "
            "check KUBECONFIG (or --kubeconfig) and that the cluster is running"
        ) from None


def _api_message(error: kubernetes.client.ApiException) -> str:
    """The apiserver's own explanation (e.g. which RBAC verb is missing), when it sent one."""
    if error.status == 404:
        return (
            " — the ProcessingPolicy/ProcessingStatus CRDs are not installed in this cluster: "
            "install the chart (or manifests/crds.yaml)"
        )
    try:
        message = json.loads(error.body or "{}").get("message")
    except (ValueError, AttributeError):
        message = None
    return f": {message}" if message else ""


def _network_reason(error: Exception) -> str:
    reason = str(getattr(error, "reason", None) or error)
    marker = "Failed to establish a new connection: "
    if marker in reason:
        reason = reason.split(marker, 1)[1].rstrip(")'\"")
    return reason
