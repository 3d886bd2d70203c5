"""One script per research question (experiments/README.md)."""

import jaxstages  # noqa: F401  (first, before jax: it sets the C allocator up for XLA:CPU, jaxstages/host.py)
