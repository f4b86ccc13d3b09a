"""Distillation objectives: reference implementations in pure PyTorch, float32 math.

Conventions (every function here): ``p = softmax(teacher / T)`` is the teacher,
``q = softmax(student / T)`` the student; inputs of any float dtype are upcast to float32
(float64 stays float64) before any softmax; all math is in log space.

- :func:`divergence` -- dense teacher logits ``[..., V]``.
- :func:`topk_divergence` -- sparse top-k teacher (ids, raw T=1 logits, full logsumexp),
  tail ``"renorm"`` or ``"bucket"``.
- :func:`count_tokens` -- the global (all-reduced) token count of an optimizer step, to pass
  as ``normalizer=`` (DESIGN fact 4).
- :data:`KINDS` -- ``("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")``.
- :func:`divergence_from_logprobs` -- the per-kind math both losses share.
- :mod:`uld` -- Universal Logit Distillation across tokenizers: :func:`uld_dense` (the paper's
  loss, full sorts), :func:`uld_topk` (the top-k form training uses, its error bound) and
  :func:`teacher_sorted_topk` (a cache row -> sorted teacher probabilities and tail mass).
"""

from .core import KINDS, divergence_from_logprobs
from .dense import divergence
from .reduction import count_tokens
from .topk import TAILS, topk_divergence
from .uld import teacher_sorted_topk, uld_dense, uld_topk

__all__ = ["KINDS", "TAILS", "count_tokens", "divergence", "divergence_from_logprobs", "teacher_sorted_topk",
           "topk_divergence", "uld_dense", "uld_topk"]
