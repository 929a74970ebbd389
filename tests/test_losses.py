"""Each loss against a naive formula computed another way (numpy loops), and the objectives' contracts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kt.errors import UserError
from kt.student.losses import (
    OBJECTIVES,
    Projection,
    create_objective,
    cross_entropy,
    info_nce,
    kl_distillation,
    patch_cosine,
    resize_patches,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _naive_kl(s: np.ndarray, t: np.ndarray, T: float) -> float:
    """sum_k p log(p / q) over softened rows, times T^2, mean over rows; rows are (N, K)."""
    total = 0.0
    for s_row, t_row in zip(s, t):
        p, q = _softmax(t_row / T), _softmax(s_row / T)
        total += sum(pk * math.log(pk / qk) for pk, qk in zip(p, q) if pk > 0)
    return total * T * T / len(s)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kl_matches_naive_formula_with_temperature(T):
    s, t = torch.randn(5, 7, generator=_gen(0)) * 3, torch.randn(5, 7, generator=_gen(1)) * 3
    got = kl_distillation(s, t, T)
    assert got.item() == pytest.approx(_naive_kl(s.double().numpy(), t.double().numpy(), T), rel=1e-5)


def test_kl_temperature_scales_by_T_squared():
    s, t = torch.randn(4, 6, generator=_gen(2)), torch.randn(4, 6, generator=_gen(3))
    # the loss at T equals T^2 times the plain KL of the inputs divided by T
    assert kl_distillation(s, t, 3.0).item() == pytest.approx(9 * kl_distillation(s / 3, t / 3, 1.0).item(), rel=1e-5)


def test_kl_is_invariant_to_teacher_row_shift():
    s, t = torch.randn(4, 9, generator=_gen(4)), torch.randn(4, 9, generator=_gen(5)) * 2
    logprobs = torch.log_softmax(t, dim=1)
    shifted = t + torch.randn(4, 1, generator=_gen(6)) * 10
    for T in (1.0, 2.5):
        ref = kl_distillation(s, t, T)
        assert kl_distillation(s, logprobs, T).item() == pytest.approx(ref.item(), rel=1e-5)
        assert kl_distillation(s, shifted, T).item() == pytest.approx(ref.item(), rel=1e-5)


def test_kl_zero_for_equal_and_finite_with_minus_inf_teacher():
    s = torch.randn(3, 5, generator=_gen(7), requires_grad=True)
    assert kl_distillation(s, s.detach()).item() == pytest.approx(0.0, abs=1e-6)
    t = torch.randn(3, 5, generator=_gen(8))
    t[:, 3:] = -math.inf  # classes a top-k codec gave no mass
    loss = kl_distillation(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert loss.item() == pytest.approx(_naive_kl(s.detach().double().numpy(), t.double().numpy(), 1.0), rel=1e-5)


def test_kl_per_pixel_with_ignore_mask():
    B, K, H, W, T = 2, 4, 3, 5, 2.0
    s, t = torch.randn(B, K, H, W, generator=_gen(9)), torch.randn(B, K, H, W, generator=_gen(10))
    ignore = torch.rand(B, H, W, generator=_gen(11)) < 0.3
    sn, tn, ig = s.double().numpy(), t.double().numpy(), ignore.numpy()
    rows = [(sn[b, :, i, j], tn[b, :, i, j]) for b in range(B) for i in range(H) for j in range(W) if not ig[b, i, j]]
    expected = _naive_kl(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]), T)
    assert kl_distillation(s, t, T, ignore_mask=ignore).item() == pytest.approx(expected, rel=1e-5)
    all_rows = [(sn[b, :, i, j], tn[b, :, i, j]) for b in range(B) for i in range(H) for j in range(W)]
    unmasked = _naive_kl(np.stack([r[0] for r in all_rows]), np.stack([r[1] for r in all_rows]), T)
    assert kl_distillation(s, t, T).item() == pytest.approx(unmasked, rel=1e-5)
    assert kl_distillation(s, t, T, ignore_mask=torch.ones(B, H, W, dtype=torch.bool)).item() == 0.0


def _naive_ce(logits: np.ndarray, labels: np.ndarray, eps: float, ignore: int) -> float:
    losses = []
    for row, y in zip(logits, labels):
        if y == ignore:
            continue
        logp = row - (row.max() + math.log(np.exp(row - row.max()).sum()))
        losses.append((1 - eps) * -logp[y] + eps * -logp.mean())
    return float(np.mean(losses)) if losses else 0.0


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_matches_naive_per_image_and_per_pixel(eps):
    logits, labels = torch.randn(6, 5, generator=_gen(12)), torch.randint(0, 5, (6,), generator=_gen(13))
    labels[1] = 255
    assert cross_entropy(logits, labels, eps).item() == pytest.approx(
        _naive_ce(logits.double().numpy(), labels.numpy(), eps, 255), rel=1e-5)
    px, py = torch.randn(2, 3, 4, 4, generator=_gen(14)), torch.randint(0, 3, (2, 4, 4), generator=_gen(15))
    py[0, 0] = 255
    flat_logits = px.permute(0, 2, 3, 1).reshape(-1, 3).double().numpy()
    assert cross_entropy(px, py, eps).item() == pytest.approx(
        _naive_ce(flat_logits, py.reshape(-1).numpy(), eps, 255), rel=1e-5)
    assert cross_entropy(px, torch.full_like(py, 255), eps).item() == 0.0  # all void: 0, not nan


def _naive_info_nce(s: np.ndarray, t: np.ndarray, T: float) -> float:
    s = s / np.linalg.norm(s, axis=1, keepdims=True)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    n = len(s)
    sim = [[float(np.dot(s[i], t[j])) / T for j in range(n)] for i in range(n)]
    rows = [-sim[i][i] + math.log(sum(math.exp(sim[i][j]) for j in range(n))) for i in range(n)]
    cols = [-sim[j][j] + math.log(sum(math.exp(sim[i][j]) for i in range(n))) for j in range(n)]
    return (sum(rows) / n + sum(cols) / n) / 2


def test_info_nce_matches_manual_ce_both_ways():
    s, t = torch.randn(6, 8, generator=_gen(16)), torch.randn(6, 8, generator=_gen(17))
    for T in (0.07, torch.tensor(0.5)):
        expected = _naive_info_nce(s.double().numpy(), t.double().numpy(), float(T))
        assert info_nce(s, t, T).item() == pytest.approx(expected, rel=1e-5)


def test_info_nce_lower_for_aligned_pairs():
    t = torch.randn(8, 16, generator=_gen(18))
    s = t + 0.1 * torch.randn(8, 16, generator=_gen(19))
    shuffled = t[torch.roll(torch.arange(8), 1)]
    assert info_nce(s, t, 0.1) < info_nce(s, shuffled, 0.1)


def _naive_bilinear(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Resize (H, W, C) with align_corners=False: source = (dst + 0.5) * in / out - 0.5, clamped at 0."""
    in_h, in_w, c = x.shape
    out = np.zeros((out_h, out_w, c))

    def taps(dst, n_in, n_out):
        src = max((dst + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(math.floor(src), n_in - 1)
        return i0, min(i0 + 1, n_in - 1), src - i0

    for i in range(out_h):
        y0, y1, ly = taps(i, in_h, out_h)
        for j in range(out_w):
            x0, x1, lx = taps(j, in_w, out_w)
            out[i, j] = ((1 - ly) * ((1 - lx) * x[y0, x0] + lx * x[y0, x1])
                         + ly * ((1 - lx) * x[y1, x0] + lx * x[y1, x1]))
    return out


def _naive_area(x, out_h, out_w):
    """(H, W, C) -> (out_h, out_w, C): each output cell the mean of the input cells its area overlaps
    (adaptive average pooling's cells: [floor(i H / h), ceil((i + 1) H / h)))."""
    in_h, in_w, c = x.shape
    out = np.zeros((out_h, out_w, c))
    for i in range(out_h):
        y0, y1 = math.floor(i * in_h / out_h), math.ceil((i + 1) * in_h / out_h)
        for j in range(out_w):
            x0, x1 = math.floor(j * in_w / out_w), math.ceil((j + 1) * in_w / out_w)
            out[i, j] = x[y0:y1, x0:x1].mean((0, 1))
    return out


@pytest.mark.parametrize("h, w, H, W, reference", [(3, 4, 7, 6, "area"), (6, 5, 3, 4, "bilinear")])
def test_patch_cosine_matches_manual_resized_cosine(h, w, H, W, reference):
    B, C = 2, 5
    s, t = torch.randn(B, C, h, w, generator=_gen(20)), torch.randn(B, H, W, C, generator=_gen(21))
    total, count = 0.0, 0
    for b in range(B):
        resize = _naive_area if reference == "area" else _naive_bilinear
        resized = resize(t[b].double().numpy(), h, w)
        assert np.allclose(resize_patches(t[b:b + 1], (h, w))[0].permute(1, 2, 0).numpy(), resized, atol=1e-5)
        for i in range(h):
            for j in range(w):
                u, v = s[b, :, i, j].double().numpy(), resized[i, j]
                total += 1 - float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))
                count += 1
    assert patch_cosine(s, t).item() == pytest.approx(total / count, rel=1e-5)


