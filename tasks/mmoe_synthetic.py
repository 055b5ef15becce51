"""The MMoE synthetic benchmark: two regression tasks with a controlled task correlation.

Ma, Zhao, Yi, Chen, Hong, Chi, "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD 2018 (section 3.2, data; section 5, experiments). Generation, for one data seed:

1. ``u1, u2``: two orthogonal unit vectors in ``R^d`` (the Q factor of a ``d x 2`` standard normal matrix);
2. ``w1 = c u1``, ``w2 = c (p u1 + sqrt(1 - p^2) u2)``, so ``cos(w1, w2) = p`` (the ``correlation`` option);
3. ``alpha_j, beta_j ~ N(0, 1)``, ``j = 1..m``, drawn once and shared by both tasks;
4. per row ``x ~ N(0, I_d)`` and ``y_i = w_i^T x + sum_j sin(alpha_j w_i^T x + beta_j) + eps_i``,
   ``eps_i ~ N(0, noise_std^2)`` independently per task and row.

With ``p = 1`` the two label functions are identical and the labels differ only by the noise. The label Pearson
correlation is a *consequence* of p (equal to it only in the linear case, MMoE Fig. 2); ``info`` records the
measured value on the training split, the exact weight cosine and the drawn ``alpha``/``beta``.

Defaults, and where they come from (the MMoE paper does not fix c, m, alpha, beta or the number of rows; the PLE
paper, Tang et al. RecSys 2020 section 5.2.1, says so too):

- ``input_dim`` d = 100: the MMoE paper's experiments (section 5.1, "input dimension 100");
- ``scale`` c = 1.0, ``n_sin`` m = 10, ``alpha_j, beta_j ~ N(0, 1)``: the PLE paper's setting of this generator,
  the only fully published one (PLE also used d = 512 and 1.4M rows per correlation: ``-D input_dim=512
  -D n_rows=1400000`` reproduces that scale);
- ``noise_std`` = 0.1: the paper writes ``eps ~ N(0, 0.01)``; we read 0.01 as the variance (the usual
  ``N(mu, sigma^2)`` notation, as keras-mmoe did), hence a standard deviation of 0.1;
- ``n_rows`` = 12,000 split 10,000 / 1,000 / 1,000 (train / val / test), the split of the widely used keras-mmoe
  reproduction; the MMoE paper's Fig. 2 uses 10k points per trial. Fractions are fixed: validation and test get
  ``n_rows // 12`` rows each, in log order, train the rest (rows are i.i.d., so this is a random split);
- ``correlation`` p = 0.5 (the paper's experiments name 1.0 and 0.5; it must lie in [-1, 1]).
  keras-mmoe's variant: ``-D scale=0.3 -D n_sin=5`` (d = 100, noise std 0.1, 12k rows are already the defaults).

The data seed is the run seed unless ``data_seed`` is given (then every run seed sees the same data set and only
initialisation and shuffling change). The paper repeats each experiment with independently generated data and
initialisation: leave ``data_seed`` unset and vary ``--seed``/``--seeds``.
Labels are not standardised (their scale is part of the benchmark); the dense features are already N(0, 1).

Features: dense only (``x0 .. x{d-1}``), no categorical fields (the splits carry an empty ``[N, 0]`` int64
``categorical`` tensor). mtlbench's shared ``InputLayer`` projects the dense vector to ONE field of ``embed_dim``,
so every arch sees ``Linear(d -> embed_dim)`` first; the engine-wide default of 16 would be a 16-unit linear
bottleneck the paper's models do not have, so this adapter suggests ``embed_dim`` 100 (``default_training``, shown
by ``mtlbench list -v``): a square map for the default d = 100. ``--embed-dim`` overrides it.

Tasks: ``y1``, ``y2``; kind regression (MSE loss), metrics ``rmse`` (primary) and ``mae``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mtlbench import DatasetAdapter, FeatureSchema, MultiTaskData, Split, TaskSpec, option_field, register_dataset


def unit_vectors(d: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two orthonormal vectors of ``R^d`` (float64), uniformly oriented: the Q factor of a Gaussian ``d x 2``."""
    q, r = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # fix the QR sign convention so the draw alone decides the vectors
    return q[:, 0].contiguous(), q[:, 1].contiguous()


def task_weights(u1: torch.Tensor, u2: torch.Tensor, scale: float, correlation: float) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """``w1 = c u1``, ``w2 = c (p u1 + sqrt(1 - p^2) u2)``: ``cos(w1, w2) = p`` for orthonormal ``u1, u2``."""
    p = correlation
    return scale * u1, scale * (p * u1 + math.sqrt(max(0.0, 1.0 - p * p)) * u2)


