"""Teacher top-k logit cache: build it offline once, read it during training.

Format "dd-topk-v0" (a simple, honest format; compact encodings come later):

  <cache_dir>/manifest.json          what was cached and from what (written last, atomically)
  <cache_dir>/shard-00000.safetensors  topk_ids int32 [n, L, k], topk_logits float32 [n, L, k],
                                        lse float32 [n, L] for samples [start, stop)
  <cache_dir>/shard-00000.json       the shard's sample range and sha256, written after the shard

Per token the cache keeps the teacher's k largest RAW logits over the real vocabulary
(T = 1) and the full-vocabulary logsumexp in float32, so top-k probabilities
``exp(z - lse)`` and the tail mass are exact. Positions align with the student's
tokens: row (i, t) is the teacher's prediction from position t of sample i.

A shard counts as done only when its .json exists; shards and sidecars are written to a
temporary name, fsynced and renamed, so a killed build leaves no file that looks complete
and a re-run redoes only the missing shards. Work splits by rank (torchrun) and by
``--shard-index/--num-shards`` (SLURM array): shard s belongs to worker s % workers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from .errors import UserError, run_cli

FORMAT = "dd-topk-v0"
MANIFEST = "manifest.json"


def _fsync_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically: temporary file, fsync, rename, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


@torch.no_grad()
def teacher_topk(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int, vocab_size: int):
    """Teacher top-k over the real vocabulary: (ids int32 [B, L, k], logits fp32 [B, L, k], lse fp32 [B, L])."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[..., :vocab_size].float()
    lse = torch.logsumexp(logits, dim=-1)
    values, ids = logits.topk(k, dim=-1)
    return ids.to(torch.int32), values, lse


def build_shard(model, data, start: int, stop: int, k: int, vocab_size: int, batch_size: int) -> dict:
    """Teacher signal for samples [start, stop) as safetensors tensors."""
    parts = [teacher_topk(model, data.input_ids[i:min(i + batch_size, stop)],
                          data.attention_mask[i:min(i + batch_size, stop)], k, vocab_size)
             for i in range(start, stop, batch_size)]
    return {"topk_ids": torch.cat([p[0] for p in parts]).contiguous(),
            "topk_logits": torch.cat([p[1] for p in parts]).contiguous(),
            "lse": torch.cat([p[2] for p in parts]).contiguous()}


def write_shard(cache_dir: Path, index: int, start: int, stop: int, tensors: dict) -> None:
    """Publish a shard: the tensors file first, then the sidecar that marks it complete."""
    from safetensors.torch import save

    payload = save(tensors)  # no metadata: safetensors writes its map in no fixed order
    _fsync_write(cache_dir / f"{shard_name(index)}.safetensors", payload)
    sidecar = {"index": index, "start": start, "stop": stop, "sha256": hashlib.sha256(payload).hexdigest()}
    _fsync_write(cache_dir / f"{shard_name(index)}.json", json.dumps(sidecar).encode())


def shard_done(cache_dir: Path, index: int) -> bool:
    return (cache_dir / f"{shard_name(index)}.json").is_file() and \
        (cache_dir / f"{shard_name(index)}.safetensors").is_file()


def expected_manifest(recipe, tokenizer, data, vocab_size: int) -> dict:
    """The manifest fields that a cache for this recipe must have (everything but the shard list)."""
    from .models import model_fingerprint, tokenizer_fingerprint

    return {
        "format": FORMAT, "k": recipe.teacher_source.top_k, "seq_len": recipe.data.max_seq_len,
        "vocab_size": vocab_size, "num_samples": len(data),
        "teacher": model_fingerprint(recipe.teacher),
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "dataset": {"source": data.source, "max_samples": recipe.data.max_samples,
                    "token_ids_sha256": data.fingerprint},
        "dtypes": {"topk_ids": "int32", "topk_logits": "float32", "lse": "float32"},
    }


