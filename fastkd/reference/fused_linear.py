"""The fused linear + distillation loss, chunked as the kernels' path, each chunk's rows by the reference's closed
forms (`fastkd.fused_linear.reference_rows`; a sparse teacher's: `fastkd.reference.sparse.sparse_kd_rows_and_grad`):
no `N x V` tensor on this path either. The maths and the chunk loop are in `fastkd/fused_linear.py`."""
from __future__ import annotations

from .. import fused_linear as chunked


def fused_linear_distill_terms(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None,
                               *, loss="forward_kl", beta=0.5, temperature=1.0, ignore_index=-100, ce_weight=0.0,
                               kd_weight=1.0, student_bias=None, teacher_bias=None, teacher_logits=None,
                               teacher_topk=None, tail="renormalize", student_softcap=None, teacher_softcap=None,
                               vocab_mismatch="error", num_items_in_batch=None, chunk_size=None):
    """`(loss, [kd_weight * D, ce_weight * CE])`, the terms not differentiable (`fused_linear_distill_terms`)."""
    return chunked.fused_linear_distill_terms(
        chunked.reference_rows, student_hidden, student_weight, teacher_hidden, teacher_weight, labels, loss=loss,
        beta=beta, temperature=temperature, ignore_index=ignore_index, ce_weight=ce_weight, kd_weight=kd_weight,
        student_bias=student_bias, teacher_bias=teacher_bias, teacher_logits=teacher_logits,
        teacher_topk=teacher_topk, tail=tail, student_softcap=student_softcap, teacher_softcap=teacher_softcap,
        vocab_mismatch=vocab_mismatch, num_items_in_batch=num_items_in_batch, chunk_size=chunk_size)


def fused_linear_distill_loss(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None,
                              *, loss="forward_kl", beta=0.5, temperature=1.0, ignore_index=-100, ce_weight=0.0,
                              kd_weight=1.0, student_bias=None, teacher_bias=None, teacher_logits=None,
                              teacher_topk=None, tail="renormalize", student_softcap=None, teacher_softcap=None,
                              vocab_mismatch="error", num_items_in_batch=None, chunk_size=None):
    """`kd_weight * D + ce_weight * CE` of the logits `softcap(hidden @ weight.T + bias)` (`fastkd.fused_linear`)."""
    return fused_linear_distill_terms(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, loss=loss, beta=beta,
        temperature=temperature, ignore_index=ignore_index, ce_weight=ce_weight, kd_weight=kd_weight,
        student_bias=student_bias, teacher_bias=teacher_bias, teacher_logits=teacher_logits,
        teacher_topk=teacher_topk, tail=tail, student_softcap=student_softcap, teacher_softcap=teacher_softcap,
        vocab_mismatch=vocab_mismatch, num_items_in_batch=num_items_in_batch, chunk_size=chunk_size)[0]
