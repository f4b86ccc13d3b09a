"""Distilling across tokenizers: the refusal of token-level KD, the ULD loss against brute force, and a
2-rank ZeRO-3 run on two tiny models with different local tokenizers, the teacher read from a cache built
with the teacher's tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dist_distill.errors import UserError
from dist_distill.losses.fused_uld import fused_linear_uld_loss
from dist_distill.losses.uld import teacher_sorted_topk, uld_dense, uld_topk
from dist_distill.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/tiny/distill.yaml"


def teacher_tokenizer(world: Path, out: Path, vocab_size: int = 96):
    """Another local BPE tokenizer on the world's texts: digits are NOT split one per token, so the same
    answer takes fewer, different tokens than with the student's tokenizer (tiny_world.train_tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from dist_distill.tiny_world import SPECIAL_TOKENS

    texts = [json.loads(line)["prompt"] + json.loads(line)["answer"]
             for line in (world / "data/teacher_train.jsonl").read_text().splitlines()]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS[::-1]))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(out)
    return fast


@pytest.fixture(scope="module")
def other_teacher(tiny_world, tmp_path_factory) -> Path:
    """A tiny teacher model with its own tokenizer (96 tokens vs the student's 15, digits one per token), sharpened (lm_head x 40)
    so its distributions are far from the untrained student's near-uniform ones."""
    from safetensors.torch import load_file, save_file

    from dist_distill.tiny_world import STUDENT_SHAPE, build_model

    out = tmp_path_factory.mktemp("other_teacher")
    tok = teacher_tokenizer(tiny_world, out)
    build_model(STUDENT_SHAPE, tok, out, seed=11)
    weights = load_file(out / "model.safetensors")
    weights["lm_head.weight"] *= 40.0
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def recipe(world: Path, teacher: Path, out: Path, *sets: str):
    return load_recipe(TINY, [f"student.name_or_path={world}/student_init", f"teacher.name_or_path={teacher}",
                              f"data.train={world}/data/student_train.jsonl", f"teacher_source.cache_dir={out}/cache",
                              f"output.dir={out}", *sets])


# ---- the refusal ----------------------------------------------------------------------------------

