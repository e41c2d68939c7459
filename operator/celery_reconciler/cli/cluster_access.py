"""How the cluster verbs reach the API server: with the person's own credentials, found like
kubectl finds them (``--kubeconfig``, ``$KUBECONFIG``, ``~/.kube/config``, in-cluster), in the
context's namespace unless one is named; and the policy they name, or an error that says how
to list the policies there are."""

from __future__ import annotations

import argparse
import datetime
from typing import Any

from celery_reconciler import kube
from celery_reconciler.cli import conventions


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def connect_cluster(args: argparse.Namespace) -> kube.Cluster:
    cluster = kube.cluster_like_kubectl(kubeconfig=args.kubeconfig, context=args.context)
    kube.use_api_client(cluster.client)
    return cluster


def namespace_of(args: argparse.Namespace, cluster: kube.Cluster) -> str:
    return str(args.namespace or cluster.namespace)


def existing_policy(*, namespace: str, name: str) -> dict[str, Any]:
    policy = kube.get_policy(namespace=namespace, name=name)
    if policy is None:
        raise conventions.UsageError(
            f'processingpolicy "{name}" not found in namespace "{namespace}" — list them '
            f"with: {conventions.prog_name()} status -A"
        )
    return policy


def add_cluster_arguments(parser: argparse.ArgumentParser, *, all_namespaces: bool) -> None:
    parser.add_argument(
        "--kubeconfig",
        help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, then in-cluster)",
    )
    parser.add_argument("--context", help="kubeconfig context (default: the current one)")
    scope = parser.add_mutually_exclusive_group() if all_namespaces else parser
    scope.add_argument("-n", "--namespace", help="namespace (default: the context's, else default)")
    if all_namespaces:
        scope.add_argument(
            "-A", "--all-namespaces", action="store_true", help="policies of every namespace"
        )
