"""Cancelling the AIS decoder inside its forward: the stop check is asked between bands of
conv rows (a few GFLOP apart), not only between stages, so Cancel in the Segment Everything
widget acts within a second even in the full-resolution stages (seconds each on a CPU)."""

from __future__ import annotations

import threading

import pytest
import torch

from napari_sam.engine.instances import predict_decoder_outputs
from napari_sam.engine.predictor import ImageEmbedding, Stopped, stop_when
from napari_sam.model import instance_decoder
from napari_sam.model.instance_decoder import DecodingStopped, InstanceDecoder

IMG = 128  # output 128 x 128 from an 8 x 8 embedding: the real architecture, small


@pytest.fixture(scope="module", params=[True, False], ids=["transposed", "bilinear"])
def decoder(request):
    torch.manual_seed(0)
    return InstanceDecoder(256, IMG, transposed=request.param).eval()


@pytest.fixture(scope="module")
def embedding():
    return torch.randn(1, 256, IMG // 16, IMG // 16, generator=torch.Generator().manual_seed(1))


class WorkBetweenChecks:
    """Counts stop checks and the conv / linear FLOPs done between two of them."""

    def __init__(self, monkeypatch, cancel_at: int | None = None) -> None:
        self.checks, self.flops, self.largest, self.total = 0, 0, 0, 0
        self.cancel_at, self.cancel = cancel_at, threading.Event()
        self.work_after_cancel = 0
        F = torch.nn.functional
        conv2d, linear = F.conv2d, F.linear

        def counted_conv2d(x, weight, *args, **kwargs):
            out = conv2d(x, weight, *args, **kwargs)
            self._add(2 * out.numel() * weight[0].numel())
            return out

        def counted_linear(x, weight, *args, **kwargs):
            out = linear(x, weight, *args, **kwargs)
            self._add(2 * out.numel() * weight.shape[1])
            return out

        monkeypatch.setattr(F, "conv2d", counted_conv2d)
        monkeypatch.setattr(F, "linear", counted_linear)

    def _add(self, flops: int) -> None:
        self.flops += flops
        self.total += flops
        self.largest = max(self.largest, self.flops)
        if self.cancel.is_set():
            self.work_after_cancel += flops

    def __call__(self) -> bool:
        self.checks += 1
        self.flops = 0
        if self.checks == self.cancel_at:
            self.cancel.set()
        return self.cancel.is_set()


def test_enclosing_stop_check_is_asked_between_bands(decoder, embedding, monkeypatch):
    """Under a job's ``stop_when`` (as the widget's job runner runs each step), the check is
    asked many times within one forward, and no stretch between two asks holds more than a
    small part of the forward's work (without bands, the full-resolution head alone is a
    quarter of it)."""
    monkeypatch.setattr(instance_decoder, "_BAND_FLOPS", 1 << 26)  # 67 MFLOP bands at this size
    work = WorkBetweenChecks(monkeypatch)
    with stop_when(work):
        decoder(embedding, (IMG, IMG), (IMG, IMG))
    assert work.checks >= 30
    assert work.largest <= work.total / 20, f"{work.largest / work.total:.1%} of the work between two checks"


@pytest.mark.parametrize("where", [0.25, 0.5, 0.9])
def test_cancel_set_mid_forward_stops_at_the_next_check(decoder, embedding, monkeypatch, where):
    """A cancel set at any point of the forward raises DecodingStopped (a Stopped) at the
    next check: no conv work runs after the check that saw it."""
    monkeypatch.setattr(instance_decoder, "_BAND_FLOPS", 1 << 26)
    with stop_when(counter := WorkBetweenChecks(monkeypatch)):
        decoder(embedding, (IMG, IMG), (IMG, IMG))
    monkeypatch.undo()
    monkeypatch.setattr(instance_decoder, "_BAND_FLOPS", 1 << 26)
    cancel_at = max(2, int(where * counter.checks))
    work = WorkBetweenChecks(monkeypatch, cancel_at=cancel_at)
    with pytest.raises(DecodingStopped):
        decoder(embedding, (IMG, IMG), (IMG, IMG), should_stop=work)
    assert work.checks == cancel_at and work.work_after_cancel == 0
    # the same through an enclosing stop_when (the job runner's): a Stopped as well
    work = WorkBetweenChecks(monkeypatch, cancel_at=cancel_at)
    with pytest.raises(Stopped), stop_when(work):
        decoder(embedding, (IMG, IMG), (IMG, IMG))
    assert work.checks == cancel_at and work.work_after_cancel == 0


def test_predict_decoder_outputs_returns_none_when_cancelled_mid_forward(embedding, monkeypatch):
    """The engine call the widget's AIS job makes: a cancel event set inside the forward
    ends it with None (the job then ends cancelled, nothing written)."""
    decoder = InstanceDecoder(256, IMG).eval()
    model = type("Model", (), {"instance_decoder": decoder, "device": torch.device("cpu")})()
    emb = ImageEmbedding(features=embedding, original_size=(IMG, IMG), input_size=(IMG, IMG),
                         model_signature=None)
    monkeypatch.setattr(instance_decoder, "_BAND_FLOPS", 1 << 26)
    work = WorkBetweenChecks(monkeypatch, cancel_at=12)
    cancel = work.cancel
    with stop_when(work):  # counts the checks; the event is what predict_decoder_outputs gets
        assert predict_decoder_outputs(model, emb, cancel) is None
    assert work.checks == 12 and work.work_after_cancel == 0


def test_bands_give_the_unbanded_result(decoder, embedding, monkeypatch):
    """Not cancelled, the banded convs compute the same maps as one conv per layer."""
    sizes = [((IMG, IMG), (IMG, IMG)), ((IMG, 90), (200, 141))]
    whole = []
    monkeypatch.setattr(instance_decoder, "_BAND_FLOPS", 1 << 62)  # one band per conv
    for size in sizes:
        whole.append(decoder(embedding, *size))
    monkeypatch.setattr(instance_decoder, "_BAND_FLOPS", 1 << 20)  # a few rows per band
    for size, expected in zip(sizes, whole):
        with stop_when(lambda: False):
            got = decoder(embedding, *size)
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
