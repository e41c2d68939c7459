"""A throwaway local stack of real servers for tests and the demo.

This machine has no Docker engine, so there is no kind or k3d: devstack starts etcd,
kube-apiserver (and kube-controller-manager for garbage collection and the node lifecycle),
PostgreSQL and Redis as plain processes on free loopback ports in a temporary directory, and
a node — containerd, runc, kubelet and kube-scheduler (``node.py``) — that runs the
project's image as real Pods; everything is stopped by PID. The same code serves the pytest
fixtures, ``make stack-up`` and ``make demo``. It is the test harness: it stays out of the
wheel and the image, and is imported from the repository checkout.
"""
