"""ConfiG: confidence-guided diffusion augmentation for KD (Popp, Laube, Hein, Schott, 2025,
arXiv 2506.02294), as the dataset-level augmenter ``config``.

Every ``every`` epochs the ``fraction`` of training samples on which the student is least
confident are re-generated with a diffusion model so that a robust teacher agrees and the
student does not. Least confident is ranked by ``select``: ``max_prob`` (default, the paper's
procedure: the student's maximum softmax probability, whatever class it predicts) or
``true_label`` (its softmax probability of the sample's label, which also ranks the samples it
gets wrong with confidence first). For each source image a latent ``z`` is optimised (Adam,
``steps``, ``lr``), all selected samples in batches, to maximise

    t(x(z))^gamma + (1 - f(x(z)))^gamma

(t, f: teacher's and student's softmax confidence in the source label; x(z): the image decoded
from z). The generated images join the training set with their source labels for the
following epochs (``keep: replace`` the previous round's, or ``accumulate`` up to ``cap``).

Choices that are ours (the paper's sampler and step counts are not public):

- x(z) is a deterministic DDIM sampler (eta = 0) of ``round(ddim_steps * strength)`` steps
  (default 10 * 0.5 = 5), differentiated end to end with gradient checkpointing per step;
- z starts at the DDIM inversion of the source image to that same noise level, so x(z) starts
  as a reconstruction of the source and stays a variant of it (``strength`` < 1 keeps more of it);
- the class label conditions the UNet when the model is class-conditional;
- each sample keeps its best iterate (highest objective seen), so a sample never ends worse
  than its reconstruction; decoded pixels are clamped to the valid range;
- generated samples carry the source's metadata (group, attribute): the attribute of a
  generated image is not known, and the source's is the closest available label.

The diffusion model is either a local diffusers directory (``model: {path: DIR}``) or, by
default, a small class-conditional UNet (see :mod:`kdbench.diffusion.train`; recipe keys under
``model:``), cached in the run directory. The UNet trains on the student's own training split
unless ``model: {dataset: SPEC}`` names other data (a dataset spec as in a grid, its ``train``
split; same classes, channels and image size as the cell's): the paper's generator is pretrained
on broad data and has seen the groups a biased split rarely shows, which e.g. the balanced
variant of a spurious set gives a generator trained here.

Artefacts per round in ``<cell>/config/``: ``round_NNN.pt`` (the generated samples, checksummed;
a resumed cell reloads them instead of generating again) and ``round_NNN.png`` (source |
generated, with t and f before -> after); one ``{"stage": "config", ...}`` row in metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdbench.artifacts import load_checked, save_checked
from kdbench.errors import ConfigError, KdbenchError

KEEP = ("replace", "accumulate")
#: the key under ``model:`` naming the data the default UNet trains on (default: the cell's split)
DATASET_KEY = "dataset"
#: how the samples of a round are ranked: the student's maximum softmax probability (the
#: paper's), or its probability of the true label
SELECT = ("max_prob", "true_label")


# --------------------------------------------------------------------------- pixel space


class PixelSpace:
    """Maps the dataset's normalised images to the diffusion model's [-1, 1] and back.

    ``unit = x * scale + shift`` is the image in [0, 1]: from the split's ``mean``/``std`` when
    it has them (exact), else from the per-channel min/max of the training images.
    """

    def __init__(self, scale: Tensor, shift: Tensor):
        self.scale = scale.float().view(1, -1, 1, 1)
        self.shift = shift.float().view(1, -1, 1, 1)

    @classmethod
    def from_stats(cls, mean: Any, std: Any) -> PixelSpace:
        std_t, mean_t = torch.as_tensor(std, dtype=torch.float32), torch.as_tensor(mean, dtype=torch.float32)
        return cls(std_t, mean_t)

    @classmethod
    def from_range(cls, lo: Tensor, hi: Tensor) -> PixelSpace:
        return cls(1.0 / (hi - lo).clamp_min(1e-6), -lo / (hi - lo).clamp_min(1e-6))

    def to_model(self, x: Tensor) -> Tensor:
        return (x * self.scale.to(x.device) + self.shift.to(x.device)) * 2 - 1

    def from_model(self, u: Tensor) -> Tensor:
        return ((u + 1) / 2 - self.shift.to(u.device)) / self.scale.to(u.device)

    def to_unit(self, x: Tensor) -> Tensor:
        return (self.to_model(x) + 1) / 2

    @classmethod
    def of(cls, data: Any, chunks: Callable[[], Any]) -> PixelSpace:
        """The space of a split: its ``mean``/``std`` when ``data`` has them, else the range of the
        images ``chunks()`` yields as ``(x, y)`` batches."""
        if getattr(data, "mean", None) is not None and getattr(data, "std", None) is not None:
            return cls.from_stats(data.mean, data.std)
        lo = hi = None
        for x, _ in chunks():
            xl, xh = x.amin(dim=(0, 2, 3)), x.amax(dim=(0, 2, 3))
            lo = xl if lo is None else torch.minimum(lo, xl)
            hi = xh if hi is None else torch.maximum(hi, xh)
        assert lo is not None and hi is not None
        return cls.from_range(lo, hi)


# --------------------------------------------------------------------------- the core


def _logits(m: Any, x: Tensor) -> Tensor:
    """Logits of a model, a FeatureReader (``.read``) or any callable returning logits."""
    if hasattr(m, "read"):
        return m.read(x).logits
    out = m(x)
    return out.logits if hasattr(out, "logits") else out


def _module(m: Any) -> nn.Module | None:
    mod = getattr(m, "model", m)
    return mod if isinstance(mod, nn.Module) else None


class _EvalMode:
    """Puts models in eval mode for the block and restores their modes after."""

    def __init__(self, *models: Any):
        self.mods = [m for m in (_module(x) for x in models) if m is not None]

    def __enter__(self) -> None:
        self.modes = [m.training for m in self.mods]
        for m in self.mods:
            m.eval()

    def __exit__(self, *exc: Any) -> None:
        for m, was in zip(self.mods, self.modes, strict=True):
            m.train(was)


def confidence(model: Any, x: Tensor, y: Tensor) -> Tensor:
    """Softmax probability of the label ``y`` per sample."""
    return F.softmax(_logits(model, x).float(), dim=1).gather(1, y.view(-1, 1)).squeeze(1)


@dataclass
class Generated:
    """One round's output: images in the data's normalised space, with per-sample confidences."""

    images: Tensor
    labels: Tensor
    source_index: Tensor
    conf: dict[str, Tensor] = field(default_factory=dict)  # t/f at source, start and end
    seconds: float = 0.0

    def stats(self) -> dict[str, float]:
        """Mean confidences (``t_source``, ``f_start``, ``t_after``...), ``n`` and throughput."""
        out: dict[str, float] = {"n": len(self.labels), "gen_s": round(self.seconds, 3)}
        out.update({k: float(v.mean()) if len(v) else float("nan") for k, v in self.conf.items()})
        out["images_per_s"] = len(self.labels) / self.seconds if self.seconds > 0 else float("nan")
        return out


#: the per-sample confidences a round records: teacher (t) and student (f) on the source image,
#: on its reconstruction (the optimisation's start) and on the kept (best) iterate
CONF_KEYS = ("t_source", "f_source", "t_start", "f_start", "t_after", "f_after")


def confidence_guided(
    teacher: Any,
    student: Any,
    images: Tensor,
    labels: Tensor,
    diffusion: Any,
    generator: torch.Generator | None = None,
    *,
    space: PixelSpace | None = None,
    steps: int = 100,
    lr: float = 0.01,
    gamma: float = 2.0,
    ddim_steps: int = 10,
    strength: float = 0.5,
    batch_size: int = 64,
    grad_checkpoint: bool = True,
    device: torch.device | str | None = None,
    source_index: Tensor | None = None,
) -> Generated:
    """Generate one variant per image that the teacher gets right and the student does not.

    ``images``: normalised ``[N, C, H, W]`` (``space`` maps them to [-1, 1]; identity when None),
    ``labels`` ``[N]``, ``diffusion`` a :class:`~kdbench.diffusion.DiffusionModel`. Deterministic
    (``generator`` is accepted for the plugin contract; nothing here is random). Models are used
    in eval mode, their parameters get no gradients; their modes are restored afterwards.
    """
    from kdbench.diffusion.sampler import DDIMPath

    device = torch.device(device) if device is not None else diffusion.device
    diffusion.to(device)
    space = space or PixelSpace(torch.ones(images.shape[1]) * 0.5, torch.ones(images.shape[1]) * 0.5)
    search = _LatentSearch(
        teacher, student, DDIMPath(diffusion, ddim_steps, strength), space, steps, lr, gamma, grad_checkpoint
    )
    conf: dict[str, list[Tensor]] = {k: [] for k in CONF_KEYS}
    outs = []
    t0 = time.perf_counter()
    with _EvalMode(teacher, student):
        for lo in range(0, len(images), batch_size):
            x_src = images[lo : lo + batch_size].to(device)
            y = labels[lo : lo + batch_size].to(device)
            y_cond = y if diffusion.conditional else None
            best_x, got = search.run(x_src, y, y_cond)
            for k, v in got.items():
                conf[k].append(v)
            outs.append(best_x)
    n = len(labels)
    return Generated(
        images=torch.cat(outs) if outs else images[:0].clone(),
        labels=labels.clone().cpu(),
        source_index=source_index.clone() if source_index is not None else torch.arange(n),
        conf={k: torch.cat(v) if v else torch.zeros(0) for k, v in conf.items()},
        seconds=time.perf_counter() - t0,
    )


@dataclass
class _LatentSearch:
    """The optimisation of one batch's latents: Adam on z towards t^gamma + (1 - f)^gamma."""

    teacher: Any
    student: Any
    path: Any  # a DDIMPath: z -> image, and the inversion image -> z
    space: PixelSpace
    steps: int
    lr: float
    gamma: float
    grad_checkpoint: bool

    def run(self, x_src: Tensor, y: Tensor, y_cond: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """The best image per sample (on the CPU) and its confidences (``CONF_KEYS``)."""
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            out["t_source"] = confidence(self.teacher, x_src, y).cpu()
            out["f_source"] = confidence(self.student, x_src, y).cpu()
            z = self.path.invert(self.space.to_model(x_src), y_cond)
        z.requires_grad_(True)
        opt = torch.optim.Adam([z], lr=self.lr)
        best = torch.full((len(y),), -math.inf, device=x_src.device)
        best_x = torch.empty_like(x_src)
        best_t, best_f = torch.zeros_like(best), torch.zeros_like(best)
        for step in range(self.steps + 1):
            last = step == self.steps
            with torch.set_grad_enabled(not last):
                x = self.space.from_model(self.path.sample(z, y_cond, self.grad_checkpoint).clamp(-1, 1))
                t, f = confidence(self.teacher, x, y), confidence(self.student, x, y)
                objective = t.pow(self.gamma) + (1 - f).pow(self.gamma)
            with torch.no_grad():
                if step == 0:
                    out["t_start"], out["f_start"] = t.detach().cpu(), f.detach().cpu()
                better = objective.detach() > best  # keep each sample's best iterate
                best = torch.where(better, objective.detach(), best)
                best_x[better] = x.detach()[better]
                best_t = torch.where(better, t.detach(), best_t)
                best_f = torch.where(better, f.detach(), best_f)
            if last:
                break
            (grad,) = torch.autograd.grad(-objective.sum(), z)
            z.grad = grad
            opt.step()
            z.grad = None
        out["t_after"], out["f_after"] = best_t.cpu(), best_f.cpu()
        return best_x.cpu(), out


def selection_score(model: Any, x: Tensor, y: Tensor, select: str = "max_prob") -> Tensor:
    """The confidence a round ranks samples by (``SELECT``): the maximum softmax probability
    (``max_prob``) or the softmax probability of the label ``y`` (``true_label``)."""
    if select == "true_label":
        return confidence(model, x, y)
    if select == "max_prob":
        return F.softmax(_logits(model, x).float(), dim=1).amax(dim=1)
    raise ConfigError(f"config: select must be one of {', '.join(SELECT)}, got {select!r}")


@torch.no_grad()
def least_confident(
    student: Any, chunks: Callable[[], Any], fraction: float, device: Any, select: str = "max_prob"
) -> Tensor:
    """Indices of the ``fraction`` of samples with the lowest student confidence, ranked by
    ``select`` (see :func:`selection_score`; ties: lower index first). ``chunks()`` yields
    ``(x, y)`` batches of the split, in order."""
    scores = []
    with _EvalMode(student):
        for x, y in chunks():
            scores.append(selection_score(student, x.to(device), y.to(device), select).cpu())
    s = torch.cat(scores)
    k = max(1, round(fraction * len(s)))
    return torch.sort(s, stable=True).indices[:k]


# --------------------------------------------------------------------------- artefacts


def save_grid_png(
    path: Path, gen: Generated, sources: Tensor, space: PixelSpace, max_pairs: int = 16
) -> None:
    """A PNG of up to ``max_pairs`` (source | generated) pairs, t and f before -> after under each."""
    from PIL import Image, ImageDraw

    n = min(max_pairs, len(gen.labels))
    if n == 0:
        return
    _, c, h, w = sources.shape
    scale = max(1, math.ceil(64 / max(h, w)))  # each image at least 64 px: room for the text
    cols = min(4, n)
    rows = math.ceil(n / cols)
    cw, ch, text_h, pad = 2 * w * scale + 4, h * scale, 26, 6
    canvas = Image.new("RGB", (cols * (cw + pad) + pad, rows * (ch + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)

    def to_pil(x: Tensor) -> Image.Image:
        u = space.to_unit(x.unsqueeze(0))[0].clamp(0, 1)
        arr = (u * 255).round().byte().permute(1, 2, 0).numpy()
        img = Image.fromarray(arr[:, :, 0] if c == 1 else arr[:, :, :3], "L" if c == 1 else "RGB")
        return img.convert("RGB").resize((w * scale, h * scale), Image.NEAREST)

    cf = gen.conf
    for i in range(n):
        r, col = divmod(i, cols)
        x0, y0 = pad + col * (cw + pad), pad + r * (ch + text_h + pad)
        canvas.paste(to_pil(sources[i]), (x0, y0))
        canvas.paste(to_pil(gen.images[i]), (x0 + w * scale + 4, y0))
        line1 = f"y={int(gen.labels[i])} t {cf['t_source'][i]:.2f}>{cf['t_after'][i]:.2f}"
        line2 = f"f {cf['f_source'][i]:.2f}>{cf['f_after'][i]:.2f}"
        draw.text((x0, y0 + ch + 1), line1, fill="black")
        draw.text((x0, y0 + ch + 13), line2, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    canvas.save(tmp)
    tmp.replace(path)


# --------------------------------------------------------------------------- the generator's data


def parse_dataset_spec(raw: Any) -> dict[str, Any]:
    """``model.dataset`` as ``{"name", "params"}``: a dataset name or ``{name: {params}}``, checked
    like a grid's datasets (a known plugin, parameters that fit its signature, defaults filled)."""
    from kdbench.config import Problems, parse_ref, validate_params

    problems = Problems("config", None)
    ref = parse_ref(raw, "datasets", ("model", DATASET_KEY), problems)
    if ref is not None:
        validate_params(ref, ("model", DATASET_KEY, ref.name), problems)
    if problems.items or ref is None:
        raise ConfigError("; ".join(problems.items), list(problems.items))
    return {"name": ref.name, "params": dict(ref.params)}


def _load(spec: dict[str, Any]) -> Any:
    from kdbench.engine.cell import load_dataset

    try:
        return load_dataset(spec)
    except KdbenchError as e:
        raise ConfigError(f"config: model.{DATASET_KEY} ({spec['name']}) cannot be built: {e}") from None


def _split_chunks(split: Any, batch_size: int = 512) -> Callable[[], Any]:
    """(x, y) batches of a dataset split, in order."""
    from kdbench.engine.data import Batches

    batches = Batches(split, batch_size)

    def gen():
        for x, y, _ in batches.iterate(None, False):
            yield x, y

    return gen


def check_generator_data(
    spec: dict[str, Any], num_classes: int, in_channels: int, size: tuple[int, int], conditional: bool
) -> None:
    """Raise :class:`ConfigError` naming ``model.dataset`` unless its images have the cell's
    channels and size (and, for a class-conditional UNet, its classes)."""
    ds = _load(spec)
    x, _ = ds.split("train")[0]
    shape, want = tuple(torch.as_tensor(x).shape), (in_channels, *size)
    problems = []
    if shape != want:
        problems.append(
            f"its images are {'x'.join(map(str, shape))} (channels x height x width) but the cell's "
            f"dataset's are {'x'.join(map(str, want))}"
        )
    if conditional and int(ds.num_classes) != num_classes:
        problems.append(f"it has {ds.num_classes} classes but the cell's dataset has {num_classes}")
    if problems:
        raise ConfigError(
            f"config: model.{DATASET_KEY} ({spec['name']}): {'; '.join(problems)}; the diffusion model must "
            "make the kind of images it varies: choose data of the same shape (or drop model.dataset "
            "to train on the cell's split)"
        )


# --------------------------------------------------------------------------- the plugin


def _extra_samples(x: Tensor, y: Tensor, meta: dict[str, Tensor], replace: bool) -> Any:
    from kdbench.engine.data import ExtraSamples

    try:
        return ExtraSamples(x, y, meta, replace=replace)  # type: ignore[call-arg]
    except TypeError:
        if replace:
            raise ConfigError(
                "config: keep 'replace' (and a `cap`) need an engine whose ExtraSamples can replace "
                "earlier samples; use keep: accumulate without cap"
            ) from None
        return ExtraSamples(x, y, meta)


class ConfigAugmenter:
    """ConfiG (dataset-level augmenter ``config``); see the module docstring for the method.

    Parameters: ``every`` (epochs between rounds; the first round starts epoch ``every``),
    ``fraction`` (of the training split re-generated per round), ``select`` (how the least
    confident samples are ranked: ``max_prob``, the paper's, or ``true_label``), ``steps``,
    ``lr`` (Adam on the latents), ``gamma``, ``ddim_steps`` and ``strength`` (the DDIM path:
    ``round(ddim_steps * strength)`` sampler steps), ``batch_size`` (samples optimised together), ``keep``
    (``replace`` the previous round's samples or ``accumulate`` them, at most ``cap``, oldest
    dropped first), ``model`` (``{path: DIR}`` for a local diffusers directory, else keys of
    :class:`kdbench.diffusion.Recipe` for the default UNet and ``dataset``, the data it trains on:
    a dataset spec, default the cell's training split), ``grid_images`` (pairs in the PNG),
    ``grad_checkpoint`` (recompute each sampler step in the backward pass: memory of one UNet
    forward instead of one per step, for about a third more time).
    """

    dataset_level = True
    needs_teacher = True

    def __init__(
        self,
        every: int = 3,
        fraction: float = 0.3,
        select: str = "max_prob",
        steps: int = 100,
        lr: float = 0.01,
        gamma: float = 2.0,
        ddim_steps: int = 10,
        strength: float = 0.5,
        batch_size: int = 64,
        keep: str = "replace",
        cap: int | None = None,
        model: dict[str, Any] | None = None,
        grid_images: int = 16,
        grad_checkpoint: bool = True,
    ) -> None:
        problems = []
        if every < 1:
            problems.append(f"every must be >= 1, got {every}")
        if not 0 < fraction <= 1:
            problems.append(f"fraction must be in (0, 1], got {fraction}")
        if steps < 0 or batch_size < 1:
            problems.append(f"steps must be >= 0 and batch_size >= 1, got {steps}, {batch_size}")
        if lr <= 0 or gamma <= 0:
            problems.append(f"lr and gamma must be > 0, got {lr}, {gamma}")
        if ddim_steps < 1 or not 0 < strength <= 1:
            problems.append(f"ddim_steps must be >= 1 and strength in (0, 1], got {ddim_steps}, {strength}")
        if select not in SELECT:
            problems.append(f"select must be one of {', '.join(SELECT)}, got {select!r}")
        if keep not in KEEP:
            problems.append(f"keep must be one of {', '.join(KEEP)}, got {keep!r}")
        if cap is not None and cap < 1:
            problems.append(f"cap must be >= 1, got {cap}")
        if problems:
            raise ConfigError("config: " + "; ".join(problems), [f"config: {p}" for p in problems])
        self.every, self.fraction, self.steps, self.lr, self.gamma = every, fraction, steps, lr, gamma
        self.select = select
        self.ddim_steps, self.strength, self.batch_size = ddim_steps, strength, batch_size
        self.keep, self.cap, self.grid_images = keep, cap, grid_images
        self.grad_checkpoint = grad_checkpoint
        self.model = dict(model or {})
        self._path = self.model.pop("path", None)
        #: the data the default UNet trains on, ``{"name", "params"}`` (None: the cell's split)
        self.dataset = self.model.pop(DATASET_KEY, None)
        if self.dataset is not None:
            self.dataset = parse_dataset_spec(self.dataset)
        self._local_info: dict[str, Any] | None = None
        if self._path is not None:
            from kdbench.diffusion.model import inspect_local

            if self.model or self.dataset is not None:
                keys = [*self.model, *([DATASET_KEY] if self.dataset is not None else [])]
                raise ConfigError(
                    f"config: model.path takes no recipe keys, got {', '.join(keys)} "
                    f"(model.{DATASET_KEY} is the data the default UNet trains on; a loaded model is trained)"
                )
            self._local_info = inspect_local(self._path)
            self.recipe = None
        else:
            from kdbench.diffusion.train import Recipe

            self.recipe = Recipe.from_params(self.model)
        self._diffusion: Any = None
        self._diffusion_record: dict[str, Any] = {}
        self._space: PixelSpace | None = None
        self._checked = False

    def __repr__(self) -> str:
        return f"ConfigAugmenter(every={self.every}, fraction={self.fraction}, steps={self.steps})"

    @staticmethod
    def check_params(params: dict[str, Any]) -> None:
        """Checks of the grid's parameters when it is loaded: ``model.dataset`` names a dataset
        plugin and its parameters fit its signature (nothing is built here)."""
        model = params.get("model")
        if isinstance(model, dict) and model.get(DATASET_KEY) is not None:
            parse_dataset_spec(model[DATASET_KEY])

    # ----------------------------------------------------------------- validation

    def validate(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int | tuple[int, int],
        teacher_classes: int | None = None,
        student_classes: int | None = None,
    ) -> None:
        """Raise :class:`ConfigError` before any cell runs when this setting cannot work."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        for who, k in (("teacher", teacher_classes), ("student", student_classes)):
            if k is not None and k != num_classes:
                raise ConfigError(
                    f"config: the {who} predicts {k} classes but the dataset has {num_classes}; "
                    "ConfiG compares teacher and student confidence in the same label"
                )
        if self._local_info is not None:
            from kdbench.diffusion.model import check_compatible

            if h != w:
                raise ConfigError(f"config: diffusion models here take square images, got {h}x{w}")
            check_compatible(
                self._local_info["unet"], self._local_info["vae"], in_channels, h, num_classes, self._path
            )
            return
        assert self.recipe is not None
        factor = self.recipe.downsample()
        if h != w or h % factor:
            raise ConfigError(
                f"config: the default UNet ({len(self.recipe.widths)} levels) cannot take {h}x{w} images; "
                f"it needs square images with a size divisible by {factor} (set fewer model.widths)"
            )
        if self.dataset is not None:
            check_generator_data(
                self.dataset, num_classes, in_channels, (h, w), self.recipe.class_conditional
            )

    # ----------------------------------------------------------------- the hook

    def on_epoch_start(self, epoch: int, ctx: Any) -> Any:
        """Generate (or reload) the round that starts at ``epoch``; None between rounds."""
        out_dir = Path(ctx.cell_dir) / "config"
        if not self._checked:  # at the cell's first epoch: fail before training, not at round 1
            first_x, _ = next(iter(self._chunks(ctx)()))
            self._check_models(ctx, first_x, int(ctx.train.targets().max()) + 1)
        self._restore_rows(ctx, epoch - 1)  # earlier rounds' rows first, in order
        if epoch == 0 or epoch % self.every:
            return None
        r = epoch // self.every
        path = out_dir / f"round_{r:03d}.pt"
        if not path.exists():
            self._generate(r, epoch, ctx, path)
        self._restore_rows(ctx, epoch)
        if self.keep == "accumulate" and self.cap is None:
            # the engine keeps earlier extra samples: hand over only the new ones
            d = load_checked(path)
            return _extra_samples(d["x"], d["y"], d["meta"], replace=False)
        first = r if self.keep == "replace" else 1
        rounds = [load_checked(out_dir / f"round_{i:03d}.pt") for i in range(first, r + 1)]
        x = torch.cat([d["x"] for d in rounds])
        y = torch.cat([d["y"] for d in rounds])
        meta = {k: torch.cat([d["meta"][k] for d in rounds]) for k in rounds[-1]["meta"]}
        if self.cap is not None and len(y) > self.cap:
            x, y, meta = x[-self.cap :], y[-self.cap :], {k: v[-self.cap :] for k, v in meta.items()}
        return _extra_samples(x, y, meta, replace=r > 1)

    def _chunks(self, ctx: Any, positions: Tensor | None = None):
        """(x, y) of the split's own samples (not earlier extra ones), in order."""
        train = ctx.train
        n_base = getattr(train, "n_base", len(train))

        def gen():
            for x, y, pos in train.iterate(None, False):
                keep = pos < n_base if positions is None else torch.isin(pos, positions)
                if bool(keep.any()):
                    yield x[keep], y[keep]

        return gen

    def _pixel_space(self, ctx: Any) -> PixelSpace:
        return PixelSpace.of(getattr(ctx.train, "data", None), self._chunks(ctx))

    def _check_models(self, ctx: Any, x: Tensor, n_labels: int) -> int:
        """The class count; clear errors for a missing teacher or mismatched heads."""
        if ctx.teacher is None:
            raise ConfigError("config needs a teacher: use it with a distillation method, not ce")
        with torch.no_grad(), _EvalMode(ctx.teacher, ctx.student):
            kt = _logits(ctx.teacher, x[:2].to(ctx.device)).shape[1]
            ks = _logits(ctx.student, x[:2].to(ctx.device)).shape[1]
        if ks < n_labels:
            raise ConfigError(f"config: the student predicts {ks} classes but labels go up to {n_labels - 1}")
        if not self._checked:
            self.validate(ks, x.shape[1], tuple(x.shape[2:]), kt, ks)  # type: ignore[arg-type]
            self._checked = True
        return ks

    def _diffusion_model(self, ctx: Any, num_classes: int) -> Any:
        if self._diffusion is not None:
            return self._diffusion
        if self._path is not None:
            from kdbench.diffusion.model import load_local

            self._diffusion = load_local(self._path).to(ctx.device)
            self._diffusion_record = {"path": str(self._path)}
            return self._diffusion
        from kdbench.diffusion.train import obtain_trained

        assert self._space is not None and self.recipe is not None
        if self.dataset is None:
            chunks, space, source = self._chunks(ctx), self._space, None
            n = getattr(ctx.train, "n_base", len(ctx.train))
            groups = ctx.train.meta.get("group") if hasattr(ctx.train, "meta") else None
            seen: dict[str, Any] = {"dataset": "the cell's training split", "n": n}
            groups = groups[:n] if groups is not None else None
        else:
            ds = _load(self.dataset)
            split = ds.split("train")
            chunks = _split_chunks(split)
            space = PixelSpace.of(split, chunks)
            source = {"dataset": self.dataset, "fingerprint": ds.fingerprint()}
            groups = ds.meta("train").get("group")
            seen = {"dataset": self.dataset, "n": len(split)}
        if groups is not None:
            seen["group_counts"] = torch.bincount(groups.long()).tolist()
        xs, ys = [], []
        for x, y in chunks():
            xs.append(space.to_model(x).clamp(-1, 1))  # the model's [-1, 1] pixels: the same for all data
            ys.append(y)
        run_dir = Path(ctx.cell_dir).parent.parent  # <run>/cells/<id>
        self._diffusion, self._diffusion_record = obtain_trained(
            self.recipe,
            torch.cat(xs),
            torch.cat(ys),
            num_classes,
            run_dir,
            ctx.device,
            source=source,
            seen=seen,
        )
        return self._diffusion

    def _generate(self, r: int, epoch: int, ctx: Any, path: Path) -> None:
        train = ctx.train
        targets = train.targets()
        if self._space is None:
            self._space = self._pixel_space(ctx)
        first_x, _ = next(iter(self._chunks(ctx)()))
        num_classes = self._check_models(ctx, first_x, int(targets.max()) + 1)
        diffusion = self._diffusion_model(ctx, num_classes)
        picked = least_confident(ctx.student, self._chunks(ctx), self.fraction, ctx.device, self.select)
        positions = torch.sort(picked).values
        src_x = torch.cat([x for x, _ in self._chunks(ctx, positions)()])
        src_y = targets[positions]
        gen = confidence_guided(
            ctx.teacher,
            ctx.student,
            src_x,
            src_y,
            diffusion,
            ctx.generator,
            space=self._space,
            steps=self.steps,
            lr=self.lr,
            gamma=self.gamma,
            ddim_steps=self.ddim_steps,
            strength=self.strength,
            batch_size=self.batch_size,
            grad_checkpoint=self.grad_checkpoint,
            device=ctx.device,
            source_index=positions,
        )
        meta = train.meta_at(positions) if hasattr(train, "meta_at") else {}
        stats = gen.stats()
        save_checked(
            {
                "epoch": epoch,
                "round": r,
                "x": gen.images,
                "y": gen.labels,
                "meta": {k: v.clone() for k, v in meta.items()},
                "source": positions,
                "conf": gen.conf,
                "stats": stats,
            },
            path,
        )
        save_grid_png(path.with_suffix(".png"), gen, src_x, self._space, self.grid_images)
        self._append_row(ctx, self._row(epoch, r, stats))

    def _row(self, epoch: int, r: int, stats: dict[str, float]) -> dict[str, Any]:
        row: dict[str, Any] = {"stage": "config", "epoch": epoch, "round": r}
        row.update({f"config/{k}": v for k, v in stats.items()})
        if "train_s" in self._diffusion_record:
            row["config/diffusion_train_s"] = self._diffusion_record["train_s"]
            row["config/diffusion_trained_here"] = self._diffusion_record.get("trained_here", False)
        return row

    @staticmethod
    def _append_row(ctx: Any, row: dict[str, Any]) -> None:
        with open(Path(ctx.cell_dir) / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def _restore_rows(self, ctx: Any, epoch: int) -> None:
        """Re-add the rows of rounds up to ``epoch`` that a resume truncated away."""
        out_dir = Path(ctx.cell_dir) / "config"
        if not out_dir.exists():
            return
        mpath = Path(ctx.cell_dir) / "metrics.jsonl"
        have = set()
        if mpath.exists():
            for ln in mpath.read_text().splitlines():
                if ln.strip():
                    row = json.loads(ln)
                    if row.get("stage") == "config":
                        have.add(row.get("round"))
        for r in range(1, epoch // self.every + 1):
            p = out_dir / f"round_{r:03d}.pt"
            if r not in have and p.exists():
                d = load_checked(p)
                self._append_row(ctx, self._row(d["epoch"], d["round"], d["stats"]))


def generation_cost(cell_dir: Path) -> dict[str, float]:
    """A finished cell's ConfiG cost from its files: images generated, seconds, images/s, the
    share of the cell's wall time spent generating (and training the diffusion model, when this
    cell trained it)."""
    cell_dir = Path(cell_dir)
    rows = []
    mpath = cell_dir / "metrics.jsonl"
    if mpath.exists():
        rows = [json.loads(ln) for ln in mpath.read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if r.get("stage") == "config"]
    n = sum(r["config/n"] for r in rows)
    gen_s = sum(r["config/gen_s"] for r in rows)
    train_s = max(
        (r.get("config/diffusion_train_s", 0.0) for r in rows if r.get("config/diffusion_trained_here")),
        default=0.0,
    )
    out = {
        "rounds": len(rows),
        "images": n,
        "gen_s": gen_s,
        "images_per_s": n / gen_s if gen_s else float("nan"),
        "diffusion_train_s": train_s,
    }
    rpath = cell_dir / "result.json"
    if rpath.exists():
        wall = json.loads(rpath.read_text()).get("wall_s")
        if wall:
            out["gen_share"] = gen_s / wall
            out["diffusion_share"] = train_s / wall
    return out
