"""Logit standardization (Sun et al., CVPR 2024, "Logit Standardization in Knowledge Distillation",
arXiv 2403.01427), the ``standardize`` option of ``kd``, ``dkd``, ``mlkd`` and ``ctkd``.

Each model's logits are z-scored per sample before the temperature divides them:

    Z(z) = (z − mean(z)) / (std(z) + 1e-7),   std with Bessel's correction (``Tensor.std``)

and the method's loss is then computed unchanged on Z(z_s), Z(z_t), keeping its τ² factor.
This is the authors' ``normalize`` in sunshangquan/logit-standardization-KD (commit f6e5aa5)
``mdistiller/distillers/{KD,DKD,MLKD}.py`` and ``CTKD/distiller_zoo/KD.py``: unbiased std,
1e-7 added to the std (not to the variance), τ² kept. Their ``tools/train.py`` turns it on with
``--logit-stand --base-temp 2 --kd-weight 9``: the temperature becomes the "base temperature"
2 and the distillation weight 9 (DKD: α and β multiplied by 9). The methods here take the
base temperature as ``base_T`` (default 2, used instead of ``T`` when ``standardize`` is on)
and the weight 9 through ``weights_for``; the authors' per-pair values (the ``logs/`` file names
``method,teacher,student,base_T,weight``, e.g. 3 and 9 for vgg13→vgg8 KD) are set in a grid.
"""

from __future__ import annotations

from torch import Tensor

from kdbench.errors import ConfigError

#: added to the standard deviation, as in the reference
EPS = 1e-7
#: the reference's default base temperature and distillation weight (``tools/train.py``)
BASE_T = 2.0
KD_WEIGHT = 9.0


def zscore(z: Tensor) -> Tensor:
    """Per-row (per-sample) z-score of logits: (z − mean) / (unbiased std + 1e-7)."""
    return (z - z.mean(dim=-1, keepdim=True)) / (z.std(dim=-1, keepdim=True) + EPS)


def check_base_temperature(method: str, standardize: bool, T: float, default_T: float) -> None:
    """With ``standardize`` the temperature is ``base_T``; refuse a ``T`` that would be ignored."""
    if standardize and T != default_T:
        raise ConfigError(
            f"{method}: with standardize: true the temperature of the z-scored logits is base_T "
            f"(T={T:g} would be ignored); set base_T instead"
        )
