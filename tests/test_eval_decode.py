"""The fast path's JPEG decoders (parity/eval_decode.py): routing, fallbacks, and the nvImageCodec glue.

nvImageCodec needs a CUDA device even to make a decoder, so its glue is tested here against
a stand-in module with the same calls, decoding through PIL; the real library's pixels are
checked by the GPU tests (tests/test_fixtures.py, tests/test_eval.py).
"""

from __future__ import annotations

import io
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from converters.errors import InputError
from parity import eval_decode
from parity.eval_data import collate_packed


def _jpeg(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _pil(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)).convert("RGB"))


def _fake_nvimgcodec(refuse: set[bytes]) -> types.ModuleType:
    """A stand-in for nvidia.nvimgcodec: CodeStream parses (RuntimeError on garbage, as the library does),
    Decoder.decode returns H, W, C arrays, or None for streams in `refuse`; every call is recorded."""
    module = types.ModuleType("nvidia.nvimgcodec")
    module.calls = []

    class CodeStream:
        def __init__(self, array: np.ndarray) -> None:
            self.data = array.tobytes()
            try:
                Image.open(io.BytesIO(self.data))
            except Exception:
                raise RuntimeError("Failed to get image info") from None

    class Decoder:
        def __init__(self, device_id: int, options: str) -> None:
            module.calls.append(("Decoder", device_id, options))

        def decode(self, streams, *, params, cuda_stream):
            module.calls.append(("decode", len(streams), params.kwargs, cuda_stream))
            return [None if s.data in refuse else _pil(s.data) for s in streams]

    module.CodeStream, module.Decoder = CodeStream, Decoder
    module.DecodeParams = lambda **kwargs: types.SimpleNamespace(kwargs=kwargs)
    module.ColorSpec = types.SimpleNamespace(SRGB="sRGB")
    return module


@pytest.fixture
def fake_codec(monkeypatch):
    def install(refuse: set[bytes] = frozenset()) -> types.ModuleType:
        module = _fake_nvimgcodec(set(refuse))
        monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", module)
        return module

    eval_decode._nvimgcodec_decoder.cache_clear()
    yield install
    eval_decode._nvimgcodec_decoder.cache_clear()


def _batch(items: list[bytes | np.ndarray]) -> dict:
    """A packed batch as the workers make it: bytes stay JPEG data, arrays are decoded pixels."""
    rows = [{"index": i, "note": "", "data": item if isinstance(item, bytes) else None,
             "image": torch.from_numpy(item).permute(2, 0, 1).contiguous() if isinstance(item, np.ndarray) else None}
            for i, item in enumerate(items)]
    return collate_packed(rows)


def test_nvimgcodec_glue_decodes_in_one_call_and_falls_back_to_pil(fake_codec):
    codec = fake_codec(refuse={_jpeg(1, (30, 20))})
    good, refused, garbage = _jpeg(0, (61, 45)), _jpeg(1, (30, 20)), b"\xff\xd8not a jpeg\xff\xd9"
    pixels = _pil(_jpeg(2, (17, 9)))
    images, notes = eval_decode.decode_batch(_batch([good, refused, pixels, garbage]), torch.device("cpu"), "nvimgcodec")
    assert np.array_equal(images[0].permute(1, 2, 0).numpy(), _pil(good)) and notes[0] == ""
    assert np.array_equal(images[1].permute(1, 2, 0).numpy(), _pil(refused)) and notes[1] == "GPU decode failed; PIL"
    assert np.array_equal(images[2].permute(1, 2, 0).numpy(), pixels) and notes[2] == ""
    assert images[3] is None and notes[3].startswith("RuntimeError: Failed to get image info; PIL: ")
    # one decoder, libjpeg's chroma upsampling; one batched call for the two parsable streams; no EXIF rotation
    assert codec.calls == [("Decoder", -1, ":fancy_upsampling=1"),
                           ("decode", 2, {"apply_exif_orientation": False, "color_spec": "sRGB"}, 0)]
    eval_decode.decode_batch(_batch([good]), torch.device("cpu"), "nvimgcodec")
    assert [c[0] for c in codec.calls] == ["Decoder", "decode", "decode"]  # the decoder is made once per device


def test_a_batch_of_worker_decoded_pixels_needs_no_decoder(fake_codec):
    codec = fake_codec()
    pixels = [_pil(_jpeg(s, (13, 11))) for s in range(2)]
    images, notes = eval_decode.decode_batch(_batch(pixels), torch.device("cpu"), "nvimgcodec")
    assert all(np.array_equal(i.permute(1, 2, 0).numpy(), p) for i, p in zip(images, pixels)) and notes == ["", ""]
    assert codec.calls == []


