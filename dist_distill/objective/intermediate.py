"""Intermediate-layer and attention transfer: layer maps, width projections, and their losses.

Layer indices (every function here): a *layer* is a 0-based index ``i in [0, num_layers)``
of a transformer block. The embedding output is never a layer. With a Hugging Face causal
LM called as ``model(..., output_hidden_states=True, output_attentions=True)``
(checked on transformers 5.23, LlamaForCausalLM):

- ``outputs.hidden_states`` has ``num_layers + 1`` entries ``[B, L, H]``: ``[0]`` is the
  embedding output, ``[i + 1]`` the output of block ``i``. The LAST entry is taken after
  the model's final norm (it equals ``last_hidden_state``), not the raw residual stream of
  the last block; student and teacher are treated alike, so mapping last to last compares
  like with like. :func:`layer_hidden` does the ``+ 1``.
- ``outputs.attentions`` has ``num_layers`` entries ``[B, num_attention_heads, L, L]``
  (query heads, also under grouped-query attention), ``[i]`` for block ``i``, in the
  model's dtype (bf16 for a bf16 model; eager's softmax runs in float32 and is cast back).
  Only ``attn_implementation="eager"`` fills it: under ``"sdpa"`` transformers logs
  "`sdpa` attention does not support `output_attentions=True`" and returns an EMPTY tuple
  ``()`` (no exception); ``flash_attention_2`` cannot return weights either. Hence
  :func:`check_attention_support` at start-up and :func:`layer_attention` at run time.

Losses return ``(sum, count)`` so the caller normalises by the count of the whole optimizer
step (DESIGN fact 4), exactly as for the output-level divergence. Math is float32 (float64
stays float64); the teacher side is always detached.

ZeRO-3: projections are trained with the student, so they must be submodules of the
module the DeepSpeed engine wraps (their parameters are then partitioned and optimised)
and must be called as modules (``proj(h, mask)``), never through their ``.weight``, so the
engine's hooks gather them. :func:`projection_l2` reads weights directly: see its notes.
Checked (CPU, 2 gloo ranks, ZeRO-3, 3 AdamW steps): a conv_gate projection inside the
engine's module, with ``projection_l2`` computed in that module's forward after
``deepspeed.zero.register_external_parameter(module, p)`` for each projection parameter,
matched plain PyTorch to 1e-7; without the registration ``projection_l2`` raises.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn

from dist_distill.errors import UserError

PROJECTIONS = ("linear", "conv_gate", "identity")
"""Projection kinds accepted by :func:`make_projection`."""
HIDDEN_LOSSES = ("mse", "cosine")
"""Per-token hidden-state losses accepted by :func:`hidden_state_loss`."""
HEAD_MODES = ("average", "map")
"""Head handling accepted by :func:`attention_transfer_loss`."""
ATTN_PROB_FLOOR = 1e-12
"""Floor of the student's attention probability inside the log (``log(1e-12)`` is about -27.6):
a student probability of exactly 0 where the teacher's is positive costs
``p_t * (log p_t + 27.6)``, not inf, and has a 0 (not NaN) gradient."""


# ----------------------------------------------------------------------------- layer maps
def uniform_layer_map(num_teacher_layers: int, num_student_layers: int) -> list[tuple[int, int]]:
    """Map every student layer to a teacher layer at the same relative depth.

    Student layer ``i`` -> teacher layer ``round((i + 1) * Nt / Ns) - 1`` (halves round up),
    so the last student layer maps to the last teacher layer: 4 -> 2 gives
    ``[(0, 1), (1, 3)]``; equal depths give the identity. A student deeper than its teacher
    maps several student layers to one teacher layer.

    Returns:
        ``[(student_layer, teacher_layer), ...]`` in student order, 0-based block indices
        (see the module docstring for how they index ``hidden_states`` / ``attentions``).
    """
    nt, ns = int(num_teacher_layers), int(num_student_layers)
    if nt < 1 or ns < 1:
        raise UserError(f"layer map needs at least one layer on each side, got teacher={nt}, student={ns}")
    # Integer form of floor((i + 1) * nt / ns + 1/2): exact, no float rounding.
    return [(i, (2 * (i + 1) * nt + ns) // (2 * ns) - 1) for i in range(ns)]


def check_layer_map(pairs: Sequence[Sequence[int]], num_teacher_layers: int, num_student_layers: int,
                    key: str = "layer_map") -> list[tuple[int, int]]:
    """Validate an explicit ``[(student_layer, teacher_layer), ...]`` list (e.g. from YAML).

    Rules: non-empty; each entry two integers; student layers in ``[0, num_student_layers)``
    and unique (each student layer has one target); teacher layers in
    ``[0, num_teacher_layers)`` (a teacher layer may serve several student layers).
    ``key`` is the recipe key named in errors.

    Returns:
        The pairs as a list of int tuples, in the given order.
    """
    if not pairs:
        raise UserError(f"{key} is empty: give [student_layer, teacher_layer] pairs "
                        "or leave it unset for a uniform map")
    out, seen = [], {}
    for n, pair in enumerate(pairs):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair)):
            raise UserError(f"{key}[{n}]={pair!r}: expected a pair of integers [student_layer, teacher_layer]")
        s, t = pair
        if not 0 <= s < num_student_layers:
            raise UserError(f"{key}[{n}]: student layer {s} is out of range; the student has "
                            f"{num_student_layers} layers (0-based: 0..{num_student_layers - 1})")
        if not 0 <= t < num_teacher_layers:
            raise UserError(f"{key}[{n}]: teacher layer {t} is out of range; the teacher has "
                            f"{num_teacher_layers} layers (0-based: 0..{num_teacher_layers - 1})")
        if s in seen:
            raise UserError(f"{key}[{n}]: student layer {s} already appears in {key}[{seen[s]}]; "
                            "each student layer may map to one teacher layer")
        seen[s] = n
        out.append((s, t))
    return out


def layer_hidden(hidden_states: Sequence[torch.Tensor] | None, layer: int, role: str) -> torch.Tensor:
    """``hidden_states[layer + 1]``: the output of block ``layer`` (``[0]`` is the embedding output).

    Raises ``RuntimeError`` naming ``role`` when the model was not called with
    ``output_hidden_states=True`` or has fewer layers.
    """
    if not hidden_states or len(hidden_states) < layer + 2:
        have = len(hidden_states) if hidden_states else 0
        raise RuntimeError(f"{role} returned {have} hidden states, need block {layer} (entry {layer + 1}); "
                           "call the model with output_hidden_states=True")
    return hidden_states[layer + 1]


def layer_attention(attentions: Sequence[torch.Tensor] | None, layer: int, role: str) -> torch.Tensor:
    """``attentions[layer]`` ``[B, heads, L, L]``; a clear error when the model returned none.

    transformers returns an empty tuple under sdpa / flash attention (see the module docstring).
    """
    if not attentions or len(attentions) <= layer or attentions[layer] is None:
        raise UserError(f"{role} returned no attention weights for layer {layer}: attention transfer needs "
                        f"set {role}.attn_implementation=eager and output_attentions=True")
    return attentions[layer]


def check_attention_support(attn_implementation: str | None, role: str) -> None:
    """Refuse, at start-up, an attention kernel that cannot return attention weights.

    Attention transfer reads ``outputs.attentions``. In transformers 5.23 only ``"eager"``
    fills it. With ``"sdpa"`` (also what ``"auto"`` resolves to without flash-attn) and
    ``output_attentions=True`` the model logs a warning and returns ``attentions == ()``,
    silently; ``"flash_attention_2"`` never materialises the weights. Eager attention
    materialises ``[B, heads, L, L]`` per layer, so memory grows with ``L**2``.

    Args:
        attn_implementation: the configured value (``"auto"``, ``"eager"``, ``"sdpa"``,
            ``"flash_attention_2"``, ...) or a model's resolved ``config._attn_implementation``.
        role: ``"student"`` or ``"teacher"``: the recipe section named in the fix.
    """
    if attn_implementation == "eager":
        return
    raise UserError(f"attention transfer needs attention weights, which transformers returns only with eager "
                    f"attention; {role}.attn_implementation={attn_implementation!r} returns none "
                    f"(sdpa returns an empty tuple): set {role}.attn_implementation=eager, "
                    "or turn attention transfer off")


# ----------------------------------------------------------------------------- projections
class LinearProjection(nn.Module):
    """``h @ W^T (+ b)``: student width ``Hs`` -> teacher width ``Ht``; ``mask`` is unused."""

    def __init__(self, student_dim: int, teacher_dim: int, bias: bool = False):
        super().__init__()
        self.linear = nn.Linear(student_dim, teacher_dim, bias=bias)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``h [B, L, Hs]`` -> ``[B, L, Ht]`` in the projection's dtype."""
        return self.linear(h.to(self.linear.weight.dtype))


