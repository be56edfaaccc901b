"""Soft-label replay (FKD, Shen & Xing, ECCV 2022; FerKD's calibration, Shen, ICCV 2023).

A student cell with ``train: {teacher_outputs: replay}`` does not run its teacher while it trains:
the teacher's soft labels for every crop the student will see were computed once and stored in a
*bank*, which any number of students (kd, dkd, dist, mlkd... of one seed) replay.

Key and layout
--------------
A bank belongs to (teacher, dataset and validation hold-out, seed, crop recipe: batch size, sampler,
augmenters and views, epochs, arithmetic, storage options), :func:`bank_key`, hashed to its id, and
lives in ``<run dir>/softlabels/<id>/``: ``key.json``, one ``epoch0000.pt`` per epoch (atomic, with a
SHA-256 sidecar, verified when read) and, written last, ``bank.json`` (+ sidecar): a bank without it is
incomplete. It is built under a file lock by the first cell that needs it (as teachers are).

Building
--------
The build replays the train stage's own randomness without a student: the data order from a generator
seeded as the trainer's (:func:`kdbench.engine.train.train_data_seed`), the views from one seeded as its
augmentation generator (:func:`~kdbench.engine.train.aug_seed`) through the engine's own view rule
(``_views``, then the method's extra views). Per step it records the samples' positions, the crop of a
``flip_crop`` student view as int16 (flip, top, left) (left/top: offset of the crop in the zero-padded,
possibly mirrored image, in [-padding, padding]; drawn from the generator state the student's augmenter
starts from, and checked to reproduce the student's view bit for bit), and the teacher's soft labels on
the teacher's view (``"teacher"``) and on each extra view the method reads (MLKD's ``"strong"``). Each
epoch file also keeps both generators' states after that epoch: a killed build continues at the first
missing epoch and ends with the same files.

Replaying
---------
A replaying cell trains as the computing cell would (same data order, same views drawn from the same
generator, so its metrics depend only on the stored labels); only the teacher's forward becomes a
lookup of (epoch, step), which checks the batch's positions and the student's crop against the recorded
ones. A bank that does not fit is an error, never a silent mismatch.

Only the teacher's logits are stored: methods whose teacher taps are ``("logits",)`` replay; a method
reading teacher features (FitNet, CRD, AT...) is refused when the grid is planned (:func:`refusal`), as
are a dataset-level augmenter (ConfiG: the data then depend on the student), DDP cells and methods with
an initialisation stage.

Storage
-------
``store: exact``: the teacher's logits, fp32, every class. Replay is bitwise the computing cell on CPU
(tests/test_softlabels.py).

``store: topk`` (the default, FKD's format): per crop the k largest softmax probabilities (T = 1) in fp16,
their class indices (int16 below 32768 classes) and the remaining mass ``1 - sum(top k)`` in fp16.
Replayed logits are ``log p`` for those k classes and ``log(rest / (C - k))`` for every other one, so
``softmax(z / T)`` keeps the top-k ratios exactly and spreads the tail evenly. Bytes per crop:
``4 k + 2`` (labels) ``+ 6`` (a flip_crop crop) ``+ 4`` (its position) ``+ 1`` (FerKD's code).
Error of the KD loss (mean over batches of 64 of |KD_topk - KD_exact| / KD_exact) measured on 2560 crops
of CIFAR-100-shaped data with a resnet56 teacher of mean max probability 0.53 on them (4 epochs), the
student a resnet20 after one kd epoch / untrained:

    k        T = 1               T = 4
    5     1.4 % /  5.5 %     7.1 % / 58 %
    10    0.8 % /  2.2 %     6.1 % / 51 %
    20    0.3 % /  0.6 %     4.4 % / 38 %

At T = 1 (FKD trains on the T = 1 soft labels) top-10 is within about 2 %; at T = 4 the shape of the
tail, which the uniform fill loses, carries much of the loss of a student far from the teacher: use
``store: exact`` (or a larger k) for temperature KD where that matters. FKD reports top-5 enough on
ImageNet, with a far more confident teacher.

FerKD calibration (``ferkd: {relabel_below, drop_above, smoothing}``)
-------------------------------------------------------------------
FerKD observes that random crops are easy positives, hard positives or hard negatives (background or
another object), and that the teacher's soft label is not reliable on the last two. kdbench's rule,
applied at build time to the teacher's view of each crop, with p the teacher's softmax (T = 1), y the
crop's image label and C the classes:

* **dropped** (a confident background crop): ``argmax p != y`` and ``max p >= drop_above`` (default 0.5):
  the teacher confidently sees another class in it. The crop is left out of its student batch (a
  batch keeps all its crops if fewer than two would remain: BatchNorm).
* **relabelled** (a hard region): not dropped and ``p[y] < relabel_below`` (default 0.1): its soft label
  becomes the softened ground truth ``(1 - smoothing) onehot(y) + smoothing / C`` (default smoothing 0.1),
  stored as the logits ``log q``.
* otherwise the teacher's soft label.

Extra views (MLKD's strong view) are not calibrated; a dropped crop leaves every view. The paper ranks
crops by the teacher's confidence and calibrates the less confident; the thresholds here are absolute
probabilities, parameters of the bank (part of its key).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdbench import registry
from kdbench.artifacts import (
    ArtifactCorrupt,
    file_lock,
    load_checked,
    record_checksum,
    save_checked,
    sidecar,
    verify,
    write_json_atomic,
)
from kdbench.augment.basic import FlipCrop
from kdbench.cells import Cell, check_teacher_outputs, digest
from kdbench.engine import ranks, views
from kdbench.engine.precision import Amp
from kdbench.engine.train import (
    LossFn,
    StepInput,
    TrainSetup,
    _batch,
    _ce,
    _views,
    _weighted,
    aug_seed,
    train_data_seed,
)
from kdbench.errors import ConfigError, KdbenchError
from kdbench.features import Features

BANK_FORMAT = 1
#: FerKD's per-crop code (``calib``): the teacher's label, the softened ground truth, left out
KEPT, RELABELLED, DROPPED = 0, 1, 2


class BankMismatch(KdbenchError):
    """A bank's recorded order or crops differ from what the replaying cell draws."""


