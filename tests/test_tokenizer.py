"""Tokenizers against their references: Meta's llama_models Llama 3 tokenizer, sentencepiece itself for
Llama 1/2, and transformers for a Hugging Face tokenizer.json. Plus the streaming decoder's invariant
and the checkpoint layouts load_tokenizer understands."""

import importlib.resources
import json
import shutil
from pathlib import Path

import pytest
import sentencepiece
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llama_models.llama3.tokenizer import Tokenizer as MetaLlama3Tokenizer

from llama.core.tokenizer import (
    SentencePieceTokenizer,
    TiktokenTokenizer,
    TokenizerFormatError,
    TokenizerNotFoundError,
    _pieces_for_tiktoken,
    load_tokenizer,
)

LLAMA3_MODEL = Path(str(importlib.resources.files("llama_models.llama3") / "tokenizer.model"))
LLAMA2_MODEL = Path(__file__).parents[1].parent / "shared/fixtures/llama2-tokenizer.model"
needs_llama2 = pytest.mark.skipif(
    not LLAMA2_MODEL.is_file(), reason=f"Llama 2 tokenizer not found at {LLAMA2_MODEL}"
)

TEXTS = [
    "",
    "This is a test sentence.",
    "Hello, world! It's the cat's toy; we'll see, they'd've gone.",
    "我们在北京的大学学习汉语。",
    "日本語のテキスト、カタカナとひらがな。",
    "مرحبا بالعالم، كيف حالك؟",
    "Привет, мир! Как дела?",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "def f(x):\n\treturn {'a': [1, 2, 3]}  # comment\n\n\nclass A:\n    pass\n",
    "   leading and trailing spaces   ",
    "tabs\t\tand\nnewlines\n\n\nand\r\nwindows\r\nlines\r\n",
    "\n\n\n\n",
    " \t \n \r\n  ",
    "emoji 😀👍🏽 and a family 👩‍👩‍👧‍👦 and a flag 🇫🇷",
    "<|eot_id|> <|begin_of_text|><|start_header_id|>user<|end_header_id|>",
    "3.14159 1234567890 12,345.67 -42 1e-9 0x1F",
    "mixed: naïve café Ünïcödé — “quotes” … ½ ∑ ∞",
    "\u00a0non-breaking\u2003em-space\u3000ideographic space",
    "\x00\x01 control\x7f chars \ufeff BOM \ufffd replacement",
]
BOS_EOS = [(False, False), (True, False), (False, True), (True, True)]


@pytest.fixture(scope="module")
def meta3() -> MetaLlama3Tokenizer:
    return MetaLlama3Tokenizer(LLAMA3_MODEL)


@pytest.fixture(scope="module")
def llama3() -> TiktokenTokenizer:
    return TiktokenTokenizer.from_tiktoken_file(LLAMA3_MODEL)


@pytest.fixture(scope="module")
def sp_reference() -> sentencepiece.SentencePieceProcessor:
    if not LLAMA2_MODEL.is_file():
        pytest.skip(f"Llama 2 tokenizer not found at {LLAMA2_MODEL}")
    return sentencepiece.SentencePieceProcessor(model_file=str(LLAMA2_MODEL))


@pytest.fixture(scope="module")
def llama2(sp_reference) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(LLAMA2_MODEL)