def test_patch_cosine_zero_for_identical_features_after_resize():
    t = torch.randn(2, 6, 6, 4, generator=_gen(22))
    resized = torch.from_numpy(np.stack([_naive_bilinear(x.double().numpy(), 3, 3) for x in t])).float()
    assert patch_cosine(resized.permute(0, 3, 1, 2), t).item() == pytest.approx(0.0, abs=1e-6)
    assert patch_cosine(t.permute(0, 3, 1, 2), t).item() == pytest.approx(0.0, abs=1e-6)  # same size: no resize


def test_projection_is_the_same_linear_map_on_vectors_and_grids():
    proj = Projection(4, 3)
    grid = torch.randn(2, 4, 5, 5, generator=_gen(23))
    expected = torch.einsum("oc,bchw->bohw", proj.linear.weight, grid) + proj.linear.bias[:, None, None]
    assert torch.allclose(proj(grid), expected, atol=1e-6)
    assert torch.allclose(proj(grid[:, :, 0, 0]), expected[:, :, 0, 0], atol=1e-6)


STUDENT = {"embedding": 12, "grid": 6, "num_classes": 5}
TEACHER = {"embedding": 10, "patches": 8, "num_classes": 5}


def _batch(B=4):
    student = {"embedding": torch.randn(B, 12, requires_grad=True), "grid": torch.randn(B, 6, 3, 3, requires_grad=True),
               "logits": torch.randn(B, 5, requires_grad=True)}
    targets = {"logits": torch.randn(B, 5), "embedding": torch.randn(B, 10).half(),
               "patches": torch.randn(B, 4, 4, 8).half()}
    return student, targets


