"""Device test mode (``DD_CHECK_DEVICES=1``): a host tensor handed to a collective that is NCCL on a GPU
cluster fails on the CPU too.

On a CUDA cluster the default groups are NCCL, which refuses CPU tensors; on the CPU box every tensor
is a CPU tensor and gloo takes them all, so a ``torch.tensor([x])`` handed to ``all_reduce`` (or a
device that was never taken from LOCAL_RANK) passes every CPU test and kills the first GPU run. In
this mode:

- this process's "accelerator" is ``cpu:0`` (:func:`dist_distill.training.distributed.local_device`):
  it computes on the CPU but is named apart from the host (``cpu``, no index);
- a TorchFunctionMode tags tensors by where the code put them: a factory call with a device of
  the accelerator (``cpu:0`` here, ``cuda`` there) or a ``.to(accelerator)`` tags ``accel``; a
  factory call from this package without a device (the host by default), ``.cpu()`` or
  ``.to("cpu")`` tags ``host`` (with the file and line that made it); every other op passes the
  tag of its inputs on (``accel`` wins);
- groups are declared as they would be on CUDA: the default group of a command that asks for
  ``default_backend()`` is a device group (NCCL there), one that asks for ``mixed_backend()``
  ("cpu:gloo,cuda:nccl") or a group created here with ``backend="gloo"`` takes host tensors;
- the ``torch.distributed`` collectives called from this package refuse a ``host`` tensor on a
  device group, naming the collective and where the tensor was made.

Tensors this package never touched (DeepSpeed's, transformers') carry no tag and are not judged.
The mode costs a Python call per torch op: for tests only, never on by default.
"""

from __future__ import annotations

import functools
import os
import sys

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

ENV = "DD_CHECK_DEVICES"
ACCELERATOR = torch.device("cpu", 0)
"""The accelerator of a CPU process in this mode: the CPU, under a name of its own."""
_TAG = "_dd_device_tag"
_PACKAGE = "dist_distill"
_FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
              torch.rand, torch.randn, torch.randint, torch.randperm, torch.linspace, torch.eye, torch.from_numpy}
_LIKE = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like,
         torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_empty, torch.Tensor.new_full,
         torch.Tensor.new_tensor}
_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                "reduce", "send", "recv", "isend", "irecv", "all_to_all_single", "gather", "scatter")
_MOVES = {torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda}
_CROSS_DEVICE = {torch.Tensor.copy_, torch.Tensor.__setitem__, torch.Tensor.index_copy_, torch.Tensor.index_put_}
"""Ops that take a host and an accelerator tensor on CUDA too (copies)."""
_declared: dict = {}  # id(group) or None (the default group) -> "device" | "host"
_installed = False


class DeviceCheckError(RuntimeError):
    """A host tensor reached a collective that is NCCL on CUDA (device test mode)."""


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


def _placement(device, where: str | None) -> str | None:
    """The tag of a tensor put on `device` by code at `where`: the accelerator (an int, a CUDA device,
    ``cpu:0`` here), the host (the string "cpu", or torch.device("cpu") named in this package), or None
    for a bare ``torch.device("cpu")`` (in this mode a tensor's ``.device`` on the CPU drops the index,
    so ``device=x.device`` cannot say which it follows) and for code outside this package (DeepSpeed's
    CPU accelerator names the host as its device): such tensors are not judged."""
    if isinstance(device, int):
        return "accel"
    d = torch.device(device)
    if d.type != "cpu" or d.index is not None:
        return "accel"
    if isinstance(device, str) and where is not None:
        return f"host@{where}"
    return None


def _ours(depth: int = 2) -> str | None:
    """'file:line' of the caller `depth` frames up when it is in this package (not this module), else None."""
    frame = sys._getframe(depth)
    name = frame.f_globals.get("__name__", "")
    if name.startswith(_PACKAGE) and name != __name__:
        return f"{frame.f_code.co_filename}:{frame.f_lineno}"
    return None


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


def _tag(t):
    return getattr(t, _TAG, None) if isinstance(t, torch.Tensor) else None


def _device_arg(func, args, kwargs):
    """The device a `.to(...)` call names, or None (dtype-only, or a tensor whose device to copy)."""
    if "device" in kwargs:
        return ("device", kwargs["device"])
    for a in args[1:]:
        if isinstance(a, (torch.device, str, int)) and not isinstance(a, bool):
            return ("device", a)
        if isinstance(a, torch.Tensor):
            return ("like", a)
    return None


