"""fastkd on torch.distributed: vocabulary-parallel logit losses, global-batch relational losses, top-k across
vocabulary shards.

The public losses take `process_group=` (`fastkd.functional`); this package holds what they are built from:
the collectives with their autograd conventions (`collectives`), the check of each rank's vocabulary slice
(`layout`), the vocabulary-parallel losses themselves (`vocab_parallel`) and the top-k of a sharded
vocabulary (`topk`).
"""
from .collectives import copy_to_ranks, gather_rows, max_over_ranks, sum_over_ranks
from .layout import VocabSlice, check_group, vocab_slice
from .topk import sharded_topk

__all__ = ["VocabSlice", "check_group", "copy_to_ranks", "gather_rows", "max_over_ranks", "sharded_topk",
           "sum_over_ranks", "vocab_slice"]
