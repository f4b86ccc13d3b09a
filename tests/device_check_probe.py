"""Run under torchrun (2 ranks) with DD_CHECK_DEVICES=1: the device test mode against the patterns of
issue 12's items 1-3, written as code of this package (compiled with a dist_distill module name, which is
what the mode judges). Prints one line per case: "<case> ok" or "<case> refused: <message>"."""

import sys

import torch
import torch.distributed as dist

from dist_distill.training import device_check
from dist_distill.training.distributed import init_from_env, local_device

CASES = {
    # item 1: the checkpoint disk-space / save agreement all-reduced a CPU tensor on the default group
    "host_tensor_to_default_group": "dist.all_reduce(torch.tensor([1.0]))",
    # the fix: the tensor on this rank's device
    "device_tensor_to_default_group": "dist.all_reduce(torch.tensor([1.0], device=local_device()))",
    # item 3: start_step broadcast of a CPU tensor
    "host_broadcast": "dist.broadcast(torch.zeros(1, dtype=torch.int64), src=0)",
    # item 3: ids = torch.arange(...) on the CPU, indexed by indices of device logits
    "host_ids_indexed_by_device_logits": "torch.arange(5)[torch.randn(2, 5, device=local_device()).argmax(1)]",
    "device_ids_indexed_by_device_logits": "torch.arange(5, device=local_device())[torch.randn(2, 5, device=local_device()).argmax(1)]",
    # a gloo group made for CPU bookkeeping takes host tensors
    "host_tensor_to_gloo_group": "dist.all_reduce(torch.ones(1), group=dist.new_group(backend='gloo'))",
    # .cpu() results are host tensors too
    "moved_to_host": "dist.all_reduce(torch.ones(1, device=local_device()).cpu())",
}


def main() -> None:
    device_check.install()
    init_from_env()
    env = {"__name__": "dist_distill._device_probe", "torch": torch, "dist": dist, "local_device": local_device}
    for name, code in CASES.items():
        try:
            exec(compile(code, f"<{name}>", "exec"), env)
            result = "ok"
        except device_check.DeviceCheckError as err:
            result = f"refused: {err}"
        if dist.get_rank() == 0:
            print(f"{name} {result}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
