"""A cluster of gateways on one Redis (``[cluster] redis_url``).

Records (``tables``, ``replica``, ``recordlog``, ``follower``, ``store``,
``node``): Redis holds the truth, each node's LMDB is a replica kept current
from a stream of changes. ``membership``: the live nodes. See docs/cluster.md.
"""
