"""``python -m celery_reconciler``: the same command line as the ``celery-reconciler`` script."""

import sys

from celery_reconciler import cli

sys.exit(cli.main())
