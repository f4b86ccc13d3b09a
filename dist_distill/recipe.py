"""Typed recipes: one YAML file describes a whole distillation run.

A recipe is a tree of dataclasses. Each field carries a docstring (the string literal
under it) that says what it holds and in which unit. YAML is loaded strictly: unknown
keys, wrong types and contradictory settings raise :class:`RecipeError`, whose message
names the dotted key and what is allowed. Command lines override any field with
``--set section.key=value`` (the value is parsed as YAML: ``3e-5``, ``true``, ``[0.9, 0.95]``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml

from dist_distill.errors import UserError
from dist_distill.objective.schedules import Ramp, Stage, TermWeights, check_stages


class RecipeError(UserError):
    """A recipe that cannot be used as written; the message names the key to change."""


@dataclass
class ModelSpec:
    """Where a model comes from and how it is loaded."""

    name_or_path: str = ""
    """Hugging Face hub name or local directory holding config.json and safetensors weights."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit); ignored for local directories."""
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float64"] = "auto"
    """Weights dtype when loading. "auto": bfloat16 on a CUDA device that supports it, else float32."""
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    """Attention kernel. "auto": flash_attention_2 when flash-attn and CUDA are present, else sdpa."""
    trust_remote_code: bool = False
    """Run modelling code shipped with the checkpoint. Off unless the recipe needs it."""


@dataclass
class ReplaySpec:
    """Samples of another dataset mixed into the training stream against forgetting (data/replay.py).

    Replay rows are trained with hard-label cross-entropy only: no teacher is asked for them and they
    never enter a KD term. Their CE SUM, times `weight`, is divided by the step's MAIN-data target-token
    count (the KD normalisation, DESIGN fact 4, is unchanged): a replay target token weighs `weight`
    times a main-data target token. Which steps carry replay rows, and which, is a pure function of
    (seed, step): resumable."""

    path: str = ""
    """Replay data: a local .jsonl/.json/.parquet/.arrow/.csv file or a hub dataset name, tokenized into
    the token store like data.train (same tokenizer, max_seq_len and bad-row policies; no augmentation)."""
    samples: Optional[int] = None
    """Replay samples (all ranks together) per `every_steps` optimizer steps, e.g. 100 per 1000 (seed 2)."""
    every_steps: Optional[int] = None
    """The period of `samples`, in optimizer steps."""
    fraction: Optional[float] = None
    """Instead of samples / every_steps: replay samples per main-data sample of a step (0.1: one replay
    sample per ten main samples; scales with world size x grad_accum x micro_batch_size)."""
    weight: float = 1.0
    """Weight of a replay target token's CE relative to a main-data target token."""
    split: Optional[str] = None
    """Hub split of the replay data (None: data.split)."""
    revision: Optional[str] = None
    """Hub revision of the replay data (None: data.revision)."""
    prompt_field: Optional[str] = None
    """Prompt field of the replay records (None: data.prompt_field)."""
    answer_field: Optional[str] = None
    """Answer field of the replay records (None: data.answer_field)."""
    format: Optional[Literal["auto", "prompt_answer", "messages"]] = None
    """Record shape of the replay records (None: data.format)."""
    messages_field: Optional[str] = None
    """Chat-turns field of the replay records (None: data.messages_field)."""
    max_samples: Optional[int] = None
    """Use only the first N replay records (None: all)."""


