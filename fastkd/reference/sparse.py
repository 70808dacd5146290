"""Sparse-teacher KD: the teacher given as k (id, log-probability) pairs per row instead of V logits.

A teacher cache stores, for every token, the ids of the teacher's top-k (or of n sampled ids) and the
teacher's log-probabilities of those ids, normalised over its full vocabulary. Per row (every leading position
of the student's logits `(..., V)` is a row, with its k slots `teacher_indices[..., :]`,
`teacher_logprobs[..., :]`):

    log q = log_softmax(z / T)                   the student, over all V ids
    i_1..i_k, l_1..l_k                           the slots; a slot whose l is -inf is unused

and over the used slots only, by `tail`:

- "renormalize": `p = softmax(l / T)` over the slots; `loss = sum_k p_k (log p_k - log q_{i_k})`.
  With k = V (every id once) this is `kl_div_loss(z, teacher_logits, T)`, the forward KL, exactly: the
  softmax of log-probabilities is the teacher's distribution, and tempering them is tempering its logits.
  Only the differences between the l matter, so log-weights that are not normalised work too. Random-sampling
  KD goes here: n ids drawn from the teacher, stored once each with `log(count / n)`; the student's gradient
  `(q - p_hat) / T` is then unbiased at T = 1, since the empirical `p_hat` has expectation p.
- "bucket": the k ids plus one more outcome, the tail (every id outside the set), on both sides:
      p_k = exp(l_k),   p_tail = max(0, 1 - sum_k p_k),   q_tail = sum_{j not in the set} q_j,
      loss = sum_k p_k (l_k - log q_{i_k}) + p_tail (log p_tail - log q_tail),
  the KL between the two distributions over k + 1 outcomes. Both tails are taken in log space, because the
  top-k often holds almost all the mass and `1 - sum` would cancel: `log q_tail` is the logsumexp of the
  student's log-probabilities with the set's ids masked out (not `log(1 - sum_k q_{i_k})`), and
  `log p_tail = log(1 - exp(L))`, `L = logsumexp_k l_k`, by `log1mexp`.
- "none": `sum_k p_k (l_k - log q_{i_k})` with `p_k = exp(l_k)` as given: the truncated KL, the terms of the
  forward KL at the k ids (no tail term, no renormalisation).

"bucket" and "none" need T = 1 (`fastkd.functional` raises otherwise): the stored log-probabilities are the
teacher's distribution at T = 1, and the mass outside the k ids at another temperature would need the logits
that were not stored.

Defined behaviour on unusual rows (each tested in tests/test_sparse_kd.py):
- An unused slot (l = -inf) is not among the k ids, on either side: its id is never read, whatever it holds
  (a padding value, -1, anything out of range).
- A used id outside [0, V): `fastkd.functional` raises on CPU tensors (that check reads the ids). Here,
  and so on CUDA tensors, the index is clamped for the gather (never an out-of-bounds read) and the row's
  loss is NaN: never a finite wrong number, and no wait on the host.
- A row with every slot unused (the teacher said nothing about this token): 0 for every tail, with a zero
  gradient. For "renormalize" p over no slots is undefined, and 0 is taken as "no information", as for
  "none" (an empty sum); for "bucket" it follows from the formula: p_tail = 1, and with no id in the set
  q_tail = 1, so the tail term is 1 * (log 1 - log 1). The token still counts in "batchmean"'s denominator
  (the labels decide what counts, not the teacher).
- Duplicate ids in a row: the writer should merge them (one slot per id, the masses added; the sampled-teacher
  recipe says so). If it does not, each used slot is its own term on both sides, while the tail is the
  complement of the *set* of ids: q_tail leaves a duplicated id out once, and p_tail subtracts each slot's
  mass, which is the merged mass. So at T = 1 the student's gradient is exactly that of the merged row, for
  every tail, and the value differs from the merged row's by a constant of the teacher
  (`sum_slots p log p - P log P` for the duplicated id's slots p and their sum P). With "renormalize" and
  T != 1 a split id is tempered per slot, `2 a^(1/T)` against `(2a)^(1/T)` merged: a different loss.
- The set covers the whole vocabulary (k >= V, every id present): there is no tail outcome, and "bucket" takes
  p_tail = 0 whatever `1 - sum_k p_k` is (the teacher's rounding, not mass outside the vocabulary); it equals
  "none" then.
- p_k = 0 (l_k = -inf or underflow) contributes 0 and a zero gradient, also against log q = -inf; a p_k > 0
  against a student log-probability of -inf gives +inf (as `kl_div_loss`). p_tail > 0 with q_tail = 0 (the
  student's logits -inf on every id outside the set) gives +inf; p_tail = 0 gives 0 there.

Reduction as `kl_div_loss` (`masked_reduce`): tokens whose label is `ignore_index` are left out; "batchmean"
is the mean over the remaining tokens (0 when none remain), "sum", "mean" (the sum over tokens * V, PyTorch's
per-element mean as in `kl_div_loss`), "none" (per token, 0 at ignored tokens). `num_items_in_batch` (with
"batchmean") replaces the token count: the sum over kept tokens divided by it, as `fused_linear_distill_loss`.
Arithmetic in the wider of the student's and the log-probabilities' dtypes and at least float32
(`compute_dtype`); gradients (autograd's, through this formula) reach the student and, if they require one,
the teacher's log-probabilities in their own dtypes. The reference makes the student's `log q` for the whole
row (`(..., V)` in float32): it is the specification, not the fast path.
"""
from __future__ import annotations

