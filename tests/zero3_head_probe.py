"""torchrun --nproc_per_node 2 tests/zero3_head_probe.py WORLD OUT: where the student's lm_head weight is readable
under ZeRO-3 (gloo, CPU). Helper of tests/test_zero3_train.py::test_lm_head_weight_outside_a_forward_is_a_partition.

Writes OUT (rank 0): the weight's shape as read (a) inside the head's own forward, (b) from another module's
forward (DeepSpeed's parameter getter gathers it there, eager mode only), (c) outside any forward.
"""

import json
import os
import sys

import torch


def main(world: str, out: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    torch.set_num_threads(1)
    deepspeed.init_distributed("gloo")
    config = json.load(open("configs/tiny/ds_zero3_cpu.json"))
    config.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1,
                  optimizer={"type": "AdamW", "params": {"lr": 1e-3}})
    ds_config = HfDeepSpeedConfig(config)  # alive while from_pretrained runs: the model is built inside zero.Init
    seen = {}

    class Wrapper(torch.nn.Module):
        def __init__(self, student):
            super().__init__()
            self.student = student

        def forward(self, ids, read_in_wrapper: bool):
            hidden = self.student.model(input_ids=ids).last_hidden_state
            if read_in_wrapper:
                seen["in_other_forward"] = list(self.student.lm_head.weight.shape)
            return self.student.lm_head(hidden).float().pow(2).mean()

    def probe(head, args):  # registered after deepspeed.initialize: runs after DeepSpeed's gathering hook
        seen.setdefault("in_head_forward", list(head.weight.shape))

    model = AutoModelForCausalLM.from_pretrained(f"{world}/student_init")
    engine, *_ = deepspeed.initialize(model=Wrapper(model), config=ds_config.config, model_parameters=list(model.parameters()))
    engine.module.student.lm_head.register_forward_pre_hook(probe)
    for read_in_wrapper in (False, True):  # first step: only the head's forward reads its weight
        loss = engine(torch.randint(0, 15, (2, 8)), read_in_wrapper)
        engine.backward(loss)
        engine.step()
    weight = engine.module.student.lm_head.weight
    seen["outside_forward"] = list(weight.shape)
    seen["full"] = list(weight.ds_shape)
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(seen, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
