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


def test_packed_documents_match_alone(setup):
    data, model = setup
    samples = torch.tensor([3, 17, 0, 42, 8, 63, 21])
    packed = pack(data, samples, 48)
    assert packed.input_ids.shape[0] < len(samples)  # several documents per row
    kwargs, line = packed.model_inputs("sdpa")
    assert "block-diagonal" in line
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