def is_replay(teacher_outputs: Any) -> bool:
    """Whether a recipe's ``teacher_outputs`` (resolved) reads a soft-label bank."""
    return isinstance(teacher_outputs, dict) and teacher_outputs.get("mode") == "replay"


# ------------------------------------------------------------------------------- refusals


def refusal(method_cls: Any, params: dict[str, Any]) -> str | None:
    """Why a method cannot replay a bank (which holds the teacher's logits only), or None."""
    name = getattr(method_cls, "__name__", str(method_cls))
    taps = tuple(method_cls.taps_for(**params).teacher)
    features = [t for t in taps if t != "logits"]
    if features:
        return (
            f"method {name} reads the teacher's {', '.join(features)} features, and a soft-label bank "
            f"stores the teacher's logits only (methods whose teacher taps are ('logits',) replay: kd, "
            f"dkd, dist, mlkd, ...); remove `teacher_outputs: replay` for it"
        )
    return None


def replay_problems(grid: Any) -> list[tuple[tuple[Any, ...], str]]:
    """Methods of ``grid`` set to replay that cannot, as ``[(grid key path, message)]``."""
    out: list[tuple[tuple[Any, ...], str]] = []
    grid_wide = grid.config.train.teacher_outputs
    for i, m in enumerate(grid.methods):
        own = "teacher_outputs" in m.train
        if not is_replay(check_teacher_outputs(m.train["teacher_outputs"]) if own else grid_wide):
            continue
        cls = registry.load("losses", m.name)
        if not cls.needs_teacher(**m.method_params):
            continue  # no teacher, nothing to replay (a ce baseline under a grid-wide setting)
        why = refusal(cls, m.method_params)
        if why is not None:
            where = ("methods", i) if own else ("train", "teacher_outputs")
            out.append((where, why.replace(f"method {cls.__name__}", f"method {m.name}", 1)))
    return out


