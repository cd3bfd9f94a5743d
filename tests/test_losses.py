"""The fused LM head + cross-entropy against the unfused reference: values, gradients, ignored targets, bf16."""

import torch
import torch.nn.functional as F

from models.common import losses
from models.common.losses import IGNORE_INDEX, linear_cross_entropy


def reference_and_fused(h_ND, w_VD, y_N, **autocast):
    results = []
    for fn in (lambda h, w: F.cross_entropy((h @ w.T).float(), y_N), lambda h, w: linear_cross_entropy(h, w, y_N)):
        h, w = h_ND.clone().requires_grad_(), w_VD.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(autocast)):
            loss = fn(h, w)
        (2.0 * loss).backward()  # a non-unit upstream gradient
        results.append((loss.detach(), h.grad, w.grad))
    return results


def test_fused_loss_and_gradients_equal_the_reference_across_chunks(monkeypatch):
    torch.manual_seed(0)
    h_ND, w_VD, y_N = torch.randn(37, 16), torch.randn(50, 16), torch.randint(0, 50, (37,))
    y_N[[3, 20]] = IGNORE_INDEX
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 50 * 8)  # 8 rows per chunk: 5 chunks, the last one short
    (ref, ref_h, ref_w), (fused, fused_h, fused_w) = reference_and_fused(h_ND, w_VD, y_N)
    torch.testing.assert_close(fused, ref)
    torch.testing.assert_close(fused_h, ref_h)
    torch.testing.assert_close(fused_w, ref_w)
    assert fused_h[[3, 20]].abs().max() == 0  # ignored targets add no gradient


def test_fused_loss_under_bf16_autocast_stays_close_to_the_reference():
    torch.manual_seed(0)
    h_ND, w_VD, y_N = torch.randn(64, 32), 0.2 * torch.randn(100, 32), torch.randint(0, 100, (64,))
    (ref, ref_h, ref_w), (fused, fused_h, fused_w) = reference_and_fused(h_ND, w_VD, y_N, autocast=True)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, ref, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(fused_h, ref_h, atol=2e-3, rtol=5e-2)
    torch.testing.assert_close(fused_w, ref_w, atol=2e-3, rtol=5e-2)


def test_bf16_logit_gradient_keeps_the_target_entry_exact_when_the_model_is_confident():
    # p_t - 1 of a rounded p_t cancels near p_t = 1 (bf16 steps by 2^-8 there): the target's entry of the gradient
    # must come out right for confident rows as well as for uncertain ones
    torch.manual_seed(0)
    logits_CV = torch.randn(6, 300)
    t_C1 = torch.tensor([[3], [10], [299], [0], [150], [7]])
    logits_CV[torch.arange(3), t_C1[:3, 0]] += torch.tensor([12.0, 14.0, 16.0])  # p_t of 0.995 to 0.9999
    logits_CV = logits_CV.to(torch.bfloat16)
    logp_t_C1, g_CV = losses._target_logp_and_logit_grad(logits_CV, t_C1)
    ref_logp_CV = torch.log_softmax(logits_CV.double(), dim=-1)
    ref_g_CV = ref_logp_CV.exp().scatter_add_(1, t_C1, torch.full((6, 1), -1.0, dtype=torch.float64))
    assert g_CV.dtype == torch.bfloat16 and logp_t_C1.dtype == torch.float32
    torch.testing.assert_close(logp_t_C1.double(), ref_logp_CV.gather(1, t_C1), rtol=2**-8, atol=1e-6)
    torch.testing.assert_close(g_CV.double(), ref_g_CV, rtol=2**-8, atol=1e-9)
    assert (ref_g_CV.gather(1, t_C1[:3]) > -0.03).all()  # the confident rows are confident


def test_bf16_log_probability_of_an_underflowed_target_stays_finite():
    logits_CV = torch.zeros(2, 50)
    logits_CV[0, 7] = 200.0  # the target (0) is 200 below the best: its probability underflows fp32's exp
    logp_t_C1, g_CV = losses._target_logp_and_logit_grad(logits_CV.to(torch.bfloat16), torch.tensor([[0], [3]]))
    assert torch.isfinite(logp_t_C1).all() and logp_t_C1[0, 0] < -80  # capped at log(fp32's tiny), about -87
    assert g_CV[0, 0] == -1 and g_CV[0, 7] == 1  # the gradient is exact
    torch.testing.assert_close(logp_t_C1[1, 0], torch.tensor(-torch.log(torch.tensor(50.0)).item()), rtol=2**-8, atol=0)
