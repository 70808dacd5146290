"""Vocabulary-parallel logit losses on 2 and 3 gloo ranks against the single-process reference.

Every rank builds the same full inputs from one seed and passes its slice of the vocabulary; the parent computes
the single-process loss of the full inputs. Each rank's value must equal it, and each rank's gradient must equal
its columns of the single-process gradient (replicated inputs, such as the fused loss's hidden states or a
tensor temperature, the whole single-process gradient). float64 to rounding; float32 by the tolerance rule
against a float64 reference. A recorder of every collective checks that nothing `rows x V` crosses the network.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from ranks import RankError, run_ranks

import fastkd.functional as KF
from fastkd import losses as L

# (world size, slice bounds); None: equal slices without vocab_range.
LAYOUTS = [(2, None, 12), (2, (0, 7, 11), 11), (3, None, 12), (3, (0, 4, 5, 11), 11)]


def _slices(world, bounds, vocab):
    if bounds is None:
        width = vocab // world
        return [(r * width, (r + 1) * width) for r in range(world)], False
    return [(bounds[r], bounds[r + 1]) for r in range(world)], True


def _logit_inputs(vocab, dtype, rows_shape=(3, 4)):
    g = torch.Generator().manual_seed(7)
    s = torch.randn(*rows_shape, vocab, generator=g, dtype=torch.float64) * 3
    t = torch.randn(*rows_shape, vocab, generator=g, dtype=torch.float64) * 3
    # An id masked in both, one in the teacher only, a row's upper half masked in the teacher, a huge offset on one
    # row, a peaked teacher. (A student -inf where the teacher has mass is an infinite KL, tested elsewhere.)
    s[0, 0, 1] = t[0, 0, 1] = float("-inf")
    t[0, 1, vocab - 1] = float("-inf")
    t[1, 0, vocab // 2:] = float("-inf")
    s[1, 1] += 1e4
    t[2, 2] *= 20
    labels = torch.randint(0, vocab, rows_shape, generator=g)
    labels[0, 2] = -100
    temperature_rows = torch.rand(rows_shape, generator=g, dtype=torch.float64) + 0.5
    grad_rows = torch.randn(rows_shape, generator=g, dtype=torch.float64)
    return s.to(dtype), t.to(dtype), labels, temperature_rows.to(dtype), grad_rows.to(dtype)


def _sparse_inputs(vocab, dtype, k=5):
    g = torch.Generator().manual_seed(11)
    s = torch.randn(6, vocab, generator=g, dtype=torch.float64) * 2
    full = torch.log_softmax(torch.randn(6, vocab, generator=g, dtype=torch.float64) * 2, -1)
    lp, ids = full.topk(k, -1)
    lp[1, 3:] = float("-inf")  # unused slots, their ids garbage
    ids[1, 3:] = -1
    lp[2] = float("-inf")  # a row with no slot used
    ids[3, 1] = ids[3, 0]  # a duplicated id
    labels = torch.randint(0, vocab, (6,), generator=g)
    labels[4] = -100
    return s.to(dtype), ids, lp.to(dtype), labels


def _unshifted(s):
    """The student without its 1e4 row offset: a tensor temperature's gradient sums terms `z / T^2` that cancel,
    so at logits of 1e4 float32 keeps no digit of it in any summation order (the value and the logits' gradient do)."""
    offset = torch.zeros(s.shape[:-1] + (1,), dtype=s.dtype)
    offset[1, 1] = 1e4
    return s - offset


# name -> f(student, teacher, labels, temperature_rows, **vocab-parallel kwargs): the loss.
LOGIT_CASES = {
    "kd_ce": lambda s, t, y, tr, **k: KF.kd_loss(s, t, 4.0, target=y.clamp(min=0), ce_weight=0.1, kd_weight=0.9, **k),
    "kd_mean": lambda s, t, y, tr, **k: KF.kd_loss(s, t, 2.0, reduction="mean", **k),
    "kd_sum": lambda s, t, y, tr, **k: KF.kd_loss(s, t, 1.0, reduction="sum", **k),
    "kd_tensor_T": lambda s, t, y, tr, **k: KF.kd_loss(_unshifted(s), t, tr, **k),
    "kl_forward": lambda s, t, y, tr, **k: KF.kl_div_loss(s, t, 2.0, labels=y, **k),
    "kl_reverse": lambda s, t, y, tr, **k: KF.kl_div_loss(s, t, 1.0, direction="reverse", labels=y, **k),
    "kl_tensor_T": lambda s, t, y, tr, **k: KF.kl_div_loss(_unshifted(s), t, tr[..., :1], labels=y, **k),
    "jsd": lambda s, t, y, tr, **k: KF.jsd_loss(s, t, beta=0.5, labels=y, **k),
    "jsd_beta": lambda s, t, y, tr, **k: KF.jsd_loss(s, t, beta=0.2, temperature=1.5, **k),
    "jsd_ends": lambda s, t, y, tr, **k: KF.jsd_loss(s, t, beta=0.0, **k) + KF.jsd_loss(s, t, beta=1.0, **k),
}
ROW_CASES = {  # reduction "none": the rows, backward with a random per-row gradient
    "kd_none": lambda s, t, y, tr, **k: KF.kd_loss(s, t, 3.0, reduction="none", **k),
    "kl_none": lambda s, t, y, tr, **k: KF.kl_div_loss(s, t, 1.0, labels=y, reduction="none", **k),
    "jsd_none": lambda s, t, y, tr, **k: KF.jsd_loss(s, t, beta=0.7, reduction="none", **k),
}
SPARSE_CASES = {
    "renormalize": dict(tail="renormalize", temperature=2.0),
    "bucket": dict(tail="bucket"),
    "none": dict(tail="none"),
    "items": dict(tail="bucket", num_items_in_batch=9),
}


def _value_and_grads(fn, s, t, y, tr, grad_rows, **kwargs):
    s = s.detach().clone().requires_grad_()
    tr = tr.detach().clone().requires_grad_()
    out = fn(s, t, y, tr, **kwargs)
    (out if out.dim() == 0 else (out * grad_rows).sum()).backward()
    return out.detach(), s.grad, tr.grad


def _recorder(calls):
    """Wrap the collectives so every tensor that crosses the network is recorded (shape)."""
    originals = {}
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast"):
        original = getattr(dist, name)
        originals[name] = original

        def wrapped(tensor_or_list, *args, _original=original, _name=name, **kwargs):
            first = tensor_or_list[0] if isinstance(tensor_or_list, list) else tensor_or_list
            calls.append((_name, tuple(first.shape)))
            return _original(tensor_or_list, *args, **kwargs)
        setattr(dist, name, wrapped)
    return originals


def _logit_rank(rank, world, bounds, vocab, dtype, backend):
    slices, given = _slices(world, bounds, vocab)
    start, end = slices[rank]
    s, t, y, tr, grad_rows = _logit_inputs(vocab, dtype)
    vp = dict(process_group=dist.group.WORLD, vocab_range=(start, end) if given else None, backend=backend)
    calls = []
    _recorder(calls)
    out = {}
    for name, fn in {**LOGIT_CASES, **ROW_CASES}.items():
        value, gs, gt = _value_and_grads(fn, s[..., start:end], t[..., start:end], y, tr, grad_rows, **vp)
        out[name] = (value, gs, gt)
    logit_calls = list(calls)
    calls.clear()
    s2, ids, lp, labels = _sparse_inputs(vocab, dtype)
    vp["backend"] = None  # no kernel for the sparse loss across ranks
    for name, options in SPARSE_CASES.items():
        x = s2[:, start:end].clone().requires_grad_()
        value = KF.sparse_kd_loss(x, ids, lp, labels, **options, **vp)
        value.backward()
        out["sparse_" + name] = (value.detach(), x.grad, None)
    return out, logit_calls, calls


def _widened(tensors, dtype):
    return [x.to(dtype) if torch.is_tensor(x) and x.is_floating_point() else x for x in tensors]


def _logit_reference(vocab, dtype, exact=False):
    """The single-process results in `dtype`; `exact`: in float64 on the same `dtype`-rounded inputs."""
    s, t, y, tr, grad_rows = _widened(_logit_inputs(vocab, dtype), torch.float64 if exact else dtype)
    out = {name: _value_and_grads(fn, s, t, y, tr, grad_rows) for name, fn in {**LOGIT_CASES, **ROW_CASES}.items()}
    s2, ids, lp, labels = _widened(_sparse_inputs(vocab, dtype), torch.float64 if exact else dtype)
    for name, options in SPARSE_CASES.items():
        x = s2.clone().requires_grad_()
        value = KF.sparse_kd_loss(x, ids, lp, labels, **options)
        value.backward()
        out["sparse_" + name] = (value.detach(), x.grad, None)
    return out


def _assert_matches(got, want, exact, what, single=None):
    """`got` equal to `want` (float64: to rounding); float32: `|got - exact| <= 2 |single - exact| + slack`, the
    tolerance rule with `single` the single-process float32 result and `exact` the float64 one."""
    if want is None:
        assert got is None, what
        return
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)), f"{what}: non-finite entries differ"
    assert torch.equal(torch.isnan(want), torch.isnan(got)), f"{what}: NaN entries differ"
    if single is None:
        torch.testing.assert_close(got[finite], want[finite], rtol=1e-10, atol=1e-12, msg=what)
        return
    exact, got, single = exact[finite], got[finite].double(), single[finite].double()
    if not exact.numel():
        return
    err, base = (got - exact).abs().max(), (single - exact).abs().max()
    slack = 4 * torch.finfo(torch.float32).eps * exact.abs().max()
    assert err <= 2 * base + slack, f"{what}: error {err:.3g} against PyTorch's {base:.3g}"