def check_setup(cell: Cell, setup: TrainSetup) -> None:
    """Refuse (ConfigError) a replaying cell whose training a bank cannot stand in for."""
    d = setup.distiller
    assert d is not None
    what = f"{cell.describe}: teacher_outputs: replay"
    why = refusal(type(d), dict(cell.method.params))
    if why is not None:
        raise ConfigError(f"{what}: {why.replace(type(d).__name__, cell.method.name, 1)}")
    if d.init_epochs > 0:
        raise ConfigError(
            f"{what}: {cell.method.name} has an initialisation stage, which a bank does not cover"
        )
    if setup.dataset_augmenters:
        raise ConfigError(
            f"{what}: a dataset-level augmenter adds samples that depend on the student between epochs, "
            "which a bank built ahead cannot label; compute the teacher's outputs for this cell"
        )
    if ranks.world_size(cell.train) > 1:
        raise ConfigError(f"{what}: DDP cells (gpus_per_cell x nodes > 1) compute the teacher's outputs")


# ------------------------------------------------------------------------------- the key


def _jsonable(v: Any) -> Any:
    dump = getattr(v, "model_dump", None)
    return dump(mode="json") if callable(dump) else v


def bank_key(cell: Cell, setup: TrainSetup) -> dict[str, Any]:
    """Everything the bank's content depends on (its id is the hash of this)."""
    cls = type(setup.distiller)
    tr, opts = cell.train, cell.train.teacher_outputs
    return {
        "format": BANK_FORMAT,
        "teacher": cell.teacher.id,
        "dataset": cell.dataset.model_dump(mode="json"),
        "val_fraction": cell.eval.val_fraction,
        "seed": cell.seed,
        "epochs": tr.epochs,
        "batch_size": tr.batch_size,
        "sampler": tr.sampler,
        "jtt": _jsonable(getattr(tr, "jtt", None)),
        "augment": _jsonable(cell.augment),
        "student_view": _jsonable(views.student_view(cell, cls)),
        "teacher_view": _jsonable(views.teacher_view(cell, cls)),
        "views": {n: _jsonable(cell.views.get(n, "student")) for n in cls.views},
        "device": tr.device,
        "precision": tr.precision,
        "channels_last": tr.channels_last,
        "store": opts["store"],
        "top_k": opts["top_k"] if opts["store"] == "topk" else None,
        "ferkd": opts["ferkd"],
    }


# ------------------------------------------------------------------------------- crops


def crop_augmenter(setup: TrainSetup) -> FlipCrop | None:
    """The student's first augmenter when it is a ``flip_crop`` (whose crops a bank records)."""
    fn = setup.base_augment if setup.base_augment is not None else setup.augment
    aug = getattr(fn, "__self__", None)
    return aug if isinstance(aug, FlipCrop) else None


def flip_crop_params(aug: FlipCrop, n: int, state: Tensor) -> Tensor:
    """int16 ``[n, 3]`` (flip, top, left) that ``aug`` draws for ``n`` images from a generator in
    ``state`` (its draws, in its order: flips, then row offsets, then column offsets)."""
    g = torch.Generator()
    g.set_state(state)
    flips = torch.rand((n,), generator=g) < 0.5
    p = aug.padding
    dy = torch.randint(2 * p + 1, (n,), generator=g)
    dx = torch.randint(2 * p + 1, (n,), generator=g)
    flip = flips if aug.flip else torch.zeros_like(flips)
    return torch.stack([flip.long(), dy - p, dx - p], 1).to(torch.int16)


