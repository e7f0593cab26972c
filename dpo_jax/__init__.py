"""dpo_jax: DPO and its family of preference losses in JAX (README.md)."""
from dpo_jax import hostmem

# DPO_JAX_CPU_MALLOC=heap must reach malloc before any library starts a thread (JAX's CPU client,
# tensorstore's pools): here, before dpo_jax imports anything else. Unset, it does nothing.
hostmem.use_heap()
