"""KernelWarehouse's attention: alpha_ij of every linear mixture i of a layer over the n warehouse cells.

Structure (Appendix A.3, "Design details of Attention Module"): GAP -> FC (C_in -> max(int(C_in * reduction),
16), reduction 1/16) -> norm (BatchNorm1d; LayerNorm on ConvNeXt and DeiT, as the reference does for ConvNeXt)
-> ReLU -> FC to m sets of n + 1 logits -> the attention function set by set.

Contrasting-driven attention function, CAF (Eq. 4):

    alpha_ij = tau * beta_ij + (1 - tau) * z_ij / sum_p |z_ip|

The extra (n+1)-th logit of every mixture is the zero cell e_z (Appendix A.2, Fig. 4): it takes part in the
normalisation and in beta (the leftover mixtures of b < 1 point at it), and is dropped before assembling (it
has no weights). The normaliser gets + 1e-3, as the reference, so an all-zero row stays finite. Ablations
(Table 8): softmax, sigmoid and max(z, 0) / sum |z| ("relu_norm") replace the normalisation; tau and beta apply
the same way.

Non-local basis (the reference's `nonlocal_basis_ratio`, used for ResNet50 KW(1/2x)): a mixture's logits for
the cells that belong to the other layers of its warehouse come from a low-rank basis shared by the layer's
mixtures, fc3 (basis -> non-local cells, no bias); fc2 then outputs (own cells + basis + 1) per mixture without
bias, and one learned bias covers all m (n + 1) logits.

KW* (Table 17): with `omni`, three more heads on the same hidden vector give ODConv's channel (C_in), filter
(C_out) and spatial (k*k; not for 1 x 1) attentions, sigmoids that scale the input, the
output and the assembled kernel's taps. The filter head is kept for depth-wise layers too (unlike ODConv):
with it MobileNetV2 KW*(4x) has Table 17's 12.51M (12.21M without).

Without sharing (op.sharing=none, Table 6): every mixture attends only to its own b cells (`own_cells`), so fc2
outputs m (b + 1) logits; they are scattered into the dense (m, n) attention the assembly reads.

tau is a buffer set by `set_training_progress` (the temperature hook) from 1 to 0 over op.tau_epochs epochs,
per iteration (Appendix A.1.1), or fixed (op.tau, e.g. 0 for fine-tuning, Appendix A.1.2).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dynconv.layers.batch_safe_norm import BatchSafeBatchNorm1d
from dynconv.layers.temperature import LinearTemperature

ATTENTION_FUNCTIONS = ("caf", "softmax", "sigmoid", "relu_norm")


def attention_hidden(in_channels: int, reduction: float, minimum: int = 16) -> int:
    return max(int(in_channels * reduction), minimum)


def normalise(logits: torch.Tensor, function: str) -> torch.Tensor:
    """The attention function over the last dimension (n cells + the zero cell), Table 8."""
    if function == "caf":
        return logits / (logits.abs().sum(-1, keepdim=True) + 1e-3)
    if function == "relu_norm":
        return logits.clamp(min=0) / (logits.abs().sum(-1, keepdim=True) + 1e-3)
    if function == "softmax":
        return torch.softmax(logits, dim=-1)
    return torch.sigmoid(logits)


class KWAttention(nn.Module):
    """GAP -> FC -> norm -> ReLU -> FC -> attention function; returns alpha (B, m, n) (+ KW*'s scales)."""

    def __init__(self, in_channels: int, mixtures: int, cells: int, *, start: int, local_cells: int,
                 reduction: float, norm: str, function: str, beta: torch.Tensor, schedule: LinearTemperature,
                 fixed_tau: float | None, nonlocal_basis_ratio: float = 1.0,
                 omni: tuple[int, int, int] | None = None, own_cells: torch.Tensor | None = None):
        super().__init__()
        hidden = attention_hidden(in_channels, reduction)
        self.mixtures, self.cells, self.function = mixtures, cells, function
        self.fc1 = nn.Linear(in_channels, hidden, bias=norm != "batch")  # a bias before BN is cancelled by it
        self.norm = BatchSafeBatchNorm1d(hidden) if norm == "batch" else nn.LayerNorm(hidden)
        self.start, self.local_cells = start, local_cells
        nonlocal_cells = cells - local_cells
        self.basis = None
        self.own = own_cells is not None
        if self.own:
            self.register_buffer("own_cells", own_cells, persistent=False)  # (m, b) warehouse cell indices
            self.fc2 = nn.Linear(hidden, mixtures * (own_cells.shape[1] + 1))
            beta = torch.cat([beta.gather(1, own_cells), beta[:, -1:]], dim=1)
        elif nonlocal_basis_ratio < 1.0 and nonlocal_cells > 0:
            self.basis = max(int(nonlocal_cells * nonlocal_basis_ratio), 16)
            self.fc2 = nn.Linear(hidden, mixtures * (local_cells + self.basis + 1), bias=False)
            self.fc3 = nn.Linear(self.basis, nonlocal_cells, bias=False)
            self.logit_bias = nn.Parameter(torch.zeros(mixtures, cells + 1))
        else:
            self.fc2 = nn.Linear(hidden, mixtures * (cells + 1))
        self.omni = None
        if omni is not None:
            channels_in, channels_out, taps = omni
            self.omni = nn.ModuleDict({"channel": nn.Linear(hidden, channels_in)})
            if channels_out:
                self.omni["filter"] = nn.Linear(hidden, channels_out)
            if taps > 1:
                self.omni["spatial"] = nn.Linear(hidden, taps)
        self.register_buffer("beta", beta, persistent=False)  # (m, n + 1), rebuilt from the plan
        self.schedule, self.fixed_tau = schedule, fixed_tau
        # Persistent, so a checkpoint restored for evaluation or fine-tuning keeps its trained tau.
        self.register_buffer("tau", torch.tensor(float(fixed_tau if fixed_tau is not None else schedule(0.0))))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As the reference: kaiming-normal (fan_out, ReLU) for the FCs, zero biases, identity norm.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @torch.no_grad()
    def set_training_progress(self, epoch: float) -> dict[str, float]:
        value = self.fixed_tau if self.fixed_tau is not None else self.schedule(epoch)
        self.tau.fill_(value)
        return {"kw_tau": value}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, m, n + 1) logits, the last being the zero cell's."""
        batch = hidden.shape[0]
        if self.own:
            return self.fc2(hidden).view(batch, self.mixtures, -1)
        if self.basis is None:
            return self.fc2(hidden).view(batch, self.mixtures, self.cells + 1)
        raw = self.fc2(hidden).view(batch, self.mixtures, self.local_cells + self.basis + 1)
        local, basis, zero = raw.split([self.local_cells, self.basis, 1], dim=-1)
        nonlocal_ = self.fc3(basis)
        ordered = torch.cat([nonlocal_[..., : self.start], local, nonlocal_[..., self.start:], zero], dim=-1)
        return ordered + self.logit_bias

    def forward(self, pooled: torch.Tensor):
        """pooled (B, C_in) -> alpha (B, m, n) and KW*'s (channel, filter, spatial) scales (or None)."""
        hidden = torch.relu(self.norm(self.fc1(pooled)))
        weights = normalise(self.logits(hidden), self.function)
        tau = self.tau
        alpha = ((1.0 - tau) * weights + tau * self.beta)[..., :-1]
        if self.own:
            dense = alpha.new_zeros(alpha.shape[0], self.mixtures, self.cells)
            alpha = dense.scatter(-1, self.own_cells.expand(alpha.shape[0], -1, -1), alpha)
        scales = None
        if self.omni is not None:
            scales = {name: torch.sigmoid(head(hidden)) for name, head in self.omni.items()}
        return alpha, scales

    def extra_repr(self) -> str:
        return (f"mixtures={self.mixtures}, cells={self.cells}, function={self.function}, "
                f"nonlocal_basis={self.basis}")
