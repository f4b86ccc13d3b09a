"""dd-evaluate's metrics against hand-computed values on a model whose outputs are known, the
multiple-choice fixture, the report, and the command (2 ranks == 1 process; quantised rows)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import module_cmd, torchrun
from dist_distill.evaluation import metrics as M
from dist_distill.evaluation.data import ChoiceItem, Sequences, format_question, load_multiple_choice
from dist_distill.evaluation.report import add_retention, format_table

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "Answer", ":", "big", "dog", "cat", "cow", "red", "Is", "it", "?",
         "A", "B", "C", "."]


def bigram_model(table: torch.Tensor, pad_id: int = 0, bos_id: int = 1, eos_id: int = 2):
    """A 0-layer Llama whose logits at a position are exactly ``table[token at that position]``: one-hot
    embeddings (hidden = vocab), RMSNorm of a one-hot vector = sqrt(V) at the token, lm_head = table^T / sqrt(V)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    v = table.shape[0]
    cfg = LlamaConfig(vocab_size=v, hidden_size=v, intermediate_size=4, num_hidden_layers=0, num_attention_heads=1,
                      num_key_value_heads=1, head_dim=2, tie_word_embeddings=False, rms_norm_eps=0.0,
                      pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(v))
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.copy_(table.T / v ** 0.5)
    return model


def log_softmax_row(table, prev, nxt) -> float:
    """log p(nxt | prev) of the bigram table, in float64: the hand computation."""
    row = table[prev].double()
    return float(row[nxt] - torch.logsumexp(row, 0))


def test_bigram_model_has_the_table_as_logits():
    table = torch.randn(7, 7)
    ids = torch.tensor([[1, 3, 4, 6, 0]])
    assert torch.allclose(bigram_model(table)(ids).logits[0], table[ids[0]], atol=1e-5)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    data = Sequences([[1, 4, 5, 6], [1, 3]], [1, 1])
    out = M.perplexity(bigram_model(torch.zeros(9, 9)), data, pad_id=0, vocab_size=9, progress=False)
    assert out["perplexity"] == pytest.approx(9.0, rel=1e-6) and out["tokens"] == 4


def test_perplexity_hand_computed_and_only_scored_tokens_count():
    a, v = 3.0, 6
    table = torch.zeros(v, v)
    table[4, 5] = a  # p(5 | 4) = e^a / (e^a + 5); every other row is uniform
    # [1 4 5 4 5], start 2: scored 5|4, 4|5, 5|4 (the 4|1 before `start` is context)
    data = Sequences([[1, 4, 5, 4, 5], [1, 4]], [2, 1])
    nll = -(2 * (a - math.log(math.exp(a) + v - 1)) + math.log(1 / v) + math.log(1 / v))
    out = M.perplexity(bigram_model(table), data, pad_id=0, vocab_size=v, batch_size=1, progress=False)
    assert out["tokens"] == 4
    assert out["nll"] == pytest.approx(nll / 4, rel=1e-6)
    assert out["perplexity"] == pytest.approx(math.exp(nll / 4), rel=1e-6)


def test_perplexity_ignores_logits_past_the_real_vocabulary():
    """A padded model vocabulary (Qwen's 151936 vs ~151665): only the first vocab_size logits count."""
    table = torch.zeros(8, 8)
    table[:, 6:] = 50.0  # two padded entries that would swallow the mass
    data = Sequences([[1, 4, 5]], [1])
    assert M.perplexity(bigram_model(table), data, 0, vocab_size=6, progress=False)["perplexity"] == \
        pytest.approx(6.0, rel=1e-6)


def test_kl_to_teacher_and_top1_agreement_hand_computed():
    v = 5
    teacher_table = torch.zeros(v, v)
    teacher_table[3] = torch.tensor([0.0, 0.0, 2.0, 0.0, 1.0])  # argmax 2; the uniform student's argmax is 0
    teacher_table[4] = torch.tensor([3.0, 1.0, 0.0, 0.0, 0.0])  # argmax 0 == the student's
    student = bigram_model(torch.zeros(v, v))
    data = Sequences([[1, 3, 4, 1]], [1])  # rows predicted at tokens 1 (uniform teacher), 3, 4

    def kl_vs_uniform(row):
        p = torch.softmax(row.double(), 0)
        return float((p * (p.log() + math.log(v))).sum())

    expect = (0.0 + kl_vs_uniform(teacher_table[3]) + kl_vs_uniform(teacher_table[4])) / 3
    out = M.teacher_agreement(bigram_model(teacher_table), student, data, 0, v, progress=False)
    assert out["kl_teacher"] == pytest.approx(expect, rel=1e-5)
    assert out["top1_agreement"] == pytest.approx(2 / 3)  # row 1: uniform vs uniform, argmax 0 == 0
    same = M.teacher_agreement(student, student, data, 0, v, progress=False)
    assert same["kl_teacher"] == pytest.approx(0.0, abs=1e-7) and same["top1_agreement"] == 1.0


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