def label_function(x: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``w^T x + sum_j sin(alpha_j w^T x + beta_j)`` for every row of ``x`` (vectorised over rows and j)."""
    z = x @ w  # [N]
    return z + torch.sin(z.unsqueeze(1) * alpha + beta).sum(1)


@register_dataset("mmoe_synthetic")
class MMoESynthetic(DatasetAdapter):
    """MMoE's synthetic regression pair (Ma et al., KDD 2018) with a controlled task correlation p."""

    version = "1.0"
    tasks = ("y1", "y2")
    default_training = {"epochs": 30, "batch_size": 128, "lr": 1e-3, "embed_dim": 100}

    @dataclass
    class Options:
        correlation: float = option_field(0.5, "p, the cosine of the two tasks' weight vectors", minimum=-1, maximum=1)
        n_rows: int = option_field(12_000, "rows; validation and test get n_rows // 12 each", minimum=120)
        input_dim: int = option_field(100, "d, the input dimension", minimum=2)
        scale: float = option_field(1.0, "c, the norm of the weight vectors", minimum=0, open_minimum=True)
        n_sin: int = option_field(10, "m, the sine terms of the label function", minimum=0)
        noise_std: float = option_field(0.1, "standard deviation of the label noise", minimum=0)
        data_seed: int | None = None

        def __post_init__(self) -> None:
            if not -1.0 <= self.correlation <= 1.0:
                raise ValueError(f"correlation must be in [-1, 1], got {self.correlation}")
            if self.n_rows < 120:
                raise ValueError(f"n_rows must be at least 120 (10 validation and 10 test rows), got {self.n_rows}")
            if self.input_dim < 2:
                raise ValueError(f"input_dim must be at least 2 (two orthogonal directions), got {self.input_dim}")
            if self.n_sin < 0:
                raise ValueError(f"n_sin must be non-negative, got {self.n_sin}")
            if self.noise_std < 0:
                raise ValueError(f"noise_std must be non-negative, got {self.noise_std}")
            if self.scale <= 0:
                raise ValueError(f"scale must be positive, got {self.scale}")

    def load(self, seed: int) -> MultiTaskData:
        o = self.options or self.Options()
        g = torch.Generator().manual_seed(seed if o.data_seed is None else o.data_seed)
        n, d = o.n_rows, o.input_dim
        # constants of the data set first (drawn once), then the rows
        u1, u2 = unit_vectors(d, g)
        w1, w2 = task_weights(u1, u2, o.scale, o.correlation)
        alpha = torch.randn(o.n_sin, generator=g, dtype=torch.float64)
        beta = torch.randn(o.n_sin, generator=g, dtype=torch.float64)
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        eps = torch.randn(n, 2, generator=g, dtype=torch.float64) * o.noise_std
        y = torch.stack([label_function(x, w1, alpha, beta), label_function(x, w2, alpha, beta)], dim=1) + eps

        n_eval = n // 12
        n_train = n - 2 * n_eval
        cuts = {"train": (0, n_train), "val": (n_train, n_train + n_eval), "test": (n_train + n_eval, n)}
        x32, y32 = x.float(), y.float()
        masks = torch.ones(n, 2, dtype=torch.bool)
        categorical = torch.zeros(n, 0, dtype=torch.long)
        splits = {s: Split({"categorical": categorical[a:b], "dense": x32[a:b], "labels": y32[a:b],
                            "masks": masks[a:b]}) for s, (a, b) in cuts.items()}
        schema = FeatureSchema(dense=tuple(f"x{i}" for i in range(d)))
        tasks = (TaskSpec("y1", "regression", ("rmse", "mae"), description="w1^T x + sum_j sin(alpha_j w1^T x "
                          "+ beta_j) + noise"),
                 TaskSpec("y2", "regression", ("rmse", "mae"), description="w2^T x + sum_j sin(alpha_j w2^T x "
                          "+ beta_j) + noise; cos(w1, w2) = correlation"))
        ytr = y[:n_train]
        info = {"split": f"{n_train}/{n_eval}/{n_eval} by row order (i.i.d. rows)",
                "weight_cosine": float(torch.dot(w1, w2) / (w1.norm() * w2.norm())),
                "label_pearson_train": float(torch.corrcoef(ytr.T)[0, 1]),
                "alpha": alpha.tolist(), "beta": beta.tolist()}
        return MultiTaskData("mmoe_synthetic", self.version, schema, tasks, splits, info)
