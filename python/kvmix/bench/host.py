"""Host work of one decoding step, per layer: torch ops, Triton launches and host seconds.

On a GPU a decoding step of a transformers model is host bound (the model's Python, the
cache's Python and every launch run one after another on one CPU thread while the GPU waits),
so what a cache costs per layer and step on the host is what decides its decode speed. For
every method this prints, per layer and decoding step:

* ``ops``: torch operator calls (aten level, counted by a ``TorchDispatchMode``; those that
  Triton's launcher makes for itself under the interpreter are not counted), for the whole
  step and for the cache's own parts (``update``: the cache's ``update``; ``attend``: the
  attention function minus the model's own attention call, for kvmix the store's attention
  and its classification);
* ``launches``: Triton kernel launches (each counted once, interpreted or compiled);
* on CUDA, ``host_ms``: the step's host wall time without a synchronisation at its end
  (the CPU's own cost while the GPU runs behind it) and ``step_ms`` with one (what a caller
  waits), medians over ``--steps``.

Op and launch counts are the same on the CPU (kernels under Triton's interpreter) and on a GPU,
so the counts of a tiny model on the CPU say what a GPU step costs in launches and ops.

    python -m kvmix.bench host --tiny --device cpu
    python -m kvmix.bench host --context 8192 --batch 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kvmix
from kvmix.bench.gpu import METHODS, _enable, _model, llama_8b_config

#: Where an op is counted: the cache's ``update``, the attention function, or the rest.
SECTIONS = ("update", "attention", "model")


class OpCounter(TorchDispatchMode):  # type: ignore[no-untyped-call]  # untyped base
    """Counts aten operator calls by (section, name) while active and not paused."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.ops: Counter[tuple[str, str]] = Counter()
        self.paused = 0
        self.section: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not self.paused:
            where = self.section[0] if self.section else "model"
            self.ops[(where, str(func.overloadpacket.__name__))] += 1
        return func(*args, **(kwargs or {}))

    def total(self, section: str | None = None) -> int:
        """Ops counted, in ``section`` or in all."""
        return sum(n for (s, _), n in self.ops.items() if section is None or s == section)


