"""How good are a teacher's targets on a view spec's views? `kt-cache plan --labeled SHARDS` answers before a build.

A cached target is the teacher's output on one view. Strong crops and RandAugment (the `train` preset, made for
224 px ImageNet photos) can take a small or low-resolution image past what the teacher recognises: on 28 px
Fashion-MNIST garments an 88.8% teacher's top-1 matched the label on only 52.5% of its own `train` views (34.8%
for crops under a quarter of the image), against ~85% on `light` views (docs/results.md, "Convergence"). A student
distilled from such targets learns the teacher's confusion on views nobody evaluates. This module runs the teacher
over views of a few hundred labeled images for each candidate spec and reports, per spec:

- `top1`: the teacher's top-1 against the labels on those views (a mixed view counts its larger share's label);
- `agree_eval`: how often its top-1 on the view equals its top-1 on the image's eval view (the target the student
  is asked to copy vs the prediction that is evaluated);
- `confidence`: its mean top probability on the views (soft, noisy targets sit low).

How a user chooses: take the strongest augmentation whose `top1` stays within a few points of the eval view's
(diverse views that still carry the task); specs far below it hand the student noise. The figures this advice
rests on are in docs/results.md.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kt.errors import UserError

CANDIDATES = ("train", "light")  # presets reported beside the chosen spec


def labeled_images(data: str, n: int) -> list:
    """The first `n` decodable labeled samples of `data` (shard makers write in a seeded shuffled order)."""
    from kt.shards import BadSamples, expand_shards, iter_samples

    out = []
    for s in iter_samples(expand_shards(data), bad=BadSamples(max_fraction=1.0)):
        if s.label is not None:
            out.append(s)
        if len(out) >= n:
            break
    if not out:
        raise UserError(f"--labeled {data}: no labeled samples (a .cls per image) found")
    return out


def _predict(model, images: Sequence, batch_size: int) -> np.ndarray:
    """Softmax of the teacher's logits for a list of rendered PIL views, (N, K)."""
    import torch

    from kt.render import to_tensor

    out = []
    for i in range(0, len(images), batch_size):
        x = torch.stack([to_tensor(im, model.mean, model.std) for im in images[i:i + batch_size]])
        with torch.inference_mode():
            out.append(torch.softmax(model(x).float(), 1).numpy())
    return np.concatenate(out)


def teacher_on_views(model, samples: Sequence, specs: dict, views: int, image_size: int, seed: int = 0,
                     batch_size: int = 128) -> dict:
    """Per spec name: the teacher's top-1, agreement with its eval-view prediction and confidence on `views` views
    of each sample (see the module docstring), and the same figures for the eval view itself."""
    from kt.render import render_view
    from kt.views import PARAM_DIM, VIEW_PRESETS, mix_mode, partner_row, sample_params

    if model.task != "classification" or model.num_classes <= 0:
        raise UserError("--labeled reports a classification teacher's predictions on its views; this teacher has "
                        "no class predictions")
    labels = np.array([s.label for s in samples])
    if labels.max() >= model.num_classes:
        raise UserError(f"--labeled: labels go up to {labels.max()}, the teacher has {model.num_classes} classes")
    eval_spec = VIEW_PRESETS["eval"]
    eval_probs = _predict(model, [render_view(s.image, sample_params(eval_spec, seed, s.key, 0), image_size)
                                  for s in samples], batch_size)
    eval_pred = eval_probs.argmax(1)
    report = {"eval": {"views": len(samples), "top1": round(float((eval_pred == labels).mean()), 4),
                       "confidence": round(float(eval_probs.max(1).mean()), 4)}}
    n = len(samples)
    for name, spec in specs.items():
        rendered, truth, anchor = [], [], []
        for row, s in enumerate(samples):
            for v in range(views):
                p = sample_params(spec, seed, s.key, v)
                partner = partner_row(p, row, n)
                mate = () if partner is None else (samples[partner].image,
                                                    sample_params(spec, seed, samples[partner].key, v))
                rendered.append(render_view(s.image, p, image_size, *mate))
                own = mix_mode(p) == "none" or p[PARAM_DIM + 1] >= 0.5
                truth.append(labels[row] if own else labels[partner])
                anchor.append(row if own else partner)
        probs = _predict(model, rendered, batch_size)
        pred = probs.argmax(1)
        report[name] = {"views": len(rendered), "top1": round(float((pred == np.array(truth)).mean()), 4),
                        "agree_eval": round(float((pred == eval_pred[np.array(anchor)]).mean()), 4),
                        "confidence": round(float(probs.max(1).mean()), 4)}
    return report