@pytest.fixture(scope="module")
def hf_tokenizer_json(tmp_path_factory, meta3) -> Path:
    """A tokenizer.json written by transformers' own tiktoken converter from Meta's file, the way HF
    converted the Llama 3 checkpoints: byte-level vocab and merges, specials in added_tokens."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    specials = sorted(meta3.special_tokens, key=meta3.special_tokens.get)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    TikTokenConverter(vocab_file=str(LLAMA3_MODEL), extra_special_tokens=specials).converted().save(str(path))
    return path


# --- Llama 3 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bos, eos", BOS_EOS)
@pytest.mark.parametrize("text", TEXTS)
def test_llama3_ids_match_meta(llama3, meta3, text, bos, eos):
    assert llama3.encode(text, bos=bos, eos=eos) == meta3.encode(text, bos=bos, eos=eos)


def test_llama3_known_ids_and_specials(llama3):
    ids = llama3.encode("This is a test sentence.", bos=True, eos=True)
    assert ids == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id, llama3.vocab_size) == (128000, 128001, 128004, 128256)
    assert llama3.stop_tokens == {128001, 128008, 128009}
    assert llama3.special_tokens["<|eot_id|>"] == 128009
    assert llama3.special_tokens["<|reserved_special_token_245|>"] == 128255


def test_llama3_special_token_text_is_plain_text(llama3):
    ids = llama3.encode("<|eot_id|><|begin_of_text|>", bos=False, eos=False)
    assert all(i < 128000 for i in ids) and len(ids) > 2
    assert llama3.decode(ids) == "<|eot_id|><|begin_of_text|>"


@pytest.mark.parametrize("text", TEXTS)
def test_llama3_decode_round_trip(llama3, text):
    assert llama3.decode(llama3.encode(text, bos=False, eos=False)) == text


@pytest.mark.parametrize(
    "text",
    [
        "a" * 1_000_000,
        " " * 1_000_000,
        "\n" * 300_000 + "x" * 300_000,
        # a few MB of words, with long runs that cross the 400k chunk boundary and the 25k run limit
        ("lorem ipsum dolor 東京 😀 " * 60_000 + "b" * 60_000 + " " * 70_000 + "ü" * 26_000) * 2,
    ],
    ids=["a*1M", "space*1M", "newlines-then-x", "mixed-3MB"],
)
def test_llama3_very_long_inputs_match_meta(llama3, meta3, text):
    assert llama3.encode(text, bos=True, eos=False) == meta3.encode(text, bos=True, eos=False)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", " ", "\n", "é", "\u3000", "\xa0", "字", "\t"]),
                          st.integers(1, 30_000)), max_size=10))  # fmt: skip
def test_llama3_chunking_cuts_where_meta_cuts(runs):
    text = "".join(char * n for char, n in runs)
    split_runs = MetaLlama3Tokenizer._split_whitespaces_or_nonwhitespaces
    meta_pieces = [
        piece for start in range(0, len(text), 400_000) for piece in split_runs(text[start : start + 400_000], 25_000)
    ]
    if not text:
        meta_pieces = []  # Meta yields nothing for "" (no chunk at all)
    assert list(_pieces_for_tiktoken(text)) == meta_pieces


def test_decode_rejects_ids_outside_vocabulary(llama3):
    with pytest.raises(ValueError, match=r"\[128256\] are outside the vocabulary \[0, 128256\)"):
        llama3.decode([1, 128256])
    with pytest.raises(TypeError, match="text must be a str, got bytes"):
        llama3.encode(b"abc", bos=False, eos=False)


# --- Llama 3 from a Hugging Face tokenizer.json ------------------------------------------------------


def test_hf_tokenizer_json_matches_meta_and_transformers(hf_tokenizer_json, meta3):
    from transformers import PreTrainedTokenizerFast

    ours = TiktokenTokenizer.from_hf_json(hf_tokenizer_json)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(hf_tokenizer_json))
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (128000, 128001, 128256)
    assert ours.stop_tokens == {128001, 128008, 128009}
    assert ours.special_tokens == meta3.special_tokens
    for text in TEXTS:
        ids = ours.encode(text, bos=False, eos=False)
        assert ids == meta3.encode(text, bos=False, eos=False), text
        if "<|" not in text:  # transformers would turn special-token text into special ids
            assert ids == hf.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == text


def test_hf_tokenizer_json_with_specials_also_in_vocab(tmp_path, hf_tokenizer_json, meta3):
    # Some tokenizer.json files list the added tokens in model.vocab too; they are not BPE tokens.
    data = json.loads(hf_tokenizer_json.read_text())
    data["model"]["vocab"].update({t["content"]: t["id"] for t in data["added_tokens"]})
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    tokenizer = TiktokenTokenizer.from_hf_json(tmp_path / "tokenizer.json")
    assert tokenizer.vocab_size == 128256
    assert tokenizer.encode(TEXTS[13], bos=True, eos=True) == meta3.encode(TEXTS[13], bos=True, eos=True)


def test_hf_tokenizer_json_of_sentencepiece_model_is_rejected(tmp_path):
    path = tmp_path / "tokenizer.json"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁the": 3}
    path.write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []}, "added_tokens": []}))
    with pytest.raises(TokenizerFormatError, match="'▁the' is not byte-level BPE"):
        TiktokenTokenizer.from_hf_json(path)


# --- Llama 1/2 --------------------------------------------------------------------------------------


@needs_llama2
@pytest.mark.parametrize("bos, eos", BOS_EOS)
@pytest.mark.parametrize("text", TEXTS)
def test_llama2_ids_match_sentencepiece(llama2, sp_reference, text, bos, eos):
    expected = ([1] if bos else []) + sp_reference.encode(text) + ([2] if eos else [])
    assert llama2.encode(text, bos=bos, eos=eos) == expected
    assert llama2.decode(expected) == sp_reference.decode(expected)


@needs_llama2
def test_llama2_special_ids(llama2):
    assert (llama2.bos_id, llama2.eos_id, llama2.pad_id, llama2.vocab_size) == (1, 2, -1, 32000)
    assert llama2.stop_tokens == {2}
    assert llama2.encode("Hello", bos=True, eos=True) == [1, 15043, 2]


# --- streaming decoder ------------------------------------------------------------------------------


def stream(tokenizer, ids) -> list[str]:
    decoder = tokenizer.stream_decoder()
    return [decoder.push(i) for i in ids] + [decoder.flush()]


# Random ids biased towards the awkward ones: single bytes, specials, and (Llama 2) control ids,
# byte-fallback pieces <0x00>..<0xFF> (ids 3-258) and pieces made only of the space symbol.
llama3_ids = st.lists(
    st.one_of(st.integers(0, 255), st.integers(0, 128255), st.integers(128000, 128011)), max_size=40
)
llama2_ids = st.lists(
    st.one_of(st.integers(0, 258), st.integers(0, 31999), st.sampled_from([29871, 259, 1678, 268])), max_size=40
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=llama3_ids)
def test_llama3_stream_concatenates_to_decode(llama3, ids):
    assert "".join(stream(llama3, ids)) == llama3.decode(ids)


@needs_llama2
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=llama2_ids)
def test_llama2_stream_concatenates_to_decode(llama2, ids):
    assert "".join(stream(llama2, ids)) == llama2.decode(ids)


MULTIBYTE = "你好，世界 👩‍👩‍👧‍👦 🇯🇵 emoji 😀 and 漢字"


def test_llama3_stream_never_prints_half_a_character(llama3):
    ids = llama3.encode(MULTIBYTE, bos=False, eos=False)
    assert any("\ufffd" in llama3.decode([i]) for i in ids)  # some characters are split across tokens
    pieces = stream(llama3, ids)
    assert "".join(pieces) == MULTIBYTE
    assert not any("\ufffd" in piece for piece in pieces)


@needs_llama2
def test_llama2_stream_never_prints_half_a_character_and_keeps_spaces(llama2):
    ids = llama2.encode(MULTIBYTE, bos=True, eos=False)
    assert any(3 <= i <= 258 for i in ids)  # byte-fallback pieces: characters split across tokens
    pieces = stream(llama2, ids)
    assert "".join(pieces) == MULTIBYTE
    assert not any("\ufffd" in piece for piece in pieces)
    # sentencepiece drops the space of a first piece; decoding piece by piece would lose every space
    ids = llama2.encode("Hello big world", bos=True, eos=False)
    assert stream(llama2, ids) == ["", "Hello", " big", " world", ""]


def test_stream_flush_ends_the_text(llama3):
    emoji = llama3.encode("😀", bos=False, eos=False)
    decoder = llama3.stream_decoder()
    assert [decoder.push(i) for i in emoji[:-1]] == [""] * (len(emoji) - 1)
    assert decoder.flush() == "\ufffd"  # the incomplete character, as decode() shows it
    assert [decoder.push(i) for i in emoji] [-1] == "😀"  # fmt: skip


# --- load_tokenizer ---------------------------------------------------------------------------------


def make_checkpoint(directory: Path, files: dict[str, Path | dict]) -> Path:
    for name, source in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, dict):
            (directory / name).write_text(json.dumps(source))
        else:
            shutil.copy(source, directory / name)
    return directory


def test_load_meta_llama3_directory(tmp_path):
    tokenizer = load_tokenizer(make_checkpoint(tmp_path, {"tokenizer.model": LLAMA3_MODEL, "params.json": {}}))
    assert isinstance(tokenizer, TiktokenTokenizer)
    assert tokenizer.encode("This is", bos=True, eos=False) == [128000, 2028, 374]


def test_load_hf_llama3_directory_with_original_folder_and_list_eos(tmp_path, hf_tokenizer_json):
    checkpoint = make_checkpoint(tmp_path, {
        "original/tokenizer.model": LLAMA3_MODEL,
        "tokenizer.json": hf_tokenizer_json,
        "config.json": {"eos_token_id": 128001},
        "generation_config.json": {"eos_token_id": [128001, 128009, 128042]},
    })  # fmt: skip
    tokenizer = load_tokenizer(checkpoint)
    assert isinstance(tokenizer, TiktokenTokenizer)
    assert tokenizer.stop_tokens == {128001, 128008, 128009, 128042}


def test_load_hf_llama3_directory_with_only_tokenizer_json(tmp_path, hf_tokenizer_json, meta3):
    files = {"tokenizer.json": hf_tokenizer_json, "config.json": {"eos_token_id": 128009}}
    checkpoint = make_checkpoint(tmp_path, files)
    tokenizer = load_tokenizer(checkpoint)
    assert tokenizer.encode(TEXTS[9], bos=True, eos=True) == meta3.encode(TEXTS[9], bos=True, eos=True)
    assert tokenizer.stop_tokens == {128001, 128008, 128009}


@needs_llama2
def test_load_llama2_directories(tmp_path):
    meta = load_tokenizer(make_checkpoint(tmp_path / "meta", {"tokenizer.model": LLAMA2_MODEL, "params.json": {}}))
    assert isinstance(meta, SentencePieceTokenizer) and meta.stop_tokens == {2}
    files = {"tokenizer.model": LLAMA2_MODEL, "generation_config.json": {"eos_token_id": [2, 7]}}
    hf = make_checkpoint(tmp_path / "hf", files)
    assert load_tokenizer(hf).stop_tokens == {2, 7}


@needs_llama2
def test_kind_is_told_by_content_not_name(tmp_path):
    shutil.copy(LLAMA3_MODEL, tmp_path / "a.bin")
    shutil.copy(LLAMA2_MODEL, tmp_path / "b.bin")
    assert isinstance(load_tokenizer(tmp_path / "a.bin"), TiktokenTokenizer)
    assert isinstance(load_tokenizer(tmp_path / "b.bin"), SentencePieceTokenizer)


def test_missing_tokenizer_names_the_files_looked_for(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    looked_for = r"looked for tokenizer\.model, original/tokenizer\.model, tokenizer\.json"
    with pytest.raises(TokenizerNotFoundError, match=looked_for):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.model")


def test_unreadable_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01 not a model")
    with pytest.raises(TokenizerFormatError, match="neither a tiktoken nor a sentencepiece model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nIg== one\n")
    with pytest.raises(TokenizerFormatError, match=r"tokenizer\.model:2: expected 'base64-token rank'"):
        load_tokenizer(tmp_path)


PROMPTS = ["And God said", "Hello, world.", "日本語のテキスト", "x = 1\n"]


def _continuation_matches(tokenizer, prompt_text, ids):
    prompt = tokenizer.encode(prompt_text, bos=True, eos=False)
    decoder = tokenizer.stream_decoder(prompt)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    whole, before = tokenizer.decode(prompt + ids), tokenizer.decode(prompt)
    assert whole.startswith(before)
    assert "".join(pieces) == whole[len(before) :]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.sampled_from(PROMPTS), ids=llama3_ids)
def test_llama3_stream_after_a_prompt_prints_what_the_ids_add(llama3, prompt, ids):
    _continuation_matches(llama3, prompt, ids)


@needs_llama2
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.sampled_from(PROMPTS), ids=llama2_ids)
def test_llama2_stream_after_a_prompt_prints_what_the_ids_add(llama2, prompt, ids):
    _continuation_matches(llama2, prompt, ids)


@needs_llama2
def test_llama2_stream_keeps_the_space_after_the_prompt(llama2):
    prompt = llama2.encode("And God said", bos=True, eos=False)
    ids = llama2.encode("And God said unto them", bos=True, eos=False)[len(prompt) :]
    decoder = llama2.stream_decoder(prompt)
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == " unto them"


# ---- the bytes of one token ------------------------------------------------------------------------

BYTES_TEXT = "Grüße, 東京 🦙 and naïve café"


def test_llama3_token_bytes_concatenate_to_the_text(llama3):
    ids = llama3.encode(BYTES_TEXT, bos=False, eos=False)
    assert b"".join(llama3.token_bytes(i) for i in ids) == BYTES_TEXT.encode("utf-8")
    assert any(len(llama3.token_bytes(i).decode("utf-8", errors="ignore")) == 0 for i in ids)  # part of a character
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llama3.token_bytes(llama3.vocab_size)


def test_sentencepiece_token_bytes_concatenate_to_the_text():
    # The bundled model's tokenizer: Llama 2-style BPE with byte fallback (no CJK pieces, so 東京 and
    # the llama become <0xNN> byte pieces) and a dummy-prefix space before the first word.
    import weights

    tok = SentencePieceTokenizer(Path(weights.BUNDLED_MODEL) / "tokenizer.model")
    ids = tok.encode(BYTES_TEXT, bos=False, eos=False)
    assert b"".join(tok.token_bytes(i) for i in ids) == b" " + BYTES_TEXT.encode("utf-8")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.token_bytes(-1)