# (dtype, backend): the reference's arithmetic in float64 and float32; the Triton slice kernels (in the
# interpreter here) in float32.
PRECISIONS = [(torch.float64, "torch"), (torch.float32, "torch"), (torch.float32, "triton")]


@pytest.mark.parametrize("world,bounds,vocab", LAYOUTS)
@pytest.mark.parametrize("dtype,backend", PRECISIONS)
def test_logit_losses_equal_single_process(world, bounds, vocab, dtype, backend):
    """KD (CE term, every reduction, tensor temperature), forward/reverse KL, JSD (TRL's ends too) and the sparse
    teacher's three tails: each rank's value is the single-process loss, its gradient its columns of the
    single-process gradient, a tensor temperature's gradient the whole one; nothing N x V is communicated.
    In float32 the student's gradient is judged whole (the ranks' columns side by side), as the tolerance rule
    judges a gradient normwise: a slice's error next to eager's on the same columns alone is a coin toss."""
    results = run_ranks(world, _logit_rank, bounds, vocab, dtype, backend)
    exact = _logit_reference(vocab, dtype, exact=True)
    single = _logit_reference(vocab, dtype)
    slices, _ = _slices(world, bounds, vocab)
    low = dtype != torch.float64
    for name in results[0][0]:
        whole = torch.cat([out[name][1] for out, _, _ in results], -1)
        _assert_matches(whole, single[name][1], exact[name][1], f"{name} student grad (all ranks)",
                        single=single[name][1] if low else None)
    for rank, (out, calls, sparse_calls) in enumerate(results):
        start, end = slices[rank]
        for name, (value, gs, gt) in out.items():
            e_value, e_gs, e_gt = exact[name]
            s_value, s_gs, s_gt = single[name]
            _assert_matches(value, s_value, e_value, f"rank {rank} {name} value", single=s_value if low else None)
            if not low:
                _assert_matches(gs, s_gs[..., start:end], e_gs[..., start:end], f"rank {rank} {name} student grad")
            if gt is not None and e_gt is not None and e_gt.abs().sum() > 0:
                _assert_matches(gt, s_gt, e_gt, f"rank {rank} {name} temperature grad", single=s_gt if low else None)
        # Per-row numbers (3 x 4 rows, JSD's two KLs at once; the layout's 4 integers), and for the sparse teacher
        # (6 rows, 5 slots) one per slot: nothing that grows with the vocabulary.
        for op, shape in calls:
            assert torch.Size(shape).numel() <= 2 * 12, f"{op} of {shape} crossed the network: over two per row"
        for op, shape in sparse_calls:
            assert torch.Size(shape).numel() <= 6 * 5, f"{op} of {shape} crossed the network: more than one per slot"


