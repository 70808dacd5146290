"""The popular implementations' loss formulas, written out once, as their code writes them: the yardsticks that
never call fastkd. RepDistiller's `distiller_zoo` (DistillKL, RKDLoss, Attention, Similarity, PKT, NSTLoss,
Correlation, FSP, HintLoss), torchdistill's paper-mode attention transfer, TRL's `generalized_jsd_loss`,
mdistiller's `dkd_loss`; and sparse-teacher KD (issue 14), its definition written out slot by slot. Each runs on
tensors of its inputs' dtype (no upcast), so the same function is the float64 oracle
(tests/test_compat_repdistiller.py, tests/test_edge_cases.py, tests/test_reference_formulas.py,
tests/test_sparse_kd.py) and "eager PyTorch in the same dtype" (tests/test_adversarial.py,
tests/test_sparse_kd.py).

Imported as `from formulas import ...` (tests/ is on sys.path, see tests/helpers.py).
"""
import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------
# logits

def distill_kl(s, t, T):
    """RepDistiller `DistillKL(T)` (distiller_zoo/KD.py)."""
    p_s = F.log_softmax(s / T, dim=1)
    p_t = F.softmax(t / T, dim=1)
    return F.kl_div(p_s, p_t, reduction="sum") * (T ** 2) / s.shape[0]


def kd_with_ce(s, t, T, target):
    """RepDistiller train_student.py: `gamma * CE(logit_s, target) + alpha * DistillKL(T)`, here 0.1 and 0.9."""
    return 0.1 * F.cross_entropy(s, target) + 0.9 * distill_kl(s, t, T)


def trl_generalized_jsd(s, t, beta, T, labels=None, ignore_index=-100):
    """TRL `GKDTrainer.generalized_jsd_loss` (beta 0: forward KL, beta 1: reverse KL): the masked mean over
    tokens, or without labels the mean over the first two dimensions (TRL's "batchmean")."""
    student_log_probs = F.log_softmax(s / T, dim=-1)
    teacher_log_probs = F.log_softmax(t / T, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log(1 - beta), teacher_log_probs + torch.log(beta)]), dim=0)
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta * kl_teacher + (1 - beta) * kl_student
    if labels is None:
        return jsd.sum() / (jsd.size(0) * jsd.size(1))
    mask = labels != ignore_index
    return jsd[mask].sum() / mask.sum()