MC_FIXTURE = [  # three MMLU-format questions (index and letter answers)
    {"question": "Is it big ?", "choices": ["big dog", "cat"], "answer": 0},
    {"question": "Is it red ?", "choices": ["cat", "big cow"], "answer": 1},
    {"question": "Is it a cat ?", "choices": ["red", "cat", "big dog"], "answer": "C"},
]


def mc_table() -> torch.Tensor:
    """After ':' the model strongly expects 'big', after 'big' it expects 'dog'; every other row is uniform."""
    ix = {w: i for i, w in enumerate(WORDS)}
    table = torch.zeros(len(WORDS), len(WORDS))
    table[ix[":"], ix["big"]] = 10.0
    table[ix["big"], ix["dog"]] = 10.0
    table[ix[":"], ix["B"]] = 10.0
    return table


def test_multiple_choice_on_a_three_question_fixture(tmp_path):
    """By hand: Q1 'big dog' ~0 nats vs 'cat' ~-10 -> right both ways. Q2 'cat' -10.0001 vs 'big cow'
    -10.0006: the SUM picks 'cat' (wrong), per character (-2.5 vs -1.25) 'big cow' (right). Q3 'big dog'."""
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MC_FIXTURE))
    tok, table = word_tokenizer(), mc_table()
    items = load_multiple_choice(str(path), tok, continuation="text")
    assert [it.label for it in items] == [0, 1, 2] and items[1].texts == [" cat", " big cow"]
    out = M.multiple_choice(bigram_model(table), items, pad_id=0, vocab_size=len(WORDS), batch_size=2, progress=False)
    assert out == {"mc_acc": pytest.approx(2 / 3), "mc_acc_norm": pytest.approx(1.0), "mc_questions": 3}
    ix = {w: i for i, w in enumerate(WORDS)}
    q2 = [log_softmax_row(table, ix[":"], ix["cat"]),
          log_softmax_row(table, ix[":"], ix["big"]) + log_softmax_row(table, ix["big"], ix["cow"])]
    assert q2[0] > q2[1] and q2[0] / 4 < q2[1] / 8  # the hand computation the test relies on
    # letters (lm-eval-harness MMLU): the model always says " B" after "Answer:" -> Q2 right, Q1 and Q3 wrong
    letters = load_multiple_choice(str(path), tok, continuation="letter")
    assert tok.decode(letters[0].context, skip_special_tokens=True).endswith("Answer :")
    out = M.multiple_choice(bigram_model(table), letters, 0, len(WORDS), progress=False)
    assert out["mc_acc"] == pytest.approx(1 / 3) and out["mc_acc_norm"] == pytest.approx(1 / 3)


def test_format_question_is_the_harness_prompt():
    assert format_question("Q?", ["x", "y"]) == "Q?\nA. x\nB. y\nAnswer:"


@pytest.mark.bad_inputs(2)
def test_multiple_choice_bad_records_are_named(tmp_path):
    from dist_distill.errors import UserError

    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": "E"}) + "\n")
    with pytest.raises(UserError, match=r"record 0 has answer 'E'; expected a 0-based index below 2 or a letter A-B"):
        load_multiple_choice(str(path), word_tokenizer())
    path.write_text(json.dumps({"question": "q", "options": ["a", "b"], "answer": 0}) + "\n")
    with pytest.raises(UserError, match=r"no field 'choices'.*set --mc-choices-field"):
        load_multiple_choice(str(path), word_tokenizer())


def test_exact_match_follows_the_greedy_chain():
    v = 8
    table = torch.zeros(v, v)
    table[4, 5] = table[5, 2] = 5.0  # 4 -> 5 -> EOS
    table[6, 7] = table[7, 7] = 5.0  # 6 -> 7 -> 7 ... (never ends)
    model = bigram_model(table)
    prompts = [[1, 4], [1, 6], [1, 1, 4]]
    answers = [[5, 2], [7, 2], [5, 2]]
    out = M.exact_match(model, prompts, answers, pad_id=0, eos_id=2, batch_size=2, progress=False)
    assert out == {"exact_match": pytest.approx(2 / 3), "qa_samples": 3}


