"""Architectures without weights: a model's config found offline and the model built on the meta device.

A 70B student or a 671B teacher is never downloaded to be planned: its ``config.json`` is enough.
Where a recipe names a hub model, the config is looked up, in order, in

1. an explicit ``--student-config`` / ``--teacher-config`` path (a config.json or a directory holding one),
2. the local directory ``name_or_path`` itself,
3. ``<recipe folder>/models/<org>--<name>/config.json`` (configs/seed/models/ ships the seed models'),
4. transformers' local hub cache (``local_files_only=True``: no network),

and the model is built inside ``torch.device("meta")``: shapes and parameter counts with no storage,
about 2 s for a 70B Llama on a laptop core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from dist_distill.errors import UserError


@dataclass
class Architecture:
    """Counts taken from a model built on the meta device (all counts are parameter elements)."""

    name: str
    """The recipe's name_or_path."""
    source: str
    """Where its config.json was found."""
    config: object = field(repr=False)
    """The transformers PretrainedConfig."""
    total_params: int
    """Unique parameters (tied embeddings counted once)."""
    largest_module_params: int
    """Largest single module's own parameters (DeepSpeed's ``largest_layer_params``)."""
    largest_module: str
    """Name of that module (for a Llama: the embedding or the lm_head)."""
    layer_params: list[int]
    """Parameters of each decoder block (model.layers[i]), in order."""
    embedding_params: int
    """Input embedding parameters."""
    lm_head_params: int
    """Output projection parameters (0 when tied to the embedding)."""

    @property
    def hidden(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab(self) -> int:
        return int(self.config.vocab_size)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def intermediate(self) -> int:
        return int(self.config.intermediate_size)

    @property
    def heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.heads)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.config, "head_dim", None) or self.hidden // self.heads)

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    @property
    def active_params(self) -> int:
        """Parameters one token passes through: all of them for a dense model; for a mixture of experts
        (DeepSeek-V3/R1) the shared ones plus num_experts_per_tok routed experts per MoE layer."""
        c = self.config
        routed = getattr(c, "n_routed_experts", None)
        if not routed:
            return self.total_params
        per_expert = 3 * self.hidden * int(c.moe_intermediate_size)
        moe_layers = self.num_layers - int(getattr(c, "first_k_dense_replace", 0))
        return self.total_params - moe_layers * (routed - int(c.num_experts_per_tok)) * per_expert


def find_config(name_or_path: str, role: str, recipe_path: str | Path | None = None,
                explicit: str | Path | None = None) -> tuple[object, str]:
    """(transformers config, where it was found) for a model named by a recipe; no network.

    Raises UserError listing every place looked at when none has the config.
    """
    from transformers import AutoConfig

    tried = []
    candidates = []
    if explicit:
        candidates.append(Path(explicit))
    local = Path(name_or_path).expanduser()
    candidates.append(local)
    if recipe_path is not None:
        candidates.append(Path(recipe_path).resolve().parent / "models" / name_or_path.replace("/", "--"))
    for path in candidates:
        folder = path.parent if path.name == "config.json" else path
        tried.append(str(folder / "config.json"))
        if (folder / "config.json").is_file():
            try:
                return AutoConfig.from_pretrained(str(folder)), str(folder / "config.json")
            except (OSError, ValueError) as err:
                raise UserError(f"{role}: {folder / 'config.json'} is not a usable transformers config: {err}") from None
    if explicit:
        raise UserError(f"--{role}-config={explicit}: no config.json there")
    try:
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=True)
        return config, f"hub cache ({name_or_path})"
    except (OSError, ValueError):
        tried.append(f"the local hub cache for {name_or_path}")
    raise UserError(f"{role}.name_or_path={name_or_path}: no config.json found offline (looked in "
                    + "; ".join(tried) + f"). Give --{role}-config PATH (a config.json or its folder), or put the "
                    f"config at models/{name_or_path.replace('/', '--')}/config.json beside the recipe")


def build_meta(name: str, config, source: str) -> Architecture:
    """Build `config`'s causal LM on the meta device (no storage) and count its parameters."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    except (ValueError, KeyError) as err:
        raise UserError(f"{name}: transformers cannot build model_type={getattr(config, 'model_type', '?')} "
                        f"from {source}: {err}") from None
    unique = {id(p): p.numel() for p in model.parameters()}
    largest, largest_name = 0, ""
    for mod_name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if own > largest:
            largest, largest_name = own, mod_name
    layers = model.get_decoder().layers
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    return Architecture(name=name, source=source, config=config, total_params=sum(unique.values()),
                        largest_module_params=largest, largest_module=largest_name,
                        layer_params=[sum(p.numel() for p in layer.parameters()) for layer in layers],
                        embedding_params=embed.numel(), lm_head_params=0 if head is embed else head.numel())


def load_architecture(name_or_path: str, role: str, recipe_path=None, explicit=None) -> Architecture:
    """The model a recipe names, as an :class:`Architecture` built on the meta device."""
    config, source = find_config(name_or_path, role, recipe_path, explicit)
    return build_meta(name_or_path, config, source)
