"""Stored forms read a few samples at a time (conv backward's chunks):
byte-equal to slicing the whole decode, and without decoding the whole batch
for every chunk."""
import tracemalloc

import numpy as np
import pytest

from npapprox import quant, units
from npapprox.kernels import generic_pack, pack_bits, paper_pack, paper_sample_decoder
from npapprox.kernels.switch import use_reference
from npapprox.storage import GenericPacked
from npapprox.units import GenericUnit, PaperUnit

F32 = np.float32


def _forms(shape, bits, group, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(F32)
    x.reshape(-1)[::7] = 0.0                                   # constant runs, exact zeros
    packed, lo, scale, _ = generic_pack(x, bits, group)
    y = GenericPacked(packed, lo, scale, bits, group, shape, np.dtype(F32))
    c = shape[1]
    unit = GenericUnit(y, pack_bits((x > 0).reshape(-1).astype(np.uint8), 1), rng.standard_normal(c).astype(F32),
                       rng.standard_normal(c).astype(F32))
    return y, unit


@pytest.mark.parametrize("shape, bits, group", [
    ((7, 4, 8, 8), 4, 256),      # samples start on bytes and groups: each chunk decoded on its own
    ((6, 16, 4, 4), 8, 1),
    ((5, 2, 2, 2), 1, 8),
    ((7, 3, 5, 5), 2, 75),       # samples end mid-byte: the whole array, rebuilt once
    ((7, 4, 8, 8), 4, 100),      # groups straddle samples: the same
])
def test_sample_readers_equal_slices_of_the_whole_decode(shape, bits, group):
    y, unit = _forms(shape, bits, group)
    for form, whole in ((y, y.restore()), (unit, unit.h())):
        read = form.sample_reader()
        for a in range(shape[0]):
            for b in range(a + 1, shape[0] + 1):
                assert read(slice(a, b)).tobytes() == whole[a:b].tobytes(), (type(form).__name__, a, b)
        if form is unit:
            assert unit.h_samples(slice(1, 3)).tobytes() == whole[1:3].tobytes()


def test_an_aligned_chunk_decodes_only_its_samples():
    shape = (32, 16, 16, 16)                               # 512 KiB of float32
    y, unit = _forms(shape, 4, 256)
    for form in (y, unit):
        tracemalloc.start()
        form.sample_reader()(slice(5, 7))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        one_sample = 4 * int(np.prod(shape[1:]))
        assert peak < 12 * one_sample, (type(form).__name__, peak)  # 2 samples and their temporaries, not 32


@pytest.mark.parametrize("bits, aligned", [(8, True), (4, False), (2, False), (1, False)])
def test_a_paper_unit_whose_samples_end_mid_byte_decodes_the_batch_once(bits, aligned, monkeypatch):
    """27 values a sample: whole bytes at K = 8 only. Otherwise the reader
    decodes all of h once, not once per chunk, and still gives its slices."""
    rng = np.random.default_rng(bits)
    shape = (8, 3, 3, 3)
    y = rng.standard_normal(shape).astype(F32)
    p = quant.paper_params(np.ones(3, F32), np.zeros(3, F32), bits)
    unit = PaperUnit(paper_pack(y, p["k"], p["s"], bits)[0], p, bits, shape, np.dtype(F32))
    whole = unit.h()
    calls = []
    decode, decoder = units.paper_decode, units.paper_sample_decoder

    def counted(packed, shp, *args, **kwargs):
        calls.append(shp[0])
        return decode(packed, shp, *args, **kwargs)

    def counted_decoder(*args, **kwargs):
        chunk = decoder(*args, **kwargs)

        def counted_chunk(a, b):
            calls.append(b - a)
            return chunk(a, b)
        return counted_chunk

    monkeypatch.setattr(units, "paper_decode", counted)
    monkeypatch.setattr(units, "paper_sample_decoder", counted_decoder)
    read = unit.sample_reader()
    got = [read(slice(a, a + 2)) for a in range(0, 8, 2)]
    assert b"".join(g.tobytes() for g in got) == whole.tobytes()
    assert calls == ([2, 2, 2, 2] if aligned else [8])


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_a_paper_units_reader_gives_the_whole_decodes_slices(bits, reference):
    """Byte-aligned samples (8 x 4 x 4 values): the reader, its decode's arguments
    checked once, gives each chunk the bytes of slicing the whole h -- every range,
    compiled or reference, and a stepped slice through ``h_samples``. A decoder for
    samples that end mid-byte is refused."""
    rng = np.random.default_rng(bits)
    shape = (6, 8, 4, 4)
    gamma, beta = rng.standard_normal(8).astype(F32), rng.standard_normal(8).astype(F32)
    p = quant.paper_params(gamma, beta, bits)
    unit = PaperUnit(paper_pack(rng.standard_normal(shape).astype(F32), p["k"], p["s"], bits)[0], p, bits, shape,
                     np.dtype(F32))
    use_reference(reference)
    try:
        whole, read = unit.h(), unit.sample_reader()
        for a in range(shape[0]):
            for b in range(a + 1, shape[0] + 1):
                assert read(slice(a, b)).tobytes() == whole[a:b].tobytes(), (a, b)
        assert read(slice(0, 6, 2)).tobytes() == whole[0:6:2].tobytes()
    finally:
        use_reference(False)
    with pytest.raises(ValueError, match="do not start on whole bytes"):
        paper_sample_decoder(unit.packed, (6, 3, 1, 1), unit.s, p["h_step"], np.zeros(3, F32), 1)
