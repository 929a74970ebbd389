"""The training objectives of `kt-student`: pure loss functions and the objectives built from them.

The paper ("Label-efficient training of small task-specific models by leveraging vision foundation
models") compares three ways for a small student to learn from a foundation model on a transfer set:

- `task` (task-oriented transfer): match the finetuned teacher's predictions, KL(teacher softmax ||
  student softmax) at temperature T, per image for classification and per pixel for segmentation;
- `embedding-contrastive` (task-agnostic, image level): InfoNCE between the student's global feature
  through a linear projection and the teacher's embedding (OpenCLIP style), optionally with a second
  projection on the teacher side (the paper's DINOv2 image-level variant);
- `patch-cosine` (task-agnostic, patch level): 1 - cosine between the student's feature grid through a
  1x1 convolution and the teacher's patch features resized (bilinear) to the student's grid.

Plain cross-entropy on labels (`cross_entropy`) serves the finetuning stages. Loss functions take and
return tensors only; a `DistillObjective` owns the trainable parts an objective needs (projection heads,
a learnable temperature), so they are optimised with the student but never saved into its checkpoint.
Objectives are looked up by name in the explicit `OBJECTIVES` dict through `create_objective`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kt.errors import UserError

# Which entry of `teacher_dims` gives the size of each cached target.
TARGET_DIMS = {"logits": "num_classes", "embedding": "embedding", "patches": "patches", "seg_logits": "num_classes"}


# ---------------------------------------------------------------------------------------------------
# Loss functions


def kl_distillation(student_logits: Tensor, teacher: Tensor, temperature: float = 1.0,
                    ignore_mask: Tensor | None = None) -> Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) * T^2, averaged over samples (or pixels).

    The teacher input may be raw logits or log-probabilities (as the top-k codecs decode them): softmax
    is invariant to adding a constant per row, and a log-probability row is its logit row minus its
    log-sum-exp, so both give the same distribution at every temperature. Entries of -inf (classes the
    teacher gives no mass) contribute nothing. The T^2 factor keeps gradient magnitudes comparable across
    temperatures (Hinton et al., 2015), so a temperature sweep does not need a learning-rate sweep.

    Args:
        student_logits: (B, K) per image or (B, K, H, W) per pixel.
        teacher: logits or log-probabilities of the same shape as `student_logits`.
        temperature: softening temperature T > 0.
        ignore_mask: per pixel only, (B, H, W) boolean, True where a pixel is left out (padding,
            ignore label). The mean runs over the pixels kept; none kept gives 0.

    Returns:
        A scalar, computed in float32 whatever the input dtype (fp16 caches, mixed precision).
    """
    if student_logits.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher {tuple(teacher.shape)} differ")
    if student_logits.dim() not in (2, 4):
        raise ValueError(f"expected (B, K) or (B, K, H, W) logits, got {tuple(student_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher.float() / temperature, dim=1)
    p_t = log_p_t.exp()
    # where p_t == 0 the term is 0 (lim p log p); masking avoids 0 * -inf = nan
    terms = torch.where(p_t > 0, p_t * (log_p_t - log_p_s), torch.zeros_like(p_t))
    per_sample = terms.sum(dim=1) * temperature**2  # (B,) or (B, H, W)
    if ignore_mask is None:
        return per_sample.mean()
    if student_logits.dim() != 4 or ignore_mask.shape != per_sample.shape:
        raise ValueError(f"ignore_mask {tuple(ignore_mask.shape)} must be (B, H, W) = {tuple(per_sample.shape)}")
    keep = (~ignore_mask.bool()).float()
    return (per_sample * keep).sum() / keep.sum().clamp_min(1.0)


def cross_entropy(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0, ignore_index: int = 255) -> Tensor:
    """Cross-entropy on hard labels, per image (B, K) vs (B,) or per pixel (B, K, H, W) vs (B, H, W).

    A thin wrapper over `F.cross_entropy` that averages over the labels kept and returns 0 rather than
    nan when a batch holds only `ignore_index` (a segmentation crop of pure void would otherwise poison
    the run).
    """
    total = F.cross_entropy(logits.float(), labels.long(), label_smoothing=label_smoothing,
                            ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp_min(1)


def info_nce(student_emb: Tensor, teacher_emb: Tensor, temperature: float | Tensor) -> Tensor:
    """Symmetric CLIP-style InfoNCE over the batch: image i of the student must pick image i of the teacher.

    Both sides are L2-normalised, logits = s @ t.T / temperature, and the loss is the mean of the
    cross-entropies in both directions (student -> teacher rows, teacher -> student columns), as in
    OpenCLIP's `ClipLoss`. Negatives are the other images of the local batch; nothing is gathered across
    processes, so the effective number of negatives is the per-process batch size.

    Args:
        student_emb: (B, D) student features, already projected to the teacher's (or a shared) width.
        teacher_emb: (B, D) teacher features.
        temperature: scalar > 0; a tensor lets the objective learn it.
    """
    if student_emb.shape != teacher_emb.shape or student_emb.dim() != 2:
        raise ValueError(f"expected two (B, D) embeddings of one shape, got {tuple(student_emb.shape)} "
                         f"and {tuple(teacher_emb.shape)}")
    s = F.normalize(student_emb.float(), dim=1)
    t = F.normalize(teacher_emb.float(), dim=1)
    logits = s @ t.T / temperature
    labels = torch.arange(len(s), device=s.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def resize_patches(teacher_grid: Tensor, size: tuple[int, int]) -> Tensor:
    """Teacher patches (B, H, W, C), channels-last as cached, to (B, C, h, w): area averaging where the grid
    shrinks, bilinear interpolation where it grows.

    Shrinking by plain bilinear sampling reads only the patches next to each sample point (16x16 -> 4x4 uses
    64 of the 256 teacher patches) and aliases; averaging each output cell's area (adaptive average pooling,
    overlapping cells where the ratio is not whole) lets every teacher patch count. Growing has nothing to
    average, so bilinear with `align_corners=False` treats each patch as a cell covering its area, which is how
    a ViT patch grid and a CNN feature map both tile the image. An axis that shrinks while the other grows is
    first averaged, then interpolated. Equal sizes are passed through untouched.
    """
    grid = teacher_grid.float().permute(0, 3, 1, 2)
    (h, w), (H, W) = tuple(size), tuple(grid.shape[-2:])
    if (h, w) == (H, W):
        return grid
    if h < H or w < W:
        grid = F.adaptive_avg_pool2d(grid, (min(h, H), min(w, W)))
    if h > H or w > W:
        grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
    return grid


def resize_seg_logits(teacher: Tensor, size: tuple[int, int]) -> Tensor:
    """Per-pixel teacher logits (B, K, H, W) in the student's frame, to the student's grid (h, w): bilinear on the
    logits (the issue's recipe; the student re-renders the stored view, so only the grid differs).

    The pixel-topk codecs decode log-probabilities with -inf where a pixel's tail mass was 0; bilinear weights
    of 0 on -inf would give nan, so those entries are floored at -1e4 first (exp(-1e4) is 0 in float32: the
    same distribution)."""
    teacher = teacher.float().clamp_min(-1e4)
    if tuple(teacher.shape[-2:]) == tuple(size):
        return teacher
    return F.interpolate(teacher, size=tuple(size), mode="bilinear", align_corners=False)


def valid_to_grid(valid: Tensor, size: tuple[int, int]) -> Tensor:
    """The view's validity mask (B, H, W) at the student's input size (`kt.render.render_valid`) to its grid
    (B, h, w): a cell counts as valid when at least half of its pixels show the image (area averaging, so a
    cell the fill only grazes still teaches)."""
    frac = F.adaptive_avg_pool2d(valid.float()[:, None], tuple(size))[:, 0]
    return frac >= 0.5


def patch_cosine(student_grid: Tensor, teacher_grid: Tensor) -> Tensor:
    """Mean over positions of 1 - cos(student, teacher), the teacher resized to the student's grid.

    Args:
        student_grid: (B, C, h, w), already projected to the teacher's channel count.
        teacher_grid: (B, H, W, C) channels-last, as the cache stores patch features.
    """
    if student_grid.dim() != 4 or teacher_grid.dim() != 4:
        raise ValueError(f"expected (B, C, h, w) and (B, H, W, C) grids, got {tuple(student_grid.shape)} "
                         f"and {tuple(teacher_grid.shape)}")
    b, c, h, w = student_grid.shape
    if teacher_grid.shape[0] != b or teacher_grid.shape[-1] != c:
        raise ValueError(f"student grid {tuple(student_grid.shape)} and teacher patches "
                         f"{tuple(teacher_grid.shape)} differ in batch or channels")
    target = resize_patches(teacher_grid, (h, w))
    cos = F.cosine_similarity(student_grid.float(), target, dim=1)  # (B, h, w)
    return (1 - cos).mean()


# ---------------------------------------------------------------------------------------------------
# Projection heads and objectives


class Projection(nn.Module):
    """A linear map of feature channels: `nn.Linear` on vectors (B, D), a 1x1 convolution on grids (B, C, h, w).

    One weight serves both layouts (a 1x1 convolution is a linear map applied at every position), so a
    head reads the same in a state dict whichever it projects.
    """

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return self.linear(x)
        if x.dim() == 4:
            return F.conv2d(x, self.linear.weight[:, :, None, None], self.linear.bias)
        raise ValueError(f"Projection expects (B, D) or (B, C, h, w), got {tuple(x.shape)}")


class DistillObjective(nn.Module):
    """What `kt-student train --objective OBJ` optimises.

    Owns its trainable projection heads and a learnable logit scale where needed, so the training loop
    optimises them beside the student and `finetune --init` leaves them behind with the run.

    Attributes:
        name: the objective's name in `OBJECTIVES`.
        needs: the cached targets it reads, e.g. ("logits",).
        student_needs: the `student_out` entries it reads, e.g. ("embedding",).
        options: keyword options `create_objective` accepts for it.
    """

    name: str = ""
    needs: tuple[str, ...] = ()
    student_needs: tuple[str, ...] = ()
    options: tuple[str, ...] = ()

    @classmethod
    def from_dims(cls, student_dims: dict, teacher_dims: dict, **options) -> DistillObjective:
        """Build from checked dims; `create_objective` has verified every needed entry is present."""
        raise NotImplementedError

    def forward(self, student_out: dict[str, Tensor], targets: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """(scalar loss, float metrics for the log) from `TaskModel.forward_features` output and decoded targets."""
        raise NotImplementedError

    def _take(self, student_out: dict[str, Tensor], targets: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        missing = [k for k in self.needs if k not in targets]
        if missing:
            raise UserError(f"objective '{self.name}' needs cached target {missing[0]!r}; "
                            f"the batch holds: {', '.join(sorted(targets)) or 'nothing'}")
        missing = [k for k in self.student_needs if k not in student_out]
        if missing:
            raise UserError(f"objective '{self.name}' needs the student's {missing[0]!r} output; "
                            f"it gives: {', '.join(sorted(student_out))}")
        return [student_out[k] for k in self.student_needs], [targets[k] for k in self.needs]


class TaskObjective(DistillObjective):
    """Task-oriented transfer: KL between the teacher's and the student's class distributions at temperature T."""

    name = "task"
    needs = ("logits",)
    student_needs = ("logits",)
    options = ("temperature",)

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise UserError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)  # 1.0: plain softmaxes, as the design's "KL between softmaxes"

    @classmethod
    def from_dims(cls, student_dims, teacher_dims, **options):
        k, kt = student_dims["num_classes"], teacher_dims["num_classes"]
        if k != kt:
            raise UserError(f"objective 'task' needs the student's classes to equal the teacher's: "
                            f"student has {k}, teacher has {kt}")
        return cls(**options)

    def forward(self, student_out, targets):
        (logits,), (teacher,) = self._take(student_out, targets)
        loss = kl_distillation(logits, teacher, self.temperature)
        with torch.no_grad():
            agree = (logits.argmax(1) == teacher.argmax(1)).float().mean()
        return loss, {"agree": float(agree)}


class SegTaskObjective(TaskObjective):
    """Task-oriented transfer for segmentation: per-pixel KL on the student's grid, the cached teacher logits
    resized to it (`resize_seg_logits`), cells the view filled in (rotate/shear/translate) left out when the
    batch carries the view's validity mask as `targets["valid"]` (B, H, W)."""

    needs = ("seg_logits",)
    student_needs = ("seg_logits",)

    def forward(self, student_out, targets):
        (logits,), (teacher,) = self._take(student_out, targets)
        size = tuple(logits.shape[-2:])
        teacher = resize_seg_logits(teacher, size)
        keep = valid_to_grid(targets["valid"], size) if "valid" in targets else None
        loss = kl_distillation(logits, teacher, self.temperature, ignore_mask=None if keep is None else ~keep)
        with torch.no_grad():
            same = (logits.argmax(1) == teacher.argmax(1)).float()
            agree = same.mean() if keep is None else same[keep].sum() / keep.sum().clamp_min(1)
        return loss, {"agree": float(agree)}


class EmbeddingContrastiveObjective(DistillObjective):
    """Task-agnostic image-level transfer: InfoNCE between projected student and teacher embeddings.

    The student side always goes through a linear projection (its width rarely equals the teacher's).
    With `project_teacher` the teacher's embedding is projected too, to a shared width `proj_dim`, as the
    paper does for DINOv2 features, which are not trained to live on a contrastive sphere. The
    temperature is learned, parametrised like CLIP's logit scale (log 1/T, clamped so T >= 0.01) so that
    it stays positive and its steps are relative.
    """

    name = "embedding-contrastive"
    needs = ("embedding",)
    student_needs = ("embedding",)
    options = ("project_teacher", "proj_dim", "temperature", "learn_temperature")
    MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp: T never below 0.01

    def __init__(self, student_dim: int, teacher_dim: int, project_teacher: bool = False,
                 proj_dim: int | None = None, temperature: float = 0.07, learn_temperature: bool = True):
        super().__init__()
        if temperature <= 0:
            raise UserError(f"temperature must be > 0, got {temperature}")
        if proj_dim is not None and not project_teacher and proj_dim != teacher_dim:
            raise UserError(f"proj_dim={proj_dim} needs project_teacher=True (without it the student is "
                            f"projected to the teacher's width {teacher_dim})")
        out_dim = int(proj_dim or teacher_dim)
        self.student_proj = Projection(student_dim, out_dim)
        self.teacher_proj = Projection(teacher_dim, out_dim) if project_teacher else None
        scale = torch.tensor(math.log(1.0 / temperature))
        self.logit_scale = nn.Parameter(scale, requires_grad=learn_temperature)

    @classmethod
    def from_dims(cls, student_dims, teacher_dims, **options):
        return cls(student_dims["embedding"], teacher_dims["embedding"], **options)

    def temperature(self) -> Tensor:
        """The current temperature, 1 / exp(clamped logit scale)."""
        return torch.exp(-self.logit_scale.clamp(max=self.MAX_LOGIT_SCALE))

    def forward(self, student_out, targets):
        (emb,), (teacher,) = self._take(student_out, targets)
        s = self.student_proj(emb)
        t = teacher.to(s.dtype)
        if self.teacher_proj is not None:
            t = self.teacher_proj(t)
        temperature = self.temperature()
        loss = info_nce(s, t, temperature)
        with torch.no_grad():
            sim = F.normalize(s.float(), dim=1) @ F.normalize(t.float(), dim=1).T
            acc = (sim.argmax(1) == torch.arange(len(s), device=s.device)).float().mean()
        return loss, {"retrieval_acc": float(acc), "temperature": float(temperature.detach())}


class PatchCosineObjective(DistillObjective):
    """Task-agnostic patch-level transfer: cosine between the 1x1-projected student grid and resized teacher patches."""

    name = "patch-cosine"
    needs = ("patches",)
    student_needs = ("grid",)
    options = ()

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.student_proj = Projection(student_dim, teacher_dim)

    @classmethod
    def from_dims(cls, student_dims, teacher_dims, **options):
        return cls(student_dims["grid"], teacher_dims["patches"], **options)

    def forward(self, student_out, targets):
        (grid,), (teacher,) = self._take(student_out, targets)
        loss = patch_cosine(self.student_proj(grid), teacher)
        return loss, {"cos": 1.0 - float(loss.detach())}


OBJECTIVES: dict[str, type[DistillObjective]] = {
    "task": TaskObjective,
    "embedding-contrastive": EmbeddingContrastiveObjective,
    "patch-cosine": PatchCosineObjective,
}

# Segmentation students: per-pixel KL, or patch cosine on the student's output-stride grid (the same
# objective: `grid` is that grid). Image-level contrastive transfer has no per-pixel target.
SEG_OBJECTIVES: dict[str, type[DistillObjective]] = {
    "task": SegTaskObjective,
    "patch-cosine": PatchCosineObjective,
}
OBJECTIVES_BY_TASK = {"classification": OBJECTIVES, "segmentation": SEG_OBJECTIVES}

# Which `student_dims` entry each student output's size is read from.
_STUDENT_DIMS = {"logits": "num_classes", "embedding": "embedding", "grid": "grid", "seg_logits": "num_classes"}


def objective_class(name: str, task: str = "classification") -> type[DistillObjective]:
    """The objective `name` for `task`; a UserError listing the task's objectives for any other name."""
    table = OBJECTIVES_BY_TASK[task]
    if name not in table:
        raise UserError(f"unknown objective {name!r} for task {task}; choose one of: {', '.join(table)}")
    return table[name]


def create_objective(name: str, student_dims: dict, teacher_dims: dict, task: str = "classification",
                     **options) -> DistillObjective:
    """Build the objective `name` for a student and a teacher (or cache) of the given sizes.

    Args:
        name: a key of `OBJECTIVES`.
        student_dims: {"embedding": D, "grid": C, "num_classes": K}; 0 or None means the student lacks it.
        teacher_dims: {"embedding": Dt, "patches": Ct, "num_classes": Kt}, the targets the cache holds;
            0 or None means it is not there.
        task: "classification" (`OBJECTIVES`) or "segmentation" (`SEG_OBJECTIVES`).
        **options: the objective's own options (see each class's `options`).

    Raises:
        UserError: unknown name or option, a target the teacher/cache lacks, a student output missing,
            or (for "task") different class counts.
    """
    cls = objective_class(name, task)
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        raise UserError(f"objective {name!r} has no option {unknown[0]!r}; "
                        f"its options: {', '.join(cls.options) or 'none'}")
    for target in cls.needs:
        if not teacher_dims.get(TARGET_DIMS[target]):
            held = [t for t, k in TARGET_DIMS.items() if teacher_dims.get(k)]
            raise UserError(f"objective {name!r} needs teacher target {target!r}; "
                            f"available: {', '.join(held) or 'none'}")
    for out in cls.student_needs:
        if not student_dims.get(_STUDENT_DIMS[out]):
            what = "a task head (num_classes > 0)" if out == "logits" else f"a {out!r} size"
            raise UserError(f"objective {name!r} needs a student with {what}; "
                            f"student dims: {dict(student_dims)}")
    return cls.from_dims(student_dims, teacher_dims, **options)
