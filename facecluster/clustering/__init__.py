"""Identity clustering for the two-stage framework (Ahmadi & Dianat, JSDP 2024).

Class means (:mod:`.means`) -> partition of identities (:mod:`.kmeans`, faiss
k-means after Johnson et al., 2019) -> :class:`ClusterAssignment`
(:mod:`.assignment`), shared by training, routing and evaluation.

``assignment`` is imported first on purpose: it imports torch, so torch's
OpenMP runtime is loaded before ``kmeans`` imports faiss.
"""

from .assignment import ASSIGNMENT_FORMAT, ASSIGNMENT_VERSION, ClusterAssignment  # isort: skip
from .kmeans import METHODS, cluster_identities, dispersion, unit_rows
from .means import accumulate_class_sums, embedding_class_sums, finalize_class_means

__all__ = [
    "ASSIGNMENT_FORMAT",
    "ASSIGNMENT_VERSION",
    "METHODS",
    "ClusterAssignment",
    "accumulate_class_sums",
    "cluster_identities",
    "dispersion",
    "embedding_class_sums",
    "finalize_class_means",
    "unit_rows",
]
