"""One worker of a generation: its chunks of the prompt set, through the teacher, published one by one.

Work sharing: a generation has W = num_tasks x world workers (SLURM array tasks x torchrun ranks);
worker ``w = task * world + rank`` owns the chunks ``c`` with ``c % W == w``. No process group is
needed: workers share nothing but the output directory. A chunk's records depend only on the chunk
(engine.py: randomness from (seed, chunk, batch) or (seed, prompt, sample)), so any split into
workers and any number of attempts give the same files; a restarted worker skips complete chunks
(their sidecar names this build and their sha256 matches). Whoever finishes last and finds every chunk
complete merges them (output.merge); re-running the command after a kill or on another task list
completes the merge.

At 64 GPUs and 1M prompts with a teacher that fits one GPU: 64 workers (8 array tasks x torchrun 8),
about 61 chunks each at chunk_prompts=256. A teacher that needs several GPUs: backend vllm with
teacher_source.tp_size GPUs per process (one process per node, or per tp_size GPUs with
CUDA_VISIBLE_DEVICES), or backend hf with generate.device_map=auto (one process per node, layers
spread over its GPUs by accelerate; simple, slower). The TP shards of teacher/tensor_parallel.py serve
scoring (a decoder forward with a vocabulary-sliced lm_head), not autoregressive decoding.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from dist_distill.data.rows import BAD_KINDS, BadRow, record_format
from dist_distill.errors import UserError
from dist_distill.generation.engine import HFEngine, VLLMEngine, vllm_available
from dist_distill.generation.output import FORMAT, bind_output, chunk_done, merge, write_chunk
from dist_distill.generation.prompts import Prompt, encode_prompts


def shard_from_env(shard: str | None) -> tuple[int, int]:
    """(task, num_tasks): an explicit "I/N", else the SLURM array's (SLURM_ARRAY_TASK_ID - MIN, COUNT), else (0, 1)."""
    if shard:
        try:
            i, n = (int(x) for x in shard.split("/"))
        except ValueError:
            raise UserError(f"--shard {shard!r}: expected I/N, e.g. --shard 0/4") from None
    elif "SLURM_ARRAY_TASK_ID" in os.environ:
        i = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        n = int(os.environ.get("SLURM_ARRAY_TASK_COUNT", "1"))
    else:
        i, n = 0, 1
    if n < 1 or not 0 <= i < n:
        raise UserError(f"shard {i} of {n}: the task index must lie in [0, {n})")
    return i, n


def resolve_backend(name: str) -> str:
    if name == "auto":
        return "vllm" if vllm_available() else "hf"
    if name == "vllm" and not vllm_available():
        raise UserError("generate.backend=vllm needs CUDA and the vllm package (pip install 'dist_distill[vllm]'); "
                        "use generate.backend=hf or auto")
    return name


