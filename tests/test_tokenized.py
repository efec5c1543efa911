import json

import numpy as np
import pytest

from conftest import make_personachat, make_tokenizer
from dialogs import read_dialogs
from tokenized import get_dataset, load_or_build, tokenize_dialogs, validate


@pytest.fixture
def tokenizer():
    return make_tokenizer()


def test_tokenized_texts_equal_the_tokenizer_output(tokenizer):
    dialogs = make_personachat()
    data = tokenize_dialogs(dialogs, tokenizer)
    persona, history, candidates = data.utterance("valid", 4)
    utterance = dialogs["valid"][1]["utterances"][1]
    expect = lambda texts: [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]  # noqa: E731
    assert [list(p) for p in persona] == expect(dialogs["valid"][1]["personality"])
    assert [list(h) for h in history] == expect(utterance["history"])
    assert [list(c) for c in candidates] == expect(utterance["candidates"])
    assert data.num_utterances("train") == 8 * 3
    # each distinct text is stored once
    assert len(data.token_offsets) - 1 == len({t for split in dialogs.values() for d in split
                                              for t in d["personality"] + [x for u in d["utterances"]
                                                                           for x in u["history"] + u["candidates"]]})


def build_counting(path, tokenizer, cache_dir):
    calls = []

    def read():
        calls.append(1)
        return read_dialogs(path)

    data = load_or_build(read, [path], {"seed": 42}, tokenizer, cache_dir)
    return data, len(calls)


def test_cache_is_reused_then_invalidated_by_data_or_tokenizer(tmp_path, personachat_file, tokenizer):
    cache = tmp_path / "cache"
    first, reads = build_counting(personachat_file, tokenizer, cache)
    assert reads == 1 and len(list(cache.glob("*.safetensors"))) == 1
    second, reads = build_counting(personachat_file, tokenizer, cache)
    assert reads == 0
    assert all(np.array_equal(first.arrays[k], second.arrays[k]) for k in first.arrays)

    data = json.loads(open(personachat_file).read())
    data["train"][0]["personality"][0] = "cats and dogs"
    open(personachat_file, "w").write(json.dumps(data))
    _, reads = build_counting(personachat_file, tokenizer, cache)
    assert reads == 1

    tokenizer.add_special_tokens({"additional_special_tokens": ["<speaker1>"]})
    _, reads = build_counting(personachat_file, tokenizer, cache)
    assert reads == 1


def test_corrupt_cache_is_rebuilt_with_a_warning(tmp_path, personachat_file, tokenizer, caplog):
    cache = tmp_path / "cache"
    build_counting(personachat_file, tokenizer, cache)
    (path,) = cache.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:100])
    data, reads = build_counting(personachat_file, tokenizer, cache)
    assert reads == 1 and "unusable" in caplog.text
    assert data.num_utterances("valid") == 9
    _, reads = build_counting(personachat_file, tokenizer, cache)
    assert reads == 0  # the rebuilt cache is good again


def test_validate_rejects_inconsistent_arrays(tokenizer):
    arrays = tokenize_dialogs(make_personachat(), tokenizer).arrays
    validate(arrays, len(tokenizer))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        validate(arrays, 3)
    broken = dict(arrays, **{"train.cand_ids": arrays["train.cand_ids"] + 10_000})
    with pytest.raises(ValueError, match="outside the text table"):
        validate(broken, len(tokenizer))
    broken = dict(arrays, **{"train.history_offsets": arrays["train.history_offsets"][::-1].copy()})
    with pytest.raises(ValueError, match="offsets"):
        validate(broken, len(tokenizer))


def test_get_dataset_reads_a_local_file_and_refuses_a_missing_one(tmp_path, personachat_file, tokenizer):
    data = get_dataset(tokenizer, personachat_file, str(tmp_path / "c"))
    assert data.num_utterances("train") == 24
    with pytest.raises(FileNotFoundError, match="--dataset_path"):
        get_dataset(tokenizer, str(tmp_path / "nope.json"), str(tmp_path / "c"))
    with pytest.raises(IsADirectoryError, match="is a directory"):
        get_dataset(tokenizer, str(tmp_path), str(tmp_path / "c"))
