"""Teacher cache codec: bytes per token, write and read speed, reconstruction error.

Synthetic teacher-like rows at the Qwen2.5 vocabulary (V=151936), and optionally a real
teacher (the tiny world's quickstart teacher) run through `dd-cache build`.

Synthetic rows. Values: the logit of the token of rank r is ``-a log r + N(0, 0.5)`` with a
per-token exponent ``a`` drawn uniformly in [--a-min, --a-max] (benchmarks/topk_error.py's
model: a=1 is a flat, high-entropy token, a=2.5 a peaked one); ranks 1..4096 are drawn, the
rest of the vocabulary enters the logsumexp analytically (``e^(s^2/2) sum_{r>4096} r^-a``).
Ids: which vocabulary ids hold the top-k. "uniform" draws them uniformly (the worst case for
the id code: a random 128-subset of 151936 ids carries 186 bytes of information); "zipfS"
draws them without replacement with probability proportional to ``(id + 1)^-S``, a model of
BPE vocabularies whose ids are roughly in merge (frequency) order, where frequent tokens
are the usual candidates; "zipfS-shuffled" gives the same popularity to a random permutation
of the vocabulary (frequent tokens at arbitrary ids: what the per-shard frequency-rank coding
of ids is for).

Each configuration codes --tokens rows into one shard (all positions of samples of
--seq-len tokens hold a row), writes it, then reads random batches of --batch samples
through ``TeacherCache.rows`` (decode only) and ``TeacherCache.fetch`` (decode + [B, L, k]
tensors). Bytes per token count the whole shard file. Times are CPU seconds of this single
process (``time.process_time``; medians of --reps reads), which other jobs on a shared
machine disturb less than wall-clock time.

With --encode-speed it times only the row encoder instead (`codec.encode_rows`, the native C
encoder and the numpy reference side by side on the same rows, CPU seconds of the encoding
thread, medians of --reps) and checks that both produce the same bytes (headers, id widths,
streams, row lengths, stored values and the KL / error stats).

    .venv/bin/python benchmarks/bench_cache.py                      # synthetic, k=64 and 128
    .venv/bin/python benchmarks/bench_cache.py --encode-speed --tokens 32768 --reps 3 --ids uniform
    .venv/bin/python benchmarks/bench_cache.py --teacher runs/quickstart/teacher/model
    .venv/bin/python benchmarks/bench_cache.py --ids "" --ngram-corpus a.txt,b.txt   # real-text bigram teacher
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dist_distill.teacher.cache import codec
from dist_distill.teacher.cache import reader as cache_reader
from dist_distill.teacher.cache import writer as cache_mod
from dist_distill.teacher.cache.codec import topk_kl

DISTILLKIT_K128 = 330  # bytes/token, the best published design at k=128, V~128k-152k (83% of it ids)
HEAD = 4096


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=151936, help="vocabulary size V (default 151936, Qwen2.5)")
    ap.add_argument("--ks", default="64,128", help="comma-separated k values (default 64,128)")
    ap.add_argument("--ids", default="uniform,zipf1.0,zipf1.2,zipf1.0-shuffled",
                    help="id models (default uniform,zipf1.0,zipf1.2,zipf1.0-shuffled)")
    ap.add_argument("--modes", default="kl,lossless", help="cache modes (default kl,lossless)")
    ap.add_argument("--tokens", type=int, default=65536, help="rows per configuration (default 65536)")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per sample (default 512)")
    ap.add_argument("--batch", type=int, default=32, help="samples per read (default 32)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions (default 5)")
    ap.add_argument("--max-kl", type=float, default=1e-3, help="mode kl bound (default 1e-3)")
    ap.add_argument("--a-min", type=float, default=1.0, help="smallest Zipf exponent of the logits (default 1.0)")
    ap.add_argument("--a-max", type=float, default=2.5, help="largest Zipf exponent of the logits (default 2.5)")
    ap.add_argument("--teacher", default=None, help="also cache a real teacher: model dir for configs/tiny/distill.yaml")
    ap.add_argument("--world", default="runs/quickstart/world", help="tiny world of --teacher (default runs/quickstart/world)")
    ap.add_argument("--ngram-corpus", default=None,
                    help="comma-separated text files: also measure a bigram teacher of this real text over a BPE "
                         "vocabulary trained on it (up to --vocab tokens; benchmarks/ngram_teacher.py)")
    ap.add_argument("--decoder", choices=["auto", "numpy"], default="auto",
                    help="numpy: read with the numpy decoder even where the C decoder is built (and write with "
                         "the numpy encoder: the write column) (default auto)")
    ap.add_argument("--encode-speed", action="store_true",
                    help="only time codec.encode_rows, native C encoder vs numpy reference, per k, id model and mode, "
                         "and check that they agree bit for bit")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return ap.parse_args()


def synthetic_values(n: int, k: int, vocab: int, a_min: float, a_max: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """Top-k raw logits [n, k] and full-vocabulary logsumexp [n] of Zipf-shaped rows (see the module docstring)."""
    a = rng.uniform(a_min, a_max, n)
    grid = np.linspace(a_min, a_max, 257)
    tail_ranks = np.arange(HEAD + 1, vocab + 1, dtype=np.float64)
    # E[sum over the tail of exp(-a log r + N(0, 0.5^2))] = e^(0.125) sum r^-a, tabulated over a
    tail = np.interp(a, grid, [np.log(np.exp(0.125) * np.sum(tail_ranks ** -x)) for x in grid]) if vocab > HEAD else None
    log_ranks = np.log(np.arange(1, min(HEAD, vocab) + 1))
    top, lse = np.empty((n, k), np.float32), np.empty(n)
    for i in range(0, n, 2048):
        j = min(i + 2048, n)
        head = -a[i:j, None] * log_ranks + 0.5 * rng.standard_normal((j - i, len(log_ranks)))
        top[i:j] = -np.sort(-head, axis=1)[:, :k]
        m = head.max(axis=1, keepdims=True)
        lse[i:j] = (m + np.log(np.exp(head - m).sum(axis=1, keepdims=True)))[:, 0]
    if tail is not None:
        lse = np.logaddexp(lse, tail)
    return top, lse.astype(np.float32)


def synthetic_ids(n: int, k: int, vocab: int, model: str, rng) -> np.ndarray:
    """Top-k ids [n, k]: uniform, or Zipf(S) popularity over the id order, without replacement;
    "zipfS-shuffled": the same popularity over a random permutation of the vocabulary (frequent
    tokens with arbitrary ids)."""
    if model.endswith("-shuffled"):
        perm = np.random.default_rng(12345).permutation(vocab)
        return perm[synthetic_ids(n, k, vocab, model.removesuffix("-shuffled"), rng)]
    if model == "uniform":
        cdf = np.arange(1, vocab + 1, dtype=np.float64) / vocab
    else:
        cdf = np.cumsum(np.arange(1, vocab + 1, dtype=np.float64) ** -float(model.removeprefix("zipf")))
        cdf /= cdf[-1]
    out = np.empty((n, k), dtype=np.int64)
    for i in range(n):  # sequential draws with replacement, first k distinct = sampling without replacement
        got = np.zeros(0, dtype=np.int64)
        while len(got) < k:
            draws = np.concatenate([got, np.minimum(np.searchsorted(cdf, rng.random(4 * k)), vocab - 1)])
            _, first = np.unique(draws, return_index=True)
            got = draws[np.sort(first)]
        out[i] = got[:k]
    return out


def median_time(fn, reps: int) -> float:
    """Median CPU time of this process (robust on a shared machine; the reader is single-threaded numpy)."""
    fn()
    times = []
    for _ in range(reps):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times)


def bench_config(vocab, k, ids_model, mode, args, rng, tmp: Path) -> dict:
    rows = args.tokens // args.seq_len * args.seq_len
    z, lse = synthetic_values(rows, k, vocab, args.a_min, args.a_max, rng)
    return bench_rows(synthetic_ids(rows, k, vocab, ids_model, rng), z, lse, vocab, ids_model, mode, args, rng, tmp)


def bench_rows(ids, z, lse, vocab, label, mode, args, rng, tmp: Path) -> dict:
    """Code rows (ids [R, k], raw logits [R, k], lse [R]; R a multiple of --seq-len) into one shard, read it back."""
    k = ids.shape[1]
    n_samples = len(ids) // args.seq_len
    rows = n_samples * args.seq_len
    ids, z, lse = ids[:rows], z[:rows], lse[:rows]
    ids_model = label.replace(" ", "-")
    mask = np.ones((n_samples, args.seq_len), dtype=bool)
    t = time.process_time()
    # the tail mass at T=1 from the synthetic rows' own lse (4 bytes per row, whatever its value)
    top_mass = np.logaddexp.reduce(z.astype(np.float64) - lse.astype(np.float64)[:, None], axis=1)
    tails = np.log(np.maximum(-np.expm1(np.minimum(top_mass, 0.0)), 1e-38))[:, None].astype(np.float32)
    parts, _, stats = cache_mod.encode_shard(ids, z, lse, tails, mask, vocab, mode, args.max_kl)
    write_s = time.process_time() - t
    cache_dir = tmp / f"{ids_model}-{k}-{mode}"
    cache_dir.mkdir(parents=True)
    cache_mod.write_shard(cache_dir, 0, 0, n_samples, parts, stats)
    manifest = {"format": cache_mod.FORMAT, "k": k, "seq_len": args.seq_len, "vocab_size": vocab,
                "num_samples": n_samples, "samples_per_shard": n_samples, "codec": {"mode": mode},
                "tail_temperatures": [1.0]}
    cache_mod.finalize_cache(cache_dir, manifest)
    cache = cache_reader.TeacherCache(cache_dir)
    size = cache.manifest["shards"][0]["bytes"]
    batches = [rng.integers(0, n_samples, args.batch) for _ in range(64)]
    it = iter(range(10 ** 9))
    decode_s = median_time(lambda: cache.rows(batches[next(it) % 64]), args.reps)
    fetch_s = median_time(lambda: cache.fetch(torch.from_numpy(batches[next(it) % 64])), args.reps)
    real_check = cache_reader._Shard.check_samples  # the same reads without the per-sample CRC32: its cost
    cache_reader._Shard.check_samples = lambda self, local: None
    try:
        fetch_nocrc_s = median_time(lambda: cache.fetch(torch.from_numpy(batches[next(it) % 64])), args.reps)
    finally:
        cache_reader._Shard.check_samples = real_check
    per_read = args.batch * args.seq_len
    # error measured on what a reader gets back, against the exact rows
    sample = np.arange(min(n_samples, 16))
    got_ids, got_z, got_lse, _, _ = cache.rows(sample)
    by_id = np.argsort(got_ids, axis=1)  # the reader returns rows in storage order
    got_ids, got_z = np.take_along_axis(got_ids, by_id, 1), np.take_along_axis(got_z, by_id, 1)
    n_check = len(got_ids)
    order = np.argsort(ids[:n_check], axis=1)
    exact = np.take_along_axis(z[:n_check], order, 1) - lse[:n_check, None]
    logp = got_z - got_lse[:, None]
    assert np.array_equal(got_ids, np.take_along_axis(ids[:n_check], order, 1))
    return {"k": k, "ids": ids_model, "mode": mode, "bytes_per_token": size / rows,
            "write_tok_s": rows / write_s, "decode_tok_s": per_read / decode_s, "fetch_tok_s": per_read / fetch_s,
            "fetch_nocrc_tok_s": per_read / fetch_nocrc_s, "max_kl": stats["max_kl"], "mean_kl": stats["mean_kl"],
            "max_abs_err": stats["max_abs_logp_err"],
            "checked_max_kl": float(topk_kl(exact, logp).max()),
            "checked_max_rkl": float(topk_kl(logp, exact).max()),  # reverse: KL(stored || exact)
            "checked_max_abs_err": float(np.abs(exact - logp).max()),
            "dense_ratio": 2 * vocab * rows / size, "raw_ratio": (k * 6 + 4) * rows / size}


def same_encoding(a: dict, b: dict) -> bool:
    """Whether two encode_rows results are equal bit for bit (every array's dtype, shape and bytes; stats included)."""
    if list(a) != list(b):
        return False
    for key, x in a.items():
        y = b[key]
        if isinstance(x, str):
            if x != y:
                return False
        elif isinstance(x, dict):
            if list(x) != list(y) or any(x[s].dtype != y[s].dtype or x[s].tobytes() != y[s].tobytes() for s in x):
                return False
        elif x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            return False
    return True


def bench_encode(args, rng) -> None:
    """Encode speed of codec.encode_rows, native C encoder and numpy reference alternating on the same rows."""
    native_built = codec._codec_native is not None and hasattr(codec._codec_native, "encode")
    print(f"encode_rows: V={args.vocab} rows/config={args.tokens} reps={args.reps} max_kl={args.max_kl} "
          f"a=[{args.a_min},{args.a_max}] numpy={np.__version__}; rows/s = rows / CPU seconds of the encoding thread "
          f"(time.thread_time, median); native C encoder {'built' if native_built else 'NOT built'}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("| k | ids | mode | numpy rows/s | native rows/s | speed-up | native, fastest rep | native == numpy (bit for bit) |")
    print("|---|---|---|---|---|---|---|---|")
    checked, mismatched = 0, []
    for k in (int(x) for x in args.ks.split(",")):
        for ids_model in filter(None, args.ids.split(",")):
            z, lse = synthetic_values(args.tokens, k, args.vocab, args.a_min, args.a_max, rng)
            ids = synthetic_ids(args.tokens, k, args.vocab, ids_model, rng)
            for mode in args.modes.split(","):
                times = {False: [], True: []}
                out = {}
                for _ in range(args.reps):
                    for native in ((False, True) if native_built else (False,)):
                        t = time.thread_time()
                        out[native] = codec.encode_rows(ids, z, lse, args.vocab, mode, args.max_kl, native=native)
                        times[native].append(time.thread_time() - t)
                speed = {nat: args.tokens / statistics.median(ts) for nat, ts in times.items() if ts}
                equal = same_encoding(out[False], out[True]) if native_built else None
                if native_built:
                    checked += 1
                    if not equal:
                        mismatched.append(f"k={k} ids={ids_model} mode={mode}")
                best = args.tokens / min(times[True]) if native_built else 0.0
                print(f"| {k} | {ids_model} | {mode} | {speed[False]:,.0f} | "
                      + (f"{speed[True]:,.0f} | {speed[True] / speed[False]:.1f}x | {best:,.0f} | "
                         f"{'yes' if equal else 'NO'} |" if native_built else "- | - | - | - |"), flush=True)
    if native_built:
        print(f"bit-equality, native vs numpy encoder: {checked - len(mismatched)} of {checked} configurations equal"
              + (f"; DIFFERENT: {', '.join(mismatched)}" if mismatched else "")
              + f" (load average at the end {os.getloadavg()[0]:.1f})")


def bench_teacher(args, tmp: Path) -> list[dict]:
    """Build caches of the tiny world's training data with a real teacher (lossless and kl), report size and error."""
    from dist_distill.recipe import load_recipe

    world = Path(args.world)
    out = []
    for mode in ("lossless", "kl"):
        sets = [f"teacher.name_or_path={args.teacher}", f"student.name_or_path={world}/student_init",
                f"data.train={world}/data/student_train.jsonl", f"teacher_source.cache_dir={tmp}/real-{mode}"]
        recipe = load_recipe("configs/tiny/distill.yaml", sets)
        t = time.perf_counter()
        manifest = cache_mod.build_cache(recipe, samples_per_shard=256, progress=False, mode=mode, max_kl=args.max_kl)
        cache_mod.finalize_cache(recipe.teacher_source.cache_dir, manifest)
        took = time.perf_counter() - t
        cache = cache_reader.TeacherCache(recipe.teacher_source.cache_dir)
        m = cache.manifest
        size = sum(s["bytes"] for s in m["shards"])
        out.append({"mode": mode, "k": m["k"], "vocab": m["vocab_size"], "rows": m["rows"], "bytes_per_token": size / m["rows"],
                    "build_s": took, **m["error"]})
    return out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    if args.encode_speed:
        bench_encode(args, rng)
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    if args.decoder == "numpy":
        cache_mod.codec._codec_native = None
    try:
        native = "native C" if cache_mod.codec._codec_native is not None else "numpy (C decoder not built)"
        print(f"decoder={native} V={args.vocab} tokens/config={args.tokens} seq_len={args.seq_len} batch={args.batch} samples "
              f"({args.batch * args.seq_len} tokens) reps={args.reps} max_kl={args.max_kl} a=[{args.a_min},{args.a_max}] "
              f"torch={torch.__version__} numpy={np.__version__} threads={torch.get_num_threads()}")
        print("| k | ids | mode | bytes/token | vs dense bf16 | vs raw top-k (bf16+int32) | write tok/s | "
              "decode tok/s | fetch tok/s | fetch tok/s without CRC | max top-k KL | mean top-k KL | max reverse top-k KL "
              "| max abs logp err |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for k in (int(x) for x in args.ks.split(",")):
            for ids_model in filter(None, args.ids.split(",")):  # --ids "" : only the n-gram teacher
                for mode in args.modes.split(","):
                    r = bench_config(args.vocab, k, ids_model, mode, args, rng, tmp)
                    print(f"| {k} | {ids_model} | {mode} | {r['bytes_per_token']:.1f} | {r['dense_ratio']:.0f}x | "
                          f"{r['raw_ratio']:.2f}x | {r['write_tok_s']:,.0f} | {r['decode_tok_s']:,.0f} | "
                          f"{r['fetch_tok_s']:,.0f} | {r['fetch_nocrc_tok_s']:,.0f} | {r['checked_max_kl']:.2e} | "
                          f"{r['mean_kl']:.2e} | "
                          f"{r['checked_max_rkl']:.2e} | {r['checked_max_abs_err']:.3f} |", flush=True)
        if args.ngram_corpus:
            from ngram_teacher import corpus_rows

            windows = args.tokens // args.seq_len
            for k in (int(x) for x in args.ks.split(",")):
                ids, z, lse, vocab, n_tok = corpus_rows(args.ngram_corpus.split(","), args.vocab, k, windows,
                                                        args.seq_len, rng)
                for mode in args.modes.split(","):
                    r = bench_rows(ids, z, lse, vocab, f"ngram V={vocab}", mode, args, rng, tmp)
                    print(f"| {k} | bigram teacher, V={vocab}, {n_tok / 1e6:.1f}M corpus tokens | {mode} | "
                          f"{r['bytes_per_token']:.1f} | {r['dense_ratio']:.0f}x | "
                          f"{r['raw_ratio']:.2f}x | {r['write_tok_s']:,.0f} | {r['decode_tok_s']:,.0f} | "
                          f"{r['fetch_tok_s']:,.0f} | {r['fetch_nocrc_tok_s']:,.0f} | {r['checked_max_kl']:.2e} | "
                          f"{r['mean_kl']:.2e} | "
                          f"{r['checked_max_rkl']:.2e} | {r['checked_max_abs_err']:.3f} |", flush=True)
        if args.teacher:
            print("\nreal teacher:", args.teacher)
            for r in bench_teacher(args, tmp):
                print(json.dumps(r))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
