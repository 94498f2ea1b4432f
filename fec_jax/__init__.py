"""fec-jax: FEC (Neural Clustering based Visual Representation Learning, CVPR 2024) in JAX/Flax."""

from fec_jax import fpn
from fec_jax.checkpoint import load_pretrained
from fec_jax.fpn import SemanticFPN
from fec_jax.model import (
    FEC,
    VARIANTS,
    cluster_assignments,
    create_model,
    init_variables,
    list_models,
)

__all__ = [
    "FEC",
    "SemanticFPN",
    "VARIANTS",
    "cluster_assignments",
    "create_model",
    "fpn",
    "init_variables",
    "list_models",
    "load_pretrained",
]
