"""The public functions trace into one graph under torch.compile(fullgraph=True): no graph breaks."""
import pytest
import torch

from fastkd import functional as KF

# aot_eager traces through dynamo and AOTAutograd (forward and backward graphs) without compiling C++,
# which keeps this fast on a CPU-only machine; a graph break fails under fullgraph whatever the backend.
COMPILE_BACKEND = "aot_eager"

CASES = {
    "kd_loss": lambda s, t, y: KF.kd_loss(s, t, 4.0, target=y, ce_weight=0.1, kd_weight=0.9),
    "kl_div_loss": lambda s, t, y: KF.kl_div_loss(s, t, 2.0, direction="reverse", labels=y),
    "jsd_loss": lambda s, t, y: KF.jsd_loss(s, t, beta=0.3, labels=y),
    "dkd_loss": lambda s, t, y: KF.dkd_loss(s, t, y),
    "rkd_loss": lambda s, t, y: KF.rkd_loss(s, t),
    "sp_loss": lambda s, t, y: KF.sp_loss(s, t),
    "pkt_loss": lambda s, t, y: KF.pkt_loss(s, t),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_compiles_without_graph_breaks(name):
    torch._dynamo.reset()
    fn = CASES[name]
    s = torch.randn(6, 10, requires_grad=True)
    t = torch.randn(6, 10)
    y = torch.tensor([1, 2, -100, 3, 0, 9]) if name in ("kl_div_loss", "jsd_loss") else torch.tensor([1, 2, 5, 3, 0, 9])

    # The loss is compiled with fullgraph; its backward graph is compiled by AOTAutograd alongside.
    compiled = torch.compile(fn, fullgraph=True, backend=COMPILE_BACKEND)
    loss = compiled(s, t, y)
    loss.backward()
    grad = s.grad.clone()
    s.grad = None
    expected = fn(s, t, y)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, s.grad)
