"""weights/gguf.py against the `gguf` package (the format's reference library, from llama.cpp's repo):
dequantization bit for bit, Q8_0 quantization bit for bit, files either one writes read by the other,
and every error a damaged file can give."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import quants  # noqa: E402

from weights import CheckpointError  # noqa: E402
from weights.gguf import BLOCK, READABLE, GGMLType, GGUFFile, ValueType, dequantize, quantize_q8_0, write_gguf  # noqa: E402

# Byte offsets of the fp16 scales (d, and m / dmin) inside one block of each quantized type. Random
# bytes there would be NaN or huge; everywhere else any byte is a valid encoding.
FP16_FIELDS = {
    GGMLType.Q4_0: [0], GGMLType.Q4_1: [0, 2], GGMLType.Q5_0: [0], GGMLType.Q5_1: [0, 2],
    GGMLType.Q8_0: [0], GGMLType.Q2_K: [80, 82], GGMLType.Q3_K: [108], GGMLType.Q4_K: [0, 2],
    GGMLType.Q5_K: [0, 2], GGMLType.Q6_K: [208],
}  # fmt: skip
QUANTIZED = list(FP16_FIELDS)


def random_blocks(kind: GGMLType, n_blocks: int, seed: int = 0) -> np.ndarray:
    """(n_blocks, bytes per block) uint8: random quantized values and random finite scales."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n_blocks, BLOCK[kind][1]), dtype=np.uint8)
    for offset in FP16_FIELDS[kind]:
        scales = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def reference(blocks: np.ndarray, kind: GGMLType) -> np.ndarray:
    return quants.dequantize(blocks, gguf.GGMLQuantizationType(kind)).reshape(-1)


def test_every_quantized_type_is_readable():
    assert set(QUANTIZED) | {GGMLType.F32, GGMLType.F16, GGMLType.BF16} == set(READABLE)


@pytest.mark.parametrize("kind", QUANTIZED, ids=lambda k: k.name)
def test_dequantize_bit_for_bit(kind):
    blocks = random_blocks(kind, 3000, seed=int(kind))
    ours = dequantize(torch.from_numpy(blocks.reshape(-1).copy()), kind).numpy()
    expected = reference(blocks, kind)
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    assert np.array_equal(ours.view(np.int32), expected.view(np.int32))  # the same bits, signed zeros too


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_to_a_narrower_dtype_rounds_the_float32_values(dtype):
    blocks = random_blocks(GGMLType.Q4_K, 50)
    ours = dequantize(torch.from_numpy(blocks.reshape(-1).copy()), GGMLType.Q4_K, dtype)
    assert torch.equal(ours, torch.from_numpy(reference(blocks, GGMLType.Q4_K)).to(dtype))


def test_float_types_read_exactly():
    x = torch.randn(1000)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        stored = x.to(dtype)
        kind = {torch.float32: GGMLType.F32, torch.float16: GGMLType.F16, torch.bfloat16: GGMLType.BF16}[dtype]
        assert torch.equal(dequantize(stored.view(torch.uint8), kind, torch.float32), stored.float())


def test_q8_0_quantization_is_ggmls():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((96, 256)).astype(np.float32)
    x[0, :32] = 0  # an all-zero block: d = 0, q = 0
    x[1, :32] = np.arange(32) * (127 / 254) - 8  # many values at exact halves of d: roundf rounds away from 0
    x[2, :32] = np.float32(0.4999999702) * (np.arange(32) % 2)  # just under a half
    x[3] *= 1e-30  # subnormal-sized scales
    expected = quants.quantize(x, gguf.GGMLQuantizationType.Q8_0).reshape(-1)
    assert np.array_equal(quantize_q8_0(torch.from_numpy(x)).numpy(), expected)


def test_q8_0_of_q8_0_values_is_lossless():
    x = torch.randn(16, 64)
    once = quantize_q8_0(x)
    back = dequantize(once, GGMLType.Q8_0).view(16, 64)
    assert torch.equal(quantize_q8_0(back), once)


# ---- files ------------------------------------------------------------------------------------------


