"""The relational losses over a data-parallel group (`process_group=`, `functional.global_batch`) on W gloo ranks.

What is proved, for rkd_loss, rkd_distance_loss, rkd_angle_loss, sp_loss, cc_loss and pkt_loss with their options:
every rank's loss is the single-process loss of the batch concatenated in rank order (ranks of unequal sizes, a
rank with no sample), every rank's student gradient is W times its rows of that loss's gradient, the teacher gets
none; one DDP step on W ranks leaves the parameters of one single-process step on the concatenated batch; a group
given without torch.distributed, or a group that is not one, is refused before any collective; ranks whose
features differ in shape or dtype raise the same ValueError on every rank.

Every rank builds the same global batch from the same seed and takes its rows, so the parent can rebuild it. One
group run (tests/ranks.py) checks many cases: a group's startup costs more than the tiny losses.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import close, features
from ranks import RankError, run_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastkd import functional as KF
from fastkd.distributed import check_group

LOSSES = ("rkd_loss", "rkd_distance_loss", "rkd_angle_loss", "sp_loss", "cc_loss", "pkt_loss")
# (loss, options): each loss with its defaults and each option that changes the formula.
VARIANTS = [
    ("rkd_loss", {}), ("rkd_loss", {"squared": True, "eps": 1e-8}),
    ("rkd_loss", {"distance_weight": 1.5, "angle_weight": 0.0}),
    ("rkd_distance_loss", {}), ("rkd_distance_loss", {"squared": True}),
    ("rkd_angle_loss", {}),
    ("sp_loss", {}), ("sp_loss", {"norm": "l1"}),
    ("cc_loss", {}),
    ("pkt_loss", {}), ("pkt_loss", {"eps": 1e-4}),
]
# (student features, teacher features) per sample: a vector of odd width and a (C, H, W) map; cc_loss needs the
# teacher's shape to be the student's.
SHAPES = [((7,), (4,)), ((3, 2, 2), (5,))]
# float32 against float64 on the same values, relative to the tensor's largest entry (helpers.close).
FLOAT32_RTOL = 1e-5


def loss_fn(name, options, process_group=None):
    return lambda s, t: getattr(KF, name)(s, t, process_group=process_group, **options)


def cases():
    """Every (loss, options, student shape, teacher shape, dtype, seed) that one group run checks."""
    out = []
    for i, (name, options) in enumerate(VARIANTS):
        for j, (s_shape, t_shape) in enumerate(SHAPES):
            for dtype in (torch.float64, torch.float32):
                out.append((name, options, s_shape, s_shape if name == "cc_loss" else t_shape, dtype, 10 * i + j))
    return out


def global_features(rows, s_shape, t_shape, dtype, seed):
    """The student's and the teacher's features of the whole batch: the same on every rank and in the parent."""
    return (features(rows, *s_shape, seed=seed, dtype=dtype),
            features(rows, *t_shape, seed=seed + 1000, dtype=dtype, scale=2.0, offset=0.5))


def my_rows(rank, sizes):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def losses_on_rank(rank, world_size, sizes, checks):
    """Each case's loss over the group on this rank's rows: (loss, student grad, teacher grad or None)."""
    out = []
    for name, options, s_shape, t_shape, dtype, seed in checks:
        s_all, t_all = global_features(sum(sizes), s_shape, t_shape, dtype, seed)
        s = s_all[my_rows(rank, sizes)].clone().requires_grad_(True)
        t = t_all[my_rows(rank, sizes)].clone().requires_grad_(True)
        loss = loss_fn(name, options, dist.group.WORLD)(s, t)
        loss.backward()
        out.append((loss.detach(), s.grad, t.grad))
    return out


def single_process(name, options, s, t):
    """The plain loss (no group) of the whole batch and its student gradient."""
    s = s.detach().clone().requires_grad_(True)
    loss = loss_fn(name, options)(s, t)
    loss.backward()
    return loss.detach(), s.grad


def assert_matches_single_process(sizes, results, case):
    """Every rank's loss and gradient (scaled by 1/W) against the single-process ones on the whole batch: in
    float64 to 1e-12; in float32 to FLOAT32_RTOL of the float64 values, as the single-process float32 ones are,
    and to 1e-6 of the single-process float32 ones (the same arithmetic on the same gathered batch)."""
    name, options, s_shape, t_shape, dtype, seed = case
    W = len(sizes)
    s_all, t_all = global_features(sum(sizes), s_shape, t_shape, dtype, seed)
    exact = single_process(name, options, s_all.double(), t_all.double())
    plain = single_process(name, options, s_all, t_all)
    what = f"{name}{options} {s_shape}/{t_shape} {dtype} sizes {sizes}"
    for rank, (loss, grad, teacher_grad) in enumerate(results):
        rows = my_rows(rank, sizes)
        assert teacher_grad is None, f"{what}: rank {rank}'s teacher got a gradient"
        assert grad.shape == s_all[rows].shape, what
        for got, want, single, part in ((loss, exact[0], plain[0], "loss"),
                                        (grad / W, exact[1][rows], plain[1][rows], "grad")):
            if dtype == torch.float64:
                close(got, want, 1e-12, f"{what}: rank {rank} {part}")
            else:
                close(got.double(), want, FLOAT32_RTOL, f"{what}: rank {rank} {part} vs float64")
                close(single.double(), want, FLOAT32_RTOL, f"{what}: single-process {part} vs float64")
                close(got, single, 1e-6, f"{what}: rank {rank} {part} vs single-process float32")


@pytest.mark.parametrize("sizes", [(3, 5), (4, 4), (2, 4, 3), (3, 3, 3)], ids=str)
def test_loss_and_grad_match_single_process(sizes):
    """Every loss, option, feature shape and dtype on 2 and 3 ranks of equal and unequal batch sizes."""
    checks = cases()
    results = run_ranks(len(sizes), losses_on_rank, sizes, checks)
    for k, case in enumerate(checks):
        assert_matches_single_process(sizes, [r[k] for r in results], case)


@pytest.mark.parametrize("sizes", [(0, 4), (3, 0, 2)], ids=str)
def test_rank_without_samples(sizes):
    """A rank with an empty local batch takes part: its loss is the global one, its gradient empty."""
    checks = [c for c in cases() if c[4] == torch.float64]
    results = run_ranks(len(sizes), losses_on_rank, sizes, checks)
    for k, case in enumerate(checks):
        assert_matches_single_process(sizes, [r[k] for r in results], case)


# ----------------------------------------------------------------------------------------------------------
# one DDP step

STEP_RANK_ROWS = 3  # every rank's batch: DDP's averaging of the gradients assumes equal ones
LEARNING_RATE = 0.1


class Student(nn.Module):
    """A tiny MLP that returns its hidden features and its output, both fit for a relational loss."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(5, 6), nn.Linear(6, 6)

    def forward(self, x):
        hidden = torch.tanh(self.first(x))
        return hidden, self.second(hidden)