def build_cache(recipe, *, shard_index: int = 0, num_shards: int = 1, samples_per_shard: int = 4096,
                rank: int = 0, world_size: int = 1, progress: bool = True) -> dict:
    """Run the teacher over the recipe's training data and write this worker's missing shards.

    Returns the manifest without its shard list; `finalize_cache` completes it.
    """
    from tqdm import tqdm

    from .data import load_tokenized
    from .models import load_model, load_tokenizer, tokenizer_fingerprint

    if recipe.teacher_source.cache_dir is None:
        raise UserError("teacher_source.cache_dir is not set: where should the cache go?")
    cache_dir = Path(recipe.teacher_source.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(recipe.teacher, "teacher")
    student_tok = load_tokenizer(recipe.student, "student")
    if tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(student_tok):
        raise UserError(f"teacher {recipe.teacher.name_or_path} and student {recipe.student.name_or_path} use "
                        "different tokenizers: token-level logit distillation compares logits of the same "
                        "token ids and is invalid across vocabularies. Use a student with the teacher's "
                        "tokenizer, or a cross-tokenizer strategy (sequence-level KD on teacher text)")
    data = load_tokenized(recipe.data.train, tokenizer, recipe.data, recipe.data.max_samples)
    vocab_size = len(tokenizer)
    manifest = expected_manifest(recipe, tokenizer, data, vocab_size)
    manifest["samples_per_shard"] = samples_per_shard
    num_total = (len(data) + samples_per_shard - 1) // samples_per_shard
    workers, worker = num_shards * world_size, shard_index * world_size + rank
    mine = [s for s in range(num_total) if s % workers == worker and not shard_done(cache_dir, s)]
    if not mine:
        return manifest
    model = load_model(recipe.teacher, "teacher").eval()
    if model.config.vocab_size < vocab_size:
        raise UserError(f"teacher vocab_size={model.config.vocab_size} is smaller than its tokenizer's {vocab_size}")
    seq_len = data.input_ids.shape[1]
    tokens = sum(min(samples_per_shard, len(data) - s * samples_per_shard) for s in mine) * seq_len
    bar = tqdm(total=tokens, unit="tok", unit_scale=True, desc=f"cache[{worker}]", disable=not progress)
    for s in mine:
        start, stop = s * samples_per_shard, min((s + 1) * samples_per_shard, len(data))
        tensors = build_shard(model, data, start, stop, manifest["k"], vocab_size, recipe.teacher_source.batch_size)
        write_shard(cache_dir, s, start, stop, tensors)
        bar.update((stop - start) * seq_len)
    bar.close()
    return manifest


def finalize_cache(cache_dir: str | Path, manifest: dict) -> bool:
    """Write manifest.json (with every shard's range and sha256) once all shards exist; True if written."""
    cache_dir = Path(cache_dir)
    per_shard = manifest["samples_per_shard"]
    num_total = (manifest["num_samples"] + per_shard - 1) // per_shard
    if not all(shard_done(cache_dir, s) for s in range(num_total)):
        return False
    shards = [json.loads((cache_dir / f"{shard_name(s)}.json").read_text()) for s in range(num_total)]
    manifest = dict(manifest, shards=[{"file": f"{shard_name(x['index'])}.safetensors", "start": x["start"],
                                       "stop": x["stop"], "sha256": x["sha256"]} for x in shards])
    _fsync_write(cache_dir / MANIFEST, json.dumps(manifest, indent=2).encode())
    return True


class TeacherCache:
    """Random access to a built cache by sample index (shards memory-mapped through safetensors)."""

    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir)
        path = self.dir / MANIFEST
        if not path.is_file():
            raise UserError(f"teacher cache {self.dir}: no {MANIFEST} (the cache is missing or its build did not "
                            "finish; run dd-cache with this recipe)")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise UserError(f"teacher cache {path}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        self._handles: dict[int, object] = {}
        self._starts = [s["start"] for s in self.manifest["shards"]]

    def check_matches(self, expected: dict) -> None:
        """Refuse a cache built for another tokenizer, sequence length, dataset or a smaller k."""
        m = self.manifest
        checks = [
            ("tokenizer", m["tokenizer_sha256"], expected["tokenizer_sha256"]),
            ("sequence length (data.max_seq_len)", m["seq_len"], expected["seq_len"]),
            ("vocabulary size", m["vocab_size"], expected["vocab_size"]),
            ("dataset token ids", m["dataset"]["token_ids_sha256"], expected["dataset"]["token_ids_sha256"]),
        ]
        for what, have, want in checks:
            if have != want:
                raise UserError(f"teacher cache {self.dir} was built for another {what}: the cache has {have!r}, "
                                f"this recipe needs {want!r}. Rebuild the cache with dd-cache for this recipe, "
                                "or point teacher_source.cache_dir at the matching cache")
        if m["k"] < expected["k"]:
            raise UserError(f"teacher cache {self.dir} keeps k={m['k']} logits per token, the recipe asks "
                            f"teacher_source.top_k={expected['k']}")

    def _shard(self, index: int):
        if index not in self._handles:
            from safetensors import safe_open

            file = self.dir / self.manifest["shards"][index]["file"]
            if not file.is_file():
                raise UserError(f"teacher cache {self.dir}: shard {file.name} listed in the manifest is missing")
            self._handles[index] = safe_open(str(file), framework="pt")
        return self._handles[index]

    def fetch(self, indices: torch.Tensor, k: int | None = None):
        """Teacher signal for samples `indices` (int64 [B]): ids int64 [B, L, k], logits fp32 [B, L, k], lse fp32 [B, L]."""
        import bisect

        k = k or self.manifest["k"]
        ids, logits, lse = [], [], []
        for i in indices.tolist():
            s = bisect.bisect_right(self._starts, i) - 1
            row = i - self._starts[s]
            handle = self._shard(s)
            ids.append(handle.get_slice("topk_ids")[row:row + 1][..., :k])
            logits.append(handle.get_slice("topk_logits")[row:row + 1][..., :k])
            lse.append(handle.get_slice("lse")[row:row + 1])
        return torch.cat(ids).long(), torch.cat(logits), torch.cat(lse)


def _cmd_build(args) -> int:
    from .distributed import init_from_env
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    rank, world = init_from_env(backend="gloo")
    started = time.time()
    manifest = build_cache(recipe, shard_index=args.shard_index, num_shards=args.num_shards,
                           samples_per_shard=args.samples_per_shard, rank=rank, world_size=world,
                           progress=rank == 0)
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        where = recipe.teacher_source.cache_dir
        if finalize_cache(where, manifest):
            print(f"teacher cache complete: {where} ({time.time() - started:.1f}s)\n" + info_text(where))
        else:
            print(f"this worker's shards are written to {where}; the manifest is written when all shards exist")
    return 0


def info_text(cache_dir: str | Path) -> str:
    """Summary of a cache: k, samples, tokens, bytes per token, compression vs dense bf16 logits."""
    cache = TeacherCache(cache_dir)
    m = cache.manifest
    tokens = m["num_samples"] * m["seq_len"]
    size = sum((cache.dir / s["file"]).stat().st_size for s in m["shards"])
    dense = 2 * m["vocab_size"]
    return (f"format {m['format']}  k={m['k']}  samples={m['num_samples']}  tokens={tokens}  "
            f"vocab={m['vocab_size']}\nbytes/token={size / tokens:.1f}  (dense bf16 logits: {dense} bytes/token, "
            f"ratio {dense * tokens / size:.2f}x)")


def _cmd_info(args) -> int:
    print(info_text(args.cache_dir))
    return 0


def _cmd_verify(args) -> int:
    cache = TeacherCache(args.cache_dir)
    for shard in cache.manifest["shards"]:
        path = cache.dir / shard["file"]
        if not path.is_file():
            raise UserError(f"teacher cache {cache.dir}: shard {shard['file']} is missing")
        if sha256_file(path) != shard["sha256"]:
            raise UserError(f"teacher cache {cache.dir}: shard {shard['file']} fails its sha256 check "
                            "(corrupted or truncated); delete it and its .json and re-run dd-cache build")
    print(f"ok: {len(cache.manifest['shards'])} shards verified in {cache.dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dd-cache", description="Build, inspect and verify a teacher top-k logit cache.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="run the teacher over the recipe's training data and write the cache")
    build.add_argument("recipe", help="YAML recipe (teacher, data, teacher_source.cache_dir/top_k)")
    build.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe field, e.g. --set teacher_source.top_k=32 (repeatable)")
    build.add_argument("--shard-index", type=int, default=0, help="this task's index in a SLURM array (0-based)")
    build.add_argument("--num-shards", type=int, default=1, help="number of tasks sharing the work")
    build.add_argument("--samples-per-shard", type=int, default=4096, help="samples per cache shard file")
    build.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    build.set_defaults(func=_cmd_build)
    info = sub.add_parser("info", help="print k, tokens and bytes per token of a cache")
    info.add_argument("cache_dir", help="cache directory")
    info.set_defaults(func=_cmd_info)
    verify = sub.add_parser("verify", help="check the manifest and every shard checksum")
    verify.add_argument("cache_dir", help="cache directory")
    verify.set_defaults(func=_cmd_verify)
    args = parser.parse_args(argv)
    if getattr(args, "num_shards", 1) < 1 or not 0 <= getattr(args, "shard_index", 0) < getattr(args, "num_shards", 1):
        raise UserError(f"--shard-index must lie in [0, --num-shards); got {args.shard_index} of {args.num_shards}")
    return args.func(args)


def cli() -> None:
    """Console-script entry point: bad input exits 2 with a one-paragraph message."""
    raise SystemExit(run_cli(main, "dd-cache"))


if __name__ == "__main__":
    cli()
