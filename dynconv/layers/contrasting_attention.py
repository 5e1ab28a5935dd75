"""KernelWarehouse's contrasting-driven attention function (CAF) for operators that mix n whole kernels per layer.

KernelWarehouse (Li & Yao, ICML 2024), Eq. 4, for mixture i of a layer over the n kernels:

    alpha_ij = tau * beta_ij + (1 - tau) * z_ij / sum_p |z_ip|

with z the logits of the attention's last FC, tau falling linearly from 1 to 0 "in the early training stage"
(Appendix A.1.1: over the recipe's first 10 or 20 epochs) and beta a binary initial attention. Sec. 4.3 ("Applying
CAF to other dynamic convolution methods", Table 10) puts it in place of DY-Conv's and ODConv's kernel softmax
without further detail; what this module decides where the paper is silent:

- beta: a DY-Conv / ODConv layer is one mixture over its own n kernels (KernelWarehouse with m = 1 and l = 1,
  Sec. 3.5). Sec. 3.4's rule, one cell per mixture without repetition across the mixtures sharing a warehouse,
  then gives the layer's single mixture one kernel: beta is one-hot. Its kernels are drawn i.i.d., so which one
  is immaterial; it is the first. At tau = 1 the layer is a static convolution with that kernel (what Fig. 4 says
  of KW (1x): "roughly ... a ConvNet with standard convolutions"). The zero cell e_z (Appendix A.2) exists for
  the leftover mixtures of b < 1; with n >= 1 kernels and one mixture there is none, so the normalisation runs
  over the n logits, as Eq. 4 prints it.
- No temperature T: z / T / sum_p |z_p / T| = z / sum_p |z_p|, so DY-Conv's softmax temperature would cancel;
  tau is CAF's schedule (Eq. 4 calls it the temperature).
- The normaliser gets + 1e-3, as KernelWarehouse's release (and `dynconv/ops/kw/attention.py`): an all-zero row
  of logits (a zero input through bias-free FCs) stays finite.

tau is a persistent buffer, so an evaluated or fine-tuned model keeps its trained tau (0), and it is set every
iteration through `set_training_progress` by the operator schedule hook (logged as `schedule/caf_tau`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

ATTENTION_FUNCTIONS = ("softmax", "caf")
CAF_EPS = 1e-3  # KernelWarehouse's release: z / (sum |z| + 1e-3)


class LinearTau:
    """tau(e) = max(0, 1 - e / epochs) at fractional epoch e: 1 -> 0 linearly (0 epochs: 0 from the start)."""

    def __init__(self, epochs: float):
        if not (isinstance(epochs, (int, float)) and math.isfinite(epochs) and epochs >= 0):
            raise ValueError(f"tau epochs={epochs!r} must be a finite number >= 0")
        self.epochs = float(epochs)

    def __call__(self, epoch: float) -> float:
        if self.epochs == 0:
            return 0.0
        return max(0.0, 1.0 - max(float(epoch), 0.0) / self.epochs)

    def __eq__(self, other) -> bool:
        return isinstance(other, LinearTau) and other.epochs == self.epochs

    def __repr__(self) -> str:
        return f"LinearTau(epochs={self.epochs:g})"


def one_hot_beta(kernels: int) -> torch.Tensor:
    """(kernels,) binary initial attention of a layer's one mixture: its first kernel (see the module docstring)."""
    beta = torch.zeros(kernels)
    beta[0] = 1.0
    return beta


class ContrastingAttention(nn.Module):
    """logits z (B, n) -> alpha (B, n) = tau * beta + (1 - tau) * z / (sum_p |z_p| + 1e-3) (Eq. 4)."""

    def __init__(self, beta: torch.Tensor, schedule: LinearTau):
        super().__init__()
        self.schedule = schedule
        self.register_buffer("beta", beta.clone(), persistent=False)  # rebuilt from the layer's shape
        self.register_buffer("tau", torch.tensor(schedule(0.0)))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        normalised = logits / (logits.abs().sum(dim=-1, keepdim=True) + CAF_EPS)
        return self.tau * self.beta + (1.0 - self.tau) * normalised

    @torch.no_grad()
    def set_training_progress(self, epoch: float) -> dict[str, float]:
        value = self.schedule(epoch)
        self.tau.fill_(value)
        return {"caf_tau": value}

    def extra_repr(self) -> str:
        return f"kernels={self.beta.numel()}, {self.schedule!r}"


def read_attention_function(knobs, kernels: int) -> tuple[str, LinearTau | None]:
    """`op.attention_function` (softmax when the section does not set it) and, with caf, `op.tau_epochs`.

    CAF needs two kernels or more: over one logit it is tau + (1 - tau) * sign(z), a kernel whose sign flips
    with the sample, not an attention (softmax over one logit is the constant 1)."""
    function = knobs.choice("attention_function", ATTENTION_FUNCTIONS, default="softmax")
    schedule = None
    if function == "caf" or knobs.get("tau_epochs") is not None:  # a bad value is refused even where unused
        schedule = LinearTau(knobs.number("tau_epochs", 0, inclusive=True, note="0: tau = 0 from the first step"))
    if function == "softmax":
        return function, None
    if kernels < 2:
        raise knobs.fail("kernels", kernels, "integers >= 2 with op.attention_function=caf")
    return function, schedule