def step_setup(rows):
    """The student (the same initial weights everywhere), the teacher's features and the task targets of a global
    batch of `rows` samples, in float64."""
    g = torch.Generator().manual_seed(7)
    student = Student().double()
    with torch.no_grad():
        for p in student.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(rows, 5, generator=g, dtype=torch.float64)
    teacher = torch.randn(5, 6, generator=g, dtype=torch.float64)
    f_t = torch.tanh(x @ teacher)
    target = torch.randn(rows, 6, generator=g, dtype=torch.float64)
    return student, x, f_t, target


def step_loss(objective, model, x, f_t, target, process_group):
    """`objective` = (relational loss, with a local task loss?, with a second relational term on the hidden
    features?). The task loss is a mean over the batch held here, as usual under DDP."""
    name, task, hidden_term = objective
    hidden, out = model(x)
    loss = getattr(KF, name)(out, f_t, process_group=process_group)
    if task:
        loss = loss + F.mse_loss(out, target)
    if hidden_term:
        loss = loss + KF.sp_loss(hidden, f_t, process_group=process_group)
    return loss


def ddp_step_on_rank(rank, world_size, objectives):
    """One SGD step of a DDP student per objective, on this rank's rows: the averaged gradients and the new
    parameters."""
    out = []
    for objective in objectives:
        student, x, f_t, target = step_setup(world_size * STEP_RANK_ROWS)
        rows = slice(rank * STEP_RANK_ROWS, (rank + 1) * STEP_RANK_ROWS)
        model = DistributedDataParallel(student)
        optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
        optimizer.zero_grad()
        step_loss(objective, model, x[rows], f_t[rows], target[rows], dist.group.WORLD).backward()
        grads = [p.grad.clone() for p in student.parameters()]
        optimizer.step()
        out.append((grads, [p.detach().clone() for p in student.parameters()]))
    return out


STEP_OBJECTIVES = ([(name, False, False) for name in LOSSES] + [(name, True, False) for name in LOSSES]
                   + [("rkd_loss", True, True)])


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_step_equals_single_process_step(world_size):
    """One DDP step with a relational loss over the group (alone, plus a local mean-squared task loss, or plus
    a second relational term on the hidden features) gives every rank the gradients and parameters of one
    single-process step with the plain loss on the concatenated batch, in float64 to 1e-12."""
    results = run_ranks(world_size, ddp_step_on_rank, STEP_OBJECTIVES)
    for k, objective in enumerate(STEP_OBJECTIVES):
        student, x, f_t, target = step_setup(world_size * STEP_RANK_ROWS)
        optimizer = torch.optim.SGD(student.parameters(), lr=LEARNING_RATE)
        step_loss(objective, student, x, f_t, target, None).backward()
        want_grads = [p.grad.clone() for p in student.parameters()]
        optimizer.step()
        want_params = [p.detach() for p in student.parameters()]
        for rank, (grads, params) in enumerate(r[k] for r in results):
            assert_all_close(grads, want_grads, f"{objective} rank {rank} gradient")
            assert_all_close(params, want_params, f"{objective} rank {rank} parameter")