def eos_ids(tokenizer, teacher_spec) -> list[int]:
    """The ids that end a response: the tokenizer's EOS and the teacher's generation_config eos_token_id(s)."""
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        gc = GenerationConfig.from_pretrained(teacher_spec.name_or_path, revision=teacher_spec.revision)
        extra = gc.eos_token_id
        ids |= set(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    except OSError:  # no generation_config.json
        pass
    if not ids:
        raise UserError(f"teacher {teacher_spec.name_or_path}: its tokenizer has no eos_token, so responses never end")
    return sorted(ids)


def build_identity(recipe, tokenizer, backend: str, num_records: int, eos: list[int]) -> dict:
    """What makes two generations the same: the bytes of every chunk follow from this."""
    from dist_distill.data.store import source_identity
    from dist_distill.models.loading import model_fingerprint

    g, d = recipe.generate, recipe.data
    seed = recipe.seed if g.seed is None else g.seed
    return {"format": FORMAT, "teacher": {**model_fingerprint(recipe.teacher, tokenizer), "dtype": recipe.teacher.dtype},
            "prompts": {"source": source_identity(g.prompts, d), "records": num_records, "format": d.format,
                        "prompt_field": d.prompt_field, "messages_field": d.messages_field,
                        "answer_field": d.answer_field},
            "sampling": {"temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k,
                         "max_new_tokens": g.max_new_tokens, "num_samples": g.num_samples, "seed": seed,
                         "eos_token_ids": eos},
            "batching": {"backend": backend, "batch_size": g.batch_size if backend == "hf" else None,
                         "chunk_prompts": g.chunk_prompts, "max_prompt_tokens": g.max_prompt_tokens,
                         "too_long": d.too_long, "bad_rows": d.bad_rows}}


def load_engine(recipe, backend: str, tokenizer, eos: list[int]):
    from dist_distill.training.distributed import local_device

    g = recipe.generate
    seed = recipe.seed if g.seed is None else g.seed
    if backend == "vllm":
        if recipe.teacher.dtype == "float64":
            raise UserError("generate.backend=vllm does not run float64 models: set teacher.dtype to auto, bfloat16, "
                            "float16 or float32, or use generate.backend=hf")
        return VLLMEngine(recipe.teacher, recipe.teacher_source.tp_size, eos, g, seed)
    from dist_distill.models.loading import load_model

    if g.device_map == "auto":
        model = load_model(recipe.teacher, "teacher", device_map="auto").eval()
    else:  # straight onto this rank's GPU: 8 ranks of a node never hold 8 host-RAM copies of the teacher
        device = local_device()
        model = (load_model(recipe.teacher, "teacher", device_map={"": device}) if device.type == "cuda" else
                 load_model(recipe.teacher, "teacher").to(device)).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return HFEngine(model, pad, eos, g, seed, len(tokenizer))


def output_record(prompt: Prompt, sample: int, tokens: list[int], finish: str, tokenizer, spec, fmt: str) -> bytes | None:
    """One output line: the prompt (text or turns) and the teacher's answer, in the columns the recipe's data
    section reads (data.prompt_field / answer_field, or data.messages_field), plus provenance. None for an
    answer that decodes to blank text (the token store refuses it as an empty row): counted, not written."""
    answer = tokenizer.decode(tokens, skip_special_tokens=True)
    if not answer.strip():
        return None
    if fmt == "messages":
        rec = {spec.messages_field: prompt.echo + [{"role": "assistant", "content": answer}]}
    else:
        rec = {spec.prompt_field: prompt.echo, spec.answer_field: answer}
    rec.update(prompt_index=prompt.index, sample_index=sample, finish_reason=finish, answer_tokens=len(tokens))
    return (json.dumps(rec, ensure_ascii=False) + "\n").encode()


def _chunk(records, c: int, engine, tokenizer, recipe, fmt: str) -> tuple[list[bytes], dict]:
    g, d = recipe.generate, recipe.data
    start = c * g.chunk_prompts
    items = encode_prompts(records.read(start, min(start + g.chunk_prompts, len(records))), start, tokenizer, d, fmt,
                           g.max_prompt_tokens)
    skipped = dict.fromkeys(BAD_KINDS, 0)
    prompts = []
    for k, item in enumerate(items):
        if isinstance(item, BadRow):
            policy, key = (d.too_long, "data.too_long") if item.kind == "too_long" else (d.bad_rows, "data.bad_rows")
            if policy == "fail":
                raise UserError(f"generate.prompts {g.prompts}: record {start + k} {item.detail} [{item.kind}]; "
                                f"set {key}=skip to drop such prompts (counted in the manifest)")
            skipped[item.kind] += 1
        else:
            prompts.append(item)
    rows = [(p, s) for p in prompts for s in range(g.num_samples)]
    results = engine.generate(c, [p.ids for p, _ in rows], [(p.index, s) for p, s in rows]) if rows else []
    lines, empty = [], 0
    for (p, s), (toks, fin) in zip(rows, results):
        line = output_record(p, s, toks, fin, tokenizer, d, fmt)
        if line is None:
            empty += 1
        else:
            lines.append(line)
    finish = {k: sum(1 for _, f in results if f == k) for k in ("stop", "length")}
    meta = {"records": len(lines), "prompts": len(prompts), "skipped": {k: v for k, v in skipped.items() if v},
            "finish": finish, "empty_answers": empty, "answer_tokens": sum(len(t) for t, _ in results)}
    return lines, meta


def run_generation(recipe, task: int = 0, num_tasks: int = 1, rank: int = 0, world: int = 1,
                   progress: bool = False) -> dict:
    """Generate this worker's missing chunks of recipe.generate.prompts, then merge if every chunk exists.

    Returns a summary: chunks of this worker, written now, skipped as complete, merged (bool), output dir."""
    from tqdm import tqdm

    from dist_distill.data.store import RecordSource
    from dist_distill.models.loading import load_tokenizer
    from dist_distill.training import faults

    g = recipe.generate
    if not g.prompts or not g.output_dir:
        raise UserError("dd-generate needs generate.prompts (the prompt set) and generate.output_dir")
    out = Path(g.output_dir)
    spec = dataclasses.replace(recipe.data, max_samples=None)
    records = RecordSource(g.prompts, spec)
    if len(records) == 0:
        raise UserError(f"generate.prompts {g.prompts}: no records")
    fmt = record_format(spec, records.columns)
    tokenizer = load_tokenizer(recipe.teacher, "teacher")
    if fmt == "messages" and not getattr(tokenizer, "chat_template", None):
        raise UserError("chat prompts (data.format=messages) need a teacher tokenizer with a chat_template")
    backend = resolve_backend(g.backend)
    eos = eos_ids(tokenizer, recipe.teacher)
    identity = build_identity(recipe, tokenizer, backend, len(records), eos)
    build_sha = bind_output(out, identity)
    num_chunks = -(-len(records) // g.chunk_prompts)
    workers, me = num_tasks * world, task * world + rank
    mine = [c for c in range(me, num_chunks, workers)]
    todo = [c for c in mine if not chunk_done(out, c, build_sha, check_sha=True)]
    started, written = time.monotonic(), 0
    if todo:
        engine = load_engine(recipe, backend, tokenizer, eos)
        fault = faults.generate_fault()
        for c in tqdm(todo, desc=f"generate[task {task}/{num_tasks} rank {rank}/{world}]", unit="chunk",
                      disable=not progress):
            lines, meta = _chunk(records, c, engine, tokenizer, recipe, fmt)
            write_chunk(out, c, lines, meta, build_sha,
                        fault=None if fault is None else lambda tmp, n=written + 1: fault(n, tmp))
            written += 1
    manifest = {"format": FORMAT, "identity": identity, "teacher": recipe.teacher.name_or_path,
                "prompts": g.prompts, "sampling": identity["sampling"], "backend": backend,
                "num_chunks": num_chunks, "created_at": time.time()}
    merged = merge(out, num_chunks, build_sha, manifest)
    return {"chunks": len(mine), "written": written, "complete_before": len(mine) - len(todo), "merged": merged,
            "output_dir": str(out), "seconds": time.monotonic() - started}