def test_torchvision_decoder_retries_image_by_image():
    good, garbage = _jpeg(0, (40, 30)), b"\xff\xd8not a jpeg\xff\xd9"  # garbage fails the batched call
    images, notes = eval_decode.decode_batch(_batch([good, garbage]), torch.device("cpu"), "gpu")
    assert np.array_equal(images[0].permute(1, 2, 0).numpy(), _pil(good)) and notes[0] == ""
    assert images[1] is None and notes[1].startswith("RuntimeError: ") and "; PIL: cannot identify image file" in notes[1]


def test_nvimgcodec_needs_cuda_and_the_package(monkeypatch, fake_codec):
    with pytest.raises(InputError, match="--decode nvimgcodec decodes on a CUDA device; use --decode cpu or gpu"):
        eval_decode.check_decoder("nvimgcodec", torch.device("cpu"))
    with pytest.raises(InputError, match="decode must be one of gpu, nvimgcodec, cpu, not 'dali'"):
        eval_decode.check_decoder("dali", torch.device("cpu"))
    codec = fake_codec()
    codec.Decoder = lambda **kwargs: (_ for _ in ()).throw(RuntimeError("CUDA Runtime failure: '#35'"))
    with pytest.raises(InputError, match=r"nvImageCodec could not make a decoder on cuda:0: CUDA Runtime failure: '#35'"):
        eval_decode.check_decoder("nvimgcodec", torch.device("cuda", 0))
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)  # import fails, as when it is not installed
    with pytest.raises(InputError, match=r'needs NVIDIA nvImageCodec, which is not installed .*: pip install '
                                         r'"nvidia-nvimgcodec-cu13\[nvjpeg\]"'):
        eval_decode.check_decoder("nvimgcodec", torch.device("cuda", 0))
    eval_decode.check_decoder("gpu", torch.device("cpu"))  # torchvision's decoder runs anywhere


def test_auto_picks_nvimgcodec_where_it_runs_and_says_why_not_elsewhere(monkeypatch, fake_codec):
    cuda = torch.device("cuda", 0)
    assert eval_decode.resolve_decoder("auto", torch.device("cpu")) == ("cpu", None)
    fake_codec()
    assert eval_decode.resolve_decoder("auto", cuda) == ("nvimgcodec", None)
    assert eval_decode.resolve_decoder("gpu", cuda) == ("gpu", None)  # an explicit choice stays
    with pytest.raises(InputError, match="decode must be one of auto, gpu, nvimgcodec, cpu, not 'dali'"):
        eval_decode.resolve_decoder("dali", cuda)
    eval_decode._nvimgcodec_decoder.cache_clear()
    fake_codec().Decoder = lambda **kwargs: (_ for _ in ()).throw(RuntimeError("CUDA Runtime failure: '#35'"))
    decoder, note = eval_decode.resolve_decoder("auto", cuda)
    assert decoder == "gpu" and note == (
        "decoded JPEGs with torchvision's nvJPEG, whose chroma upsampling is not libjpeg's, so fewer predictions "
        "match the faithful path's; nvImageCodec was not usable: nvImageCodec could not make a decoder on cuda:0: "
        "CUDA Runtime failure: '#35'")
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)  # not installed
    decoder, note = eval_decode.resolve_decoder("auto", cuda)
    assert decoder == "gpu" and note.endswith('which is not installed (import of nvidia.nvimgcodec halted; None in '
                                              'sys.modules): pip install "nvidia-nvimgcodec-cu13[nvjpeg]" (or -cu12 '
                                              'for a CUDA 12 build of torch; "parityport[nvimgcodec]" from this project)')


def test_nvimgcodec_log_is_quiet_unless_the_user_set_it(monkeypatch, fake_codec):
    fake_codec()
    monkeypatch.delenv("PYNVIMGCODEC_VERBOSITY", raising=False)
    eval_decode._nvimgcodec_module()
    assert os.environ["PYNVIMGCODEC_VERBOSITY"] == "0"
    monkeypatch.setenv("PYNVIMGCODEC_VERBOSITY", "3")
    eval_decode._nvimgcodec_module()
    assert os.environ["PYNVIMGCODEC_VERBOSITY"] == "3"