def _fused_inputs(vocab, dtype, hidden=5):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 4, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64)
    b = torch.randn(vocab, generator=g, dtype=torch.float64)
    h_t = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    w_t = torch.randn(vocab, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, vocab, (2, 4), generator=g)
    y[1, 3] = -100
    full = torch.log_softmax(h_t @ w_t.T, -1)
    lp, ids = full.topk(4, -1)
    lp[0, 0, 2:] = float("-inf")
    return [x.to(dtype) for x in (h, w, b, h_t, w_t)] + [y, ids, lp.to(dtype), (h_t @ w_t.T).to(dtype)]


FUSED_CASES = {
    "forward_kl_ce": dict(loss="forward_kl", ce_weight=0.5, temperature=2.0, student_softcap=4.0),
    "reverse_kl": dict(loss="reverse_kl", teacher_softcap=3.0),
    "jsd": dict(loss="jsd", beta=0.3, ce_weight=0.2),
    "kd_bias": dict(loss="kd", temperature=3.0, bias=True, num_items_in_batch=11),
    "teacher_logits": dict(loss="jsd", beta=0.6, logits=True),
    "sparse_bucket": dict(loss="forward_kl", topk=True, tail="bucket", ce_weight=0.3),
    "sparse_renormalize": dict(loss="kd", topk=True, temperature=2.0),
}


