"""The LLM drop-ins (`fastkd.compat.liger`, `fastkd.compat.trl`) against numbers their originals gave.

The pinned numbers were computed by Liger-Kernel 0.8.5 (its chunked loss in plain PyTorch, its Triton losses in
Triton's interpreter) and TRL 1.16's `GKDTrainer.generalized_jsd_loss`, on the CPU in float32, from the inputs of
`inputs()` (torch.manual_seed(0)); neither package is a dependency of fastkd, so the numbers stand in for them.
The originals agree with each other to about 1e-7 on these; the tolerance is rtol 1e-5.
"""
import pytest
import torch

from fastkd.compat import liger, trl

RTOL = 1e-5


def inputs(teacher_vocab=32):
    torch.manual_seed(0)
    si, sw = torch.randn(8, 16), torch.randn(32, 16)
    ti, tw = torch.randn(8, 12), torch.randn(teacher_vocab, 12)
    labels = torch.randint(0, 32, (8,))
    labels[1] = labels[5] = -100
    return si, sw, ti, tw, labels


def on(device, *tensors):
    return [t.to(device) for t in tensors]


def close(got, want):
    torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=RTOL, atol=1e-7)


# (beta, T): (loss, soft, hard) of LigerFusedLinearJSDLoss(beta=beta, temperature=T, return_soft_hard_loss=True)
CHUNKED = {(0.0, 1): (8.6663799286, 8.1863870621), (0.0, 2): (6.1483330727, 3.1502931118),
           (0.1, 1): (4.7063884735, 0.2664041519), (0.5, 1): (4.8669772148, 0.5875813365),
           (0.5, 2): (4.7773370743, 0.4083014429), (0.9, 2): (4.6598038673, 0.1732347757),
           (1.0, 1): (7.8826513290, 6.6189293861), (1.0, 2): (5.8936948776, 2.6410169601)}
HARD = 9.1463727951


@pytest.mark.parametrize("beta,T", list(CHUNKED))
def test_liger_chunked_jsd(backend, device, beta, T):
    si, sw, ti, tw, labels = on(device, *inputs())
    loss_fn = liger.LigerFusedLinearJSDLoss(beta=beta, temperature=T, return_soft_hard_loss=True, chunk_size=3,
                                            backend=backend)
    loss, soft, hard = loss_fn(si, sw, ti, tw, labels)
    close(loss, CHUNKED[beta, T][0])
    close(soft, CHUNKED[beta, T][1])
    close(hard, HARD)
    assert loss.dtype == torch.float32


def test_liger_chunked_jsd_options(backend, device):
    si, sw, ti, tw, labels = on(device, *inputs())
    torch.manual_seed(1)
    sb, tb = on(device, torch.randn(32), torch.randn(32))
    out = liger.LigerFusedLinearJSDLoss(return_soft_hard_loss=True, backend=backend)(si, sw, ti, tw, labels, sb, tb)
    for got, want in zip(out, (5.0185613632, 0.5561587214, 9.4809637070)):
        close(got, want)
    plain = liger.LigerFusedLinearJSDLoss(backend=backend)
    close(plain(si.reshape(2, 4, 16), sw, ti.reshape(2, 4, 12), tw, labels.reshape(2, 4)), 4.8669772148)
    close(plain(si, sw, ti, tw, labels.clamp_min(0)), 4.7618832588)
    close(liger.LigerFusedLinearJSDLoss(ignore_index=7, backend=backend)(
        si, sw, ti, tw, torch.where(labels == -100, 7, labels)), 5.0934667587)
    assert plain(si, sw, ti, tw, torch.full_like(labels, -100)).item() == 0.0
    # The gradients of the soft loss alone (Liger's and TRL's autograd agree on these).
    si.requires_grad_()
    sw.requires_grad_()
    soft_only = liger.LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, backend=backend)
    loss = soft_only(si, sw, ti, tw, labels)
    loss.backward()
    close(loss, 0.5875813365)
    close(si.grad.sum(), -0.0153976306)
    close(sw.grad.norm(), 0.0912705287)


def test_liger_chunked_jsd_refuses_mismatched_vocabularies():
    si, sw, ti, tw, labels = inputs(teacher_vocab=36)
    with pytest.raises(ValueError, match="student's vocabulary has 32 ids and the teacher's 36.*vocab_mismatch"):
        liger.LigerFusedLinearJSDLoss()(si, sw, ti, tw, labels)


# (beta, T): (with labels, without labels) of LigerFusedLinearJSD(jsd_beta=beta, temperature=T)
TRITON_JSD = {(0.0, 1): (8.1863870621, 8.6201152802), (0.1, 2): (0.1810485274, 0.1949402988),
              (0.5, 1): (0.5875812769, 0.6035616398), (0.9, 1): (0.2698586583, 0.2771779895),
              (1.0, 2): (2.6410171986, 2.9241437912)}