@dataclass
class AugmentSpec:
    """One augmentation applied to each training record at prepare time (data/augment.py), before
    tokenization; the store's key records its identity, so changing it builds a new store."""

    fn: str = ""
    """"synonyms" (the built-in: synonym replacement from `table`), or a user function given as
    "package.module:function" or "path/to/file.py:function" (see README, Augmentation)."""
    copies: int = 1
    """Augmented copies made of each record (copy = 0 .. copies-1; each is one call of the function)."""
    keep_original: bool = True
    """Keep the record itself besides its copies (1 + copies samples per record), or only the copies."""
    fields: list[str] = field(default_factory=list)
    """Record fields the built-in rewrites (string fields; empty: data.prompt_field); passed to a user
    function as `fields`."""
    table: Optional[str] = None
    """synonyms: the synonym table, a .json object {"word": ["synonym", ...]} or a .tsv file of lines
    "word<TAB>synonym<TAB>synonym..." (lookup is case-insensitive; its sha256 enters the store key)."""
    probability: float = 0.1
    """synonyms: chance that each word found in the table is replaced in a copy."""
    seed: int = 0
    """Seed of the per-record random generator (a function of seed, record index, copy: deterministic
    whichever rank or chunk tokenizes the record)."""
    version: Optional[str] = None
    """A user function's version string in the store key; None: the sha256 of its module's source file."""
    params: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for a user function (YAML values; they enter the store key)."""


@dataclass
class DataSpec:
    """The token stream: prompt/answer records from a local file or a hub dataset."""

    train: str = ""
    """Training data: a local .jsonl/.json/.parquet/.arrow file, or a hub dataset name."""
    eval: Optional[str] = None
    """Held-out data in the same format (scored by `dd-evaluate`)."""
    split: str = "train"
    """Split to read from a hub dataset (local files always give "train")."""
    prompt_field: str = "prompt"
    """Record field holding the prompt; its tokens are context and carry no loss."""
    answer_field: str = "answer"
    """Record field holding the answer; its tokens (and EOS) are the training targets."""
    max_seq_len: int = 32
    """Tokens per sample after padding (prompt + answer + EOS must fit; longer records: see `too_long`)."""
    max_samples: Optional[int] = None
    """Use only the first N records of the training data (None: all)."""
    revision: Optional[str] = None
    """Hub dataset revision (branch, tag or commit) read with `split`; ignored for local files. Pin it:
    an unpinned hub dataset is keyed in the token store by its name alone."""
    format: Literal["auto", "prompt_answer", "messages", "text"] = "auto"
    """Record shape. "prompt_answer": the prompt_field / answer_field columns; "messages": chat turns in
    messages_field rendered with the student tokenizer's chat template; "text": plain text in text_field,
    every token after the first a target; "auto": messages when the records have a messages_field column,
    else prompt_answer."""
    text_field: str = "text"
    """format=text: record field holding the text."""
    messages_field: str = "messages"
    """Record field holding chat turns: a list of {"role": ..., "content": str}."""
    loss_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    """format=messages: which tokens are training targets: every assistant turn, the last assistant
    turn only, or every token of the rendered conversation."""
    too_long: Literal["fail", "skip", "truncate"] = "fail"
    """A record longer than max_seq_len: stop with an error naming it, drop it (counted), or keep its
    first max_seq_len tokens (counted; dropped if no target token is left)."""
    bad_rows: Literal["fail", "skip"] = "fail"
    """A record that is empty, lacks a field, has a field of the wrong type or cannot be decoded
    (invalid JSON / UTF-8, a chat template that fails): stop with an error naming it, or drop it
    (counted by kind, reported at start-up and in the store's metadata)."""
    prefetch: bool = True
    """Prepare the next optimizer step's batches (store reads, padding, pinned host copies) and a cache
    teacher's rows in a background thread while the current step runs (data/pipeline.py)."""
    replay: Optional[ReplaySpec] = None
    """Replay against forgetting: another dataset's samples mixed into the stream at a fixed rate, CE only."""
    augment: list[AugmentSpec] = field(default_factory=list)
    """Augmentations applied in order to every data.train record when the store is built (each record
    becomes keep_original + copies samples per entry; streamed chunk by chunk, never all in memory)."""
    packing: bool = False
    """Pack several records into each sequence of max_seq_len tokens, with no attention across them (positions
    restart per record; flash_attention_2 on CUDA runs its varlen path over those position_ids, sdpa/eager get
    a 4-D block-diagonal mask). A micro-batch is then optim.micro_batch_size packed rows, so the records per
    step vary; the loss is still normalised by the step's target tokens. See data/batching.py."""
    pack_open_rows: int = 16
    """data.packing: rows kept open for first-fit placement (more: denser rows, records placed further from
    their stream order)."""
    group_by_length: bool = False
    """Unpacked runs: micro-batches of records of similar length, padded to their longest record instead of
    max_seq_len (HF's group_by_length). Deterministic given seed and step, so resumable."""
    length_group_steps: int = 16
    """data.group_by_length: optimizer steps per mega-batch whose records are sorted by length together."""
    store_dir: Optional[str] = None
    """Where tokenized stores live (one folder per fingerprint of data, tokenizer, template and these
    settings). None: $DD_DATA_STORE, else ~/.cache/dist_distill/token_store."""


@dataclass
class TeacherSourceSpec:
    """Where the teacher's per-token signal comes from during training."""

    kind: Literal["cache", "group", "colocated", "none"] = "cache"
    """"cache": a top-k logit cache built by `dd-cache`; "group": a separate tensor-parallel teacher
    group in the same job sends top-k signals to the student ranks; "colocated": the teacher model
    replicated on every student rank, run forward on each batch (small teachers); "none": hard labels only."""
    cache_dir: Optional[str] = None
    """Directory of the teacher cache (required when kind is "cache")."""
    top_k: int = 16
    """Teacher logits kept per token when building the cache."""
    batch_size: int = 32
    """Samples per teacher forward pass when building the cache."""
    load_in_8bit: bool = False
    """kind=colocated or group: the frozen teacher's linear layers in bitsandbytes LLM.int8 (CUDA, or CPU with
    bitsandbytes >= 0.45); a group teacher quantises its TP shards, the lm_head stays in teacher.dtype."""
    tp_size: int = 1
    """Tensor-parallel ranks per teacher (within a node): the ranks of a kind=group teacher group, and the
    ranks that share one teacher in ``dd-cache build`` (a teacher that fits no single device; the
    launched ranks form world / tp_size data-parallel teacher replicas)."""
    num_groups: int = 1
    """kind=group: number of teacher groups; the first tp_size * num_groups ranks of the job are teachers."""
    prefetch_micro_batches: int = 4
    """kind=group: micro-batches per student the teacher may run ahead (each is sent as soon as it is
    scored; a larger window absorbs jitter, each in-flight message holds [rows, 2k+1] floats)."""
    timeout_s: float = 300.0
    """kind=group: seconds a student waits for its teacher's signal before exiting with an error."""
    tail_temperatures: list[float] = field(default_factory=list)
    """Extra temperatures at which `dd-cache build` (and a kind=group teacher) compute the teacher's exact
    tail mass outside its top-k, besides 1 and loss.temperature(_end) (teacher.tails): what loss.tail=bucket
    reads; a cache built with them serves recipes at those temperatures too."""


@dataclass
class LossSpec:
    """The distillation objective: a divergence on the teacher's top-k mixed with hard-label CE."""

    kind: Literal["fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd"] = "fkl"
    """Divergence between teacher p_T and student q_T (fkl = KL(p_T || q_T))."""
    temperature: float = 1.0
    """Softmax temperature T applied to teacher and student logits (> 0); the value at the first step."""
    temperature_end: Optional[float] = None
    """Temperature at the last step when scheduled (None: fixed at `temperature`)."""
    temperature_shape: Literal["constant", "linear", "cosine"] = "constant"
    """How the temperature moves from `temperature` to `temperature_end`."""
    scale_by_t2: bool = True
    """Multiply the divergence by T^2 so its gradient scale does not shrink as T grows."""
    ce_weight: float = 0.0
    """Weight of hard-label cross-entropy: loss = (1 - ce_weight) * divergence + ce_weight * CE."""
    tail: Literal["renorm", "bucket"] = "renorm"
    """Treatment of the teacher mass outside its top-k: renormalise over top-k, or one tail bucket."""
    beta: float = 0.5
    """Teacher weight in the JSD mixture (kind "jsd")."""
    skew_alpha: float = 0.1
    """Skew of DistiLLM's skew KL (kinds "skew_fkl", "skew_rkl")."""
    fused: bool = True
    """Compute the output loss chunk by chunk from the final hidden states inside the lm_head's forward,
    never materialising [tokens, vocab] logits (false: materialised logits + autograd, for comparison)."""
    backend: Literal["auto", "triton", "torch"] = "auto"
    """Fused-loss kernels: "auto" = Triton on CUDA, PyTorch chunks elsewhere; the others force one."""
    chunk_mib: float = 256.0
    """Memory budget of the fused loss's float32 work buffers per chunk of tokens, in MiB."""
    cross_tokenizer: Literal["none", "uld"] = "none"
    """Teacher and student tokenizers differ: "uld" trains on the Universal Logit Distillation loss (Boizard et
    al. 2024: L1 between the two distributions' probabilities sorted in decreasing order, i-th response token of
    each tokenization with the i-th, truncated to the shorter; dist_distill.losses.uld) from a cache built with
    the teacher's tokenizer; the output term is then ce_weight * CE + uld_weight * ULD at loss.temperature
    (kind, tail, beta, skew_alpha and scale_by_t2 are unused). "none": token-level logit distillation, which
    needs the same tokenizer on both sides (refused otherwise)."""
    uld_weight: float = 1.0
    """cross_tokenizer=uld: weight of the ULD term (the paper's recipe: ce_weight 1.0, uld_weight 1.5)."""


@dataclass
class IntermediateSpec:
    """Intermediate-layer alignment and attention transfer (need teacher_source.kind=colocated)."""

    layer_map: Optional[list[list[int]]] = None
    """[[student_layer, teacher_layer], ...], 0-based transformer blocks (None: uniform, last to last)."""
    hidden_loss: Literal["mse", "cosine"] = "mse"
    """Per-token hidden-state loss after projecting the student's states to the teacher's width."""
    projection: Literal["linear", "conv_gate", "identity"] = "linear"
    """Student -> teacher width map: a linear layer, the seed's 1x1 conv + channel-attention gate, or none."""
    projection_l2: float = 0.0
    """Weight of the L2 penalty on the projections' weights (seed: 0.01), applied once per optimizer step."""
    attention_heads: Literal["average", "map"] = "average"
    """Attention transfer: average heads on each side, or map teacher head groups onto student heads."""


@dataclass
class OptimSpec:
    """AdamW with linear warmup and cosine decay to a floor."""

    lr: float = 1e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine decay as a fraction of `lr`."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to `lr`."""
    max_steps: int = 100
    """Optimizer steps in the run."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)."""
    micro_batch_size: int = 8
    """Samples per rank per forward/backward."""
    grad_accum: int = 1
    """Micro-batches per optimizer step on each rank."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0: no clipping)."""
    max_consecutive_skips: int = 5
    """Optimizer steps in a row skipped for a non-finite loss or gradient norm before the run stops."""
    gradient_checkpointing: bool = False
    """Recompute each student decoder layer's activations in the backward pass (Hugging Face gradient
    checkpointing, non-reentrant): activation memory of one layer instead of all; ~1/3 more compute. A 70B
    student at 8k tokens needs it (on the order of 180 GB of activations per micro-batch without)."""


@dataclass
class DeepSpeedSpec:
    """The DeepSpeed engine that shards the student."""

    zero_stage: int = 3
    """ZeRO stage (3 partitions parameters, gradients and optimizer state)."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Training precision. "auto": bf16 on CUDA devices that support it, else fp32."""
    config: Optional[str] = None
    """Optional DeepSpeed JSON whose keys override the ones generated from this recipe."""
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend. "auto": nccl on CUDA, gloo on CPU."""
    startup_timeout_s: float = 1800.0
    """Collective timeout until the first optimizer step is done (loading, first compilation), seconds."""
    timeout_s: float = 300.0
    """Collective timeout after the first step: a dead or hung rank makes the others exit within this."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """ZeRO offload of the optimizer states (fp32 master weights, Adam moments) and step to host memory."""
    offload_params: Literal["none", "cpu"] = "none"
    """ZeRO-3 offload of the 16-bit parameter partitions to host memory (fetched for each layer's use)."""
    load_pickled_checkpoints: bool = False
    """Resume from DeepSpeed checkpoint files with torch.load(weights_only=False), which runs code stored in
    them: only for checkpoints you wrote yourself. Default: weights_only=True, DeepSpeed's own classes allowed."""


@dataclass
class OutputSpec:
    """Where results go and how often."""

    dir: str = "runs/default"
    """Output directory: recipe.yaml, checkpoints/, tensorboard/, model/ (exported student)."""
    log_every: int = 10
    """Optimizer steps between TensorBoard/log records."""
    save_every: int = 0
    """Optimizer steps between checkpoints (0: only at the end)."""
    keep_last: int = 3
    """Committed checkpoints to keep (older ones are deleted after a new one is committed; 0: keep all)."""
    export: bool = True
    """Write the trained student as a Hugging Face directory (safetensors) in `dir`/model."""
    export_8bit: bool = False
    """Also write a bitsandbytes LLM.int8 copy in `dir`/model-8bit (needs export), with its measured
    memory and logit error in quantization.json."""
    eval_every: int = 0
    """Optimizer steps between evaluations on data.eval during training (0: none; the last step is always
    evaluated when > 0): held-out loss, KL to the teacher, top-1 agreement (training.periodic_eval), logged
    as TensorBoard eval/* scalars and `dir`/eval.jsonl."""
    eval_samples: Optional[int] = 256
    """Held-out samples scored at each evaluation (the first N of data.eval; None: all)."""
    eval_metrics: list[Literal["heldout_loss", "kl_teacher", "top1_agreement"]] = field(
        default_factory=lambda: ["heldout_loss", "kl_teacher", "top1_agreement"])
    """What each evaluation measures (heldout_loss always runs; the teacher ones need a teacher source)."""
    eval_teacher_cache: Optional[str] = None
    """A teacher cache built over data.eval (dd-cache build --set data.train=<data.eval> --set
    teacher_source.cache_dir=<dir>): KL to a cache teacher on held-out data. Without it, kind=cache runs
    measure KL on the first eval_samples training samples (tags eval/train_*)."""
    best_metric: Literal["heldout_loss", "kl_teacher", "top1_agreement", "none"] = "heldout_loss"
    """The evaluation metric that picks the best checkpoint, marked in checkpoints/best.json and kept from
    keep_last pruning (top1_agreement: higher is better; the others lower)."""


@dataclass
class GradingSpec:
    """Difficulty grading (seed 2): buckets by the teacher's confidence on each sample (data/grading.py)."""

    edges: list[float] = field(default_factory=lambda: [0.7, 0.9])
    """[lo, hi]: hard (confidence < lo), medium (lo..hi), easy (> hi); confidence = mean teacher probability
    of a sample's target tokens."""
    grades: Optional[str] = None
    """The grades file (grades.npz): written by `dd-cache grade`, read by dd-train when buckets are used.
    None: <teacher_source.cache_dir>/grades.npz (every cache build writes it)."""
    weights: Optional[dict[str, float]] = None
    """A mix for the whole run: {easy: w, medium: w, hard: w} (a bucket left out weighs 0); each optimizer
    step draws its samples from the buckets in these proportions (data/sampler.py BucketSampler). With
    `stages`, give each stage its own `buckets` instead (a curriculum: easy, then medium, then hard)."""


@dataclass
class GenerateSpec:
    """Sequence-level KD: the teacher writes responses for a prompt set (`dd-generate`, dist_distill/generation/)."""

    prompts: str = ""
    """Prompt set: a local .jsonl/.json/.parquet/.arrow/.csv file or a hub dataset (read with data.split /
    data.revision). Records are prompt/answer (data.prompt_field; an answer column is ignored) or chat
    (data.messages_field; turns after the last non-assistant turn are dropped), chosen by data.format."""
    output_dir: str = ""
    """Where the chunks, the merged dataset (generated.jsonl) and manifest.json are written."""
    temperature: float = 1.0
    """Sampling temperature (> 0), or 0 for greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (in (0, 1]; 1: off)."""
    top_k: int = 0
    """Keep only the top_k most likely tokens before sampling (0: off)."""
    max_new_tokens: int = 256
    """Most tokens generated per response (EOS included); a response cut there has finish_reason "length"."""
    num_samples: int = 1
    """Responses per prompt (n): each is its own output record, sample_index 0..n-1."""
    seed: Optional[int] = None
    """Seed of the sampling randomness (None: the recipe's seed); see generation/engine.py for what it fixes."""
    batch_size: int = 16
    """Sequences (prompt x sample) per teacher `generate` call (left-padded)."""
    chunk_prompts: int = 256
    """Prompts per output chunk: the unit of work sharing, of atomic publication and of resumption."""
    max_prompt_tokens: Optional[int] = None
    """Prompts longer than this (in teacher tokens) are bad rows (data.too_long: fail, or skip and count); None: no limit."""
    backend: Literal["auto", "hf", "vllm"] = "auto"
    """"hf": transformers `generate`; "vllm": vLLM's offline LLM (pip install 'dist_distill[vllm]', CUDA);
    "auto": vllm when it is importable and CUDA is present, else hf."""
    device_map: Literal["local", "auto"] = "local"
    """backend hf: "local" puts a whole teacher replica on cuda:LOCAL_RANK (one per rank); "auto" spreads one
    teacher over every GPU this process sees (accelerate device_map="auto"; launch one process per node)."""


@dataclass
class Recipe:
    """A whole run: models, data, teacher signal, loss, optimisation, engine and outputs."""

    student: ModelSpec = field(default_factory=ModelSpec)
    """The model being trained."""
    teacher: ModelSpec = field(default_factory=ModelSpec)
    """The model distilled from (used by `dd-cache`; may be empty when no teacher is used)."""
    data: DataSpec = field(default_factory=DataSpec)
    """Training and held-out data."""
    teacher_source: TeacherSourceSpec = field(default_factory=TeacherSourceSpec)
    """Where the teacher signal comes from during training."""
    loss: LossSpec = field(default_factory=LossSpec)
    """The objective."""
    optim: OptimSpec = field(default_factory=OptimSpec)
    """Optimizer and schedule."""
    deepspeed: DeepSpeedSpec = field(default_factory=DeepSpeedSpec)
    """Engine settings."""
    output: OutputSpec = field(default_factory=OutputSpec)
    """Outputs."""
    weights: TermWeights = field(default_factory=TermWeights)
    """Weight of each loss term (output, hidden, attention): start, end and shape over the run."""
    intermediate: IntermediateSpec = field(default_factory=IntermediateSpec)
    """Intermediate-layer and attention transfer settings."""
    stages: list[Stage] = field(default_factory=list)
    """Progressive stages (name, data_fraction, steps, terms); when given they replace `weights`."""
    seed: int = 1234
    """Seed for python, numpy and torch on every rank."""
    generate: GenerateSpec = field(default_factory=GenerateSpec)
    """Teacher-generated responses for sequence-level KD (`dd-generate`)."""
    grading: GradingSpec = field(default_factory=GradingSpec)
    """Difficulty grading by teacher confidence, and training by bucket (curriculum or mix)."""

    def validate(self) -> "Recipe":
        """Refuse contradictory settings; returns self. Raises RecipeError naming the keys."""
        _check(self.student.name_or_path != "", "student.name_or_path is empty: give a hub name or a local model directory")
        _check(self.data.train != "", "data.train is empty: give a .jsonl/.parquet file or a hub dataset name")
        _check(self.data.max_seq_len >= 2, f"data.max_seq_len={self.data.max_seq_len}: must be at least 2")
        self._check_replay()
        self._check_augment()
        self._check_batching()
        lo = self.loss
        _check(lo.temperature > 0, f"loss.temperature={lo.temperature}: must be > 0")
        _check(0.0 <= lo.ce_weight <= 1.0, f"loss.ce_weight={lo.ce_weight}: must lie in [0, 1]")
        _check(0.0 <= lo.beta <= 1.0, f"loss.beta={lo.beta}: must lie in [0, 1]")
        _check(0.0 <= lo.skew_alpha < 1.0, f"loss.skew_alpha={lo.skew_alpha}: must lie in [0, 1)")
        ts = self.teacher_source
        if ts.kind == "none":
            _check(lo.ce_weight == 1.0, f"loss.ce_weight={lo.ce_weight} needs a teacher, but teacher_source.kind=none: "
                   "set teacher_source.kind=cache (with teacher_source.cache_dir) or loss.ce_weight=1.0")
        elif ts.kind == "group":
            _check(self.teacher.name_or_path != "", "teacher_source.kind=group needs teacher.name_or_path")
            _check(ts.tp_size >= 1 and ts.num_groups >= 1, f"teacher_source.tp_size={ts.tp_size} and "
                   f"teacher_source.num_groups={ts.num_groups}: both must be >= 1")
            _check(ts.prefetch_micro_batches >= 1,
                   f"teacher_source.prefetch_micro_batches={ts.prefetch_micro_batches}: must be >= 1")
            _check(ts.timeout_s > 0, f"teacher_source.timeout_s={ts.timeout_s}: must be > 0")
        elif ts.kind == "cache":
            _check(ts.cache_dir is not None, "teacher_source.kind=cache needs teacher_source.cache_dir")
        else:
            _check(self.teacher.name_or_path != "", "teacher_source.kind=colocated needs teacher.name_or_path")
        _check(lo.chunk_mib > 0, f"loss.chunk_mib={lo.chunk_mib}: must be > 0")
        if lo.cross_tokenizer != "none":
            self._check_cross_tokenizer()
        Ramp(lo.temperature, lo.temperature_end, lo.temperature_shape).check("loss.temperature", positive=True)
        _check(all(t > 0 for t in ts.tail_temperatures),
               f"teacher_source.tail_temperatures={ts.tail_temperatures}: every temperature must be > 0")
        if ts.kind in ("cache", "group"):
            from dist_distill.teacher.tails import check_bucket_recipe

            check_bucket_recipe(self)
        self.weights.check("weights")
        if self.stages:
            check_stages(self.stages, self.optim.max_steps)
        for term in ("hidden", "attention"):
            if self.uses_term(term):
                _check(ts.kind == "colocated", f"the {term} term needs the teacher's internal states, which only "
                       f"teacher_source.kind=colocated provides (a cache holds logits only); got teacher_source.kind={ts.kind}")
        _check(self.intermediate.projection_l2 >= 0,
               f"intermediate.projection_l2={self.intermediate.projection_l2}: must be >= 0")
        if self.uses_term("attention"):
            from dist_distill.objective.intermediate import check_attention_support

            check_attention_support(self.student.attn_implementation, "student")
            check_attention_support(self.teacher.attn_implementation, "teacher")
        _check(ts.top_k >= 1, f"teacher_source.top_k={ts.top_k}: must be >= 1")
        op = self.optim
        _check(op.lr > 0, f"optim.lr={op.lr}: must be > 0")
        _check(op.max_steps >= 1, f"optim.max_steps={op.max_steps}: must be >= 1")
        _check(0 <= op.warmup_steps < op.max_steps,
               f"optim.warmup_steps={op.warmup_steps} must be >= 0 and below optim.max_steps={op.max_steps}")
        _check(0.0 <= op.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={op.min_lr_ratio}: must lie in [0, 1]")
        _check(len(op.betas) == 2 and all(0 <= b < 1 for b in op.betas),
               f"optim.betas={op.betas}: expected two numbers in [0, 1)")
        _check(op.micro_batch_size >= 1, f"optim.micro_batch_size={op.micro_batch_size}: must be >= 1")
        _check(op.grad_accum >= 1, f"optim.grad_accum={op.grad_accum}: must be >= 1")
        _check(op.grad_clip >= 0, f"optim.grad_clip={op.grad_clip}: must be >= 0 (0 disables clipping)")
        _check(self.deepspeed.zero_stage in (0, 1, 2, 3), f"deepspeed.zero_stage={self.deepspeed.zero_stage}: allowed 0, 1, 2, 3")
        _check(self.deepspeed.offload_params == "none" or self.deepspeed.zero_stage == 3,
               f"deepspeed.offload_params={self.deepspeed.offload_params} needs deepspeed.zero_stage=3 "
               f"(got {self.deepspeed.zero_stage}): only ZeRO-3 partitions parameters")
        _check(self.deepspeed.offload_optimizer == "none" or self.deepspeed.zero_stage >= 1,
               f"deepspeed.offload_optimizer={self.deepspeed.offload_optimizer} needs deepspeed.zero_stage >= 1")
        _check(self.output.log_every >= 1, f"output.log_every={self.output.log_every}: must be >= 1")
        _check(self.output.save_every >= 0, f"output.save_every={self.output.save_every}: must be >= 0")
        _check(self.output.keep_last >= 0, f"output.keep_last={self.output.keep_last}: must be >= 0")
        self._check_eval()
        self._check_generate()
        self._check_grading()
        _check(self.output.export or not self.output.export_8bit,
               "output.export_8bit=true needs output.export=true (the 8-bit copy is made from the exported model)")
        _check(op.max_consecutive_skips >= 1, f"optim.max_consecutive_skips={op.max_consecutive_skips}: must be >= 1")
        _check(self.deepspeed.startup_timeout_s > 0 and self.deepspeed.timeout_s > 0,
               "deepspeed.startup_timeout_s and deepspeed.timeout_s must be > 0")
        return self

    def _check_cross_tokenizer(self) -> None:
        """loss.cross_tokenizer=uld: a cache teacher built with the teacher's tokenizer, a fixed temperature."""
        lo, ts = self.loss, self.teacher_source
        _check(ts.kind == "cache", f"loss.cross_tokenizer={lo.cross_tokenizer} reads the teacher from a top-k cache built "
               f"with the teacher's own tokenizer (dd-cache build): set teacher_source.kind=cache (got {ts.kind}; the "
               "teacher group and a colocated teacher score the student's tokens and serve token-level KD only)")
        _check(self.teacher.name_or_path != "", f"loss.cross_tokenizer={lo.cross_tokenizer} needs teacher.name_or_path "
               "(its tokenizer tokenizes the data on the teacher's side)")
        _check(lo.uld_weight >= 0 and lo.uld_weight + lo.ce_weight > 0, f"loss.uld_weight={lo.uld_weight} with "
               f"loss.ce_weight={lo.ce_weight}: both must be >= 0 and not both 0")
        _check(lo.temperature_end is None or lo.temperature_end == lo.temperature,
               f"loss.cross_tokenizer={lo.cross_tokenizer} with a scheduled temperature ({lo.temperature} -> "
               f"{lo.temperature_end}): ULD's tail needs the teacher's tail mass at the training temperature, which a "
               "cache carries at fixed temperatures only; use a constant loss.temperature (the ULD paper uses 1)")
        _check(not self.uses_term("hidden") and not self.uses_term("attention"),
               f"loss.cross_tokenizer={lo.cross_tokenizer}: the hidden and attention terms align the two models "
               "position by position, which different tokenizations do not allow; set their weights to 0")
        _check(not self.data.augment, f"loss.cross_tokenizer={lo.cross_tokenizer} with data.augment: student and "
               "teacher samples are paired by source record, and the augmented copies of one record would all pair "
               "with the teacher's first one; augment the data into a file first and train on that")
        _check(not self.uses_buckets(), f"loss.cross_tokenizer={lo.cross_tokenizer} with difficulty buckets: the "
               "grades are indexed by the teacher's token store, not the student's; drop grading.weights and the "
               "stages' buckets")
        teacher_metrics = [m for m in self.output.eval_metrics if m in ("kl_teacher", "top1_agreement")]
        _check(self.output.eval_every == 0 or not teacher_metrics,
               f"loss.cross_tokenizer={lo.cross_tokenizer} with output.eval_metrics {teacher_metrics}: KL to the "
               "teacher and top-1 agreement compare the same token ids; keep output.eval_metrics=[heldout_loss]")

    def _check_replay(self) -> None:
        rp = self.data.replay
        if rp is None:
            return
        _check(rp.path != "", "data.replay.path is empty: give the replay data (a local file or a hub dataset name)")
        by_count = rp.samples is not None or rp.every_steps is not None
        _check(by_count != (rp.fraction is not None), "data.replay: give either samples and every_steps "
               f"(e.g. 100 per 1000 steps) or fraction, not {'both' if by_count else 'neither'}")
        if by_count:
            _check(rp.samples is not None and rp.every_steps is not None,
                   "data.replay.samples and data.replay.every_steps go together (samples per every_steps steps)")
            _check(rp.samples >= 1 and rp.every_steps >= 1, f"data.replay.samples={rp.samples} and "
                   f"data.replay.every_steps={rp.every_steps}: both must be >= 1")
        else:
            _check(0 < rp.fraction <= 16, f"data.replay.fraction={rp.fraction}: must lie in (0, 16] "
                   "(replay samples per main-data sample)")
        _check(rp.weight > 0, f"data.replay.weight={rp.weight}: must be > 0")
        _check(rp.max_samples is None or rp.max_samples >= 1,
               f"data.replay.max_samples={rp.max_samples}: must be >= 1 or null")

    def _check_augment(self) -> None:
        for i, aug in enumerate(self.data.augment):
            key = f"data.augment[{i}]"
            _check(aug.fn != "", f"{key}.fn is empty: give \"synonyms\" or a user function \"module:function\"")
            _check(aug.fn == "synonyms" or (":" in aug.fn and all(aug.fn.rsplit(":", 1))),
                   f"{key}.fn={aug.fn!r}: expected \"synonyms\" or \"package.module:function\" / \"file.py:function\"")
            _check(aug.copies >= 1, f"{key}.copies={aug.copies}: must be >= 1")
            _check(0.0 <= aug.probability <= 1.0, f"{key}.probability={aug.probability}: must lie in [0, 1]")
            if aug.fn == "synonyms":
                _check(aug.table is not None, f"{key}: the synonyms built-in needs a table (a .json or .tsv file)")
                _check(not aug.params, f"{key}.params: the synonyms built-in takes no params (got {sorted(aug.params)})")
    def _check_batching(self) -> None:
        """data.packing / data.group_by_length against each other and what they cannot serve."""
        d, kind = self.data, self.teacher_source.kind
        _check(d.pack_open_rows >= 1, f"data.pack_open_rows={d.pack_open_rows}: must be >= 1")
        _check(d.length_group_steps >= 1, f"data.length_group_steps={d.length_group_steps}: must be >= 1")
        for key, on in (("data.packing", d.packing), ("data.group_by_length", d.group_by_length)):
            if not on:
                continue
            _check(not (d.packing and d.group_by_length), "data.packing and data.group_by_length are both true: "
                   "choose one (packing already removes the padding that length grouping reduces)")
            _check(kind != "group", f"{key}=true is not supported with teacher_source.kind=group: the teacher group "
                   "builds its own unpacked batches from the plain sampler; use a teacher cache (dd-cache build; one "
                   "cache serves packed and unpacked runs) or teacher_source.kind=colocated, or set "
                   f"{key}=false")
            _check(not self.stages, f"{key}=true is not supported with progressive stages (stages: "
                   f"{len(self.stages)} given): their per-stage sample pools use the plain sampler; set {key}=false")
            _check(not self.uses_buckets(), f"{key}=true is not supported with training by difficulty bucket "
                   "(grading.weights or stages[i].buckets): the bucket sampler draws its own micro-batches; set "
                   f"{key}=false or remove the buckets")
        if d.packing:
            _check(d.replay is None, "data.packing=true with data.replay: the replay rate counts samples per main-data "
                   "sample, which packed rows do not have a fixed number of; set data.packing=false (data.group_by_length "
                   "works with replay) or remove data.replay")
            _check(self.loss.cross_tokenizer == "none", f"data.packing=true with loss.cross_tokenizer="
                   f"{self.loss.cross_tokenizer}: the teacher rows pair with the student's by record over unpacked "
                   "samples; set data.packing=false")
            _check(not self.uses_term("attention"), "data.packing=true with the attention term: the attention-transfer "
                   "loss compares [B, L] real-token attention rows, which a packed row's documents do not have; set "
                   "data.packing=false or weights.attention to 0")
            _check(not self.uses_term("hidden") or self.intermediate.projection != "conv_gate",
                   "data.packing=true with intermediate.projection=conv_gate: its gate pools over the whole row, "
                   "mixing the packed documents; use intermediate.projection=linear (or identity) or data.packing=false")

    def _check_eval(self) -> None:
        """The evaluation-during-training keys (output.eval_*, output.best_metric) agree with each other."""
        out = self.output
        _check(out.eval_every >= 0, f"output.eval_every={out.eval_every}: must be >= 0 (0: no evaluation)")
        if out.eval_every == 0:
            return
        _check(self.data.eval is not None, f"output.eval_every={out.eval_every} needs held-out data: set data.eval")
        _check(out.eval_samples is None or out.eval_samples >= 1,
               f"output.eval_samples={out.eval_samples}: must be >= 1 or null (all of data.eval)")
        _check(out.best_metric in ("none", "heldout_loss") or out.best_metric in out.eval_metrics,
               f"output.best_metric={out.best_metric} is not measured: add it to output.eval_metrics "
               f"({out.eval_metrics}) or choose heldout_loss / none")
        _check(out.best_metric not in ("kl_teacher", "top1_agreement") or self.teacher_source.kind in ("cache", "colocated"),
               f"output.best_metric={out.best_metric} needs a teacher during evaluation: teacher_source.kind=cache or "
               f"colocated (got {self.teacher_source.kind})")
        _check(out.eval_teacher_cache is None or self.teacher_source.kind == "cache",
               f"output.eval_teacher_cache is set but teacher_source.kind={self.teacher_source.kind}: it serves kind=cache")

    def _check_generate(self) -> None:
        """The generate.* keys are usable (checked whatever the command: they are cheap to check)."""
        g = self.generate
        _check(g.temperature >= 0, f"generate.temperature={g.temperature}: must be >= 0 (0: greedy)")
        _check(0.0 < g.top_p <= 1.0, f"generate.top_p={g.top_p}: must lie in (0, 1]")
        _check(g.top_k >= 0, f"generate.top_k={g.top_k}: must be >= 0 (0: off)")
        for key in ("max_new_tokens", "num_samples", "batch_size", "chunk_prompts"):
            _check(getattr(g, key) >= 1, f"generate.{key}={getattr(g, key)}: must be >= 1")
        _check(g.max_prompt_tokens is None or g.max_prompt_tokens >= 1,
               f"generate.max_prompt_tokens={g.max_prompt_tokens}: must be >= 1 or null (no limit)")

    def _check_grading(self) -> None:
        """grading.edges, grading.weights and the stages' buckets name real buckets with usable weights."""
        from dist_distill.data.grading import check_edges
        from dist_distill.objective.schedules import check_bucket_weights

        check_edges(self.grading.edges)
        _check(not self.uses_buckets() or self.teacher_source.kind != "group",
               "difficulty buckets (grading.weights or stages[i].buckets) with teacher_source.kind=group: the teacher "
               "group draws each step's samples in the plain order; use a cache or a colocated teacher")
        if self.grading.weights is not None:
            _check(not self.stages, "grading.weights is a mix for a run without stages; with stages give each stage "
                                    "its own buckets (stages[i].buckets) instead")
            check_bucket_weights(self.grading.weights, "grading.weights")

    def uses_buckets(self) -> bool:
        """Whether training draws samples by difficulty bucket (grading.weights, or a stage's buckets)."""
        return self.grading.weights is not None or any(st.buckets is not None for st in self.stages)

    def uses_term(self, term: str) -> bool:
        """Whether loss term `term` ("output", "hidden", "attention") has a weight > 0 at any step."""
        if self.stages:
            return any(stage.terms.get(term, 0.0) > 0 for stage in self.stages)
        ramp = getattr(self.weights, term)
        return ramp.start > 0 or (ramp.end is not None and ramp.end > 0)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain YAML-serialisable data."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved recipe as YAML (atomically: temporary file, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        tmp.replace(path)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RecipeError(message)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {_type_name(get_args(tp)[1])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (int -> float, str '3e-5' -> float)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is Literal:
        if value not in get_args(tp):
            raise RecipeError(f"{key}={value!r}: expected {_type_name(tp)}")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        errors = []
        for arg in get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except RecipeError as err:
                errors.append(str(err))
        raise RecipeError(f"{key}={value!r}: expected {_type_name(tp)}")
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}={value!r}: expected a mapping")
        key_tp, value_tp = get_args(tp)
        return {_coerce(k, key_tp, key): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{key}={value!r}: expected {_type_name(tp)}")
        return [_coerce(v, get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key}={value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key}={value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key}={value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{key}={value!r}: expected a string")
        return value
    raise TypeError(f"unsupported recipe annotation {tp!r} at {key}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise RecipeError(f"unknown key {prefix}{unknown[0]}: allowed keys in {prefix.rstrip('.') or 'the recipe'} are "
                          + ", ".join(names))
    values = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in values]
    if missing:
        raise RecipeError(f"{prefix}{missing[0]} is missing: {prefix.rstrip('.') or 'the recipe'} needs "
                          + ", ".join(required))
    return cls(**values)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into (["a", "b", "c"], parsed YAML value)."""
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected the form section.key=value, e.g. optim.lr=3e-5")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted override in the nested dict `data` (in place; returns it)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Load, override, type-check and validate a recipe. Raises RecipeError with the key at fault."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise RecipeError(f"recipe file {path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"recipe file {path}: expected a mapping of sections at the top level")
    apply_overrides(data, overrides or [])
    return _build(Recipe, data).validate()


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> attribute docstring of a recipe dataclass (read from its source)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value)
    return docs


def describe_recipe() -> str:
    """Every recipe key with its type and docstring, for ``--help-recipe``."""
    lines = []
    for top in dataclasses.fields(Recipe):
        hints = typing.get_type_hints(Recipe)
        tp = hints[top.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{top.name}:  {tp.__doc__.splitlines()[0]}")
            sub_hints = typing.get_type_hints(tp)
            for name, doc in field_docs(tp).items():
                lines.append(f"  {top.name}.{name} ({_type_name(sub_hints[name])}): {doc}")
        else:
            lines.append(f"{top.name} ({_type_name(tp)}): {field_docs(Recipe).get(top.name, '')}")
    return "\n".join(lines)