def assert_all_close(got, want, what):
    """Each tensor to 1e-12 of the largest entry of them all: a translation-invariant loss (RKD) leaves the
    output bias a gradient that is 0 but for rounding, which only the model's scale can measure."""
    scale = max(w.abs().max().item() for w in want)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12 * scale, msg=lambda m: f"{what} {i}: {m}")


# ----------------------------------------------------------------------------------------------------------
# errors

@pytest.mark.parametrize("name", LOSSES)
def test_group_without_init_process_group(name):
    """A process group given while torch.distributed is not initialised: check_group's ValueError, before any
    collective (nothing here has initialised it)."""
    assert not (dist.is_available() and dist.is_initialized())
    s, t = features(4, 6, seed=1), features(4, 6, seed=2)
    with pytest.raises(ValueError, match="torch.distributed is not initialised") as raised:
        getattr(KF, name)(s, t, process_group=object())
    with pytest.raises(ValueError) as direct:
        check_group(object())
    assert str(raised.value) == str(direct.value)


def wrong_groups_on_rank(rank, world_size):
    """Each loss given a group that is no ProcessGroup: the messages, then a valid call, which shows that the
    refused calls left no collective behind."""
    s, t = features(4, 6, seed=1, dtype=torch.float64), features(4, 6, seed=2, dtype=torch.float64)
    messages = []
    for name in LOSSES:
        for wrong in ("world", 0, [dist.group.WORLD]):
            try:
                getattr(KF, name)(s, t, process_group=wrong)
            except TypeError as e:
                messages.append(str(e))
            else:
                messages.append(None)
    return messages, KF.sp_loss(s, t, process_group=dist.group.WORLD)


def test_group_not_a_process_group():
    """Inside an initialised group, a process_group that is not a torch.distributed.ProcessGroup is a TypeError
    naming its type, on every rank."""
    (first, loss0), (second, loss1) = run_ranks(2, wrong_groups_on_rank)
    assert first == second
    assert len(first) == 3 * len(LOSSES)
    for message, kind in zip(first, ["str", "int", "list"] * len(LOSSES)):
        assert message == f"process_group must be a torch.distributed.ProcessGroup, got {kind}"
    s, t = features(4, 6, seed=1, dtype=torch.float64), features(4, 6, seed=2, dtype=torch.float64)
    close(loss0, KF.sp_loss(torch.cat([s, s]), torch.cat([t, t])), 1e-12, "the valid call after the refused ones")
    assert torch.equal(loss0, loss1)


def mismatched_on_rank(rank, world_size, kind):
    """rkd_loss over the group where the last rank's features differ from the others': its student (or teacher)
    one column wider, its student's rows (2, 2) instead of (4,) (the same bytes), or its student in float32."""
    last = rank == world_size - 1
    s_shape = {"student": (7 + last,), "shape": (2, 2) if last else (4,)}.get(kind, (7,))
    dtype = torch.float32 if kind == "dtype" and last else torch.float64
    s = features(3, *s_shape, seed=rank, dtype=dtype).requires_grad_(True)
    t = features(3, 4 + (kind == "teacher" and last), seed=rank + 10, dtype=dtype)
    KF.rkd_loss(s, t, process_group=dist.group.WORLD).backward()
    return s.grad


@pytest.mark.parametrize("kind", ["student", "teacher"])
def test_mismatched_widths_fail_fast(kind):
    """Ranks whose features differ in width fail within seconds: the group does not hang until its timeout
    (run_ranks would report a hang as a plain AssertionError, not a RankError)."""
    with pytest.raises(RankError):
        run_ranks(2, mismatched_on_rank, kind, timeout=20)


@pytest.mark.parametrize("kind, world_size", [("student", 2), ("student", 3), ("shape", 2), ("dtype", 2)])
def test_mismatched_features_raise_on_every_rank(kind, world_size):
    """Ranks whose features differ in width, shape or dtype: every rank raises a ValueError."""
    with pytest.raises(RankError) as raised:
        run_ranks(world_size, mismatched_on_rank, kind, timeout=20)
    assert sorted(raised.value.errors) == list(range(world_size))
    for text in raised.value.errors.values():
        assert "ValueError" in text
