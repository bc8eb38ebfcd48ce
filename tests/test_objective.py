import math

import numpy as np
import pytest
import torch

from scale.config import ObjectiveConfig
from scale.masking import Masks
from scale.models import ViTSpec
from scale.objectives import OBJECTIVES, ObjectiveBatch, OCLObjective, build_objective, tsp_similarity


def spec(embed_dim: int) -> ViTSpec:
    """An encoder spec with the given width (the objective reads only embed_dim)."""
    return ViTSpec(img_size=28, patch_size=4, embed_dim=embed_dim, depth=1, num_heads=1, in_chans=1)


def batch(emb: torch.Tensor) -> ObjectiveBatch:
    """(B, G, D) CLS embeddings as the encoder pass hands them to the objective (OCL reads only cls)."""
    B, G = emb.shape[:2]
    return ObjectiveBatch(cls=emb, masks=Masks(torch.zeros(B, G, 1, dtype=torch.long)))


def reference_loss(a: np.ndarray, b: np.ndarray, kappa: float, tau: float) -> float:
    """An independent numpy implementation of the paper's symmetric T-SP cross-entropy."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    n = a.shape[0]
    total = 0.0
    for rows, cols in ((a, b), (b, a)):
        for i in range(n):
            sims = []
            for j in range(n):
                c = float(np.dot(rows[i], cols[j]))
                t_sp = (1 + c) / 2 / (1 + (1 - c) / kappa) if math.isfinite(kappa) else (1 + c) / 2
                sims.append(t_sp / tau)
            sims = np.array(sims)
            total += -(sims[i] - np.log(np.exp(sims - sims.max()).sum()) - sims.max())
    return total / (2 * n)


def test_tsp_formula_values():
    c = torch.tensor([1.0, 0.0, -1.0, 0.5])
    torch.testing.assert_close(tsp_similarity(c, 64.0),
                               torch.tensor([1.0, 0.5 / (1 + 1 / 64), 0.0, 0.75 / (1 + 0.5 / 64)]))
    torch.testing.assert_close(tsp_similarity(c, float("inf")), (1 + c) / 2)
    # smaller kappa concentrates: lower similarity for the same non-aligned cosine
    assert tsp_similarity(torch.tensor(0.5), 4.0) < tsp_similarity(torch.tensor(0.5), 128.0)


@pytest.mark.parametrize("kappa", [4.0, 64.0, float("inf")])
def test_loss_matches_independent_reference(kappa):
    torch.manual_seed(0)
    emb = torch.randn(6, 2, 16, dtype=torch.float64)
    obj = OCLObjective(16, kappa=kappa, init_temperature=0.1).double()
    out = obj.score(emb)  # float64 end to end (forward casts to fp32)
    tau = obj.temperature.item()  # 0.1 after a float32 log round trip
    assert abs(tau - 0.1) < 1e-6
    expected = reference_loss(emb[:, 0].numpy(), emb[:, 1].numpy(), kappa, tau)
    assert abs(out.loss.item() - expected) < 1e-10


def test_gradcheck_float64():
    torch.manual_seed(0)
    obj = OCLObjective(8, kappa=16.0, init_temperature=0.2).double()
    emb = torch.randn(5, 2, 8, dtype=torch.float64, requires_grad=True)
    log_t = obj.log_temperature.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e, lt: _loss_with_temperature(obj, e, lt), (emb, log_t))


def _loss_with_temperature(obj: OCLObjective, emb: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    """The objective's loss with the temperature passed in, so gradcheck covers d loss / d log tau."""
    saved = obj.log_temperature
    try:
        del obj.log_temperature
        obj.log_temperature = log_t
        return obj.score(emb).loss  # float64 (forward casts to fp32)
    finally:
        del obj.log_temperature
        obj.log_temperature = saved


def test_temperature_is_trainable_log_and_clamped():
    obj = OCLObjective(8)
    assert obj.log_temperature.requires_grad
    assert abs(obj.temperature.item() - 0.07) < 1e-6
    loss = obj(batch(torch.randn(4, 2, 8))).loss
    loss.backward()
    assert obj.log_temperature.grad is not None and obj.log_temperature.grad != 0
    low, high = obj.parameter_bounds()["log_temperature"]
    assert math.isclose(math.exp(low), 0.001) and math.isclose(math.exp(high), 0.5)
    frozen = build_objective(ObjectiveConfig(learn_temperature=False), spec(8))
    assert not frozen.log_temperature.requires_grad


def test_positives_are_the_two_groups_of_one_image():
    obj = OCLObjective(8, init_temperature=0.05)
    base = torch.randn(16, 8)
    aligned = torch.stack([base, base + 0.01 * torch.randn(16, 8)], dim=1)
    shuffled = torch.stack([base, base[torch.roll(torch.arange(16), 1)]], dim=1)
    assert obj(batch(aligned)).loss < 0.5 * obj(batch(shuffled)).loss
    metrics = obj(batch(aligned)).metrics
    assert metrics["pos_cos"] > 0.99 and metrics["neg_cos"] < 0.5


def test_symmetric_in_the_two_groups():
    emb = torch.randn(8, 2, 16)
    obj = OCLObjective(16)
    torch.testing.assert_close(obj(batch(emb)).loss, obj(batch(emb.flip(1))).loss)


@pytest.mark.parametrize("layers", [2, 3])
def test_optional_mlp_head(layers):
    obj = build_objective(ObjectiveConfig(head=type(ObjectiveConfig().head)(layers=layers)), spec(192))
    linears = [m for m in obj.head if isinstance(m, torch.nn.Linear)]
    norms = [m for m in obj.head if isinstance(m, torch.nn.BatchNorm1d)]
    gelus = [m for m in obj.head if isinstance(m, torch.nn.GELU)]
    assert len(linears) == len(norms) == layers and len(gelus) == layers - 1
    assert linears[0].in_features == 192 and linears[0].out_features == 1024 and linears[-1].out_features == 512
    out = obj(batch(torch.randn(8, 2, 192)))
    out.loss.backward()
    assert linears[0].weight.grad is not None


def test_no_head_by_default_and_registry():
    obj = build_objective(ObjectiveConfig(), spec(64))
    assert isinstance(obj.head, torch.nn.Identity)
    assert "ocl" in OBJECTIVES
    with pytest.raises(ValueError, match=r"\(B, 2, D\)"):
        obj(batch(torch.randn(4, 3, 64)))
