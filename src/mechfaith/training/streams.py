"""Streams of training batches ``(x, y_or_None)`` that can save and restore their position.

A stream yields ``x`` [batch, d_in] and either the target ``y`` [batch, d_out] or ``None`` (then the
trainer computes the target: the reference function's output, or ``x`` itself for an SAE).
``next_batch`` raises ``StopIteration`` when the stream has nothing more.

``state_dict()`` returns tensors and JSON-safe values (ints, floats, strings, bools, None, lists);
a checkpoint stores the tensors in safetensors and the rest in JSON, so a resumed run sees exactly
the batches the interrupted run would have seen.

- :class:`TensorStream`: in-memory tensors, reshuffled every epoch with a seeded generator (the last
  incomplete batch of an epoch is dropped, so every batch has the same size).
- :class:`FunctionStream`: ``fn(generator, batch_size) -> (x, y)`` (or ``x``) for synthetic data;
  its state is the generator's.
- :class:`IterableStream`: any iterable of ``(x, y)``, ``(x,)`` or ``x``; resumed by skipping the
  batches already used (fast-forwarding), so the iterable must yield the same batches again.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Protocol, runtime_checkable

import torch
from torch import Tensor

from mechfaith.errors import ConfigError, InputError

Batch = tuple[Tensor, "Tensor | None"]


@runtime_checkable
class BatchStream(Protocol):
    """What the trainer needs from a source of batches."""

    def next_batch(self) -> tuple[Tensor, Tensor | None]:
        """The next ``(x, y_or_None)``; ``StopIteration`` when exhausted."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Tensors and JSON-safe values that :meth:`load_state_dict` restores the position from."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position saved by :meth:`state_dict`."""
        ...


def _tensors(items: Any, allow_none: bool = False) -> bool:
    return isinstance(items, (tuple, list)) and len(items) > 0 and all(
        isinstance(t, Tensor) or (allow_none and t is None) for t in items)


def split_batch(item: Any) -> tuple[Tensor, Tensor | None]:
    """Normalise ``(x, y)``, ``(x, None)``, ``(x,)`` or ``x`` to ``(x, y_or_None)``.

    For an engine with several members, ``x`` (and ``y``) may be tuples with one tensor per member.
    """
    if isinstance(item, Tensor):
        return item, None
    if isinstance(item, (tuple, list)) and len(item) in (1, 2):
        x = item[0]
        y = item[1] if len(item) == 2 else None
        if isinstance(x, Tensor) and (y is None or isinstance(y, Tensor)):
            return x, y
        if _tensors(x) and (y is None or _tensors(y, allow_none=True)):  # one (x, y) per engine member
            return x, y
    raise InputError(f"a batch must be a tensor x or a tuple (x, y) of tensors, got {type(item).__name__}")


def _check_state(state: dict[str, Any], kind: str, keys: Iterable[str]) -> None:
    if not isinstance(state, dict):
        raise ConfigError(f"{kind}: stream state must be a mapping, got {type(state).__name__}")
    if state.get("kind") != kind:
        raise ConfigError(f"the saved stream state is of a {state.get('kind')!r}, not of a {kind}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise ConfigError(f"{kind}: the saved stream state lacks {', '.join(missing)}")
    for key in keys:  # counters are integers >= 0, generator states byte tensors
        value = state[key]
        if key == "generator":
            if not (isinstance(value, Tensor) and value.dtype == torch.uint8 and value.dim() == 1):
                raise ConfigError(f"{kind}: the saved generator state is not a byte tensor")
        elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{kind}: the saved {key} must be an integer >= 0, got {str(value)[:40]!r}")


def _set_generator(generator: torch.Generator, state: Tensor, kind: str) -> None:
    try:
        generator.set_state(state)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"{kind}: the saved generator state does not fit ({str(exc).splitlines()[0]})") from None


class TensorStream:
    """Batches of rows of in-memory tensors, shuffled anew each epoch (seeded)."""

    def __init__(self, x: Tensor, y: Tensor | None = None, *, batch_size: int, seed: int = 0,
                 shuffle: bool = True) -> None:
        if not isinstance(x, Tensor) or x.ndim < 2:
            raise InputError(f"TensorStream: x must be a tensor [rows, d_in], got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        x = x.reshape(-1, x.shape[-1])
        if y is not None:
            if not isinstance(y, Tensor) or y.ndim < 2:
                raise InputError("TensorStream: y must be a tensor [rows, d_out] or None")
            y = y.reshape(-1, y.shape[-1])
            if y.shape[0] != x.shape[0]:
                raise InputError(f"TensorStream: x has {x.shape[0]} rows but y has {y.shape[0]}")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ConfigError(f"TensorStream: batch_size must be a positive integer, got {batch_size!r}")
        if batch_size > x.shape[0]:
            raise ConfigError(f"TensorStream: batch_size {batch_size} exceeds the {x.shape[0]} rows of data")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0  # epochs started
        self.position = 0  # rows of the current epoch already served
        self._epoch_gen_state: Tensor | None = None  # generator state the epoch's order came from
        self._order: Tensor | None = None  # [rows] int64 order of the current epoch

    @property
    def n_rows(self) -> int:
        return self.x.shape[0]

    def _new_order(self) -> Tensor:
        if self.shuffle:
            return torch.randperm(self.n_rows, generator=self.generator)
        return torch.arange(self.n_rows)

    def _start_epoch(self) -> None:
        self._epoch_gen_state = self.generator.get_state()
        self._order = self._new_order()
        self.epoch += 1
        self.position = 0

    def next_batch(self) -> tuple[Tensor, Tensor | None]:
        if self._order is None or self.position + self.batch_size > self.n_rows:
            self._start_epoch()
        assert self._order is not None
        idx = self._order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        idx = idx.to(self.x.device)
        return self.x[idx], (self.y[idx] if self.y is not None else None)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "TensorStream", "n_rows": self.n_rows, "batch_size": self.batch_size,
                "shuffle": self.shuffle, "epoch": self.epoch, "position": self.position,
                "generator": self.generator.get_state(),
                "epoch_generator": self._epoch_gen_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state(state, "TensorStream", ("n_rows", "batch_size", "epoch", "position", "generator"))
        for key in ("n_rows", "batch_size"):
            if state[key] != getattr(self, key):
                raise ConfigError(f"TensorStream: the saved state is for {key} = {state[key]}, "
                                  f"this stream has {getattr(self, key)}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if position > self.n_rows:
            raise ConfigError(f"TensorStream: the saved position {position} is beyond the {self.n_rows} rows")
        if epoch > 0:
            epoch_gen = state.get("epoch_generator")
            if not isinstance(epoch_gen, Tensor):
                raise ConfigError("TensorStream: the saved state lacks the epoch's generator state")
            _set_generator(self.generator, epoch_gen, "TensorStream")
            self._epoch_gen_state = epoch_gen.clone()
            self._order = self._new_order()
        else:
            self._epoch_gen_state, self._order = None, None
        _set_generator(self.generator, state["generator"], "TensorStream")
        self.epoch, self.position = epoch, position


class FunctionStream:
    """Synthetic batches ``fn(generator, batch_size) -> (x, y)`` (or ``x``) from a seeded generator.

    ``fn`` must draw all its randomness from the generator it is given, so that restoring the
    generator's state restores the stream.
    """

    def __init__(self, fn: Callable[[torch.Generator, int], Any], *, batch_size: int, seed: int = 0,
                 generator_device: str | torch.device = "cpu") -> None:
        if not callable(fn):
            raise ConfigError("FunctionStream: fn must be callable")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ConfigError(f"FunctionStream: batch_size must be a positive integer, got {batch_size!r}")
        self.fn = fn
        self.batch_size = batch_size
        self.generator = torch.Generator(device=generator_device).manual_seed(seed)
        self.batches = 0

    def next_batch(self) -> tuple[Tensor, Tensor | None]:
        item = self.fn(self.generator, self.batch_size)
        self.batches += 1
        return split_batch(item)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "FunctionStream", "batch_size": self.batch_size, "batches": self.batches,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state(state, "FunctionStream", ("batch_size", "batches", "generator"))
        if state["batch_size"] != self.batch_size:
            raise ConfigError(f"FunctionStream: the saved state is for batch_size = "
                              f"{state['batch_size']}, this stream has {self.batch_size}")
        _set_generator(self.generator, state["generator"], "FunctionStream")
        self.batches = int(state["batches"])


class IterableStream:
    """Any iterable of batches; resuming skips the batches already used."""

    def __init__(self, iterable: Iterable[Any]) -> None:
        self._iterable = iterable
        self._it: Iterator[Any] | None = None
        self.batches = 0
        self._skip = 0

    def next_batch(self) -> tuple[Tensor, Tensor | None]:
        if self._it is None:
            self._it = iter(self._iterable)
        while self._skip > 0:
            next(self._it)  # StopIteration here: the iterable is shorter than the saved position
            self._skip -= 1
        item = next(self._it)
        self.batches += 1
        return split_batch(item)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "IterableStream", "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state(state, "IterableStream", ("batches",))
        if self._it is not None or self.batches:
            raise ConfigError("IterableStream: load_state_dict must come before the first batch")
        self.batches = int(state["batches"])
        self._skip = self.batches


def as_stream(source: Any) -> BatchStream:
    """A :class:`BatchStream` as it is, or any other iterable wrapped in an :class:`IterableStream`."""
    if all(hasattr(source, a) for a in ("next_batch", "state_dict", "load_state_dict")):
        return source  # type: ignore[no-any-return]
    if isinstance(source, Tensor):
        raise ConfigError("pass a tensor of data as TensorStream(x, y, batch_size=...), not bare")
    if hasattr(source, "__iter__"):
        return IterableStream(source)
    raise ConfigError(f"cannot train on a {type(source).__name__}: expected a BatchStream or an "
                      f"iterable of (x, y) batches")