def mdistiller_dkd(logits_student, logits_teacher, target, alpha=1.0, beta=8.0, temperature=4.0):
    """mdistiller `dkd_loss` (mdistill/distillers/DKD.py), masks and `- 1000 * gt_mask` included."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(t, mask1, mask2):
        t1 = (t * mask1).sum(dim=1, keepdims=True)
        t2 = (t * mask2).sum(1, keepdims=True)
        return torch.cat([t1, t2], dim=1)

    pred_student = cat_mask(F.softmax(logits_student / temperature, dim=1), gt_mask, other_mask)
    pred_teacher = cat_mask(F.softmax(logits_teacher / temperature, dim=1), gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd_loss = F.kl_div(log_pred_student, pred_teacher, reduction="sum") * (temperature ** 2) / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd_loss = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") * (temperature ** 2) \
        / target.shape[0]
    return alpha * tckd_loss + beta * nckd_loss


def sparse_kd_tokens(s, ids, logprobs, tail, T=1.0):
    """Sparse-teacher KD per token (`fastkd.functional.sparse_kd_loss`'s definition), one Python term per slot.

    Logits `s (..., V)`, ids and teacher log-probabilities `(..., k)`; a slot whose log-probability is -inf is
    skipped. "renormalize": `p = softmax(l / T)` over the used slots, `sum p (log p - log q_i)`; "none":
    `sum exp(l) (l - log q_i)`; "bucket": "none" plus `p_tail (log p_tail - log q_tail)`, with
    `p_tail = max(0, 1 - sum exp(l))` and `q_tail` the student's probabilities summed over the ids outside the
    set of used ids (no tail when the set is the whole vocabulary). A duplicated id is a term per slot.
    A token with no used slot gives 0. Out-of-range ids are not handled. Returns `(...)`.
    """
    V, k = s.shape[-1], ids.shape[-1]
    per_token = []
    for z, i, l in zip(s.reshape(-1, V), ids.reshape(-1, k), logprobs.reshape(-1, k)):
        log_q = F.log_softmax(z / T, dim=-1)
        used = [j for j in range(k) if l[j] != float("-inf")]
        terms = [(z * 0).sum()]  # a token with no term: 0, still in the graph
        if tail == "renormalize":
            if used:
                log_p = F.log_softmax(l[used] / T, dim=-1)
                terms += [log_p[n].exp() * (log_p[n] - log_q[i[j]]) for n, j in enumerate(used)]
        else:
            terms += [l[j].exp() * (l[j] - log_q[i[j]]) for j in used]
            outside = sorted(set(range(V)) - {int(i[j]) for j in used})
            if tail == "bucket" and outside:
                p_tail = (1 - sum((l[j].exp() for j in used), l.new_zeros(()))).clamp(min=0)
                q_tail = log_q[outside].exp().sum()
                if p_tail > 0:
                    terms.append(p_tail * (p_tail.log() - q_tail.log()))
        per_token.append(sum(terms))
    return torch.stack(per_token).reshape(s.shape[:-1])


# ----------------------------------------------------------------------------------------------------------
# features (B, D), maps (B, C, H, W)

def pdist(e, squared=False, eps=1e-12):
    """RepDistiller `RKDLoss.pdist`."""
    e_square = e.pow(2).sum(dim=1)
    prod = e @ e.t()
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * prod).clamp(min=eps)
    if not squared:
        res = res.sqrt()
    res = res.clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def rkd_distance(f_s, f_t):
    """RepDistiller `RKDLoss.forward` (distiller_zoo/RKD.py), its distance term."""
    student, teacher = f_s.view(f_s.shape[0], -1), f_t.view(f_t.shape[0], -1)
    with torch.no_grad():
        t_d = pdist(teacher, squared=False)
        mean_td = t_d[t_d > 0].mean()
        t_d = t_d / mean_td
    d = pdist(student, squared=False)
    mean_d = d[d > 0].mean()
    d = d / mean_d
    return F.smooth_l1_loss(d, t_d)


def rkd_angle(f_s, f_t):
    """RepDistiller `RKDLoss.forward`, its angle term."""
    student, teacher = f_s.view(f_s.shape[0], -1), f_t.view(f_t.shape[0], -1)
    with torch.no_grad():
        td = (teacher.unsqueeze(0) - teacher.unsqueeze(1))
        norm_td = F.normalize(td, p=2, dim=2)
        t_angle = torch.bmm(norm_td, norm_td.transpose(1, 2)).view(-1)
    sd = (student.unsqueeze(0) - student.unsqueeze(1))
    norm_sd = F.normalize(sd, p=2, dim=2)
    s_angle = torch.bmm(norm_sd, norm_sd.transpose(1, 2)).view(-1)
    return F.smooth_l1_loss(s_angle, t_angle)


def rkd(f_s, f_t, w_d=25, w_a=50):
    """RepDistiller `RKDLoss(w_d, w_a)`, by default its (25, 50)."""
    return w_d * rkd_distance(f_s, f_t) + w_a * rkd_angle(f_s, f_t)


def pool_to_smaller(f_s, f_t):
    """RepDistiller (AT, NST, FSP): the map with the larger H is pooled to (H, H) of the other."""
    s_H, t_H = f_s.shape[2], f_t.shape[2]
    if s_H > t_H:
        f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
    elif s_H < t_H:
        f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))
    return f_s, f_t


def attention_map(f, p):
    """RepDistiller `Attention.at` (distiller_zoo/AT.py)."""
    return F.normalize(f.pow(p).mean(1).view(f.size(0), -1))


def at(f_s, f_t, p):
    """RepDistiller `Attention.at_loss`."""
    f_s, f_t = pool_to_smaller(f_s, f_t)
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


def at_paper(f_s, f_t, p):
    """torchdistill `ATLoss(mode='paper')`: `||normalize(sum_c f^p) diff||_2` per sample, mean over the batch."""
    a_s = F.normalize(f_s.pow(p).sum(dim=1).flatten(1), dim=1)
    a_t = F.normalize(f_t.pow(p).sum(dim=1).flatten(1), dim=1)
    return torch.norm(a_s - a_t, dim=1).sum() / f_s.shape[0]


def similarity(f_s, f_t):
    """RepDistiller `Similarity.similarity_loss` (distiller_zoo/SP.py): shape (1,), as RepDistiller returns it."""
    bsz = f_s.shape[0]
    f_s, f_t = f_s.view(bsz, -1), f_t.view(bsz, -1)
    G_s = F.normalize(torch.mm(f_s, torch.t(f_s)))
    G_t = F.normalize(torch.mm(f_t, torch.t(f_t)))
    G_diff = G_t - G_s
    return (G_diff * G_diff).view(-1, 1).sum(0) / (bsz * bsz)


def pkt(output_net, target_net, eps=0.0000001):
    """RepDistiller `PKT.cosine_similarity_loss` (distiller_zoo/PKT.py)."""
    output_net_norm = torch.sqrt(torch.sum(output_net ** 2, dim=1, keepdim=True))
    output_net = output_net / (output_net_norm + eps)
    output_net[output_net != output_net] = 0
    target_net_norm = torch.sqrt(torch.sum(target_net ** 2, dim=1, keepdim=True))
    target_net = target_net / (target_net_norm + eps)
    target_net[target_net != target_net] = 0
    model_similarity = torch.mm(output_net, output_net.transpose(0, 1))
    target_similarity = torch.mm(target_net, target_net.transpose(0, 1))
    model_similarity = (model_similarity + 1.0) / 2.0
    target_similarity = (target_similarity + 1.0) / 2.0
    model_similarity = model_similarity / torch.sum(model_similarity, dim=1, keepdim=True)
    target_similarity = target_similarity / torch.sum(target_similarity, dim=1, keepdim=True)
    return torch.mean(target_similarity * torch.log((target_similarity + eps) / (model_similarity + eps)))


def nst(f_s, f_t):
    """RepDistiller `NSTLoss.nst_loss` (distiller_zoo/NST.py)."""
    f_s, f_t = pool_to_smaller(f_s, f_t)
    f_s = F.normalize(f_s.view(f_s.shape[0], f_s.shape[1], -1), dim=2)
    f_t = F.normalize(f_t.view(f_t.shape[0], f_t.shape[1], -1), dim=2)

    def poly_kernel(a, b):
        return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)
    return poly_kernel(f_t, f_t).mean().detach() + poly_kernel(f_s, f_s).mean() - 2 * poly_kernel(f_s, f_t).mean()


def correlation(f_s, f_t):
    """RepDistiller `Correlation.forward` (distiller_zoo/CC.py)."""
    delta = torch.abs(f_s - f_t)
    return torch.mean((delta[:-1] * delta[1:]).sum(1))


def fsp_matrices(g):
    """RepDistiller `FSP.compute_fsp` (distiller_zoo/FSP.py): one matrix per pair of consecutive layers."""
    fsp_list = []
    for i in range(len(g) - 1):
        bot, top = pool_to_smaller(g[i], g[i + 1])
        bot = bot.unsqueeze(1)
        top = top.unsqueeze(2)
        bot = bot.view(bot.shape[0], bot.shape[1], bot.shape[2], -1)
        top = top.view(top.shape[0], top.shape[1], top.shape[2], -1)
        fsp_list.append((bot * top).mean(-1))
    return fsp_list


def fsp_losses(g_s, g_t):
    """RepDistiller `FSP.forward`: the list of per-pair losses."""
    return [(s - t).pow(2).mean() for s, t in zip(fsp_matrices(g_s), fsp_matrices(g_t))]


def fsp(g_s, g_t):
    """The training script's FSP loss: the sum of the per-pair losses."""
    return sum(fsp_losses(g_s, g_t))


def hint(f_s, f_t):
    """RepDistiller `HintLoss` (`nn.MSELoss`)."""
    return torch.nn.MSELoss()(f_s, f_t)
