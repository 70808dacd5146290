"""The reference implementations: every loss in plain, readable PyTorch.

They define what each loss computes, run on any device, and are the "torch" backend that every kernel
falls back to and is tested against. They do not validate their inputs: `fastkd.functional` does.
"""
from .attention import at_loss, attention_map
from .fused_linear import fused_linear_distill_loss, fused_linear_distill_terms
from .features import cc_loss, fsp_loss, fsp_matrix, fsp_pair_losses, hint_loss, nst_loss, pkt_loss, sp_loss
from .logits import dkd_loss, jsd_loss, kd_loss, kl_div, kl_div_loss
from .relational import pairwise_distances, rkd_angle_loss, rkd_distance_loss, rkd_loss
from .sparse import sparse_kd_loss


# Every loss `fastkd._dispatch.resolve` knows, by the name the public function asks for.
IMPLEMENTATIONS = {fn.__name__: fn for fn in (
    kd_loss, kl_div_loss, jsd_loss, dkd_loss, sparse_kd_loss, kl_div, rkd_loss, rkd_distance_loss, rkd_angle_loss,
    attention_map, at_loss, sp_loss, fsp_loss, pkt_loss, nst_loss, cc_loss, hint_loss, fused_linear_distill_loss,
    fused_linear_distill_terms)}