def _fused_call(case, h, w, b, h_t, w_t, y, ids, lp, z_t, **vp):
    options = dict(case)
    bias = options.pop("bias", False)
    logits = options.pop("logits", False)
    topk = options.pop("topk", False)
    if topk:
        teacher = dict(teacher_topk=(ids, lp))
    elif logits:
        teacher = dict(teacher_logits=z_t)
    else:
        teacher = dict(teacher_hidden=h_t, teacher_weight=w_t)
    return KF.fused_linear_distill_loss(h, w, labels=y, student_bias=b if bias else None, chunk_size=3, **teacher,
                                        **options, **vp)


def _fused_rank(rank, world, bounds, vocab, dtype, backend):
    slices, given = _slices(world, bounds, vocab)
    start, end = slices[rank]
    h, w, b, h_t, w_t, y, ids, lp, z_t = _fused_inputs(vocab, dtype)
    vp = dict(process_group=dist.group.WORLD, vocab_range=(start, end) if given else None, backend=backend)
    calls = []
    _recorder(calls)
    out = {}
    for name, case in FUSED_CASES.items():
        hs, ws, bs = (x.clone().requires_grad_() for x in (h, w[start:end], b[start:end]))
        loss = _fused_call(case, hs, ws, bs, h_t, w_t[start:end], y, ids, lp, z_t[..., start:end], **vp)
        loss.backward()
        out[name] = (loss.detach(), hs.grad, ws.grad, bs.grad)
    return out, calls