def apply_flip_crop(x: Tensor, crops: Tensor, padding: int) -> Tensor:
    """The images ``x`` [B, C, H, W] cropped as recorded: mirrored where ``flip``, then the H x W window at
    (top, left) of the zero-padded image."""
    b, _, h, w = x.shape
    crops = crops.to(x.device).long()
    x = torch.where(crops[:, 0].bool().view(b, 1, 1, 1), x.flip(-1), x)
    if padding == 0:
        return x
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    rows = (crops[:, 1:2] + padding + torch.arange(h, device=x.device)).view(b, h, 1)
    cols = (crops[:, 2:3] + padding + torch.arange(w, device=x.device)).view(b, 1, w)
    batch = torch.arange(b, device=x.device).view(b, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------- labels


def encode(logits: Tensor, store: str, top_k: int) -> dict[str, Tensor]:
    """One view's labels of a batch as stored: fp32 logits (exact) or fp16 top-k (see the module doc)."""
    logits = logits.detach().float().cpu()
    if store == "exact":
        return {"logits": logits}
    c = logits.shape[1]
    p = logits.softmax(1)
    val, idx = p.topk(min(top_k, c), 1)
    rest = (1.0 - val.sum(1)).clamp_min(0.0)
    return {
        "prob": val.half(),
        "index": idx.to(torch.int16 if c < 2**15 else torch.int32),
        "rest": rest.half(),
    }


def decode(enc: dict[str, Tensor], a: int, b: int, num_classes: int) -> Tensor:
    """Rows ``a:b`` of a view's stored labels as fp32 logits (exact: the teacher's own)."""
    if "logits" in enc:
        return enc["logits"][a:b]
    p = enc["prob"][a:b].float()
    k = p.shape[1]
    tail = enc["rest"][a:b].float() / max(num_classes - k, 1)
    full = tail.unsqueeze(1).expand(-1, num_classes).clone() if k < num_classes else torch.zeros(b - a, k)
    full.scatter_(1, enc["index"][a:b].long(), p)
    return full.clamp_min(1e-30).log()


def ferkd_calibrate(
    logits: Tensor, y: Tensor, relabel_below: float, drop_above: float, smoothing: float
) -> tuple[Tensor, Tensor]:
    """(calibrated logits, int8 code per crop: KEPT / RELABELLED / DROPPED): the rule of the module doc."""
    z = logits.detach().float()
    p = z.softmax(1)
    c = p.shape[1]
    y = y.to(p.device).long()
    p_true = p.gather(1, y.view(-1, 1)).squeeze(1)
    conf, top = p.max(1)
    drop = (top != y) & (conf >= drop_above)
    relabel = ~drop & (p_true < relabel_below)
    q = torch.full_like(p, smoothing / c)
    q.scatter_add_(1, y.view(-1, 1), torch.full_like(p_true, 1.0 - smoothing).view(-1, 1))
    out = torch.where(relabel.view(-1, 1), q.clamp_min(1e-30).log(), z)
    code = torch.where(drop, DROPPED, torch.where(relabel, RELABELLED, KEPT)).to(torch.int8)
    return out, code


# ------------------------------------------------------------------------------- building


def epoch_path(bank_dir: Path, epoch: int) -> Path:
    return Path(bank_dir) / f"epoch{epoch:04d}.pt"


def is_complete(bank_dir: Path) -> bool:
    m = Path(bank_dir) / "bank.json"
    return m.exists() and sidecar(m).exists()


def epochs_done(bank_dir: Path, epochs: int) -> int:
    """Epoch files written (each atomic, with its checksum) from epoch 0 on."""
    n = 0
    while n < epochs and epoch_path(bank_dir, n).exists() and sidecar(epoch_path(bank_dir, n)).exists():
        n += 1
    return n


@torch.no_grad()
def _teacher_logits(setup: TrainSetup, amp: Amp, x: Tensor) -> Tensor:
    assert setup.teacher_reader is not None
    with amp.autocast():
        return setup.teacher_reader.read(x).logits.detach()


def build(bank_dir: Path, key: dict[str, Any], setup: TrainSetup, log: logging.Logger | None = None) -> dict:
    """Write the bank of ``key`` for ``setup`` (resuming after the last epoch written); its manifest."""
    bank_dir = Path(bank_dir)
    write_json_atomic(bank_dir / "key.json", key)
    recipe, dev = setup.recipe, setup.device
    epochs, store, top_k, ferkd = recipe.epochs, key["store"], key["top_k"] or 0, key["ferkd"]
    data_gen = torch.Generator().manual_seed(train_data_seed(setup.seed))
    aug_gen = torch.Generator(device="cpu").manual_seed(aug_seed(setup.seed))
    start, build_s = epochs_done(bank_dir, epochs), 0.0
    if start:
        prev = load_checked(epoch_path(bank_dir, start - 1), rebuild_hint=f"delete {bank_dir} to rebuild it")
        data_gen.set_state(prev["state"]["data_gen"])
        aug_gen.set_state(prev["state"]["aug_gen"])
        build_s = float(prev["build_s"])
        if log is not None:
            log.info("soft-label bank %s: resuming at epoch %d", bank_dir.name, start + 1)
    amp = Amp(recipe, dev)
    crop_aug = crop_augmenter(setup)
    check_crop = crop_aug is not None and setup.base_augment is None
    names = tuple(setup.distiller.views) if setup.distiller is not None else ()
    num_classes = None
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        pos, offsets, crops, codes = [], [0], [], []
        labels: dict[str, list[dict[str, Tensor]]] = {v: [] for v in ("teacher", *names)}
        for step, (x, y, idx) in enumerate(setup.train_data.iterate(data_gen, sampler=recipe.sampler)):
            x = amp.input(x.to(dev, non_blocking=True))
            state = aug_gen.get_state()
            inp = StepInput(x, y.to(dev), idx.to(dev), {}, epoch, epochs, step, aug_gen)
            xs, xt = _views(setup, inp)
            if crop_aug is not None:
                crop = flip_crop_params(crop_aug, len(x), state)
                if check_crop and not torch.equal(apply_flip_crop(x, crop, crop_aug.padding), xs):
                    raise KdbenchError(
                        "soft-label bank: the recorded flip_crop parameters do not reproduce the student's "
                        "view; kdbench.engine.softlabels.flip_crop_params no longer draws as FlipCrop does"
                    )
                crops.append(crop)
            z = _teacher_logits(setup, amp, xt)
            num_classes = z.shape[1]
            if ferkd is not None:
                z, code = ferkd_calibrate(z, inp.y, **ferkd)
                codes.append(code.cpu())
            labels["teacher"].append(encode(z, store, top_k))
            for name in names:
                xv = setup.views[name](inp.x, aug_gen) if name in setup.views else xs
                labels[name].append(encode(_teacher_logits(setup, amp, xv), store, top_k))
            pos.append(idx.cpu().to(torch.int32))
            offsets.append(offsets[-1] + len(idx))
        build_s += time.perf_counter() - t0
        save_checked(
            {
                "format": BANK_FORMAT,
                "epoch": epoch,
                "num_classes": num_classes,
                "positions": torch.cat(pos),
                "offsets": torch.tensor(offsets, dtype=torch.int64),
                "crops": torch.cat(crops) if crops else None,
                "labels": {v: _cat(encs) for v, encs in labels.items()},
                "calib": torch.cat(codes) if codes else None,
                "state": {"data_gen": data_gen.get_state(), "aug_gen": aug_gen.get_state()},
                "build_s": build_s,
            },
            epoch_path(bank_dir, epoch),
        )
    return _finish(bank_dir, key, epochs, build_s)


def _cat(encs: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.cat([e[k] for e in encs]) for k in encs[0]}


def _finish(bank_dir: Path, key: dict[str, Any], epochs: int, build_s: float) -> dict:
    rows, size, payload, num_classes = 0, 0, 0, None
    for e in range(epochs):
        p = epoch_path(bank_dir, e)
        size += p.stat().st_size
        ep = load_checked(p, rebuild_hint=f"delete {bank_dir} to rebuild it")
        rows += len(ep["positions"])
        num_classes = ep["num_classes"]
        tensors = [ep["positions"], ep["crops"], ep["calib"]] + [
            t for enc in ep["labels"].values() for t in enc.values()
        ]
        payload += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    manifest = {
        "id": bank_dir.name,
        "key": key,
        "epochs": epochs,
        "num_classes": num_classes,
        "crops": rows,
        "bytes": size,
        "bytes_per_crop": size / max(rows, 1),
        #: the tensors alone (what a crop costs once per-file overhead is spread over a large split)
        "payload_bytes_per_crop": payload / max(rows, 1),
        "build_s": round(build_s, 3),
    }
    write_json_atomic(bank_dir / "bank.json", manifest)
    record_checksum(bank_dir / "bank.json")
    return manifest


def obtain(cell: Cell, setup: TrainSetup, run_dir: Path, log: logging.Logger | None = None) -> Replay:
    """The bank ``cell`` replays, built now (once, under a lock) when the run directory lacks it."""
    check_setup(cell, setup)
    key = bank_key(cell, setup)
    bank_dir = Path(run_dir) / "softlabels" / digest(key)
    with file_lock(bank_dir / "build.lock"):
        if not is_complete(bank_dir):
            manifest = build(bank_dir, key, setup, log)
            if log is not None:
                log.info(
                    "soft-label bank %s built in %.1f s (%.1f bytes per crop)",
                    bank_dir.name, manifest["build_s"], manifest["bytes_per_crop"],
                )  # fmt: skip
    return Replay(bank_dir, setup)


# ------------------------------------------------------------------------------- replaying


class Replay:
    """A bank read by a training cell: :meth:`loss` is its train stage's loss."""

    def __init__(self, bank_dir: Path, setup: TrainSetup):
        self.dir = Path(bank_dir)
        hint = f"delete {self.dir} to rebuild it"
        verify(self.dir / "bank.json", hint)
        self.manifest = json.loads((self.dir / "bank.json").read_text())
        self.num_classes = int(self.manifest["num_classes"])
        self.device = setup.device
        self.crop_aug = crop_augmenter(setup)
        self._epoch: tuple[int, dict[str, Any]] | None = None

    def _load(self, epoch: int) -> dict[str, Any]:
        if self._epoch is None or self._epoch[0] != epoch:
            hint = f"delete {self.dir} to rebuild it"
            path = epoch_path(self.dir, epoch)
            if not path.exists():
                raise ArtifactCorrupt(f"soft-label bank {self.dir} lacks {path.name}; {hint}")
            self._epoch = (epoch, load_checked(path, rebuild_hint=hint))
        return self._epoch[1]

    def lookup(
        self, epoch: int, step: int, index: Tensor, crop_state: Tensor | None = None
    ) -> tuple[Features, dict[str, Features], Tensor | None]:
        """(teacher view, extra views, kept crops or None) of step ``step`` of ``epoch``, after checking
        that the bank recorded this batch (its positions) and these crops (the generator's draws)."""
        ep = self._load(epoch)
        off = ep["offsets"]
        where = f"soft-label bank {self.dir.name}, epoch {epoch + 1} step {step}"
        if step + 1 >= len(off):
            raise BankMismatch(f"{where}: the bank has {len(off) - 1} steps in this epoch")
        a, b = int(off[step]), int(off[step + 1])
        if not torch.equal(ep["positions"][a:b].long(), index.detach().cpu().long()):
            raise BankMismatch(f"{where}: the batch's samples differ from the recorded ones (another order)")
        if crop_state is not None and self.crop_aug is not None and ep["crops"] is not None:
            drawn = flip_crop_params(self.crop_aug, b - a, crop_state)
            if not torch.equal(drawn, ep["crops"][a:b]):
                raise BankMismatch(f"{where}: the student's crops differ from those the teacher labelled")

        def feats(view: str) -> Features:
            z = decode(ep["labels"][view], a, b, self.num_classes)
            return Features(logits=z.to(self.device, dtype=torch.float32, copy=True))

        extra = {v: feats(v) for v in ep["labels"] if v != "teacher"}
        keep = None
        if ep["calib"] is not None:
            k = ep["calib"][a:b] != DROPPED
            if 2 <= int(k.sum()) < len(k):
                keep = k.to(self.device)
        return feats("teacher"), extra, keep

    def loss(self, setup: TrainSetup) -> LossFn:
        """The train stage's loss with the teacher's outputs read from this bank (the engine's
        ``distill_loss`` otherwise, term for term)."""
        d, w = setup.distiller, setup.weights
        assert d is not None
        draws_crop = self.crop_aug is not None

        def loss(inp: StepInput) -> dict[str, Tensor]:
            state = inp.generator.get_state() if draws_crop else None
            xs, xt = _views(setup, inp)
            xv = {n: setup.views[n](inp.x, inp.generator) if n in setup.views else xs for n in d.views}
            t, tv, keep = self.lookup(inp.epoch, inp.step, inp.index, state)
            if keep is not None:  # FerKD: crops the teacher saw as confident background leave the batch
                inp = dataclasses.replace(
                    inp,
                    x=inp.x[keep],
                    y=inp.y[keep],
                    index=inp.index[keep],
                    meta={k: v[keep] for k, v in inp.meta.items()},
                )
                xs, xv = xs[keep], {n: v[keep] for n, v in xv.items()}
                t = Features(logits=t.logits[keep])
                tv = {n: Features(logits=f.logits[keep]) for n, f in tv.items()}
            s = setup.student_reader.read(xs)
            pairs = {n: (setup.student_reader.read(xv[n]), tv[n]) for n in d.views}
            terms = dict(d(s, t, _batch(inp, xs, pairs)))
            if w.get("ce", 0.0) != 0.0:
                terms["ce"] = _ce(setup, d.predict(s), inp)
            return _weighted(terms, w)

        return loss