@contextmanager
def count_host_work() -> Iterator[tuple[OpCounter, Counter[str]]]:
    """``(ops, launches)`` counted while the block runs: torch ops outside Triton's launchers
    by section (``Cache.update``, the attention functions transformers looks up, the rest),
    and Triton launches by kernel name (interpreted kernels, JIT launches and compiled kernels
    launched directly alike). What a GPU step does: the value checks the device store makes
    only on CPU tensors (``triton_store.CHECK_HOST_VALUES``) are off while it counts."""
    import triton.runtime.interpreter as interp
    import triton.runtime.jit as jit
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache
    from triton.compiler.compiler import CompiledKernel

    counter = OpCounter()
    launches: Counter[str] = Counter()
    patched: list[tuple[Any, str, Any]] = []

    def wrap(cls: Any, attr: str, name_of: Callable[[Any], str]) -> None:
        orig = getattr(cls, attr)

        def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            launches[name_of(self)] += 1
            counter.paused += 1
            try:
                return orig(self, *args, **kwargs)
            finally:
                counter.paused -= 1

        setattr(cls, attr, run)
        patched.append((cls, attr, orig))

    def section(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            counter.section.append(name)
            try:
                return fn(*args, **kwargs)
            finally:
                counter.section.pop()

        return run

    def jit_name(f: Any) -> str:
        return str(getattr(getattr(f, "fn", None), "__name__", "?"))

    wrap(interp.InterpretedFunction, "run", jit_name)
    wrap(jit.JITFunction, "run", jit_name)
    wrap(CompiledKernel, "__getitem__", lambda k: str(getattr(k, "name", "?")))
    # The engines' direct launch calls a compiled kernel's launcher (its instance's ``run``)
    # itself: those of the kernels compiled so far are counted by wrapping that attribute
    # (a kernel compiled inside the block is counted by its first launch, a JIT launch).
    from kvmix.engines import base as engines_base

    direct: list[tuple[Any, Any]] = []
    for mod in list(engines_base._LOADED.values()):
        for kernel, _ in list(getattr(mod, "_COMPILED", {}).values()):
            if "run" not in vars(kernel):
                continue
            orig_run = kernel.run

            def launcher(*args: Any, _orig: Any = orig_run, _name: str = str(
                getattr(kernel, "name", "?"))) -> Any:  # fmt: skip
                launches[_name] += 1
                counter.paused += 1
                try:
                    return _orig(*args)
                finally:
                    counter.paused -= 1

            kernel.run = launcher
            direct.append((kernel, orig_run))
    update = Cache.update
    Cache.update = section(update, "update")  # type: ignore[method-assign]
    mapping = AttentionInterface._global_mapping
    saved = dict(mapping)
    for name, fn in saved.items():
        mapping[name] = section(fn, "attention")
    from kvmix.engines import triton_store

    checks, triton_store.CHECK_HOST_VALUES = triton_store.CHECK_HOST_VALUES, False
    try:
        with counter:
            yield counter, launches
    finally:
        triton_store.CHECK_HOST_VALUES = checks
        Cache.update = update  # type: ignore[method-assign]
        mapping.update(saved)
        for cls, attr, orig in reversed(patched):
            setattr(cls, attr, orig)
        for kernel, orig_run in direct:
            kernel.run = orig_run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu (with --tiny)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--steps", type=int, default=8, help="decoding steps timed (median)")
    p.add_argument("--methods", nargs="+", default=["full", "zipcache"], choices=sorted(METHODS))
    p.add_argument("--tiny", action="store_true", help="a 2-layer toy model")


def measure(
    model: Any, method: str, batch: int, context: int, steps: int, device: torch.device
) -> dict[str, Any]:
    """Prefill ``context`` random tokens, take two decoding steps, then count one step's host
    work and time ``steps`` more (on CUDA)."""
    attention, make = METHODS[method]
    _enable(model, attention)
    if attention != "sdpa":
        # kvmix's presets on the Triton engine on every device (the interpreter on the CPU).
        preset = method.removesuffix("-portable")
        make = lambda c: kvmix.make_cache(preset, c, engine="triton")  # noqa: E731
    layers = model.config.num_hidden_layers
    gen = torch.Generator().manual_seed(context)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen).to(device)
    cuda = device.type == "cuda"
    with torch.inference_mode():
        cache = make(model.config)
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(2):  # warm-up: compiles, grows the workspaces
            token = model(token, past_key_values=cache, use_cache=True).logits.argmax(-1)
        with count_host_work() as (ops, launches):
            token = model(token, past_key_values=cache, use_cache=True).logits.argmax(-1)
        host, step = [], []
        for _ in range(steps if cuda else 0):
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            logits = model(token, past_key_values=cache, use_cache=True).logits
            t1 = time.perf_counter()
            token = logits.argmax(-1)
            torch.cuda.synchronize(device)
            host.append(t1 - t0)
            step.append(time.perf_counter() - t0)
    result: dict[str, Any] = {
        "ops": ops.total() / layers,
        **{f"ops_{s}": ops.total(s) / layers for s in SECTIONS},
        "launches": sum(launches.values()) / layers,
        "op_names": {f"{s}:{n}": c for (s, n), c in ops.ops.most_common() if s != "model"},
        "launch_names": dict(launches),
    }
    if cuda:
        result["host_ms"] = 1e3 * statistics.median(host)
        result["step_ms"] = 1e3 * statistics.median(step)
    del cache
    return result


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    config = llama_8b_config(args.tiny)
    model = _model(config, device, torch.float32 if args.tiny else torch.bfloat16)
    print({"device": str(device), "layers": config.num_hidden_layers, "kvmix": kvmix.__file__})
    for method in args.methods:
        r = measure(model, method, args.batch, args.context, args.steps, device)
        line = (
            f"{method:20s} B={args.batch} T={args.context}: per layer and step "
            f"{r['ops']:6.1f} torch ops (update {r['ops_update']:5.1f}, attention "
            f"{r['ops_attention']:5.1f}, rest {r['ops_model']:5.1f}), "
            f"{r['launches']:4.1f} Triton launches"
        )
        if "host_ms" in r:
            line += f"; host {r['host_ms']:7.2f} ms, step {r['step_ms']:7.2f} ms"
        print(line)
        print("   ops:", r["op_names"])
        print("   launches:", r["launch_names"])
    return 0