def _fused_reference(vocab, dtype, exact=False):
    """The single-process results in `dtype`; `exact`: in float64 on the same `dtype`-rounded inputs."""
    h, w, b, h_t, w_t, y, ids, lp, z_t = _widened(_fused_inputs(vocab, dtype), torch.float64 if exact else dtype)
    out = {}
    for name, case in FUSED_CASES.items():
        hs, ws, bs = (x.clone().requires_grad_() for x in (h, w, b))
        loss = _fused_call(case, hs, ws, bs, h_t, w_t, y, ids, lp, z_t)
        loss.backward()
        out[name] = (loss.detach(), hs.grad, ws.grad, bs.grad)
    return out


@pytest.mark.parametrize("world,bounds,vocab", LAYOUTS)
@pytest.mark.parametrize("dtype,backend", PRECISIONS)
def test_fused_linear_loss_equals_single_process(world, bounds, vocab, dtype, backend):
    """The fused linear loss with vocabulary-parallel output layers (several chunks; softcaps, biases, CE, JSD, KD,
    precomputed teacher logits, a sparse teacher): the loss of the whole vocabulary on every rank, the weight's and
    bias's gradients the rank's rows of the single-process ones, the hidden states' gradient the whole one. Only
    per-row numbers and the N x H hidden-state gradient are communicated."""
    results = run_ranks(world, _fused_rank, bounds, vocab, dtype, backend)
    exact = _fused_reference(vocab, dtype, exact=True)
    single = _fused_reference(vocab, dtype)
    slices, _ = _slices(world, bounds, vocab)
    low = dtype != torch.float64
    for name in FUSED_CASES:
        # The weight's and bias's rows of every rank side by side, judged whole (as the logit test's gradients).
        for i, what in ((2, "weight grad"), (3, "bias grad")):
            if exact[name][i] is None:
                assert all(out[name][i] is None for out, _ in results)
                continue
            whole = torch.cat([out[name][i] for out, _ in results])
            _assert_matches(whole, single[name][i], exact[name][i], f"{name} {what} (all ranks)",
                            single=single[name][i] if low else None)
    for rank, (out, calls) in enumerate(results):
        start, end = slices[rank]
        for name, got in out.items():
            e, s = exact[name], single[name]
            for i, what in ((0, "value"), (1, "hidden grad")):
                _assert_matches(got[i], s[i], e[i], f"rank {rank} {name} {what}", single=s[i] if low else None)
        # The hidden states' gradient (8 x 5), else per-row numbers of a 3-row chunk (a sparse teacher's: one per
        # slot, 4 slots): the chunk's logits (3 x V / W) never.
        for op, shape in calls:
            assert shape == (8, 5) or torch.Size(shape).numel() <= 3 * 4, f"{op} of {shape} crossed the network"


def _layout_error_rank(rank, world, case):
    x = torch.randn(4, 5)
    if case == "range_for_two":  # ranges made for 2 ranks on 3
        return KF.kl_div_loss(x, x, process_group=dist.group.WORLD, vocab_range=(min(rank, 1) * 5, min(rank, 1) * 5 + 5))
    if case == "unequal_without_range":
        x = torch.randn(4, 5 + rank)
        return KF.kl_div_loss(x, x, process_group=dist.group.WORLD)
    if case == "other_rows":
        x = torch.randn(4 + rank, 5)
        return KF.jsd_loss(x, x, process_group=dist.group.WORLD)
    if case == "range_on_some":
        return KF.kd_loss(x, x, process_group=dist.group.WORLD, vocab_range=(0, 5) if rank == 0 else None)
    if case == "wrong_width":
        return KF.kd_loss(x, x, process_group=dist.group.WORLD, vocab_range=(rank * 6, rank * 6 + 6))
    raise AssertionError(case)


@pytest.mark.parametrize("case,message", [
    ("range_for_two", "tile"), ("unequal_without_range", "equal slices"), ("other_rows", "same tokens"),
    ("range_on_some", "every rank or on none"), ("wrong_width", "holds 6 ids")])