def write_with_gguf_package(path, tensors: dict[str, tuple[np.ndarray, GGMLType]], extra_kv=None):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(3)
    writer.add_rope_freq_base(500000.0)
    writer.add_token_list(["<s>", "a", "\u2581b"])
    writer.add_token_scores([0.0, -1.5, -2.25])
    writer.add_token_types([3, 1, 1])
    writer.add_add_bos_token(True)
    for key, value in (extra_kv or {}).items():
        writer.add_string(key, value)
    for name, (data, kind) in tensors.items():
        if kind in (GGMLType.F32, GGMLType.F16):
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType(kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_reads_a_file_the_gguf_package_wrote(tmp_path):
    rng = np.random.default_rng(2)
    full = rng.standard_normal((8, 512)).astype(np.float32)
    tensors = {"f32": (full, GGMLType.F32), "f16": (full.astype(np.float16), GGMLType.F16),
               "norm": (full[0], GGMLType.F32)}  # fmt: skip
    for kind in QUANTIZED:  # 8 rows of 512 values: 16 or 2 blocks per row
        blocks = random_blocks(kind, 8 * 512 // BLOCK[kind][0], seed=int(kind))
        tensors[kind.name] = (blocks.reshape(8, -1), kind)
    write_with_gguf_package(tmp_path / "m.gguf", tensors)
    with GGUFFile(tmp_path / "m.gguf") as f:
        assert f.version == 3
        assert f.metadata["general.architecture"] == "llama"
        assert f.metadata["llama.block_count"] == 3 and f.value_types["llama.block_count"] == ValueType.UINT32
        assert f.metadata["llama.rope.freq_base"] == 500000.0
        assert f.metadata["tokenizer.ggml.tokens"] == ["<s>", "a", "\u2581b"]
        assert f.metadata["tokenizer.ggml.scores"] == [0.0, -1.5, -2.25]
        assert f.metadata["tokenizer.ggml.token_type"] == [3, 1, 1]
        assert f.metadata["tokenizer.ggml.add_bos_token"] is True
        assert f.tensors["f32"].shape == (8, 512) and f.tensors["norm"].shape == (512,)
        assert torch.equal(f.read("f32"), torch.from_numpy(full))
        assert f.read("f16").dtype == torch.float16
        assert torch.equal(f.read("f16", torch.float32), torch.from_numpy(full.astype(np.float16).astype(np.float32)))
        for kind in QUANTIZED:
            assert f.tensors[kind.name].shape == (8, 512) and f.tensors[kind.name].type == kind
            expected = reference(tensors[kind.name][0].reshape(-1, BLOCK[kind][1]), kind).reshape(8, 512)
            assert torch.equal(f.read(kind.name), torch.from_numpy(expected)), kind.name
            assert torch.equal(f.raw(kind.name), torch.from_numpy(tensors[kind.name][0].reshape(-1)))


def test_written_files_read_back_with_the_gguf_package(tmp_path):
    w = torch.randn(64, 96)
    metadata = {
        "general.architecture": "llama",
        "llama.block_count": 2,
        "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.tokens": ["a", "b\udcff"],  # a byte that is not UTF-8 survives
        "tokenizer.ggml.scores": [0.5, -1.0],
        "tokenizer.ggml.token_type": [1, 6],
        "tokenizer.ggml.add_bos_token": True,
        "big": (ValueType.UINT64, 2**40),
    }
    write_gguf(tmp_path / "o.gguf", metadata, [("w32", w, GGMLType.F32), ("w16", w, GGMLType.F16),
                                               ("wbf", w, GGMLType.BF16), ("w8", w, GGMLType.Q8_0),
                                               ("n", torch.ones(7), GGMLType.F32)])  # fmt: skip
    reader = gguf.GGUFReader(str(tmp_path / "o.gguf"))
    fields = reader.fields
    T = gguf.GGUFValueType
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.block_count"].types == [T.UINT32] and fields["llama.block_count"].contents() == 2
    assert fields["llama.rope.freq_base"].types == [T.FLOAT32]
    assert fields["tokenizer.ggml.token_type"].types == [T.ARRAY, T.INT32]
    assert fields["tokenizer.ggml.scores"].types == [T.ARRAY, T.FLOAT32]
    assert fields["tokenizer.ggml.add_bos_token"].types == [T.BOOL]
    assert fields["big"].types == [T.UINT64] and fields["big"].contents() == 2**40
    tokens = fields["tokenizer.ggml.tokens"]
    assert [bytes(tokens.parts[i]) for i in tokens.data] == [b"a", b"b\xff"]
    by_name = {t.name: t for t in reader.tensors}
    assert [t.name for t in reader.tensors] == ["w32", "w16", "wbf", "w8", "n"]
    assert list(by_name["w32"].shape) == [96, 64]  # GGUF order: the row length first
    assert np.array_equal(by_name["w32"].data, w.numpy())
    assert np.array_equal(by_name["w16"].data, w.half().numpy())
    assert by_name["wbf"].tensor_type == gguf.GGMLQuantizationType.BF16
    bf16 = quants.dequantize(by_name["wbf"].data, gguf.GGMLQuantizationType.BF16)
    assert np.array_equal(bf16, w.bfloat16().float().numpy())
    assert by_name["w8"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert np.array_equal(by_name["w8"].data.reshape(-1), quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0).reshape(-1))
    with GGUFFile(tmp_path / "o.gguf") as f:  # and with ours
        assert f.metadata["tokenizer.ggml.tokens"] == ["a", "b\udcff"]
        assert torch.equal(f.read("wbf"), w.bfloat16())


def test_writer_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(ValueError, match="cannot write type Q4_0"):
        write_gguf(tmp_path / "x.gguf", {}, [("w", torch.randn(4, 32), GGMLType.Q4_0)])
    with pytest.raises(ValueError, match="'w': Q8_0 needs rows whose length is a multiple of 32"):
        write_gguf(tmp_path / "x.gguf", {}, [("w", torch.randn(4, 20), GGMLType.Q8_0)])
    with pytest.raises(ValueError, match="'k': cannot write dict"):
        write_gguf(tmp_path / "x.gguf", {"k": {}}, [])


# ---- errors -----------------------------------------------------------------------------------------


def small_file(tmp_path, **tensors) -> bytes:
    write_gguf(tmp_path / "ok.gguf", {"general.architecture": "llama"},
               [(n, t, k) for n, (t, k) in tensors.items()] or [("a", torch.randn(4, 64), GGMLType.F32)])  # fmt: skip
    return (tmp_path / "ok.gguf").read_bytes()


def tensor_info_offset(data: bytes, name: str) -> int:
    """Where tensor `name`'s info (n_dims ...) starts, right after its name string."""
    key = struct.pack("<Q", len(name)) + name.encode()
    return data.index(key) + len(key)


def test_not_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 a zip")
    with pytest.raises(CheckpointError, match=r"x\.gguf: not a GGUF file"):
        GGUFFile(tmp_path / "x.gguf")
    with pytest.raises(CheckpointError, match="cannot read"):
        GGUFFile(tmp_path / "missing.gguf")


def test_version_2_reads_like_3(tmp_path):
    data = bytearray(small_file(tmp_path))  # v3 added only big-endian files; the layout is v2's
    data[4:8] = struct.pack("<I", 2)
    (tmp_path / "v2.gguf").write_bytes(data)
    with GGUFFile(tmp_path / "v2.gguf") as f, GGUFFile(tmp_path / "ok.gguf") as g:
        assert f.version == 2 and f.metadata == g.metadata and torch.equal(f.read("a"), g.read("a"))


def test_old_version_and_big_endian(tmp_path):
    data = bytearray(small_file(tmp_path))
    data[4:8] = struct.pack("<I", 1)
    (tmp_path / "v1.gguf").write_bytes(data)
    with pytest.raises(CheckpointError, match="GGUF version 1 is not supported; expected 2 or 3"):
        GGUFFile(tmp_path / "v1.gguf")
    data[4:8] = struct.pack(">I", 3)
    (tmp_path / "be.gguf").write_bytes(data)
    with pytest.raises(CheckpointError, match="big-endian"):
        GGUFFile(tmp_path / "be.gguf")


def test_unknown_tensor_type(tmp_path):
    data = bytearray(small_file(tmp_path))
    at = tensor_info_offset(data, "a") + 4 + 2 * 8  # n_dims, two dims, then the type
    data[at : at + 4] = struct.pack("<I", 77)
    (tmp_path / "t.gguf").write_bytes(data)
    with pytest.raises(CheckpointError, match=r"t\.gguf: tensor 'a' has unknown tensor type 77"):
        GGUFFile(tmp_path / "t.gguf")


def test_a_type_this_reader_cannot_dequantize(tmp_path):
    data = bytearray(small_file(tmp_path, a=(torch.randn(4, 256), GGMLType.F32)))
    at = tensor_info_offset(data, "a") + 4 + 2 * 8
    data[at : at + 4] = struct.pack("<I", GGMLType.IQ2_XXS)  # smaller than F32: fits the file
    (tmp_path / "iq.gguf").write_bytes(data)
    with GGUFFile(tmp_path / "iq.gguf") as f:
        with pytest.raises(CheckpointError, match=r"iq\.gguf: tensor 'a' has type IQ2_XXS, which this reader cannot dequantize"):
            f.read("a")


def test_truncated_file(tmp_path):
    data = small_file(tmp_path)
    (tmp_path / "cut.gguf").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: truncated GGUF file: tensor 'a' \(F32, shape \[4, 64\]\) ends at byte"):
        GGUFFile(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(data[:40])
    with pytest.raises(CheckpointError, match=r"head\.gguf: truncated GGUF file"):
        GGUFFile(tmp_path / "head.gguf")


def test_size_that_disagrees_with_type_and_shape(tmp_path):
    data = bytearray(small_file(tmp_path, a=(torch.randn(4, 64), GGMLType.F32), b=(torch.randn(4, 64), GGMLType.F32)))
    at = tensor_info_offset(data, "a") + 4
    data[at : at + 8] = struct.pack("<Q", 128)  # a claims 128 values a row: twice the room it has
    (tmp_path / "s.gguf").write_bytes(data)
    with pytest.raises(CheckpointError, match=r"s\.gguf: tensor 'a' \(F32, shape \[4, 128\]\) needs 2048 bytes, but the next tensor, 'b'"):
        GGUFFile(tmp_path / "s.gguf")


def test_rows_not_a_multiple_of_the_block(tmp_path):
    data = bytearray(small_file(tmp_path, a=(torch.randn(4, 64), GGMLType.Q8_0)))
    at = tensor_info_offset(data, "a") + 4
    data[at : at + 8] = struct.pack("<Q", 48)
    (tmp_path / "r.gguf").write_bytes(data)
    with pytest.raises(CheckpointError, match="tensor 'a' of type Q8_0 has rows of 48 values, not a multiple of its block size 32"):
        GGUFFile(tmp_path / "r.gguf")