class _Tagger(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tag = self._tag_for(func, args, kwargs)
        if func in _MOVES and out is args[0] and tag != _tag(out):
            out = out.view_as(out)  # a CPU -> CPU move returns its input; on CUDA it would be a new tensor
        if tag is not None:
            for t in _tensors(out):
                try:
                    setattr(t, _TAG, tag)
                except (AttributeError, RuntimeError):
                    pass
        return out

    @staticmethod
    def _tag_for(func, args, kwargs):
        if func in _FACTORIES or func in _LIKE:
            device = kwargs.get("device")
            if device is not None:
                return _placement(device, _ours(3))
            if func in _LIKE:
                return _tag(args[0]) if args else None
            where = _ours(3)
            return f"host@{where}" if where else None
        if func is torch.Tensor.to:
            named = _device_arg(func, args, kwargs)
            if named is None:
                return _tag(args[0])
            kind, value = named
            return _tag(value) if kind == "like" else _placement(value, _ours(3))
        if func is torch.Tensor.cpu:
            where = _ours(3)
            return f"host@{where}" if where else None
        if func is torch.Tensor.cuda:
            return "accel"
        tagged = [(t, _tag(t)) for t in _tensors((args, kwargs))]
        tags = [tag for _, tag in tagged if tag is not None]
        if "accel" in tags:
            host = next((tag for t, tag in tagged if tag and tag.startswith("host") and t.dim() > 0), None)
            where = _ours(3) if host is not None and func not in _CROSS_DEVICE else None
            if where is not None:
                raise DeviceCheckError(f"device test mode: {getattr(func, '__name__', func)} at {where} mixes a tensor "
                                       f"on the accelerator with one on the host (made at {host.split('@', 1)[1]}): "
                                       "on CUDA this raises 'Expected all tensors to be on the same device'")
            return "accel"
        return tags[0] if tags else None


def declare_default(backend: str) -> None:
    """Record what the default group is on CUDA: host tensors are legal only in a mixed ("cpu:gloo,...") group."""
    _declared[None] = "host" if "cpu:gloo" in backend else "device"


def _group_kind(group) -> str:
    if group is None or group is dist.GroupMember.WORLD:
        return _declared.get(None, "device")
    return _declared.get(id(group), _declared.get(None, "device"))


def _checked(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        where = _ours(2)
        if where is not None:
            group = kwargs.get("group")
            if group is None:
                group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
            if _group_kind(group) == "device":
                for t in _tensors((args, kwargs)):
                    tag = _tag(t)
                    if tag is not None and tag.startswith("host"):
                        raise DeviceCheckError(
                            f"device test mode: dist.{name} at {where} got a tensor on the host (made at "
                            f"{tag.split('@', 1)[1]}) for a group that is NCCL on CUDA, which refuses CPU tensors: "
                            "create it on the group's device (local_device()) or use a gloo group")
        return fn(*args, **kwargs)

    return wrapper


def _init_process_group(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "backend" in kwargs:
            backend = kwargs.pop("backend")
        elif args:
            backend, args = args[0], args[1:]
        else:
            backend = None
        declare_default(str(backend or "nccl"))
        return fn("gloo", *args, **kwargs)

    return wrapper


def _new_group(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        group = fn(*args, **kwargs)
        if kwargs.get("backend") == "gloo" and _ours(2) is not None:
            _declared[id(group)] = "host"
        return group

    return wrapper


def install() -> None:
    """Turn the mode on in this process (idempotent): the tagging mode and the checked collectives."""
    global _installed
    if _installed:
        return
    _installed = True
    _Tagger().__enter__()  # for the life of the process
    for name in _COLLECTIVES:
        setattr(dist, name, _checked(name, getattr(dist, name)))
    dist.init_process_group = _init_process_group(dist.init_process_group)
    dist.distributed_c10d.init_process_group = dist.init_process_group
    dist.new_group = _new_group(dist.new_group)
    if os.environ.get("RANK", "0") == "0":
        print(f"device test mode ({ENV}=1): host tensors refused on groups that are NCCL on CUDA", file=sys.stderr)


def install_if_enabled() -> None:
    if enabled():
        install()