import math

import torch

from .logits import NEG_INF, compute_dtype, kl_rows, log_probs, logsumexp_or_neg_inf, masked_reduce

TAILS = ("renormalize", "bucket", "none")

_LOG_HALF = -math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """`log(1 - e^x)` for x < 0 without cancellation, -inf for x >= 0 (a mass of at least 1 leaves none).

    Maechler's split: `log(-expm1(x))` for x > -log 2, where `e^x` is near 1 and `expm1` keeps its digits,
    `log1p(-exp(x))` below, where `e^x` is small. The argument is made safe before either branch, so neither
    sends a NaN into the backward pass of the other.
    """
    below_one = x < 0
    safe = torch.where(below_one, x, -1.0)
    near_one = safe > _LOG_HALF
    out = torch.where(near_one, torch.log(-torch.expm1(torch.where(near_one, safe, -1.0))),
                      torch.log1p(-torch.exp(torch.where(near_one, -1.0, safe))))
    return torch.where(below_one, out, NEG_INF)


def log_softmax_or_neg_inf(x: torch.Tensor) -> torch.Tensor:
    """`log_softmax` over the last dim; a row that is -inf everywhere stays -inf (p = 0, zero gradient) where
    `log_softmax` would give NaN."""
    empty = (x == NEG_INF).all(-1, keepdim=True)
    return torch.where(empty, NEG_INF, torch.log_softmax(torch.where(empty, 0.0, x), dim=-1))


def sparse_kd_rows(student_logits: torch.Tensor, teacher_indices: torch.Tensor, teacher_logprobs: torch.Tensor,
                   tail: str = "renormalize", temperature: float = 1.0) -> torch.Tensor:
    """The loss of each row (module docstring), shaped `student_logits.shape[:-1]`, in `compute_dtype`.

    Every tensor below has the leading (row) dimensions of the student's logits; the last one is the row's V
    ids or its k slots, and each row's loss depends on that row alone.
    """
    dtype = compute_dtype(student_logits, teacher_logprobs)
    vocab = student_logits.shape[-1]
    l = teacher_logprobs.to(dtype)
    ids = teacher_indices.long()
    used = l != NEG_INF
    # A used id outside [0, V) makes its row NaN; its gather reads id 0 instead (an unused slot's id too:
    # never read, whatever it holds).
    in_range = (ids >= 0) & (ids < vocab)
    bad_row = (used & ~in_range).any(-1)
    readable = used & in_range
    ids = torch.where(readable, ids, 0)

    log_q = log_probs(student_logits, temperature, dtype)  # (..., V)
    log_q_ids = log_q.gather(-1, ids)  # (..., k): log q_{i_k}

    if tail == "renormalize":
        # p = softmax(l / T) over the used slots (unused ones stay -inf: p = 0); all unused: p = 0 everywhere.
        rows = kl_rows(log_softmax_or_neg_inf(l / temperature), log_q_ids)
    elif tail == "none":
        rows = kl_rows(l, log_q_ids)
    else:
        # The set of ids (a duplicated id once): counted by scatter_add, which sums duplicates (a boolean
        # scatter would let an unused slot's placeholder id overwrite a used one).
        in_set = torch.zeros_like(log_q).scatter_add_(-1, ids, readable.to(dtype)) > 0
        log_q_tail = logsumexp_or_neg_inf(log_q.masked_fill(in_set, NEG_INF), -1)
        # An empty set leaves q_tail = 1 exactly (the logsumexp of all of log q rounds near 0).
        log_q_tail = torch.where(in_set.any(-1), log_q_tail, 0.0)
        log_p_tail = log1mexp(logsumexp_or_neg_inf(l, -1))
        log_p_tail = torch.where(in_set.all(-1), NEG_INF, log_p_tail)  # no id outside the set: no tail
        # The k slots and the tail as one distribution over k + 1 outcomes on each side.
        rows = kl_rows(torch.cat([l, log_p_tail.unsqueeze(-1)], -1),
                       torch.cat([log_q_ids, log_q_tail.unsqueeze(-1)], -1))
    return torch.where(bad_row, float("nan"), rows)


def sparse_kd_loss(student_logits: torch.Tensor, teacher_indices: torch.Tensor, teacher_logprobs: torch.Tensor,
                   labels: torch.Tensor | None = None, *, tail: str = "renormalize", temperature: float = 1.0,
                   ignore_index: int = -100, num_items_in_batch=None, reduction: str = "batchmean") -> torch.Tensor:
    """KD against a sparse teacher: `sparse_kd_rows` per token, reduced as `kl_div_loss` (module docstring).

    `num_items_in_batch` (a number or a one-element tensor, with reduction "batchmean"): the sum over the kept
    tokens divided by it instead of by their count (gradient accumulation over micro-batches).
    """
    per_token = sparse_kd_rows(student_logits, teacher_indices, teacher_logprobs, tail, temperature)
    return reduce_tokens(per_token, labels, ignore_index, num_items_in_batch, reduction, student_logits.shape[-1])


