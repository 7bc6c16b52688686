"""The local Ray cluster the tests share: a head with no CPUs and one labelled node per site.

Started once per test session (``ray.cluster_utils.Cluster``: a few seconds and
about 1 GB), with this process connected to it as a driver before the site
nodes join (Ray refuses to remove the node its driver is attached to, and the
fault tests remove site nodes). Failure detection is fast (0.5 s health checks)
so that a removed node is noticed in about a second.
"""

from __future__ import annotations

import logging
import os
from typing import Any

SITES = ("a", "b", "c", "hub")  # every site name the behaviour tests use
LABEL = "federation/site"
OBJECT_STORE = 80 << 20  # bytes per node: enough for the payload tests, small for 2-core CI
SYSTEM_CONFIG = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}


class TestCluster:
    """The cluster, its site nodes, and a way to replace one (after a fault test removed it)."""

    def __init__(self) -> None:
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        import ray
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "object_store_memory": OBJECT_STORE,
                "include_dashboard": False,
                "_system_config": SYSTEM_CONFIG,
            },
        )
        ray.init(
            address=self.cluster.address,
            log_to_driver=False,
            logging_level=logging.WARNING,
            namespace="federation-tests",
        )
        self.nodes: dict[str, Any] = {}
        for site in SITES:
            self.add_site_node(site)
        self.cluster.wait_for_nodes()

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    def add_site_node(self, site: str) -> Any:
        """Start a node labelled for ``site`` (one CPU, a small object store)."""
        node = self.cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE, labels={LABEL: site})
        self.nodes[site] = node
        return node

    def remove_site_node(self, site: str) -> None:
        """Remove the node of ``site`` as if its machine were lost."""
        self.cluster.remove_node(self.nodes.pop(site), allow_graceful=False)

    def node_id(self, site: str) -> str:
        return str(self.nodes[site].node_id)

    def shutdown(self) -> None:
        import ray

        try:
            ray.shutdown()
        finally:
            self.cluster.shutdown()


def start_test_cluster() -> TestCluster:
    """Start the session's cluster and connect this process to it."""
    return TestCluster()
