"""A simulated second device on CPU, so that device bugs fail CI on machines without a GPU.

``with simulated_device() as dev:`` makes ``dev`` (``torch.device("meta")``) behave like an accelerator whose
tensors hold real numbers: ``x.to(dev)``, ``model.to(dev)`` and ``torch.zeros(3, device=dev)`` give tensors that
report ``dev`` as their device but compute on CPU underneath, so training, ``.item()``, boolean indexing and the
metrics all run with real values. Every aten op (forward, backward, optimizer) is checked as CUDA checks it: an
op that mixes a simulated tensor with a plain CPU tensor raises :class:`DeviceMismatch` naming the op and the
devices. CPU 0-dim tensors are allowed with any device (as in CUDA), and so are cross-device ``copy_`` and
indices on the CPU (CUDA accepts both).

Why not torch's ``FakeTensorMode`` with a fake ``cuda`` device: its tensors hold no data, so the data-dependent
parts of a run (metrics, early stopping, host-side solvers, boolean masks) cannot run, and on a CPU-only build of
torch its autograd fails on fake ``cuda`` tensors before any of our code is reached. Why ``meta`` as the
reported device: it is the one non-CPU device type a CPU-only build accepts everywhere (device guards, the
autograd engine); plain ``meta`` tensors never appear in a run, so nothing is confused with it.

This is a test tool (Python dispatch on every op: roughly 10x slower than plain CPU); it lets a plugin author
check a new method for device mixing in the same way the built-ins are checked (tests/test_devices.py).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

SIM = torch.device("meta")


class DeviceMismatch(RuntimeError):
    """An op mixed tensors of the simulated device with tensors on the CPU."""


class SimTensor(torch.Tensor):
    """A CPU tensor (``elem``) that reports the simulated device."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> "SimTensor":
        r = torch.Tensor._make_wrapper_subclass(cls, elem.size(), strides=elem.stride(),
                                                storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                layout=elem.layout, device=SIM, requires_grad=elem.requires_grad)
        r.elem = elem
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:  # the default repr would read the (absent) meta storage
        return f"SimTensor({self.elem!r})"

    def tolist(self):  # torch refuses .tolist() on subclasses; on a real device it copies to the host
        _note_host_read("tolist")
        return self.elem.tolist()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


def _is_sim_device(device: Any) -> bool:
    return device is not None and torch.device(device).type == SIM.type


# ops that may legitimately take tensors of two devices (as CUDA allows): copies between devices, and indexing
# a device tensor with CPU indices (the reverse, CPU data indexed by device indices, is an error in CUDA too)
_CROSS_DEVICE_OK = {"aten::copy_", "aten::_to_copy", "aten::_has_compatible_shallow_copy_type", "aten::set_"}
_INDEX_OPS = {"aten::index", "aten::index_put_", "aten::index_put", "aten::_index_put_impl_"}


def _flat(values, out: list) -> list:
    for v in values:
        if isinstance(v, (list, tuple)):
            _flat(v, out)
        elif isinstance(v, torch.Tensor):
            out.append(v)
    return out


def _unwrap(v):
    if isinstance(v, SimTensor):
        return v.elem
    if isinstance(v, (list, tuple)):
        return type(v)(_unwrap(x) for x in v)
    return v


def _wrap(v):
    if isinstance(v, torch.Tensor):
        return v if isinstance(v, SimTensor) else SimTensor(v)
    if isinstance(v, (list, tuple)):
        return type(v)(_wrap(x) for x in v)
    return v


HOST_READS: list[str] = []  # every copy from the simulated device to the host (a sync on a real device)


def _note_host_read(what: str) -> None:
    HOST_READS.append(what)


class SimulationHole(RuntimeError):
    """A tensor reached the device without passing through the simulation (its values are lost): a gap in this
    harness, not in the code under test."""


def _dispatch(func, args, kwargs):
    name = func._schema.name
    tensors = _flat(args, _flat(kwargs.values(), []))
    sim_in = any(isinstance(t, SimTensor) for t in tensors)
    if any(t.device.type == SIM.type and not isinstance(t, SimTensor) for t in tensors):
        raise SimulationHole(f"{func}: a {SIM.type} tensor without values (created by a C++ path this harness "
                             f"does not intercept; see simdevice._SimFunctionMode)")
    if sim_in and name not in _CROSS_DEVICE_OK:
        if name in _INDEX_OPS:
            bad = not isinstance(args[0], SimTensor) and args[0].dim() > 0
            cpu = args[0].device if bad else None
        else:
            cpu = next((t.device for t in tensors if not isinstance(t, SimTensor) and t.dim() > 0), None)
        if cpu is not None:
            raise DeviceMismatch(f"{func}: tensors on the simulated device ({SIM}) mixed with tensors on {cpu} "
                                 f"(a tensor created without device=, or moved with .cpu())")
    to_sim = sim_in
    if "device" in kwargs:
        to_sim = _is_sim_device(kwargs["device"]) or (kwargs["device"] is None and sim_in)
        if _is_sim_device(kwargs["device"]):
            kwargs = {**kwargs, "device": torch.device("cpu")}
    if sim_in and (name == "aten::_local_scalar_dense" or (name == "aten::_to_copy" and not to_sim)
                   or (name == "aten::copy_" and not isinstance(args[0], SimTensor))):
        _note_host_read(name)  # a device-to-host copy
    out = func(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()}) if sim_in else func(*args, **kwargs)
    returns = func._schema.returns
    if returns and returns[0].alias_info is not None and returns[0].alias_info.is_write and args:
        return args[0]  # in-place: the result is the (wrapped or plain) tensor that was written
    if name == "aten::copy_" or not to_sim:
        return out
    return _wrap(out)


class _SimMode(TorchDispatchMode):
    """Routes factory calls and ``.to(sim)`` of plain tensors onto the simulated device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


# functions that build a tensor from Python data directly on the target device, in C++ below the dispatcher
_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor}


def _cpu_index(index: Any) -> Any:
    """Python lists in an index become CPU index tensors (torch would build them on the device in C++)."""
    if isinstance(index, list):
        return torch.tensor(index)
    if isinstance(index, tuple):
        return tuple(_cpu_index(i) for i in index)
    return index


class _SimFunctionMode(TorchFunctionMode):
    """Routes the C++ paths that create device tensors from Python data through the simulation."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FROM_DATA:
            device = kwargs.get("device")
            if device is None and func is torch.Tensor.new_tensor and isinstance(args[0], SimTensor):
                device = SIM
            if _is_sim_device(device):
                kwargs = {**kwargs, "device": torch.device("cpu")}
                grad = kwargs.pop("requires_grad", False)
                return func(*args, **kwargs).to(SIM).requires_grad_(grad)
        elif func is torch.Tensor.__getitem__ or func is torch.Tensor.__setitem__:
            args = (args[0], _cpu_index(args[1]), *args[2:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def simulated_device() -> Iterator[torch.device]:
    """Inside the block, ``torch.device("meta")`` is a simulated accelerator with real values (see module doc)."""
    with _SimMode(), _SimFunctionMode():
        yield SIM


def unwrap(x: Any) -> Any:
    """A CPU copy of ``x`` (tensors anywhere in nested containers)."""
    return tree_map(lambda a: a.elem.clone() if isinstance(a, SimTensor) else a, x)