def test_latency_and_throughput_measure_what_they_say():
    model = bigram_model(torch.randn(16, 16))
    prompts = [[1, 3, 4, 5], [1, 6, 7], [1, 8]]
    lat = M.latency(model, prompts, num_prompts=2, new_tokens=3)
    assert lat["latency_prompts"] == 2 and lat["prefill_ms_per_token"] > 0 and lat["decode_ms_per_token"] > 0
    thr = M.throughput(model, prompts, pad_id=0, batch_size=5, new_tokens=4, repeats=1)
    assert thr["throughput_batch"] == 5 and thr["throughput_tokens_per_s"] > 0


def test_peak_memory_sees_an_allocation():
    with M.PeakMemory(interval_s=0.001) as mem:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        block += 1
        import time

        time.sleep(0.05)
        del block
    assert mem.peak_mib > 40


def test_parameter_count_and_weights():
    model = bigram_model(torch.zeros(6, 6))
    n = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # rotary inv_freq
    assert M.parameter_count(model) == n == 2 * 36 + 6
    assert M.weights_mib(model) == pytest.approx((4 * n + buffers) / 2**20)


def test_retention_and_table():
    recs = [{"model": "teacher", "exact_match": 0.8, "perplexity": 2.0},
            {"model": "student", "exact_match": 0.6, "perplexity": 4.0},
            {"model": "s4", "skipped": "4bit via bitsandbytes is not supported here: x"}]
    assert add_retention(recs, "teacher") == "exact_match"
    assert recs[1]["retention_pct"] == pytest.approx(75.0) and recs[0]["retention_pct"] == pytest.approx(100.0)
    assert add_retention(recs, "teacher", "perplexity") == "perplexity" and recs[1]["retention_pct"] == pytest.approx(50)
    table = format_table(recs)
    assert table.splitlines()[0] == "| model | exact match | retention % | ppl |"
    assert "| student | 60.0% | 50.00 | 4.000 |" in table and "| s4 | skipped: 4bit" in table


# ---- the command -------------------------------------------------------------------------------
def mc_fixture_for_world(world, path, n=5):
    """Digit-sorting questions as multiple choice: the right sort and a slipped one."""
    rows = [json.loads(x) for x in (world / "data/heldout.jsonl").read_text().splitlines()[:n]]
    recs = []
    for i, r in enumerate(rows):
        wrong = r["answer"][:-2] + r["answer"][-1] + r["answer"][-2]
        choices = [wrong, r["answer"]] if i % 2 else [r["answer"], wrong]
        recs.append({"question": r["prompt"], "choices": choices, "answer": 1 if i % 2 else 0})
    path.write_text("".join(json.dumps(x) + "\n" for x in recs))
    return path


EVAL_ARGS = ["--metrics", "perplexity,kl,mc,exact_match,params", "--teacher", "teacher", "--reference", "teacher",
             "--max-samples", "37", "--batch-size", "5", "--gen-batch-size", "7", "--mc-continuation", "text",
             "--no-progress"]