def test_wrong_layout_raises_on_every_rank(case, message):
    """A layout mistake raises a ValueError naming it on every rank (3 ranks), never a hang."""
    with pytest.raises(RankError) as info:
        run_ranks(3, _layout_error_rank, case, timeout=60)
    assert sorted(info.value.errors) == [0, 1, 2]
    for text in info.value.errors.values():
        assert "ValueError" in text and message in text, text


def test_single_process_errors():
    """Without torch.distributed initialised a group cannot be used; a vocab_range needs a group; the kernel
    backends have no vocabulary-parallel form."""
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="not initialised"):
        KF.kl_div_loss(x, x, process_group=object())
    with pytest.raises(ValueError, match="needs process_group"):
        KF.jsd_loss(x, x, vocab_range=(0, 4))
    with pytest.raises(ValueError, match="needs process_group"):
        KF.fused_linear_distill_loss(torch.randn(3, 2), torch.randn(4, 2), teacher_logits=x, vocab_range=(0, 4))


def _backend_rank(rank, world):
    from fastkd._dispatch import BackendUnavailableError
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    group = dist.group.WORLD
    refused = {}
    for name, call in (("cuda", lambda: KF.kd_loss(x, y, process_group=group, backend="cuda")),
                       ("sparse", lambda: KF.sparse_kd_loss(x, torch.zeros(2, 1, dtype=torch.long),
                                                            torch.zeros(2, 1), process_group=group,
                                                            backend="triton"))):
        try:
            call()
        except BackendUnavailableError as error:
            refused[name] = str(error)
    module = L.KLDistillationLoss(process_group=group)
    value = module(x.requires_grad_(), x.detach())
    return refused, value.detach()


def test_kernel_backend_refused_and_module():
    """A backend that cannot run here is refused by name (CUDA C++ without a GPU; the sparse loss has no slice
    kernel); the modules take the group."""
    for refused, value in run_ranks(2, _backend_rank):
        assert set(refused) == {"cuda", "sparse"}, refused
        assert "vocabulary-parallel" in refused["sparse"]
        assert float(value) == 0.0


def _dtensor_rank(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    torch.manual_seed(0)
    vocab, hidden = 10, 4
    w = torch.randn(vocab, hidden, dtype=torch.float64)
    w_t = torch.randn(vocab, 3, dtype=torch.float64)
    hs = torch.randn(world, 5, hidden, dtype=torch.float64)
    hts = torch.randn(world, 5, 3, dtype=torch.float64)
    mesh = init_device_mesh("cpu", (world,))
    weight = torch.nn.Parameter(distribute_tensor(w, mesh, [Shard(0)]))
    teacher = distribute_tensor(w_t, mesh, [Shard(0)])
    loss = KF.fused_linear_distill_loss(hs[rank], weight, hts[rank], teacher, loss="jsd")
    loss.backward()
    return loss.detach(), weight.grad.full_tensor()


def test_dtensor_weight_fsdp():
    """An FSDP2-style DTensor weight (Shard(0) over 2 ranks, each rank its own tokens): each rank's loss is the
    single-process loss of its tokens, and the weight's gradient is the average over the ranks of theirs, as FSDP2
    averages every parameter's."""
    results = run_ranks(2, _dtensor_rank)
    torch.manual_seed(0)
    w = torch.randn(10, 4, dtype=torch.float64)
    w_t = torch.randn(10, 3, dtype=torch.float64)
    hs = torch.randn(2, 5, 4, dtype=torch.float64)
    hts = torch.randn(2, 5, 3, dtype=torch.float64)
    grads = []
    for rank, (loss, grad) in enumerate(results):
        weight = w.clone().requires_grad_()
        want = KF.fused_linear_distill_loss(hs[rank], weight, hts[rank], w_t, loss="jsd")
        want.backward()
        grads.append(weight.grad)
        torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-14)
    for _, grad in results:
        torch.testing.assert_close(grad, (grads[0] + grads[1]) / 2, rtol=1e-12, atol=1e-14)
