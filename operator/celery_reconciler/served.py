"""Stops the operator when kopf does not serve ProcessingPolicies after its start-up.

kopf looks up the resources it serves once, as it starts, and afterwards only when a CRD
changes. If the apiserver did not list ours at that moment — for a few seconds after its
own restart it answers discovery without the custom resources — kopf logs a warning
("Unresolved resources cannot be served") and serves nothing: an operator that is live and
healthy and never sweeps again, until someone restarts it. A chaos run that restarted the
apiserver and the operator found it: operators started next to an apiserver restart
processed nothing, in every case, for as long as they ran.

So, a short while after kopf's first listing, if ProcessingPolicies are not among the
resources it watches, the operator says why and exits non-zero; the kubelet starts it again,
and that start lists them. Operators built on controller-runtime do the same when their
kinds are missing. A CRD created within the grace period (``kubectl apply -f manifests/``
starts the Deployment beside the CRDs) reaches kopf through its CRD watch, and is served.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

import kopf

# kopf's Insights is what kopf.run fills with what it serves; kopf.run takes one as an
# argument, but the class itself is not exported at the top level.
from kopf._cogs.structs.references import Insights

from celery_reconciler import kube

# Long enough for kopf's CRD watch to see CRDs created just after the operator started.
GRACE_SECONDS = 10.0

logger = logging.getLogger(__name__)


def policies_are_served(resources: Iterable[kopf.Resource]) -> bool:
    return any(r.group == kube.GROUP and r.plural == kube.POLICIES for r in resources)


def new_insights() -> Insights:
    return Insights()


async def stop_unless_policies_are_served(
    *, insights: Insights, stop: Callable[[], None], grace_seconds: float = GRACE_SECONDS
) -> None:
    await insights.ready_resources.wait()
    await asyncio.sleep(grace_seconds)
    if policies_are_served(insights.watched_resources):
        return
    logger.error(
        "kopf does not serve %s.%s: the apiserver did not list them when the operator "
        "started (it was restarting, or the CRDs are not installed), and kopf looks only "
        "once; exiting so that the next start finds them",
        kube.POLICIES,
        kube.GROUP,
    )
    stop()
