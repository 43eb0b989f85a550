"""Batch streams: order, epochs, and saving/restoring their position."""

from __future__ import annotations

import pytest
import torch

from mechfaith.errors import ConfigError, InputError
from mechfaith.training.streams import BatchStream, FunctionStream, IterableStream, TensorStream, as_stream, split_batch


def _take(stream, n):
    return [stream.next_batch() for _ in range(n)]


def test_tensor_stream_epochs_cover_rows_once_and_drop_last():
    x = torch.arange(10, dtype=torch.float32).reshape(10, 1)
    y = -x
    s = TensorStream(x, y, batch_size=3, seed=0)
    assert isinstance(s, BatchStream)
    batches = _take(s, 6)  # 3 per epoch (the 10th row of an epoch is dropped), 2 epochs
    for xb, yb in batches:
        assert xb.shape == (3, 1) and torch.equal(yb, -xb)
    first = torch.cat([b[0] for b in batches[:3]]).flatten().tolist()
    second = torch.cat([b[0] for b in batches[3:]]).flatten().tolist()
    assert len(set(first)) == 9 and len(set(second)) == 9
    assert first != second  # reshuffled
    assert s.epoch == 2
    unshuffled = TensorStream(x, batch_size=5, shuffle=False)
    assert unshuffled.next_batch()[0].flatten().tolist() == [0, 1, 2, 3, 4]
    assert unshuffled.next_batch()[1] is None


@pytest.mark.parametrize("n_before", [0, 2, 3, 4, 7])
def test_tensor_stream_state_round_trip(n_before):
    x = torch.randn(10, 2)
    a = TensorStream(x, batch_size=3, seed=4)
    _take(a, n_before)
    state = a.state_dict()
    expected = _take(a, 5)
    b = TensorStream(x, batch_size=3, seed=99)
    b.load_state_dict(state)
    for (xa, _), (xb, _) in zip(expected, _take(b, 5)):
        assert torch.equal(xa, xb)


def test_tensor_stream_rejects_bad_input_and_foreign_state():
    with pytest.raises(ConfigError, match="exceeds"):
        TensorStream(torch.randn(4, 2), batch_size=5)
    with pytest.raises(InputError, match="rows"):
        TensorStream(torch.randn(4, 2), torch.randn(3, 2), batch_size=2)
    s = TensorStream(torch.randn(6, 2), batch_size=2)
    with pytest.raises(ConfigError, match="n_rows"):
        s.load_state_dict(TensorStream(torch.randn(8, 2), batch_size=2).state_dict())
    with pytest.raises(ConfigError, match="FunctionStream"):
        s.load_state_dict(FunctionStream(lambda g, b: torch.zeros(b, 2), batch_size=2).state_dict())


def test_function_stream_state_round_trip():
    def fn(gen, b):
        x = torch.randn(b, 3, generator=gen)
        return x, 2 * x

    a = FunctionStream(fn, batch_size=4, seed=1)
    _take(a, 3)
    state = a.state_dict()
    expected = _take(a, 2)
    b = FunctionStream(fn, batch_size=4, seed=7)
    b.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(expected, _take(b, 2)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert b.batches == 5


def test_iterable_stream_fast_forwards_and_ends():
    data = [(torch.full((2, 1), float(i)), None) for i in range(5)]
    a = IterableStream(data)
    _take(a, 2)
    b = as_stream(iter(data))
    assert isinstance(b, IterableStream)
    b.load_state_dict(a.state_dict())
    assert b.next_batch()[0][0, 0].item() == 2.0
    _take(b, 2)
    with pytest.raises(StopIteration):
        b.next_batch()


def test_split_batch_and_as_stream_errors():
    x = torch.zeros(2, 3)
    assert split_batch(x)[1] is None
    assert split_batch((x,))[1] is None
    assert split_batch((x, x))[1] is x
    with pytest.raises(InputError):
        split_batch("nope")
    with pytest.raises(ConfigError, match="TensorStream"):
        as_stream(x)
    with pytest.raises(ConfigError):
        as_stream(3)
