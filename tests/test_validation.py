"""Bad input raises a clear ValueError/TypeError that names the argument, from `fastkd.functional` and from the
`nn.Module`s in `fastkd.losses`; backend selection errors (unknown names, FASTKD_BACKEND, unavailable kernels).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastkd
from fastkd import functional as K
from fastkd import losses as L

NAN, INF = float("nan"), float("inf")


def x(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def idx(*values):
    return torch.tensor(values)


META = "meta"
S, T = x(4, 5), x(4, 5)  # valid logits: 4 rows, 5 classes
Y = idx(0, 1, 2, 4)  # valid targets
LABELS = idx(0, -100, 2, 3)
MAP = x(2, 3, 4, 4)


def err(exc, match, fn):
    return exc, match, fn


def run_cases(cases):
    """pytest params from {id: (exception, regex, thunk)}."""
    return pytest.mark.parametrize("exc, match, fn", list(cases.values()), ids=list(cases))


# ----------------------------------------------------------------------------------------------------------
# logit losses

LOGIT_FNS = {
    "kd_loss": lambda s, t, **kw: K.kd_loss(s, t, **kw),
    "kl_div_loss": lambda s, t, **kw: K.kl_div_loss(s, t, **kw),
    "jsd_loss": lambda s, t, **kw: K.jsd_loss(s, t, **kw),
    "dkd_loss": lambda s, t, **kw: K.dkd_loss(s, t, Y, **kw),  # the logits are checked before the target
}
SHAPE_MSG = "student_logits and teacher_logits must have the same shape"
VOCAB_MSG = r"the student's vocabulary has 5 ids and the teacher's 6 .*vocab_mismatch='truncate'"

LOGIT_ERRORS = {}
for _name, _fn in LOGIT_FNS.items():
    LOGIT_ERRORS.update({
        f"{_name}-batch-mismatch": err(ValueError, SHAPE_MSG, lambda f=_fn: f(x(4, 5), x(3, 5))),
        f"{_name}-class-mismatch": err(ValueError, VOCAB_MSG, lambda f=_fn: f(x(4, 5), x(4, 6))),
        f"{_name}-int-student": err(TypeError, "student_logits must be a floating-point tensor",
                                    lambda f=_fn: f(torch.ones(4, 5, dtype=torch.long), T)),
        f"{_name}-int-teacher": err(TypeError, "teacher_logits must be a floating-point tensor",
                                    lambda f=_fn: f(S, torch.ones(4, 5, dtype=torch.int32))),
        f"{_name}-bool-teacher": err(TypeError, "teacher_logits must be a floating-point tensor",
                                     lambda f=_fn: f(S, torch.ones(4, 5, dtype=torch.bool))),
        f"{_name}-list-student": err(TypeError, "student_logits must be a torch.Tensor",
                                     lambda f=_fn: f(S.tolist(), T)),
        f"{_name}-numpy-teacher": err(TypeError, "teacher_logits must be a torch.Tensor",
                                      lambda f=_fn: f(S, T.numpy())),
        f"{_name}-meta-teacher": err(ValueError, "same device.*teacher_logits on meta",
                                     lambda f=_fn: f(S, x(4, 5, device=META))),
        f"{_name}-empty-batch": err(ValueError, "batch is empty.*student_logits", lambda f=_fn: f(x(0, 5), x(0, 5))),
        f"{_name}-zero-classes": err(ValueError, "student_logits must have at least one class",
                                     lambda f=_fn: f(x(4, 0), x(4, 0))),
        f"{_name}-0d": err(ValueError, "student_logits", lambda f=_fn: f(torch.tensor(1.0), torch.tensor(1.0))),
        f"{_name}-backend": err(ValueError, "backend must be 'auto' or one of", lambda f=_fn: f(S, T, backend="nope")),
    })
    for _bad, _exc in ((0, ValueError), (-1.0, ValueError), (NAN, ValueError), (INF, ValueError),
                       (True, TypeError), ("4", TypeError), (torch.tensor(4), TypeError), (torch.ones(3), ValueError),
                       (None, TypeError)):
        LOGIT_ERRORS[f"{_name}-temperature={_bad!r}"] = err(
            _exc, "temperature", lambda f=_fn, b=_bad: f(S, T, temperature=b))

for _name in ("kd_loss", "kl_div_loss", "jsd_loss"):
    LOGIT_ERRORS[f"{_name}-reduction"] = err(ValueError, "reduction must be one of",
                                             lambda f=LOGIT_FNS[_name]: f(S, T, reduction="avg"))
    LOGIT_ERRORS[f"{_name}-reduction-case"] = err(ValueError, "reduction must be one of",
                                                  lambda f=LOGIT_FNS[_name]: f(S, T, reduction="Mean"))

for _name in ("kl_div_loss", "jsd_loss"):
    _fn = LOGIT_FNS[_name]
    LOGIT_ERRORS.update({
        f"{_name}-float-labels": err(TypeError, "labels must be an integer tensor",
                                     lambda f=_fn: f(S, T, labels=LABELS.float())),
        f"{_name}-list-labels": err(TypeError, "labels must be a torch.Tensor",
                                    lambda f=_fn: f(S, T, labels=[0, 1, 2, 3])),
        f"{_name}-labels-too-short": err(ValueError, r"labels must have shape \(4,\)",
                                         lambda f=_fn: f(S, T, labels=idx(0, 1, 2))),
        f"{_name}-labels-2d": err(ValueError, r"labels must have shape \(2, 3\)",
                                  lambda f=_fn: f(x(2, 3, 5), x(2, 3, 5), labels=torch.zeros(6, dtype=torch.long))),
        f"{_name}-labels-transposed": err(ValueError, r"labels must have shape \(2, 3\)",
                                          lambda f=_fn: f(x(2, 3, 5), x(2, 3, 5),
                                                          labels=torch.zeros(3, 2, dtype=torch.long))),
        f"{_name}-meta-labels": err(ValueError, "same device.*labels on meta",
                                    lambda f=_fn: f(S, T, labels=LABELS.to(META))),
        f"{_name}-float-ignore-index": err(TypeError, "ignore_index must be an int",
                                           lambda f=_fn: f(S, T, labels=LABELS, ignore_index=-100.0)),
        f"{_name}-bool-ignore-index": err(TypeError, "ignore_index must be an int",
                                          lambda f=_fn: f(S, T, ignore_index=True)),
    })

LOGIT_ERRORS.update({
    "kl_div_loss-direction": err(ValueError, "direction must be one of", lambda: K.kl_div_loss(S, T, direction="up")),
    **{f"jsd_loss-beta={b!r}": err(ValueError, r"beta must lie in \[0, 1\]", lambda b=b: K.jsd_loss(S, T, beta=b))
       for b in (-0.1, 1.5, 2, 1e308)},
    "jsd_loss-beta=nan": err((TypeError, ValueError), "beta", lambda: K.jsd_loss(S, T, beta=NAN)),
    "jsd_loss-beta=inf": err((TypeError, ValueError), "beta", lambda: K.jsd_loss(S, T, beta=INF)),
    "jsd_loss-beta=True": err(TypeError, "beta", lambda: K.jsd_loss(S, T, beta=True)),
    "jsd_loss-beta=str": err(TypeError, "beta", lambda: K.jsd_loss(S, T, beta="0.5")),
    # kd_loss: hard-label term
    "kd_loss-ce-without-target": err(ValueError, "ce_weight=0.1 needs target",
                                     lambda: K.kd_loss(S, T, ce_weight=0.1)),
    "kd_loss-target-too-large": err(ValueError, r"target holds class indices outside \[0, 5\)",
                                    lambda: K.kd_loss(S, T, target=idx(0, 1, 2, 5), ce_weight=0.1)),
    "kd_loss-target-negative": err(ValueError, r"target holds class indices outside \[0, 5\)",
                                   lambda: K.kd_loss(S, T, target=idx(0, -1, 2, 3), ce_weight=0.1)),
    "kd_loss-target-ignore-index": err(ValueError, "target holds class indices outside",
                                       lambda: K.kd_loss(S, T, target=idx(0, -100, 2, 3), ce_weight=0.1)),
    "kd_loss-float-target": err(TypeError, "target must be an integer tensor",
                                lambda: K.kd_loss(S, T, target=Y.float(), ce_weight=0.1)),
    "kd_loss-list-target": err(TypeError, "target must be a torch.Tensor",
                               lambda: K.kd_loss(S, T, target=[0, 1, 2, 3], ce_weight=0.1)),
    "kd_loss-target-shape": err(ValueError, r"target must have shape \(4,\)",
                                lambda: K.kd_loss(S, T, target=idx(0, 1, 2), ce_weight=0.1)),
    "kd_loss-target-shape-3d": err(ValueError, r"target must have shape \(2, 3\)",
                                   lambda: K.kd_loss(x(2, 3, 5), x(2, 3, 5), target=torch.zeros(6, dtype=torch.long),
                                                     ce_weight=0.1)),
    "kd_loss-meta-target": err(ValueError, "same device.*target on meta",
                               lambda: K.kd_loss(S, T, target=Y.to(META), ce_weight=0.1)),
    "kd_loss-ce-weight-nan": err(ValueError, "ce_weight", lambda: K.kd_loss(S, T, target=Y, ce_weight=NAN)),
    "kd_loss-kd-weight-inf": err(ValueError, "kd_weight", lambda: K.kd_loss(S, T, kd_weight=INF)),
    "kd_loss-kd-weight-str": err(TypeError, "kd_weight", lambda: K.kd_loss(S, T, kd_weight="1")),
    # dkd_loss
    "dkd_loss-target-too-large": err(ValueError, r"target holds class indices outside \[0, 5\)",
                                     lambda: K.dkd_loss(S, T, idx(0, 1, 2, 5))),
    "dkd_loss-target-negative": err(ValueError, r"target holds class indices outside \[0, 5\)",
                                    lambda: K.dkd_loss(S, T, idx(-1, 1, 2, 3))),
    "dkd_loss-float-target": err(TypeError, "target must be an integer tensor", lambda: K.dkd_loss(S, T, Y.float())),
    "dkd_loss-none-target": err(TypeError, "target must be a torch.Tensor", lambda: K.dkd_loss(S, T, None)),
    "dkd_loss-target-shape": err(ValueError, r"target must have shape \(4,\)", lambda: K.dkd_loss(S, T, Y[:, None])),
    "dkd_loss-meta-target": err(ValueError, "same device.*target on meta", lambda: K.dkd_loss(S, T, Y.to(META))),
    "dkd_loss-3d-logits": err(ValueError, "student_logits must be 2-d",
                              lambda: K.dkd_loss(x(2, 3, 5), x(2, 3, 5), torch.zeros(2, 3, dtype=torch.long))),
    "dkd_loss-alpha-nan": err(ValueError, "alpha", lambda: K.dkd_loss(S, T, Y, alpha=NAN)),
    "dkd_loss-beta-str": err(TypeError, "beta", lambda: K.dkd_loss(S, T, Y, beta="8")),
    # kl_div (pointwise, F.kl_div's signature)
    "kl_div-shape": err(ValueError, "input and target must have (the same|broadcastable) shape",
                        lambda: K.kl_div(x(4, 5).log_softmax(-1), x(4, 6).softmax(-1))),
    "kl_div-int-input": err(TypeError, "input must be a floating-point tensor",
                            lambda: K.kl_div(torch.zeros(4, 5, dtype=torch.long), T.softmax(-1))),
    "kl_div-int-target": err(TypeError, "target must be a floating-point tensor",
                             lambda: K.kl_div(S.log_softmax(-1), torch.zeros(4, 5, dtype=torch.long))),
    "kl_div-list-input": err(TypeError, "input must be a torch.Tensor", lambda: K.kl_div([0.0], T)),
    "kl_div-meta-target": err(ValueError, "same device.*target on meta",
                              lambda: K.kl_div(S.log_softmax(-1), x(4, 5, device=META))),
    "kl_div-empty": err(ValueError, "input is empty", lambda: K.kl_div(x(0, 5), x(0, 5))),
    "kl_div-zero-classes": err(ValueError, "input is empty", lambda: K.kl_div(x(4, 0), x(4, 0))),
    "kl_div-reduction": err(ValueError, "reduction must be one of", lambda: K.kl_div(S, T.softmax(-1), "avg")),
    # mutual learning
    "mutual-one-student": err(ValueError, "at least 2 students, got 1", lambda: K.mutual_learning_loss([S], Y)),
    "mutual-no-students": err(ValueError, "at least 2 students, got 0", lambda: K.mutual_learning_loss([], Y)),
    "mutual-tensor": err(TypeError, "logits must be a list or tuple",
                         lambda: K.mutual_learning_loss(torch.stack([S, T]), Y)),
    "mutual-generator": err(TypeError, "logits must be a list or tuple",
                            lambda: K.mutual_learning_loss((z for z in (S, T)), Y)),
    "mutual-shape": err(ValueError, rf"logits\[0\] and logits\[2\]: {SHAPE_MSG}",
                        lambda: K.mutual_learning_loss([S, T, x(3, 5)], Y)),
    "mutual-vocabulary": err(ValueError, rf"logits\[0\] and logits\[2\]: {VOCAB_MSG}",
                             lambda: K.mutual_learning_loss([S, T, x(4, 6)], Y)),
    "mutual-int": err(TypeError, r"logits\[0\] and logits\[1\]:.*floating-point",
                      lambda: K.mutual_learning_loss([S, torch.zeros(4, 5, dtype=torch.long)], Y)),
    "mutual-meta": err(ValueError, r"logits\[0\] and logits\[1\]:.*same device",
                       lambda: K.mutual_learning_loss([S, x(4, 5, device=META)], Y)),
    "mutual-empty-batch": err(ValueError, "batch is empty", lambda: K.mutual_learning_loss([x(0, 5), x(0, 5)], Y)),
    "mutual-ce-without-target": err(ValueError, "ce_weight=1.0 needs target", lambda: K.mutual_learning_loss([S, T])),
    "mutual-target-too-large": err(ValueError, "target holds class indices outside",
                                   lambda: K.mutual_learning_loss([S, T], idx(0, 1, 2, 5))),
    "mutual-float-target": err(TypeError, "target must be an integer tensor",
                               lambda: K.mutual_learning_loss([S, T], Y.float())),
    "mutual-temperature": err(ValueError, "temperature", lambda: K.mutual_learning_loss([S, T], Y, temperature=0)),
    "mutual-kl-weight-nan": err(ValueError, "kl_weight", lambda: K.mutual_learning_loss([S, T], Y, kl_weight=NAN)),
    "mutual-backend": err(ValueError, "backend must be", lambda: K.mutual_learning_loss([S, T], Y, backend="nope")),
})


@run_cases(LOGIT_ERRORS)
def test_logit_loss_errors(exc, match, fn):
    with pytest.raises(exc, match=match):
        fn()


# ----------------------------------------------------------------------------------------------------------
# feature losses

PAIR_FNS = {  # name: (loss, minimum batch, valid student, valid teacher)
    "rkd_loss": (K.rkd_loss, 2, x(4, 8), x(4, 6)),
    "rkd_distance_loss": (K.rkd_distance_loss, 2, x(4, 8), x(4, 6)),
    "rkd_angle_loss": (K.rkd_angle_loss, 2, x(4, 8), x(4, 6)),
    "at_loss": (K.at_loss, 1, x(4, 3, 4, 4), x(4, 5, 4, 4)),
    "sp_loss": (K.sp_loss, 1, x(4, 8), x(4, 6)),
    "pkt_loss": (K.pkt_loss, 1, x(4, 8), x(4, 6)),
    "nst_loss": (K.nst_loss, 1, x(4, 3, 4, 4), x(4, 5, 4, 4)),
    "cc_loss": (K.cc_loss, 2, x(4, 8), x(4, 8)),
    "hint_loss": (K.hint_loss, 1, x(4, 8), x(4, 8)),
}


def with_batch(t, b):
    return torch.randn(b, *t.shape[1:])


FEATURE_ERRORS = {}
for _name, (_fn, _min_batch, _s, _t) in PAIR_FNS.items():
    FEATURE_ERRORS.update({
        f"{_name}-batch-mismatch": err(ValueError, "f_s and f_t must have the same batch size, got 4 and 3",
                                       lambda f=_fn, s=_s, t=_t: f(s, with_batch(t, 3))),
        f"{_name}-int-student": err(TypeError, "f_s must be a floating-point tensor",
                                    lambda f=_fn, s=_s, t=_t: f(s.long(), t)),
        f"{_name}-int-teacher": err(TypeError, "f_t must be a floating-point tensor",
                                    lambda f=_fn, s=_s, t=_t: f(s, t.to(torch.uint8))),
        f"{_name}-list-student": err(TypeError, "f_s must be a torch.Tensor",
                                     lambda f=_fn, s=_s, t=_t: f(s.tolist(), t)),
        f"{_name}-none-teacher": err(TypeError, "f_t must be a torch.Tensor", lambda f=_fn, s=_s: f(s, None)),
        f"{_name}-meta-teacher": err(ValueError, "same device.*f_t on meta",
                                     lambda f=_fn, s=_s, t=_t: f(s, torch.randn(*t.shape, device=META))),
        f"{_name}-empty-batch": err(ValueError, "f_s is empty",
                                    lambda f=_fn, s=_s, t=_t: f(with_batch(s, 0), with_batch(t, 0))),
        f"{_name}-empty-features": err(ValueError, "is empty",
                                       lambda f=_fn, s=_s, t=_t: f(s[:, :0], t[:, :0])),
        f"{_name}-backend": err(ValueError, "backend must be 'auto' or one of",
                                lambda f=_fn, s=_s, t=_t: f(s, t, backend="nope")),
    })
    if _min_batch == 2:
        # The message names the argument and its shape, not just "this loss".
        FEATURE_ERRORS[f"{_name}-batch-of-one"] = err(
            ValueError, r"f_s and f_t must hold a batch of at least 2 samples, got 1 \(f_s has shape \(1, 8\)\)",
            lambda f=_fn, s=_s, t=_t: f(s[:1], t[:1]))
    if _name != "hint_loss":  # FitNets on (B,) features is meaningful; the others need a feature dim
        FEATURE_ERRORS[f"{_name}-1d"] = err(ValueError, "f_s must have at least",
                                            lambda f=_fn: f(x(4), x(4)))

for _name in ("at_loss", "nst_loss"):
    _fn = PAIR_FNS[_name][0]
    FEATURE_ERRORS.update({
        f"{_name}-3d-student": err(ValueError, "f_s must have at least 4 dimensions",
                                   lambda f=_fn: f(x(4, 3, 16), x(4, 5, 4, 4))),
        f"{_name}-3d-teacher": err(ValueError, "f_t must have at least 4 dimensions",
                                   lambda f=_fn: f(x(4, 3, 4, 4), x(4, 5, 16))),
        f"{_name}-2d": err(ValueError, "f_s must have at least 4 dimensions", lambda f=_fn: f(x(4, 8), x(4, 8))),
        f"{_name}-5d": err(ValueError, "f_s and f_t must be 4-d",
                           lambda f=_fn: f(x(4, 3, 2, 4, 4), x(4, 3, 2, 4, 4))),
    })

FEATURE_ERRORS.update({
    "at_loss-mode": err(ValueError, "mode must be one of", lambda: K.at_loss(MAP, MAP, mode="Code")),
    "at_loss-p=0": err(ValueError, "p must be positive", lambda: K.at_loss(MAP, MAP, p=0)),
    "at_loss-p=-2": err(ValueError, "p must be positive", lambda: K.at_loss(MAP, MAP, p=-2)),
    "at_loss-p=nan": err(ValueError, "p must be positive", lambda: K.at_loss(MAP, MAP, p=NAN)),
    "at_loss-p=True": err(TypeError, "p must be", lambda: K.at_loss(MAP, MAP, p=True)),
    "attention_map-int": err(TypeError, "f must be a floating-point tensor",
                             lambda: K.attention_map(torch.ones(2, 3, 4, 4, dtype=torch.long))),
    "attention_map-list": err(TypeError, "f must be a torch.Tensor", lambda: K.attention_map(MAP.tolist())),
    "attention_map-2d": err(ValueError, "f must be a non-empty", lambda: K.attention_map(x(2, 3))),
    "attention_map-empty": err(ValueError, "f must be a non-empty", lambda: K.attention_map(x(0, 3, 4, 4))),
    "attention_map-p=0": err(ValueError, "p must be positive", lambda: K.attention_map(MAP, 0)),
    "attention_map-backend": err(ValueError, "backend must be", lambda: K.attention_map(MAP, backend="nope")),
    "sp_loss-norm": err(ValueError, "norm must be one of", lambda: K.sp_loss(x(4, 8), x(4, 8), norm="l3")),
    "sp_loss-norm-int": err(ValueError, "norm must be one of", lambda: K.sp_loss(x(4, 8), x(4, 8), norm=2)),
    "cc_loss-dims-differ": err(ValueError, "f_s and f_t must have the same shape",
                               lambda: K.cc_loss(x(4, 8), x(4, 6))),
    "rkd_loss-eps=0": err(ValueError, "eps must be positive", lambda: K.rkd_loss(x(4, 8), x(4, 8), eps=0)),
    "rkd_distance_loss-eps=-1": err(ValueError, "eps must be positive",
                                    lambda: K.rkd_distance_loss(x(4, 8), x(4, 8), eps=-1.0)),
    "rkd_loss-distance-weight-nan": err(ValueError, "distance_weight",
                                        lambda: K.rkd_loss(x(4, 8), x(4, 8), distance_weight=NAN)),
    "rkd_loss-angle-weight-str": err(TypeError, "angle_weight",
                                     lambda: K.rkd_loss(x(4, 8), x(4, 8), angle_weight="50")),
    "pkt_loss-eps=0": err(ValueError, "eps must be positive", lambda: K.pkt_loss(x(4, 8), x(4, 8), eps=0.0)),
    "hint_loss-shape": err(ValueError, r"teacher's shape \(2, 5, 4, 4\), got \(2, 3, 4, 4\)",
                           lambda: K.hint_loss(MAP, x(2, 5, 4, 4))),
    "hint_loss-regressor-output-shape": err(ValueError, r"teacher's shape \(2, 5, 4, 4\), got \(2, 4, 4, 4\)",
                                            lambda: K.hint_loss(MAP, x(2, 5, 4, 4), nn.Conv2d(3, 4, 1))),
    "hint_loss-regressor-output-size": err(ValueError, r"teacher's shape \(2, 5, 4, 4\), got \(2, 5, 2, 2\)",
                                           lambda: K.hint_loss(MAP, x(2, 5, 4, 4), nn.Conv2d(3, 5, 3))),
    "hint_loss-regressor-not-callable": err(TypeError, "regressor must be a module or callable",
                                            lambda: K.hint_loss(MAP, MAP, regressor="conv")),
    "hint_loss-0d": err(ValueError, "f_s must have at least 1 dimensions",
                        lambda: K.hint_loss(torch.tensor(1.0), torch.tensor(1.0))),
    # FSP: lists of maps
    "fsp_loss-lengths-differ": err(ValueError, "feats_s and feats_t must have the same length, got 3 and 2",
                                   lambda: K.fsp_loss([MAP, MAP, MAP], [MAP, MAP])),
    "fsp_loss-single-map": err(ValueError, "at least 2 feature maps per network, got 1",
                               lambda: K.fsp_loss([MAP], [MAP])),
    "fsp_loss-empty-lists": err(ValueError, "feats_s is empty", lambda: K.fsp_loss([], [])),
    "fsp_loss-tensor": err(TypeError, "feats_s must be a list or tuple of tensors", lambda: K.fsp_loss(MAP, [MAP, MAP])),
    "fsp_loss-teacher-tensor": err(TypeError, "feats_t must be a list or tuple of tensors",
                                   lambda: K.fsp_loss([MAP, MAP], MAP)),
    "fsp_loss-channel-mismatch": err(ValueError, r"feats_s\[1\] and feats_t\[1\] must have the same number of channels",
                                     lambda: K.fsp_loss([MAP, x(2, 4, 4, 4)], [MAP, x(2, 5, 4, 4)])),
    "fsp_loss-batch-mismatch": err(ValueError, r"feats_s\[0\] and feats_t\[0\] must have the same batch size",
                                   lambda: K.fsp_loss([MAP, MAP], [x(3, 3, 4, 4), x(2, 3, 4, 4)])),
    "fsp_loss-3d-map": err(ValueError, r"feats_s\[1\] must have at least 4 dimensions",
                           lambda: K.fsp_loss([MAP, x(2, 3, 16)], [MAP, x(2, 3, 16)])),
    "fsp_loss-int-map": err(TypeError, r"feats_t\[0\] must be a floating-point tensor",
                            lambda: K.fsp_loss([MAP, MAP], [MAP.long(), MAP])),
    "fsp_loss-none-map": err(TypeError, r"feats_s\[1\] must be a torch.Tensor", lambda: K.fsp_loss([MAP, None], [MAP, MAP])),
    "fsp_loss-meta-map": err(ValueError, r"same device.*feats_t\[1\] on meta",
                             lambda: K.fsp_loss([MAP, MAP], [MAP, x(2, 3, 4, 4, device=META)])),
    "fsp_loss-backend": err(ValueError, "backend must be", lambda: K.fsp_loss([MAP, MAP], [MAP, MAP], backend="nope")),
    "fsp_matrix-batch-mismatch": err(ValueError, "bottom and top must have the same batch size",
                                     lambda: K.fsp_matrix(MAP, x(3, 3, 4, 4))),
    "fsp_matrix-3d": err(ValueError, "bottom must have at least 4 dimensions", lambda: K.fsp_matrix(x(2, 3, 4), MAP)),
})


@run_cases(FEATURE_ERRORS)
def test_feature_loss_errors(exc, match, fn):
    with pytest.raises(exc, match=match):
        fn()


def test_fsp_loss_batch_mismatch_between_layers():
    s = [x(2, 3, 4, 4), x(3, 3, 4, 4)]
    with pytest.raises(ValueError, match=r"feats_s\[1\]"):
        K.fsp_loss(s, [t.clone() for t in s])


# ----------------------------------------------------------------------------------------------------------
# backends

VALID_CALLS = {  # every public loss, on valid CPU inputs, taking `backend`
    "kd_loss": lambda **kw: K.kd_loss(S, T, **kw),
    "kl_div_loss": lambda **kw: K.kl_div_loss(S, T, labels=LABELS, **kw),
    "jsd_loss": lambda **kw: K.jsd_loss(S, T, **kw),
    "dkd_loss": lambda **kw: K.dkd_loss(S, T, Y, **kw),
    "sparse_kd_loss": lambda **kw: K.sparse_kd_loss(S, torch.tensor([[0, 4]] * 4),
                                                    torch.tensor([[0.5, 0.25]] * 4).log(), LABELS, tail="bucket", **kw),
    "fused_linear_distill_loss": lambda **kw: K.fused_linear_distill_loss(S, T, S, T, LABELS, **kw),  # V 4, H 5
    "kl_div": lambda **kw: K.kl_div(S.log_softmax(-1), T.softmax(-1), **kw),
    "mutual_learning_loss": lambda **kw: K.mutual_learning_loss([S, T], Y, **kw),
    "rkd_loss": lambda **kw: K.rkd_loss(x(4, 8), x(4, 6), **kw),
    "rkd_distance_loss": lambda **kw: K.rkd_distance_loss(x(4, 8), x(4, 6), **kw),
    "rkd_angle_loss": lambda **kw: K.rkd_angle_loss(x(4, 8), x(4, 6), **kw),
    "attention_map": lambda **kw: K.attention_map(MAP, **kw),
    "at_loss": lambda **kw: K.at_loss(MAP, x(2, 5, 4, 4), **kw),
    "sp_loss": lambda **kw: K.sp_loss(x(4, 8), x(4, 6), **kw),
    "fsp_loss": lambda **kw: K.fsp_loss([MAP, MAP], [MAP, MAP], **kw),
    "pkt_loss": lambda **kw: K.pkt_loss(x(4, 8), x(4, 6), **kw),
    "nst_loss": lambda **kw: K.nst_loss(MAP, x(2, 5, 4, 4), **kw),
    "cc_loss": lambda **kw: K.cc_loss(x(4, 8), x(4, 8), **kw),
    "hint_loss": lambda **kw: K.hint_loss(MAP, MAP, **kw),
}
all_losses = pytest.mark.parametrize("name", list(VALID_CALLS))


def test_every_public_loss_is_covered():
    assert set(VALID_CALLS) | {"fsp_matrix"} == set(K.__all__)


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("FASTKD_BACKEND", raising=False)


@all_losses
@pytest.mark.parametrize("backend", [None, "auto", "torch"])
def test_valid_calls_run(clean_env, name, backend):
    assert torch.isfinite(VALID_CALLS[name](backend=backend)).all()


@all_losses
@pytest.mark.parametrize("bad", ["nope", "Torch", "", 3, ["torch"]])
def test_unknown_backend_name(clean_env, name, bad):
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of \('torch', 'triton', 'cuda'\)"):
        VALID_CALLS[name](backend=bad)


@all_losses
def test_bad_fastkd_backend_env(monkeypatch, name):
    monkeypatch.setenv("FASTKD_BACKEND", "tritonn")
    with pytest.raises(ValueError, match="FASTKD_BACKEND must be 'auto' or one of .*'tritonn'"):
        VALID_CALLS[name]()
    # an explicit backend does not read the variable
    assert torch.isfinite(VALID_CALLS[name](backend="torch")).all()


def test_default_backend_reads_env(monkeypatch):
    monkeypatch.setenv("FASTKD_BACKEND", "torch")
    assert fastkd.default_backend() == "torch"
    monkeypatch.setenv("FASTKD_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTKD_BACKEND"):
        fastkd.default_backend()
    monkeypatch.delenv("FASTKD_BACKEND")
    assert fastkd.default_backend() == "auto"


def unavailable_or_skip(backend):
    status = fastkd.available_backends()[backend]
    if status.available:
        pytest.skip(f"{backend} is available here")
    assert status.reason  # says why


@all_losses
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_unavailable_backend_by_name(clean_env, name, backend):
    unavailable_or_skip(backend)
    with pytest.raises(fastkd.BackendUnavailableError, match=rf"backend '{backend}' is not available: \w+"):
        VALID_CALLS[name](backend=backend)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_unavailable_backend_from_env(monkeypatch, backend):
    unavailable_or_skip(backend)
    monkeypatch.setenv("FASTKD_BACKEND", backend)
    with pytest.raises(fastkd.BackendUnavailableError, match=rf"backend '{backend}' is not available: \w+"):
        K.kd_loss(S, T)


def test_unavailable_reason_is_in_the_error(clean_env):
    unavailable_or_skip("cuda")
    import fastkd.cuda
    reason = fastkd.cuda.unavailable_reason(S.device)  # the reason for these tensors' device
    with pytest.raises(fastkd.BackendUnavailableError) as info:
        K.kd_loss(S, T, backend="cuda")
    assert reason in str(info.value)
    assert isinstance(info.value, RuntimeError)


# ----------------------------------------------------------------------------------------------------------
# nn.Module versions: constructor arguments

MODULE_CTOR_ERRORS = {
    "KDLoss-temperature=0": err(ValueError, "temperature", lambda: L.KDLoss(temperature=0)),
    "KDLoss-temperature=-4": err(ValueError, "temperature", lambda: L.KDLoss(-4.0)),
    "KDLoss-temperature=nan": err(ValueError, "temperature", lambda: L.KDLoss(temperature=NAN)),
    "KDLoss-temperature=inf": err(ValueError, "temperature", lambda: L.KDLoss(temperature=INF)),
    "KDLoss-temperature=True": err(TypeError, "temperature", lambda: L.KDLoss(temperature=True)),
    "KDLoss-reduction": err(ValueError, "reduction must be one of", lambda: L.KDLoss(reduction="avg")),
    "KLDivLoss-reduction": err(ValueError, "reduction must be one of", lambda: L.KLDivLoss(reduction="avg")),
    "KLDistillationLoss-temperature": err(ValueError, "temperature", lambda: L.KLDistillationLoss(0.0)),
    "KLDistillationLoss-direction": err(ValueError, "direction must be one of",
                                        lambda: L.KLDistillationLoss(direction="sideways")),
    "JSDLoss-beta=2": err(ValueError, r"beta must lie in \[0, 1\]", lambda: L.JSDLoss(beta=2)),
    "JSDLoss-beta=-0.5": err(ValueError, r"beta must lie in \[0, 1\]", lambda: L.JSDLoss(beta=-0.5)),
    "JSDLoss-beta=nan": err((TypeError, ValueError), "beta", lambda: L.JSDLoss(beta=NAN)),
    "JSDLoss-temperature": err(ValueError, "temperature", lambda: L.JSDLoss(temperature=0)),
    "DKDLoss-temperature": err(ValueError, "temperature", lambda: L.DKDLoss(temperature=-1.0)),
    "MutualLearningLoss-temperature": err(ValueError, "temperature", lambda: L.MutualLearningLoss(temperature=0)),
    "AttentionTransferLoss-p=0": err(ValueError, "p must be positive", lambda: L.AttentionTransferLoss(p=0)),
    "AttentionTransferLoss-mode": err(ValueError, "mode must be one of", lambda: L.AttentionTransferLoss(mode="x")),
    "AttentionTransferLoss-reduction": err(ValueError, "reduction must be one of",
                                           lambda: L.AttentionTransferLoss(reduction="mean")),
    "SimilarityLoss-norm": err(ValueError, "norm must be one of", lambda: L.SimilarityLoss(norm="l3")),
    "SimilarityLoss-reduction": err(ValueError, "reduction must be one of", lambda: L.SimilarityLoss(reduction="avg")),
    "NSTLoss-reduction": err(ValueError, "reduction must be one of", lambda: L.NSTLoss(reduction="avg")),
    "ConvRegressor-sizes": err(ValueError, "no regressor maps student size 4x4 to teacher size 16x16",
                               lambda: L.ConvRegressor((2, 8, 4, 4), (2, 16, 16, 16))),
    "KDLoss-ce_weight=nan": err(ValueError, "ce_weight", lambda: L.KDLoss(ce_weight=NAN)),
    "KDLoss-kd_weight=str": err(TypeError, "kd_weight", lambda: L.KDLoss(kd_weight="1")),
    "KLDistillationLoss-reduction": err(ValueError, "reduction must be one of",
                                        lambda: L.KLDistillationLoss(reduction="avg")),
    "JSDLoss-reduction": err(ValueError, "reduction must be one of", lambda: L.JSDLoss(reduction="avg")),
    "DKDLoss-alpha=nan": err(ValueError, "alpha", lambda: L.DKDLoss(alpha=NAN)),
    "DKDLoss-beta=inf": err(ValueError, "beta", lambda: L.DKDLoss(beta=INF)),
    "DKDLoss-warmup=-1": err(ValueError, "warmup", lambda: L.DKDLoss(warmup=-1)),
    "DKDLoss-warmup=1.5": err(ValueError, "warmup", lambda: L.DKDLoss(warmup=1.5)),
    "DKDLoss-warmup=True": err(ValueError, "warmup", lambda: L.DKDLoss(warmup=True)),
    "MutualLearningLoss-ce_weight=str": err(TypeError, "ce_weight", lambda: L.MutualLearningLoss(ce_weight="1")),
    "MutualLearningLoss-kl_weight=nan": err(ValueError, "kl_weight", lambda: L.MutualLearningLoss(kl_weight=NAN)),
    "RKDLoss-eps=0": err(ValueError, "eps must be positive", lambda: L.RKDLoss(eps=0.0)),
    "RKDLoss-distance_weight=nan": err(ValueError, "distance_weight", lambda: L.RKDLoss(distance_weight=NAN)),
    "RKDLoss-angle_weight=str": err(TypeError, "angle_weight", lambda: L.RKDLoss(angle_weight="50")),
    "PKTLoss-eps=0": err(ValueError, "eps must be positive", lambda: L.PKTLoss(eps=0)),
}


@run_cases(MODULE_CTOR_ERRORS)
def test_module_constructor_errors(exc, match, fn):
    with pytest.raises(exc, match=match):
        fn()


# Constructor arguments still checked only when the module is first called: the error is the functional
# one, raised at the first forward; each is also listed below as a missing eager check.
LAZY = {  # id: (exception, regex, module constructor, forward arguments)
    "KDLoss-backend": (ValueError, "backend must be", lambda: L.KDLoss(backend="nope"), (S, T)),
    "FSPLoss-backend": (ValueError, "backend must be", lambda: L.FSPLoss(backend="nope"), ([MAP, MAP], [MAP, MAP])),
    "KLDistillationLoss-ignore_index": (TypeError, "ignore_index must be an int",
                                        lambda: L.KLDistillationLoss(ignore_index=-100.0), (S, T)),
    "JSDLoss-ignore_index": (TypeError, "ignore_index must be an int", lambda: L.JSDLoss(ignore_index=None), (S, T)),
}


@pytest.mark.parametrize("exc, match, make", [v[:3] for v in LAZY.values()], ids=list(LAZY))
def test_module_constructor_checks_every_argument(exc, match, make):
    with pytest.raises(exc, match=match):
        make()


# ----------------------------------------------------------------------------------------------------------
# nn.Module versions: the same input errors at forward

MODULE_FORWARD_ERRORS = {
    "KDLoss-shape": err(ValueError, SHAPE_MSG, lambda: L.KDLoss()(x(4, 5), x(3, 5))),
    "KDLoss-int": err(TypeError, "student_logits must be a floating-point", lambda: L.KDLoss()(S.long(), T)),
    "KDLoss-ce-without-target": err(ValueError, "needs target", lambda: L.KDLoss(ce_weight=0.1)(S, T)),
    "KDLoss-target-range": err(ValueError, "target holds class indices outside",
                               lambda: L.KDLoss(ce_weight=0.1)(S, T, idx(0, 1, 2, 9))),
    "KLDivLoss-int": err(TypeError, "input must be a floating-point", lambda: L.KLDivLoss()(S.long(), T)),
    "KLDivLoss-shape": err(ValueError, "input and target must have (the same|broadcastable) shape",
                           lambda: L.KLDivLoss()(x(4, 5), x(4, 6))),
    "KLDistillationLoss-labels-shape": err(ValueError, "labels must have shape",
                                           lambda: L.KLDistillationLoss()(S, T, idx(1, 2))),
    "JSDLoss-float-labels": err(TypeError, "labels must be an integer tensor",
                                lambda: L.JSDLoss()(S, T, LABELS.float())),
    "JSDLoss-empty": err(ValueError, "batch is empty", lambda: L.JSDLoss()(x(0, 5), x(0, 5))),
    "DKDLoss-target-range": err(ValueError, "target holds class indices outside",
                                lambda: L.DKDLoss()(S, T, idx(0, 1, 2, 5))),
    "DKDLoss-float-target": err(TypeError, "target must be an integer tensor", lambda: L.DKDLoss()(S, T, Y.float())),
    "MutualLearningLoss-tensor": err(TypeError, "logits must be a list or tuple",
                                     lambda: L.MutualLearningLoss()(torch.stack([S, T]), Y)),
    "MutualLearningLoss-one": err(ValueError, "at least 2 students", lambda: L.MutualLearningLoss()([S], Y)),
    "RKDLoss-batch-of-one": err(ValueError, r"f_s and f_t must hold .*at least 2 samples.*f_s has shape \(1, 8\)",
                                lambda: L.RKDLoss()(x(1, 8), x(1, 8))),
    "CCLoss-batch-of-one": err(ValueError, r"f_s and f_t must hold .*at least 2 samples.*f_s has shape \(1, 8\)",
                               lambda: L.CCLoss()(x(1, 8), x(1, 8))),
    "CCLoss-shape": err(ValueError, "same shape", lambda: L.CCLoss()(x(4, 8), x(4, 6))),
    "AttentionTransferLoss-3d": err(ValueError, "at least 4 dimensions",
                                    lambda: L.AttentionTransferLoss()(x(2, 3, 16), x(2, 3, 16))),
    "AttentionTransferLoss-lengths": err(ValueError, "same length",
                                         lambda: L.AttentionTransferLoss()([MAP, MAP], [MAP])),
    "AttentionTransferLoss-tensor-and-list": err(TypeError, "feats_s must be a list or tuple",
                                                 lambda: L.AttentionTransferLoss()(MAP, [MAP])),
    "AttentionTransferLoss-empty": err(ValueError, "feats_s is empty", lambda: L.AttentionTransferLoss()([], [])),
    "SimilarityLoss-batch": err(ValueError, "same batch size", lambda: L.SimilarityLoss()(x(4, 8), x(3, 8))),
    "NSTLoss-5d": err(ValueError, "must be 4-d", lambda: L.NSTLoss()(x(2, 3, 2, 4, 4), x(2, 3, 2, 4, 4))),
    "FSPLoss-single": err(ValueError, "at least 2 feature maps", lambda: L.FSPLoss()([MAP], [MAP])),
    "FSPLoss-channels": err(ValueError, "same number of channels",
                            lambda: L.FSPLoss()([MAP, x(2, 4, 4, 4)], [MAP, x(2, 5, 4, 4)])),
    "PKTLoss-batch": err(ValueError, "same batch size", lambda: L.PKTLoss()(x(4, 8), x(5, 8))),
    "HintLoss-regressor-shape": err(ValueError, "teacher's shape",
                                    lambda: L.HintLoss(nn.Conv2d(3, 4, 1))(MAP, x(2, 5, 4, 4))),
}


@run_cases(MODULE_FORWARD_ERRORS)
def test_module_forward_errors(exc, match, fn):
    with pytest.raises(exc, match=match):
        fn()
