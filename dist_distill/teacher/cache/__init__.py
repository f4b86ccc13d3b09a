"""Teacher top-k logit cache: build it offline once (resumable, distributed), read it during training.

Modules: format (files on disk), codec (row coding; _codec_native.c its C twin), writer (building),
reader (memory-mapped reading, verify, info). The command is dist_distill.cache (dd-cache).

Format "dd-topk-v2":

  <cache_dir>/manifest.json        what was cached and from what; written last, atomically, by rank 0
                                   once every shard exists (fingerprints, codec, shard list + sha256)
  <cache_dir>/shard-00000.ddc      samples [start, stop) of the dataset (binary, see below)
  <cache_dir>/shard-00000.json     sidecar: the shard's range, size, sha256, error stats and the identity
                                   of the build that wrote it (teacher by content, tokenizer, data,
                                   targets, settings); written after the shard file, it marks the
                                   shard complete -- for that build only

Per token the teacher runs over the FULL real vocabulary at T=1; the cache keeps its k largest
logits (ids in storage order, values in the same order), normalised as ``logp = z - lse`` with the
full-vocabulary logsumexp ``lse`` (take top-k after the full logsumexp), and ``lse``. Rows are
stored only where the student has a loss (``targets != IGNORE_INDEX``, the answer tokens);
each sample records which of its L positions have a row, and that layout is fingerprinted
(``dataset.targets_sha256``). Rows align with the student's tokens by (sample index, position):
same tokenizer, same packing, same sequence length.

Codec (codec.py): ids sorted and gap-coded in bit-packed blocks of 8 -- as
token ids, or, when that is smaller, as ranks in the shard's own id frequency order (sections
``id_order_*``: the D distinct ids of the shard by frequency class, gap-coded; the header's
``id_space`` is D);
values either "lossless" (fp32, or bf16 when exact) or "kl" (default): per-row quantised with
the EXACT KL between the renormalised top-k distributions bounded by ``--max-kl`` (1e-3 nats).
Bytes per token (V=151936, measured by benchmarks/bench_cache.py, docs/benchmarks.md):
see the "Teacher cache" section there; ids dominate at large k.

Shard file ``.ddc``: b"DDTOPK\\x02\\x00", u64 length of a JSON header, the header (sections:
name -> [offset, nbytes, dtype, shape]), then 64-byte aligned sections: ``row_mask`` (packed
bits [n, ceil(L/8)]), ``row_start``/``a_start``/``b_start`` (int64 [n+1]: first row and byte
offsets of each sample), ``header`` (per-row struct), ``widths`` (id width nibbles),
``stream_a`` (ids and coarse values), ``stream_b`` (refinements), ``values`` (lossless),
``id_order_sizes``/``id_order_widths``/``id_order_blocks`` (optional, see above), ``sample_crc``
(uint32 [n]: CRC32 of each sample's bytes in every section, verified on every read).

Integrity: a build into a directory holding shards or a manifest of another build is refused,
naming what differs (``--start-over`` moves it aside); resume counts an existing shard done only
if its sidecar records this build and its sha256 matches; training compares the manifest with
the recipe's teacher (content fingerprint: models.loading.model_fingerprint), tokenizer and data,
and every read checks the sample's CRC32.

Building (writer.py): the teacher runs through the teacher scorer (dist_distill.teacher.scorer:
top-k and logsumexp chunk by chunk, vocab-parallel with ``teacher_source.tp_size`` > 1), so no
``[tokens, V]`` logits exist beyond one chunk. Array tasks (``--shard-index / --num-shards``)
split whole shards (shard s belongs to task ``s % num_shards``); inside a task the data-parallel
teacher replicas split every shard by teacher batches and one writer per shard (rotating)
codes it (writer.BuildLayout). Each shard is written to a temporary name, fsynced and renamed;
the sidecar follows the same way. A re-run skips shards whose sidecar and file (of the
recorded size) exist and redoes the others; a per-shard lock keeps two writers apart. Outputs
are deterministic: a resumed, multi-rank or tensor-parallel build is byte-identical to an
uninterrupted single-process build (TP to the teacher's float rounding: bit-identical for a
float64 teacher, tested).
"""
