"""torch.distributed plumbing: vocab-parallel losses and top-k, and data-parallel counts.

- :mod:`.comm`: the collectives (each counted: :func:`comm_stats`), the collective agreement
  on a vocab split (:func:`vocab_shard`) and :func:`global_num_items` for data parallelism.
- :mod:`.vocab_parallel`: the row maths of the ``process_group=`` paths of the public ops
  (partial row statistics, one all-reduce, each rank's slice of the gradient), and
  :mod:`.kernel_rows`, the same through the fused C++ and Triton kernels' phases.
"""

from .comm import VocabShard, comm_stats, global_num_items, reset_comm_stats, vocab_shard

__all__ = ["VocabShard", "comm_stats", "global_num_items", "reset_comm_stats", "vocab_shard"]