@pytest.mark.parametrize("beta,T", list(TRITON_JSD))
def test_liger_fused_linear_jsd(backend, device, beta, T):
    si, sw, ti, tw, labels = on(device, *inputs())
    loss_fn = liger.LigerFusedLinearJSD(jsd_beta=beta, temperature=T, backend=backend)
    close(loss_fn(si, sw, ti, tw, labels), TRITON_JSD[beta, T][0])
    close(loss_fn(si, sw, ti, tw), TRITON_JSD[beta, T][1])


# (reduction, T): (with labels, without labels) of LigerFusedLinearKLDivLoss(reduction, temperature=T) with the
# target softmax(ti @ tw.T)
KL_DIV = {("batchmean", 1): (8.1863870621, 8.6201152802), ("batchmean", 2): (4.2752437592, 4.5486197472),
          ("mean", 1): (0.2558245957, 0.2693786025), ("mean", 2): (0.1336013675, 0.1421443671),
          ("sum", 1): (49.1183204651, 68.9609222412), ("sum", 2): (25.6514606476, 36.3889579773)}


@pytest.mark.parametrize("reduction,T", list(KL_DIV))
def test_liger_fused_linear_kl_div(backend, device, reduction, T):
    si, sw, ti, tw, labels = on(device, *inputs())
    target = torch.softmax(ti @ tw.t(), dim=-1)
    loss_fn = liger.LigerFusedLinearKLDivLoss(reduction=reduction, temperature=T, backend=backend)
    close(loss_fn(si, sw, target, labels), KL_DIV[reduction, T][0])
    close(loss_fn(si, sw, target), KL_DIV[reduction, T][1])
    assert loss_fn(si, sw, target, torch.full_like(labels, -100)).item() == 0.0


# (beta, T): labels batchmean, sum, mean; no labels batchmean (/ B = 2), sum, mean -- of TRL's generalized_jsd_loss
# on (2, 4, 32) logits.
TRL = {(0.0, 1): (8.1863870621, 49.1183204651, 0.2558245957, 34.4804649353, 68.9609298706, 0.2693786323),
       (0.1, 2): (0.1810484976, 1.0862909555, 0.0056577655, 0.7797610760, 1.5595221519, 0.0060918834),
       (0.5, 1): (0.5875813365, 3.5254881382, 0.0183619168, 2.4142467976, 4.8284935951, 0.0188613031),
       (0.9, 2): (0.1732347757, 1.0394086838, 0.0054135867, 0.7458664775, 1.4917329550, 0.0058270819),
       (1.0, 1): (6.6189284325, 39.7135696411, 0.2068415135, 28.7387695312, 57.4775390625, 0.2245216370)}


@pytest.fixture
def default_backend(backend, monkeypatch):
    """TRL's signature has no backend: the test's goes through FASTKD_BACKEND."""
    monkeypatch.setenv("FASTKD_BACKEND", backend)


@pytest.mark.parametrize("beta,T", list(TRL))
def test_trl_generalized_jsd_loss(default_backend, device, beta, T):
    si, sw, ti, tw, labels = on(device, *inputs())
    s, t, labels = (si @ sw.t()).reshape(2, 4, 32), (ti @ tw.t()).reshape(2, 4, 32), labels.reshape(2, 4)
    want = TRL[beta, T]
    for i, reduction in enumerate(("batchmean", "sum", "mean")):
        close(trl.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=T, reduction=reduction), want[i])
        close(trl.generalized_jsd_loss(s, t, beta=beta, temperature=T, reduction=reduction), want[3 + i])


def test_trl_options(default_backend, device):
    si, sw, ti, tw, labels = on(device, *inputs())
    s, t = (si @ sw.t()).reshape(2, 4, 32), (ti @ tw.t()).reshape(2, 4, 32)
    close(trl.generalized_jsd_loss(s, t, labels=labels.reshape(2, 4), num_items_in_batch=10), 0.3525488079)
    close(trl.generalized_jsd_loss(s, t, num_items_in_batch=torch.tensor(10, device=device)), 0.4828493595)
    close(trl.generalized_jsd_loss(s.reshape(8, 32), t.reshape(8, 32)), 0.6035616994)
    assert trl.generalized_jsd_loss(s, t, labels=torch.full((2, 4), -100, device=device)).item() == 0.0
    with pytest.raises(ValueError, match="reduction must be one of .*got 'none'"):
        trl.generalized_jsd_loss(s, t, reduction="none")


def test_trl_patches_the_trainer_in_one_line():
    class GKDTrainer:  # TRL's shape: a static method, called on the trainer with keyword arguments
        @staticmethod
        def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                                 reduction="batchmean", num_items_in_batch=None):
            raise AssertionError("not patched")

        def compute_loss(self, s, t, labels):
            return self.generalized_jsd_loss(student_logits=s, teacher_logits=t, labels=labels, beta=0.5,
                                             num_items_in_batch=None)

    GKDTrainer.generalized_jsd_loss = trl.generalized_jsd_loss
    si, sw, ti, tw, labels = inputs()
    s, t = (si @ sw.t()).reshape(2, 4, 32), (ti @ tw.t()).reshape(2, 4, 32)
    close(GKDTrainer().compute_loss(s, t, labels.reshape(2, 4)), 0.5875813365)