class ConvGateProjection(nn.Module):
    """The seed's dimension-alignment module: 1x1 convolution + channel-attention gate.

    ``y = Conv1d(Hs -> Ht, kernel 1)`` over the token axis (a per-token linear map), then a
    squeeze-and-excitation gate (Hu et al. 2018) over the ``Ht`` channels:
    ``s = mean of y over the VALID tokens of each sequence`` ``[B, Ht]``,
    ``g = sigmoid(fc2(relu(fc1(s))))`` with ``fc1: Ht -> max(1, Ht // reduction)``,
    ``fc2: -> Ht`` (both with bias, as in torchvision's SqueezeExcitation), output ``y * g``
    (``g`` broadcast over tokens). Padded tokens never reach ``s``: they are replaced by 0
    before the sum, so even inf/NaN there cannot leak into valid outputs. A sequence with
    no valid token gets ``s = 0``. The gate is causal-unsafe by design (a token's output
    depends on later tokens via ``s``); it is a training-time aligner, never used at inference.
    """

    def __init__(self, student_dim: int, teacher_dim: int, reduction: int = 16, bias: bool = False):
        super().__init__()
        if reduction < 1:
            raise UserError(f"conv_gate reduction={reduction}: must be >= 1 (16 in the seed recipe)")
        hidden = max(1, teacher_dim // reduction)
        self.conv = nn.Conv1d(student_dim, teacher_dim, kernel_size=1, bias=bias)
        self.fc1 = nn.Linear(teacher_dim, hidden)
        self.fc2 = nn.Linear(hidden, teacher_dim)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``h [B, L, Hs]``, ``mask [B, L]`` bool (None: all valid) -> ``[B, L, Ht]``."""
        # Submodules are called (not their weights read) so ZeRO-3 gathers each one's parameters.
        y = self.conv(h.to(self.conv.weight.dtype).transpose(1, 2)).transpose(1, 2)  # [B, L, Ht]
        if mask is None:
            s = y.mean(dim=1)
        else:
            m = mask.to(torch.bool).unsqueeze(-1)
            total = torch.where(m, y, y.new_zeros(())).sum(dim=1)
            count = m.sum(dim=1).clamp_min(1).to(y.dtype)
            s = total / count
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))  # [B, Ht]
        return y * gate.unsqueeze(1)


class IdentityProjection(nn.Module):
    """No projection (equal widths): returns ``h`` unchanged; no parameters."""

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return h


def make_projection(kind: str, student_dim: int, teacher_dim: int, *, bias: bool = False,
                    reduction: int = 16, key: str = "projection") -> nn.Module:
    """Build a trainable width projection ``Hs -> Ht``.

    Every kind has the forward ``(h [B, L, Hs], mask [B, L] bool | None) -> [B, L, Ht]``.

    Args:
        kind: ``"linear"`` (:class:`LinearProjection`), ``"conv_gate"``
            (:class:`ConvGateProjection`, e.g. 768 -> 512 in the seed) or ``"identity"``
            (widths must be equal).
        bias: bias of the linear map / 1x1 convolution (default none).
        reduction: squeeze-and-excitation ratio ``r`` of ``conv_gate`` (bottleneck
            ``max(1, Ht // r)`` channels).
        key: the recipe key named in errors.
    Returns:
        An ``nn.Module`` in float32 on the CPU; the caller moves it with the student
        (attach it to the module the engine wraps, see the module docstring).
    """
    if kind not in PROJECTIONS:
        raise UserError(f"{key}={kind!r}: choose one of {', '.join(PROJECTIONS)}")
    if student_dim < 1 or teacher_dim < 1:
        raise UserError(f"projection widths must be >= 1, got student {student_dim}, teacher {teacher_dim}")
    if kind == "identity":
        if student_dim != teacher_dim:
            raise UserError(f"{key}=identity needs equal widths, but the student's hidden size is {student_dim} "
                            f"and the teacher's {teacher_dim}: set {key}=linear or {key}=conv_gate")
        return IdentityProjection()
    if kind == "linear":
        return LinearProjection(student_dim, teacher_dim, bias=bias)
    return ConvGateProjection(student_dim, teacher_dim, reduction=reduction, bias=bias)


def projection_l2(modules: nn.Module | Iterable[nn.Module]) -> torch.Tensor:
    """Sum of squared WEIGHTS (parameters with ``ndim >= 2``; biases excluded) of ``modules``.

    The seed's regulariser is ``0.01 * projection_l2(projections)``: the caller applies the
    weight. Returns a float32 0-d tensor (0 when there are no weights), differentiable.

    ZeRO-3: outside its module's forward a partitioned parameter is an empty placeholder.
    This function refuses such a parameter (``RuntimeError``) instead of silently summing
    nothing; under ZeRO-3 call it where the weights are gathered with autograd intact, e.g.
    inside the forward of a module for which they were registered with
    ``deepspeed.zero.register_external_parameter`` (``GatheredParameters`` gathers for
    reading only: gradients taken inside it do not reach the partitions reliably).
    """
    if isinstance(modules, nn.Module):
        modules = [modules]
    total = None
    for module in modules:
        for name, p in module.named_parameters():
            ds_numel = getattr(p, "ds_numel", None)
            if ds_numel is not None and p.numel() != ds_numel:
                raise RuntimeError(f"projection_l2: parameter {name} is a ZeRO-3 partition placeholder "
                                   f"({p.numel()} of {ds_numel} elements); compute the penalty where it is gathered")
            shape = getattr(p, "ds_shape", p.shape)
            if len(shape) < 2:
                continue
            term = p.float().pow(2).sum()
            total = term if total is None else total + term
    return total if total is not None else torch.zeros((), dtype=torch.float32)


# ----------------------------------------------------------------------------- losses
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_mask(mask: torch.Tensor | None, shape: torch.Size, what: str) -> torch.Tensor | None:
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask must have shape {tuple(shape)} ([B, L] of {what}), got {tuple(mask.shape)}")
    return mask.to(torch.bool)


def hidden_state_loss(
    student_h: torch.Tensor,
    teacher_h: torch.Tensor,
    projection: nn.Module,
    mask: torch.Tensor | None,
    kind: str = "mse",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden-state alignment of one (student layer, teacher layer) pair.

    ``x = projection(student_h, mask)`` ``[B, L, Ht]``, then per valid token:
    ``"mse"``: ``mean_c (x_c - t_c)^2`` (mean over the ``Ht`` channels, so the scale does
    not grow with width); ``"cosine"``: ``1 - cos(x, t)`` (``eps = 1e-8`` on the norms).

    Args:
        student_h: ``[B, L, Hs]`` any float dtype (gradients flow to it and to ``projection``).
        teacher_h: ``[B, L, Ht]``; detached.
        projection: a module from :func:`make_projection` (called as a module: ZeRO-3 safe).
        mask: ``[B, L]`` bool, True where the token counts (None: all). Masked tokens give
            exactly 0 loss and 0 gradient whatever their values.
        kind: one of :data:`HIDDEN_LOSSES`.
    Returns:
        ``(sum over valid tokens of the per-token loss, number of valid tokens)``: a 0-d
        float32 tensor (float64 for float64 inputs) and a 0-d int64 tensor. Divide the sum
        of a whole optimizer step by its total count (summed over micro-batches and ranks).
    """
    if kind not in HIDDEN_LOSSES:
        raise UserError(f"hidden-state loss {kind!r}: choose one of {', '.join(HIDDEN_LOSSES)}")
    if student_h.shape[:2] != teacher_h.shape[:2]:
        raise ValueError(f"student hidden states {tuple(student_h.shape)} and teacher hidden states "
                         f"{tuple(teacher_h.shape)} differ in [B, L]: the two models must see the same tokens")
    mask = _check_mask(mask, student_h.shape[:2], "the hidden states")
    dtype = _compute_dtype(student_h)
    if mask is not None:
        # Zero padded rows BEFORE the projection: the weight gradient sums h^T g over all
        # tokens, and 0 * NaN from a garbage padded row would poison it.
        student_h = torch.where(mask.unsqueeze(-1), student_h, student_h.new_zeros(()))
    x = projection(student_h, mask)
    if x.shape != teacher_h.shape:
        raise ValueError(f"projection output {tuple(x.shape)} != teacher hidden states {tuple(teacher_h.shape)}: "
                         "build the projection with make_projection(kind, student_dim, teacher_dim)")
    x = x.to(dtype)
    t = teacher_h.detach().to(dtype)
    if mask is not None:  # garbage in padded rows (even NaN) must not reach the math
        keep = mask.unsqueeze(-1)
        x = torch.where(keep, x, x.new_zeros(()))
        t = torch.where(keep, t, t.new_zeros(()))
    if kind == "mse":
        per_token = (x - t).pow(2).mean(dim=-1)
    else:
        per_token = 1.0 - torch.nn.functional.cosine_similarity(x, t, dim=-1, eps=1e-8)
    if mask is None:
        return per_token.sum(), torch.tensor(per_token.numel(), device=per_token.device)
    per_token = torch.where(mask, per_token, per_token.new_zeros(()))
    return per_token.sum(), mask.sum()


def _group_heads(attn: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, H, L, L]`` -> ``[B, groups, L, L]``: mean over contiguous blocks of ``H // groups`` heads."""
    b, h, lq, lk = attn.shape
    return attn.reshape(b, groups, h // groups, lq, lk).mean(dim=2)


def attention_transfer_loss(
    student_attn: torch.Tensor,
    teacher_attn: torch.Tensor,
    mask: torch.Tensor | None,
    heads: str = "average",
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(teacher attention row || student attention row), summed over valid query rows.

    Head handling: ``"average"`` averages the heads of each side first (any head counts);
    ``"map"`` needs ``Ht_heads = g * Hs_heads`` and averages teacher heads
    ``[h*g, (h+1)*g)`` for student head ``h`` (``g = 1``: one to one), then takes the mean of
    the per-head KLs, so one query row contributes one (head-averaged) KL in both modes.
    Head order is arbitrary between unrelated models: "map" is most meaningful for a student
    pruned or initialised from its teacher.

    Per row ``KL = sum_k p_k (log p_k - log max(q_k, ATTN_PROB_FLOOR))`` over key columns
    ``k`` with ``mask[b, k]``; terms with ``p_k == 0`` are exactly 0 (causal/padded columns,
    ``0 log 0 = 0``), so rows are NOT renormalised after dropping padded columns (their
    mass is ~0 anyway). The floor ``1e-12`` keeps ``q_k == 0 < p_k`` finite (its
    gradient is then 0). No NaN/inf for any probabilities in ``[0, 1]``.

    Args:
        student_attn: ``[B, Hs_heads, L, L]`` probabilities (``outputs.attentions[i]`` of
            an eager model), any float dtype; upcast to float32 (float64 stays).
        teacher_attn: ``[B, Ht_heads, L, L]``; detached.
        mask: ``[B, L]`` bool, True for real tokens (None: all): selects query rows and key columns.
        heads: one of :data:`HEAD_MODES`.
    Returns:
        ``(sum over valid query rows of KL, number of valid query rows)``: a 0-d float32
        (float64) tensor and a 0-d int64 tensor.
    """
    if heads not in HEAD_MODES:
        raise UserError(f"attention heads={heads!r}: choose one of {', '.join(HEAD_MODES)}")
    if student_attn.dim() != 4 or teacher_attn.dim() != 4:
        raise ValueError(f"attention maps must be [B, heads, L, L], got {tuple(student_attn.shape)} "
                         f"and {tuple(teacher_attn.shape)}")
    b, hs, lq, lk = student_attn.shape
    ht = teacher_attn.shape[1]
    if (teacher_attn.shape[0], teacher_attn.shape[2], teacher_attn.shape[3]) != (b, lq, lk) or lq != lk:
        raise ValueError(f"student attention {tuple(student_attn.shape)} and teacher attention "
                         f"{tuple(teacher_attn.shape)} must both be [B, heads, L, L] over the same tokens")
    mask = _check_mask(mask, torch.Size((b, lq)), "the attention maps")
    dtype = _compute_dtype(student_attn)
    q = student_attn.to(dtype)
    p = teacher_attn.detach().to(dtype)
    if heads == "average":
        q, p = q.mean(dim=1, keepdim=True), p.mean(dim=1, keepdim=True)
    elif ht % hs != 0:
        raise UserError(f"attention heads=map needs the teacher's head count ({ht}) to be a multiple of the "
                        f"student's ({hs}): use heads=average")
    else:
        p = _group_heads(p, hs)
    # Only (valid query row, valid key column, p > 0) terms exist; where() keeps 0*log0 and
    # masked garbage out of both the value and the gradient.
    keep = p > 0
    if mask is not None:
        keep = keep & (mask[:, None, :, None] & mask[:, None, None, :])
    zero, one = p.new_zeros(()), p.new_ones(())
    safe_p = torch.where(keep, p, one)
    log_q = torch.where(keep, q, one).clamp_min(ATTN_PROB_FLOOR).log()
    terms = torch.where(keep, safe_p * (safe_p.log() - log_q), zero)
    per_row = terms.sum(dim=-1).mean(dim=1)  # [B, L]: sum over keys, mean over heads
    if mask is None:
        return per_row.sum(), torch.tensor(per_row.numel(), device=per_row.device)
    return torch.where(mask, per_row, zero).sum(), mask.sum()
