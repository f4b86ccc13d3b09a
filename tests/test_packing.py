"""Packing: a packed batch gives each document the logits and losses it has alone (sdpa on CPU), counts the
same target tokens (so the step's loss normalisation is unchanged), and maps onto the teacher rows of the
unpacked samples (one cache serves packed and unpacked runs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_distill.data.packing import first_fit, pack
from dist_distill.data.records import IGNORE_INDEX, load_tokenized
from dist_distill.models.loading import load_tokenizer
from dist_distill.recipe import DataSpec, ModelSpec


@pytest.fixture(scope="module")
def setup(tiny_world, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(ModelSpec(name_or_path=str(tiny_world / "student_init")), "student")
    spec = DataSpec(train="x", max_seq_len=24, store_dir=str(tmp_path_factory.mktemp("stores")))
    data = load_tokenized(str(tiny_world / "data/heldout.jsonl"), tok, spec)
    model = AutoModelForCausalLM.from_pretrained(tiny_world / "student_init", attn_implementation="sdpa",
                                                 dtype=torch.float32).eval()
    return data, model


def test_first_fit():
    bins = first_fit([5, 4, 3, 6, 2], 8)
    assert bins == [[0, 2], [1, 4], [3]]
    with pytest.raises(ValueError, match="more than the packed length 8"):
        first_fit([9], 8)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_documents_match_alone(setup, attn):
    """sdpa takes the bool block mask; eager ADDS a 4-D mask to its scores, so it gets an additive one (a bool
    mask there leaked across documents and into the future: 0.17 off on these logits)."""
    data, model = setup
    model.set_attn_implementation(attn)
    samples = torch.tensor([3, 17, 0, 42, 8, 63, 21])
    packed = pack(data, samples, 48)
    assert packed.input_ids.shape[0] < len(samples)  # several documents per row
    kwargs, line = packed.model_inputs(attn)
    assert "block-diagonal" in line and (("additive" in line) == (attn == "eager"))
    with torch.no_grad():
        logits = model(**kwargs).logits
        packed_loss, alone_loss = torch.zeros(()), torch.zeros(())
        for k, s in enumerate(samples.tolist()):
            n = int(data.attention_mask[s].sum())
            alone = model(input_ids=data.input_ids[s][None, :n]).logits[0]
            where = packed.doc == k
            got = logits[where]
            assert got.shape == alone.shape
            torch.testing.assert_close(got, alone, atol=2e-5, rtol=1e-5)
            tgt = data.targets[s][:n]
            alone_loss += F.cross_entropy(alone, tgt, ignore_index=IGNORE_INDEX, reduction="sum")
            packed_loss += F.cross_entropy(got, packed.targets[where], ignore_index=IGNORE_INDEX, reduction="sum")
        n_unpacked = int((data.targets[samples] != IGNORE_INDEX).sum())
        n_packed = int((packed.targets != IGNORE_INDEX).sum())
        assert n_packed == n_unpacked  # same normaliser N_step
        torch.testing.assert_close(packed_loss / n_packed, alone_loss / n_unpacked, atol=1e-5, rtol=1e-6)
        # without the block mask documents would see each other: the check above is not vacuous
        leaky = model(input_ids=packed.input_ids, position_ids=packed.position_ids).logits
        assert not torch.allclose(leaky[packed.doc == 1], logits[packed.doc == 1], atol=1e-3)
    model.set_attn_implementation("sdpa")


def test_unsupported_attention_is_refused_for_packing():
    from dist_distill.data.packing import packed_model_inputs

    x = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="attn_implementation='flex_attention': packed batches support sdpa, eager"):
        packed_model_inputs(x, x, x, x, "flex_attention")


def test_packed_batch_reads_the_unpacked_teacher_rows(setup):
    data, _ = setup
    samples = torch.tensor([5, 9, 2, 30, 11])
    tgt = data.targets[samples]
    where = tgt != IGNORE_INDEX
    # a teacher signal of the unpacked batch whose row r carries its key (sample * 1000 + position)
    rows_key = (samples[:, None] * 1000 + torch.arange(tgt.shape[1]))[where]
    packed = pack(data, samples, 40)
    got = rows_key[packed.teacher_rows(tgt)]
    pw = packed.targets != IGNORE_INDEX
    want = packed.source[..., 0][pw] * 1000 + packed.source[..., 1][pw]
    assert torch.equal(got, want)


def test_loss_normalisation_unchanged_by_packing(setup):
    """The training loss of the same documents, packed (sdpa, block mask) and unpacked, with a top-k teacher
    keyed by (sample, position) and the trainer's normalisation (sum over target tokens / the step's target
    count): one value, and each micro-batch layout counts the same target tokens."""
    from dist_distill.data.packing import packed_model_inputs
    from dist_distill.objective.module import DistillationModule, StepSettings
    from dist_distill.recipe import LossSpec
    from dist_distill.teacher.signal import TeacherSignal

    data, model = setup
    vocab = model.config.vocab_size
    module = DistillationModule(model, LossSpec(kind="fkl", temperature=2.0, ce_weight=0.3, backend="torch"), vocab)
    samples = torch.tensor([4, 19, 33, 7, 50, 12])

    def teacher(sample, position):  # rows that depend on the token's key only
        g = torch.Generator().manual_seed(0)
        table = torch.randn(64, 40, 5, generator=g) * 3
        ids = torch.stack([torch.randperm(vocab, generator=torch.Generator().manual_seed(int(s * 100 + p)))[:5]
                           for s, p in zip(sample.tolist(), position.tolist())])
        logits = table[sample, position]
        return TeacherSignal(topk=(ids, logits, torch.logsumexp(logits, 1) + 1.0))

    step = StepSettings(temperature=2.0)
    with torch.no_grad():
        tgt = data.targets[samples]
        where = tgt != IGNORE_INDEX
        keys = (samples[:, None].expand_as(tgt)[where], torch.arange(tgt.shape[1]).expand_as(tgt)[where])
        n = int(where.sum())
        unpacked, _ = module(data.input_ids[samples], data.attention_mask[samples], tgt, teacher(*keys), step)
        packed = pack(data, samples, 48)
        assert packed.input_ids.numel() < tgt.numel()  # fewer slots
        pw = packed.targets != IGNORE_INDEX
        assert int(pw.sum()) == n
        kw = packed_model_inputs(packed.input_ids, packed.position_ids, packed.doc, packed.targets, "sdpa")
        loss, _ = module(**kw, teacher=teacher(packed.source[..., 0][pw], packed.source[..., 1][pw]), step=step)
    torch.testing.assert_close(loss / n, unpacked / n, atol=1e-5, rtol=1e-5)
    assert loss.item() > 0


def test_flash_inputs_are_flattened_rows():
    """flash_attention_2: one [1, B*L] sequence whose position_ids restart per document (transformers' packed
    path needs batch 1), targets in the same row-major order; no L x L mask."""
    from dist_distill.data.packing import packed_model_inputs

    pos = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])
    doc = torch.tensor([[0, 0, 0, 1, 1], [2, 2, -1, -1, -1]])
    ids, tgt = torch.arange(10).view(2, 5), torch.arange(10, 20).view(2, 5)
    kw = packed_model_inputs(ids, pos, doc, tgt, "flash_attention_2")
    assert kw["attention_mask"] is None and kw["input_ids"].shape == (1, 10)
    assert kw["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 0, 1, 2]] and torch.equal(kw["targets"][0], tgt.reshape(-1))
    mask = packed_model_inputs(ids, pos, doc, tgt, "sdpa")["attention_mask"]
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    assert mask[0, 0, 4].tolist() == [False, False, False, True, True] and mask[1, 0, 3].tolist() == [False] * 3 + [True, False]


def test_colocated_teacher_on_packed_inputs_gives_the_unpacked_rows(setup):
    """A colocated teacher run on the packed batch (the trainer's path: the same packed inputs, laid out for
    its attention implementation) gives, per target token, the final hidden state it gives unpacked."""
    from dist_distill.data.packing import packed_model_inputs
    from dist_distill.teacher.colocated import ColocatedTeacher

    data, model = setup
    teacher = ColocatedTeacher(model)
    assert teacher.attn_implementation == "sdpa"
    samples = torch.tensor([8, 2, 61, 14, 27])
    tgt = data.targets[samples]
    alone = teacher.signal(samples, {"input_ids": data.input_ids[samples], "attention_mask": data.attention_mask[samples],
                                     "targets": tgt}).hidden
    packed = pack(data, samples, 48)
    got = teacher.signal(samples, packed_model_inputs(packed.input_ids, packed.position_ids, packed.doc, packed.targets,
                                                      teacher.attn_implementation)).hidden
    where = tgt != IGNORE_INDEX
    row_of = torch.full(tgt.shape, -1, dtype=torch.long)
    row_of[where] = torch.arange(int(where.sum()))
    pw = packed.targets != IGNORE_INDEX
    order = row_of[packed.doc[pw], packed.source[..., 1][pw]]
    torch.testing.assert_close(got, alone[order], atol=2e-5, rtol=1e-5)