@pytest.mark.parametrize("name,options,needs", [
    ("task", {"temperature": 2.0}, ("logits",)),
    ("embedding-contrastive", {}, ("embedding",)),
    ("embedding-contrastive", {"project_teacher": True, "proj_dim": 7}, ("embedding",)),
    ("patch-cosine", {}, ("patches",)),
])
def test_objectives_need_targets_and_train_their_heads(name, options, needs):
    objective = create_objective(name, STUDENT, TEACHER, **options)
    assert objective.name == name and objective.needs == needs
    student, targets = _batch()
    loss, metrics = objective(student, {k: targets[k] for k in needs})
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss) and all(isinstance(v, float) for v in metrics.values())
    assert any(v.grad is not None for v in student.values())
    params = [p for p in objective.parameters() if p.requires_grad]
    assert bool(params) == (name != "task")
    for p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    if options.get("project_teacher"):
        assert objective.teacher_proj is not None and objective.student_proj.linear.out_features == 7


def test_contrastive_temperature_starts_at_clip_value():
    objective = create_objective("embedding-contrastive", STUDENT, TEACHER)
    assert objective.temperature().item() == pytest.approx(0.07, rel=1e-5)
    frozen = create_objective("embedding-contrastive", STUDENT, TEACHER, learn_temperature=False)
    assert not frozen.logit_scale.requires_grad


def test_objective_refusals():
    with pytest.raises(UserError, match="task, embedding-contrastive, patch-cosine"):
        create_objective("kd", STUDENT, TEACHER)
    assert set(OBJECTIVES) == {"task", "embedding-contrastive", "patch-cosine"}
    with pytest.raises(UserError, match=r"'patches'.*available: logits, embedding"):
        create_objective("patch-cosine", STUDENT, {**TEACHER, "patches": 0})
    with pytest.raises(UserError, match=r"'logits'.*available: embedding$"):
        create_objective("task", STUDENT, {"embedding": 10})
    with pytest.raises(UserError, match="student has 3, teacher has 5"):
        create_objective("task", {**STUDENT, "num_classes": 3}, TEACHER)
    with pytest.raises(UserError, match="task head"):
        create_objective("task", {**STUDENT, "num_classes": 0}, TEACHER)
    with pytest.raises(UserError, match="no option 'project_teacher'"):
        create_objective("task", STUDENT, TEACHER, project_teacher=True)
    student, targets = _batch()
    with pytest.raises(UserError, match="needs cached target 'embedding'.*holds: logits"):
        create_objective("embedding-contrastive", STUDENT, TEACHER)(student, {"logits": targets["logits"]})


def test_shrinking_teacher_patches_all_count():
    """16x16 teacher patches to a 4x4 student grid: every teacher patch moves the loss (bilinear sampling
    read 64 of the 256), each with the same weight (area averaging over whole 4x4 cells)."""
    t = torch.randn(1, 16, 16, 8, generator=_gen(30), requires_grad=True)
    s = torch.randn(1, 8, 4, 4, generator=_gen(31))
    patch_cosine(s, t).backward()
    footprint = t.grad.abs().sum(-1)[0]
    assert bool((footprint > 0).all()), f"{int((footprint > 0).sum())} of 256 teacher patches reach the loss"
    resized = resize_patches(t.detach(), (4, 4))[0].permute(1, 2, 0).double().numpy()
    assert np.allclose(resized, _naive_area(t.detach()[0].double().numpy(), 4, 4), atol=1e-6)