def reduce_tokens(per_token: torch.Tensor, labels: torch.Tensor | None, ignore_index: int, num_items_in_batch,
                  reduction: str, vocab: int) -> torch.Tensor:
    """The loss from the per-token terms: `masked_reduce`, or with `num_items_in_batch` the sum over the kept
    tokens divided by it. Shared with the kernel backends' loss (`fastkd.kernel_losses.sparse_kd_loss`)."""
    if num_items_in_batch is None:
        return masked_reduce(per_token, labels, ignore_index, reduction, vocab)
    if labels is not None:
        per_token = torch.where(labels != ignore_index, per_token, 0.0)
    return per_token.sum() / items_count(num_items_in_batch, per_token.dtype, per_token.device)


def items_count(num_items_in_batch, dtype: torch.dtype, device) -> torch.Tensor:
    """`num_items_in_batch` (a number or a one-element tensor) as a 0-d tensor in `dtype` on `device`."""
    return torch.as_tensor(num_items_in_batch, device=device).to(dtype).reshape(())


def sparse_kd_rows_and_grad(student_logits: torch.Tensor, teacher_indices: torch.Tensor,
                            teacher_logprobs: torch.Tensor, tail: str = "renormalize",
                            temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`sparse_kd_rows` and the gradient of each row's loss with respect to that row's logits, in closed form
    (no autograd): for a caller that makes the student's gradient in its forward pass (the fused linear loss's
    chunk loop, `fastkd.fused_linear`). Both in `compute_dtype`; the gradient has the logits' shape.

    With `q = softmax(z / T)`, the slot masses `p_k` (the teacher side of each tail's KL, 0 in unused slots),
    `P = sum_k p_k` and `d log q_i / d z_j = ([i = j] - q_j) / T`, the k slots' terms `-sum_k p_k log q_{i_k}`
    give `(q_j P - sum_{k: i_k = j} p_k) / T`:
    - "renormalize": `p = softmax(l / T)` over the used slots (P = 1, or 0 for a row with none);
    - "none": `p_k = e^{l_k}` as stored (T = 1 by the public API; any T here divides by it all the same);
    - "bucket": the same slot terms, plus the tail's `-p_tail log q_tail`, whose derivative is
      `p_tail (q_j - [j not in the set] q_j / q_tail)`; so `q_j (P + p_tail) - sum_{k: i_k = j} p_k -
      p_tail [j not in the set] q_j / q_tail` (over T). `q_j / q_tail` is the student's softmax over the ids outside the
      set, taken as `exp(log q_j - log q_tail)` from the same log-space `q_tail` as the value.
    A duplicated id collects each of its slots' masses (the scatter adds), as autograd of `sparse_kd_rows` does.
    Rows `sparse_kd_rows` makes NaN (a used id out of range) get a zero gradient, as autograd gives through its
    `where`; so does a bucket row whose `q_tail` is 0 in the tail term (its loss is +inf or 0).
    """
    rows = sparse_kd_rows(student_logits.detach(), teacher_indices, teacher_logprobs.detach(), tail, temperature)
    dtype = rows.dtype
    l = teacher_logprobs.detach().to(dtype)
    ids = teacher_indices.long()
    used = l != NEG_INF
    in_range = (ids >= 0) & (ids < student_logits.shape[-1])
    readable = used & in_range
    ids = torch.where(readable, ids, 0)  # an unread slot adds its p = 0 at id 0; a bad row is zeroed below

    log_q = log_probs(student_logits.detach(), temperature, dtype)
    p = (log_softmax_or_neg_inf(l / temperature) if tail == "renormalize" else l).exp()
    grad = log_q.exp()
    if tail == "bucket":
        in_set = torch.zeros_like(log_q).scatter_add_(-1, ids, readable.to(dtype)) > 0
        log_q_tail = logsumexp_or_neg_inf(log_q.masked_fill(in_set, NEG_INF), -1)
        log_q_tail = torch.where(in_set.any(-1), log_q_tail, 0.0).unsqueeze(-1)
        log_p_tail = log1mexp(logsumexp_or_neg_inf(l, -1))
        p_tail = torch.where(in_set.all(-1), 0.0, log_p_tail.exp()).unsqueeze(-1)
        # q_j / q_tail outside the set (0 inside it, and where q_tail is 0: no finite direction there).
        outside = torch.where(in_set | (log_q_tail == NEG_INF), 0.0, (log_q - log_q_tail).exp())
        grad = grad * (p.sum(-1, keepdim=True) + p_tail) - p_tail * outside
    else:
        grad = grad * p.sum(-1, keepdim=True)
    grad = grad.scatter_add_(-1, ids, -p)
    if temperature != 1.0:  # every term is a function of z / T
        grad = grad / temperature
    bad_row = (used & ~in_range).any(-1, keepdim=True)
    return rows, torch.where(bad_row, 0.0, grad)