@pytest.mark.bad_inputs(4)
def test_token_level_kd_across_tokenizers_is_refused(tiny_world, other_teacher, tmp_path):
    from dist_distill.models.loading import load_tokenizer
    from dist_distill.teacher.sources import cache_tokenizer_or_refuse, same_tokenizer_or_refuse

    r = recipe(tiny_world, other_teacher, tmp_path)
    student = load_tokenizer(r.student, "student")
    with pytest.raises(UserError) as err:
        same_tokenizer_or_refuse(r, student)
    text = str(err.value)
    assert f"teacher {other_teacher} and student {tiny_world}/student_init use different tokenizers (vocabulary of 96 " \
           "tokens (teacher) vs 15 (student))" in text
    assert "Two ways forward: (1) sequence-level KD: train on text the teacher generated (dd-generate) with the " \
           "hard-label loss only (teacher_source.kind=none, loss.ce_weight=1.0); (2) a cross-tokenizer logit loss: " \
           "loss.cross_tokenizer=uld" in text
    # the same vocabulary size with two tokens swapped is another tokenizer too (the vocabulary hash)
    swapped = tmp_path / "swapped"
    shutil.copytree(tiny_world / "student_init", swapped)
    tok = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["3"], vocab["7"] = vocab["7"], vocab["3"]
    (swapped / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(UserError, match=r"different tokenizers \(same vocabulary size 15, but 2 token ids mean "
                                        r"different tokens\): token-level logit distillation .* Two ways forward"):
        same_tokenizer_or_refuse(recipe(tiny_world, swapped, tmp_path), student)
    # a cache built with the teacher's tokenizer, read by a token-level recipe: refused without the teacher's files
    manifest = {"tokenizer_sha256": "ab" * 32, "vocab_size": 96}
    with pytest.raises(UserError, match=r"teacher cache .*cache was built with a tokenizer of 96 tokens, sha256 "
                                        r"abababababab, the student's has 15, .*Two ways forward"):
        cache_tokenizer_or_refuse(r, SimpleNamespace(manifest=manifest, dir=tmp_path / "cache"), student)
    # the ULD recipe is accepted; the teacher group cannot serve it and says so
    uld = recipe(tiny_world, other_teacher, tmp_path, "loss.cross_tokenizer=uld", "loss.ce_weight=1.0")
    same_tokenizer_or_refuse(uld, student)
    cache_tokenizer_or_refuse(uld, SimpleNamespace(manifest=manifest, dir=tmp_path / "cache"), student)
    with pytest.raises(UserError, match="loss.cross_tokenizer=uld reads the teacher from a top-k cache built with the "
                                        "teacher's own tokenizer .* set teacher_source.kind=cache"):
        recipe(tiny_world, other_teacher, tmp_path, "loss.cross_tokenizer=uld", "teacher_source.kind=group")
    with pytest.raises(UserError, match="with a scheduled temperature"):
        recipe(tiny_world, other_teacher, tmp_path, "loss.cross_tokenizer=uld", "loss.temperature_end=3.5")


def test_dry_run_vocabulary_check(tiny_world, other_teacher, tmp_path):
    from dist_distill.planning.dryrun import DryRun, _check_vocab

    arch = SimpleNamespace(vocab=128)  # both padded to the same size: only the tokenizers tell them apart
    run = DryRun("token-level")
    _check_vocab(run, recipe(tiny_world, other_teacher, tmp_path), arch, arch)
    status, what, detail = run.checks[-1]
    assert (status, what) == ("FAIL", "teacher vs student") and "vocabulary of 96 tokens (teacher) vs 15" in detail
    assert "Two ways forward" in detail and "loss.cross_tokenizer=uld" in detail
    run = DryRun("uld")
    _check_vocab(run, recipe(tiny_world, other_teacher, tmp_path, "loss.cross_tokenizer=uld", "loss.ce_weight=1.0",
                             "loss.uld_weight=1.5"), arch, arch)
    status, what, detail = run.checks[-1]
    assert status == "PASS" and detail.startswith("tokenizers differ (vocabulary of 96 tokens (teacher) vs 15 "
                                                  "(student)); the recipe uses sequence-level KD data")
    assert "loss.cross_tokenizer=uld (ULD weight 1.5" in detail


# ---- the loss -------------------------------------------------------------------------------------

def _teacher_rows(logits: torch.Tensor, k: int, temperature: float):
    """A cache row of dense teacher logits [n, V_t]: (top-k raw logits, T=1 lse, log tail mass at T), float64."""
    top = logits.topk(k, dim=1).values
    log_tail = torch.log(-torch.expm1((top / temperature).logsumexp(-1) - (logits / temperature).logsumexp(-1))) \
        if k < logits.shape[1] else torch.full((len(logits),), float("-inf"), dtype=logits.dtype)
    return top, logits.logsumexp(-1), log_tail


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_against_brute_force(temperature):
    """The paper's loss by dense sorts in float64 is the reference: the top-k form equals it when the top-k holds
    the whole teacher vocabulary, and is a lower bound within 2 min(S, r) otherwise; the float32 fused kernel
    (chunked, CE mixed in) matches the float64 autograd loss and gradients, including through the sort."""
    torch.manual_seed(0)
    n, h, vs, vt = 41, 16, 401, 271  # odd shapes; the student's vocabulary larger than the teacher's
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(vs, h, dtype=torch.float64) * 0.7).requires_grad_()
    teacher = torch.randn(n, vt, dtype=torch.float64) * 3
    rows = torch.tensor(sorted(torch.randperm(n)[:29].tolist()))  # the aligned rows (truncation left the others)
    labels = torch.randint(0, vs, (n,))
    for k in (vt, 16):
        top, lse, log_tail = _teacher_rows(teacher[rows], k, temperature)
        p, r = teacher_sorted_topk(top, lse, log_tail, temperature)
        student = hidden[rows] @ weight.T
        dense = uld_dense(student, teacher[rows], temperature)
        ref = uld_topk(student, p, r, temperature)
        if k == vt:
            torch.testing.assert_close(ref, dense, rtol=0, atol=1e-12)
        else:
            s_tail = torch.softmax(student / temperature, -1).sort(-1, descending=True).values[:, k:].sum(-1)
            gap = dense - ref
            assert (gap >= -1e-12).all() and (gap <= 2 * torch.minimum(s_tail, r) + 1e-12).all()
            assert gap.max() > 1e-3  # the bound is not vacuous here: the top-k form does miss part of the loss
        total = 0.4 * torch.nn.functional.cross_entropy(hidden @ weight.T, labels, reduction="sum") + 1.5 * ref.sum()
        g_h, g_w = torch.autograd.grad(total * 3.0, (hidden, weight))  # grad_output != 1
        h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
        loss, parts = fused_linear_uld_loss(h32, w32, labels=labels, teacher_probs=p.float(), teacher_tail=r.float(),
                                            aligned_rows=rows, temperature=temperature, ce_weight=0.4, uld_weight=1.5,
                                            chunk_bytes=4 * vs * 5 * 7, return_parts=True)  # 7 rows a chunk
        (loss * 3.0).backward()
        torch.testing.assert_close(loss.double(), total.detach(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(parts["div"].double(), ref.sum().detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h32.grad.double(), g_h, rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(w32.grad.double(), g_w, rtol=1e-4, atol=2e-5)


def test_uld_properties():
    """Identical distributions give 0 whatever the token ids (a permuted vocabulary is the same shape); a student
    vocabulary smaller than k compares the teacher's extra ranks with zeros."""
    torch.manual_seed(1)
    z = torch.randn(5, 50, dtype=torch.float64)
    perm = torch.randperm(50)
    assert uld_dense(z, z[:, perm]).abs().max() < 1e-12
    p, r = teacher_sorted_topk(*_teacher_rows(z[:, perm], 8, 1.0), 1.0)
    assert uld_topk(z, p, r).abs().max() < 1e-12
    small = torch.randn(5, 6, dtype=torch.float64)
    padded = torch.nn.functional.pad(torch.softmax(small, -1).sort(-1, descending=True).values, (0, 2))
    want = (padded - p).abs().sum(-1) + r
    torch.testing.assert_close(uld_topk(small, p, r), want, rtol=0, atol=1e-12)
    loss = fused_linear_uld_loss(torch.eye(5), small.float().T.contiguous(),  # logits = small
                                 labels=torch.zeros(5, dtype=torch.long), teacher_probs=p.float(),
                                 teacher_tail=r.float(), aligned_rows=torch.arange(5), ce_weight=0.0, uld_weight=1.0)
    torch.testing.assert_close(loss.double(), want.sum(), rtol=1e-5, atol=1e-5)


# ---- pairing and the end-to-end run ---------------------------------------------------------------

def test_align_rows_by_response_position():
    """Sample b pairs its first min(n_s, n_t) response tokens; rows are row-major indices on each side."""
    from dist_distill.teacher.cross_tokenizer import align_rows

    s_rows, t_rows = align_rows(torch.tensor([3, 0, 5, 2]), torch.tensor([2, 4, 5, 0]))
    assert s_rows.tolist() == [0, 1, 3, 4, 5, 6, 7] and t_rows.tolist() == [0, 1, 6, 7, 8, 9, 10]


@pytest.mark.slow
@pytest.mark.bad_inputs(1)
def test_uld_from_a_teacher_tokenizer_cache_falls_on_two_zero3_ranks(tiny_world, other_teacher, tmp_path):
    """dd-cache build tokenizes with the teacher's tokenizer (the manifest names it); the signal pairs each student
    response token with the teacher row of the same record and response position, truncated to the shorter
    response; 2 ZeRO-3 ranks train on CE + ULD and the ULD term falls; a token-level recipe is refused."""
    import sys

    from conftest import run_cmd, torchrun
    from dist_distill.data.records import IGNORE_INDEX, load_tokenized
    from dist_distill.models.loading import load_tokenizer, tokenizer_fingerprint
    from dist_distill.teacher.cache.writer import build_cache
    from dist_distill.teacher.sources import build_teacher_source

    sets = [f"student.name_or_path={tiny_world}/student_init", f"teacher.name_or_path={other_teacher}",
            f"data.train={tiny_world}/data/student_train.jsonl", f"teacher_source.cache_dir={tmp_path}/cache",
            f"output.dir={tmp_path}/run", "loss.cross_tokenizer=uld", "loss.temperature=1.0", "loss.ce_weight=0.5",
            "loss.uld_weight=1.5", "optim.max_steps=12", "optim.warmup_steps=0", "optim.micro_batch_size=8",
            "output.log_every=1", "output.export=false"]
    args = [a for s in sets for a in ("--set", s)]
    run_cmd([sys.executable, "-m", "dist_distill.cache", "build", str(TINY), *args, "--quiet"], timeout=900)
    teacher_tok = load_tokenizer(SimpleNamespace(name_or_path=str(other_teacher), revision=None,
                                                 trust_remote_code=False), "teacher")
    manifest = json.loads((tmp_path / "cache/manifest.json").read_text())
    assert manifest["tokenizer_sha256"] == tokenizer_fingerprint(teacher_tok) and manifest["vocab_size"] == 96
    # the pairing, in process: student sample i <-> teacher sample of the same record, i-th response tokens
    r = load_recipe(TINY, sets)
    student_tok = load_tokenizer(r.student, "student")
    data = load_tokenized(r.data.train, student_tok, r.data)
    source = build_teacher_source(r, student_tok, data, torch.device("cpu"), lambda: 0)
    idx = torch.tensor([5, 0, 17])
    batch = {"targets": data.targets[idx]}
    sig = source.signal(idx, batch)
    t_data = load_tokenized(r.data.train, teacher_tok, r.data)
    ns = (batch["targets"] != IGNORE_INDEX).sum(1)
    nt = (t_data.targets[idx] != IGNORE_INDEX).sum(1)  # no bad rows here: record i is sample i on both sides
    assert (nt < ns).all(), (ns, nt)  # merged digits: the teacher's responses are shorter, the student's truncated
    assert sig.aligned_rows.tolist() == [int(ns[:b].sum()) + j for b in range(3) for j in range(int(nt[b]))]
    ids, logits, *_ = source.cache.fetch(idx)
    t_mask = t_data.targets[idx] != IGNORE_INDEX
    assert torch.equal(sig.topk[1], logits[t_mask][:, :r.teacher_source.top_k])
    # token-level KD from this teacher is refused before anything is scored
    with pytest.raises(UserError, match="different tokenizers .* Two ways forward"):
        build_cache(load_recipe(TINY, sets[:5] + [f"teacher_source.cache_dir={tmp_path}/cache2"]), progress=False)
    torchrun(2, "dist_distill.train", str(TINY), *args, timeout=900)
    steps = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    part = json.loads((tmp_path / "run/partition-rank0.json").read_text())
    assert part["world_size"] == 2 and part["zero_stage"] == 3 and part["local_elements"] < part["total_elements"]
    uld = [s["divergence"] for s in steps]
    assert len(uld) == 12 and all(u > 0 for u in uld)
    assert sum(uld[-3:]) / 3 < 0.8 * sum(uld[:3]) / 3, uld  # ULD to the teacher falls (measured: 0.84 -> 0.58)
    assert all(abs(s["loss"] - (0.5 * s["ce"] + 1.5 * s["divergence"])) < 1e-4 for s in steps)