@pytest.mark.slow
def test_two_ranks_give_the_single_process_numbers(tiny_world, tmp_path):
    mc = mc_fixture_for_world(tiny_world, tmp_path / "mc.jsonl")
    models = ["--model", f"teacher={tiny_world}/teacher_init", "--model", f"student={tiny_world}/student_init"]
    common = [*models, "--data", f"{tiny_world}/data/heldout.jsonl", "--mc-data", str(mc), *EVAL_ARGS]
    module_cmd("dist_distill.evaluate", *common, "--out", str(tmp_path / "one"), timeout=600)
    torchrun(2, "dist_distill.evaluate", *common, "--out", str(tmp_path / "two"), timeout=900)
    one = json.loads((tmp_path / "one/results.json").read_text())["results"]
    two = json.loads((tmp_path / "two/results.json").read_text())["results"]
    for a, b in zip(one, two):
        for key in ("perplexity", "nll", "kl_teacher", "top1_agreement", "mc_acc", "mc_acc_norm", "exact_match"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
        for key in ("tokens", "mc_questions", "qa_samples", "params"):
            assert b[key] == a[key], key
    assert one[1]["qa_samples"] == 37 and one[1]["mc_questions"] == 5 and one[0]["kl_teacher"] == 0.0
    assert one[1]["kl_teacher"] > 0


@pytest.mark.slow
def test_quantised_variants_and_report(tiny_world, tmp_path):
    """@8bit runs on this CPU (bitsandbytes >= 0.45); @4bit either runs or its row says why it was skipped."""
    proc = module_cmd("dist_distill.evaluate", "--model", f"student={tiny_world}/student_init",
                      "--model", f"student 8-bit={tiny_world}/student_init@8bit",
                      "--model", f"student 4-bit={tiny_world}/student_init@4bit",
                      "--data", f"{tiny_world}/data/heldout.jsonl", "--max-samples", "16",
                      "--metrics", "perplexity,latency,throughput,memory,params", "--throughput-batch", "4",
                      "--new-tokens", "4", "--latency-prompts", "2", "--no-progress", "--out", str(tmp_path), timeout=600)
    res = {r["model"]: r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    full, q8, q4 = res["student"], res["student 8-bit"], res["student 4-bit"]
    assert q8["weights_mib"] < 0.5 * full["weights_mib"] and q8["params"] == full["params"]
    assert q8["perplexity"] == pytest.approx(full["perplexity"], rel=0.05)  # int8: close, not equal
    for r in (full, q8):
        assert r["prefill_ms_per_token"] > 0 and r["decode_ms_per_token"] > 0 and r["throughput_tokens_per_s"] > 0
        assert r["peak_memory_mib"] is not None
    assert "skipped" in q4 or q4["params"] == full["params"]
    assert "| model | ppl | params | weights MiB | peak MiB | prefill ms/tok | decode ms/tok | tok/s @batch |" in proc.stdout
    assert (tmp_path / "report.md").read_text().startswith("# Held-out evaluation")


@pytest.mark.bad_inputs(3)
def test_evaluate_bad_arguments(tmp_path):
    from test_cli import assert_clean_error

    proc = module_cmd("dist_distill.evaluate", "--model", "a=x", "--data", "x.jsonl", "--metrics", "ppl",
                      "--out", str(tmp_path), check=False, timeout=120)
    assert_clean_error(proc, "--metrics: unknown metric 'ppl'; choose from perplexity, kl,")
    proc = module_cmd("dist_distill.evaluate", "--model", "a=x", "--data", "x.jsonl", "--metrics", "kl",
                      "--out", str(tmp_path), check=False, timeout=120)
    assert_clean_error(proc, "--metrics kl needs --data and --teacher")
    proc = module_cmd("dist_distill.evaluate", "--model", "a=x", "--teacher", "b", "--data", "x.jsonl",
                      "--out", str(tmp_path), check=False, timeout=120)
    assert_clean_error(proc, "--teacher 'b' is not one of the --model names (a)")


def test_held_out_sequences_come_from_the_token_store(tiny_world, tmp_path):
    """dd-evaluate's scored sequences are read through the token store (data/store.py), and they are the
    tokens of a direct tokenization: prompt/answer records (prompt with special tokens, answer, EOS; truncated
    to max_len, dropped when no answer token is left) and text records (scored from the second token); a
    record with nothing to score is dropped and counted. A second call maps the same store."""
    from dist_distill.evaluation.data import StoreSequences, load_sequences
    from dist_distill.models.loading import load_tokenizer
    from dist_distill.recipe import ModelSpec

    tok = load_tokenizer(ModelSpec(name_or_path=str(tiny_world / "student_init")), "student")
    source = tiny_world / "data/heldout.jsonl"
    records = [json.loads(line) for line in source.read_text().splitlines()]
    got = load_sequences(str(source), tok, max_len=12, store_dir=str(tmp_path / "stores"))
    assert isinstance(got.ids, StoreSequences)
    want = []
    for r in records:
        p = tok(r["prompt"])["input_ids"]
        seq = (p + tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:12]
        if len(p) < len(seq):
            want.append((seq, len(p)))
    assert [(s, b) for s, b in zip(got.ids, got.start)] == want and len(want) > 30
    assert got.ids[:2] == [want[0][0], want[1][0]] and got.num_tokens == sum(len(s) - b for s, b in want)
    again = load_sequences(str(source), tok, max_len=12, store_dir=str(tmp_path / "stores"))
    assert again.ids.store.path == got.ids.store.path  # built once, mapped after
    texts = ["the big red dog", "", "cat", "a cow is red " * 8]
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    seqs = load_sequences(str(tmp_path / "text.jsonl"), tok, max_len=10, store_dir=str(tmp_path / "stores"))
    want = [ids[:10] for ids in (tok(t)["input_ids"] for t in texts) if len(ids) >= 2]
    assert list(seqs.ids) == want and seqs.start == [1] * len(want) and len(want) >= 2
    assert seqs.ids.store.meta["bad_rows"]["empty"] == len(texts) - len(want)
