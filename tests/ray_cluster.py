"""A two-node Ray cluster on this machine's loopback, for tests/test_search.py: `python ray_cluster.py` starts a
head and a second node (each a real raylet process with 1 CPU, both on 127.0.0.1 and listening there only),
prints the head's address, and shuts both down when its stdin closes.

Ray's own multi-node test utility (`ray.cluster_utils.Cluster`) starts them: `ray start --address` cannot put a
second node on 127.0.0.1 (it swaps loopback for the machine's routable address, and with that turned off it
refuses to join), while Ray's nodes started here are the same processes `ray start` runs.
"""

import os
import sys

os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")

from ray.cluster_utils import Cluster  # after the environment Ray reads at import

cluster = Cluster(initialize_head=True, shutdown_at_exit=True,
                  head_node_args={"num_cpus": 1, "object_store_memory": 128 * 2**20, "include_dashboard": False})
cluster.add_node(num_cpus=1, object_store_memory=128 * 2**20)
cluster.wait_for_nodes()
print(cluster.address, flush=True)
sys.stdin.read()
cluster.shutdown()
