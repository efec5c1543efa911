import json

import pytest

from conftest import make_personachat
from dialogs import DialogFormatError, main, read_dialogs, read_parlai, source_files

CONVAI2_WITH_CANDS = (
    "1 your persona: i like cats.\n"
    "2 your persona: i read books.\n"
    "3 hi , how are you ?\ti am fine , thanks .\t\tnope|i am fine , thanks .|bye\n"
    "4 do you have pets ?\tyes , two cats .\t\tyes , two cats .|no|maybe\n"
    "1 your persona: i play football.\n"
    "2 partner's persona: i am a chef.\n"
    "3 hello !\they there .\t\tok|hey there .|sure\n"
)
CONVAI2_NO_CANDS = "".join(
    f"1 your persona: persona {d}.\n2 turn {d} a\treply {d} a\n3 turn {d} b\treply {d} b\n" for d in range(6))


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_personachat_json_is_read_as_is(personachat_file):
    data = read_dialogs(personachat_file)
    original = make_personachat()
    assert data["train"] == original["train"] and data["valid"] == original["valid"]


def test_convai2_text_with_candidates_puts_gold_last_and_builds_history(tmp_path):
    train = write(tmp_path, "train_self_original.txt", CONVAI2_WITH_CANDS)
    write(tmp_path, "valid_self_original.txt", CONVAI2_WITH_CANDS)
    data = read_dialogs(train)
    first, second = data["train"]
    assert first["personality"] == ["i like cats.", "i read books."]
    assert second["personality"] == ["i play football."]  # partner's persona lines are not ours
    assert first["utterances"][0] == {"history": ["hi , how are you ?"],
                                      "candidates": ["nope", "bye", "i am fine , thanks ."]}
    assert first["utterances"][1]["history"] == ["hi , how are you ?", "i am fine , thanks .", "do you have pets ?"]
    assert first["utterances"][1]["candidates"][-1] == "yes , two cats ."
    assert len(data["valid"]) == 2  # the valid_ sibling file is the valid split
    assert source_files(train) == [train, str(tmp_path / "valid_self_original.txt")]


def test_convai2_no_cands_gets_seeded_distractors_from_other_dialogs(tmp_path):
    path = write(tmp_path, "train_no_cands.txt", CONVAI2_NO_CANDS)
    data = read_dialogs(path, seed=1, num_distractors=4, valid_fraction=0.34)
    assert len(data["valid"]) == 2 and len(data["train"]) == 4
    for split in data.values():
        for dialog in split:
            own = {u["candidates"][-1] for u in dialog["utterances"]}
            for utterance in dialog["utterances"]:
                assert len(utterance["candidates"]) == 5
                assert not own & set(utterance["candidates"][:-1])
    assert read_dialogs(path, seed=1, num_distractors=4, valid_fraction=0.34) == data
    assert read_dialogs(path, seed=2, num_distractors=4, valid_fraction=0.34) != data


def test_chitchat_corpus_joins_messages_of_a_turn_and_splits_whole_dialogs(tmp_path):
    convs = {f"c{k}": {"messages": [[{"text": f"hi {k}"}, {"text": "there"}], [{"text": f"yo {k}"}],
                                    [{"text": f"bye {k}"}]]} for k in range(20)}
    convs["lonely"] = {"messages": [[{"text": "anyone?"}]]}  # one turn: nothing to reply to
    data = read_dialogs(write(tmp_path, "chat.json", json.dumps(convs)), num_distractors=3, valid_fraction=0.1)
    assert len(data["train"]) == 18 and len(data["valid"]) == 2
    dialog = data["train"][0]
    k = dialog["utterances"][0]["history"][0].split()[1]
    assert dialog["utterances"][0]["history"] == [f"hi {k} there"]
    assert dialog["utterances"][1] == {"history": [f"hi {k} there", f"yo {k}"],
                                       "candidates": dialog["utterances"][1]["candidates"][:3] + [f"bye {k}"]}


def test_chitchat_prompt_becomes_the_persona_only_when_asked(tmp_path):
    convs = {f"c{k}": {"prompt": f" What is your favorite smell {k}? " if k % 2 else "",
                       "messages": [[{"text": f"hi {k}"}], [{"text": f"yo {k}"}]]} for k in range(10)}
    path = write(tmp_path, "chat.json", json.dumps(convs))
    plain = read_dialogs(path, num_distractors=2, valid_fraction=0.2)
    prompted = read_dialogs(path, num_distractors=2, valid_fraction=0.2, prompt_as_persona=True)
    for split in ("train", "valid"):
        for without, dialog in zip(plain[split], prompted[split]):
            k = int(dialog["utterances"][0]["history"][0].split()[1])
            assert without["personality"] == []
            assert dialog["personality"] == ([f"What is your favorite smell {k}?"] if k % 2 else [])
            assert dialog["utterances"] == without["utterances"]  # same split, same distractors


def test_prompt_as_persona_is_refused_for_files_with_their_own_personas(personachat_file):
    with pytest.raises(DialogFormatError, match="prompt_as_persona applies to the chit-chat corpus only"):
        read_dialogs(personachat_file, prompt_as_persona=True)


def test_cli_writes_personachat_json_that_reads_back_unchanged(tmp_path, capsys):
    convs = {f"c{k}": {"prompt": f"prompt {k}", "messages": [[{"text": f"hi {k}"}], [{"text": f"yo {k}"}],
                                                             [{"text": f"bye {k}"}]]} for k in range(10)}
    path, out = write(tmp_path, "chat.json", json.dumps(convs)), str(tmp_path / "personachat.json")
    main([out, "--dataset_path", path, "--prompt_as_persona", "--num_distractors", "3", "--seed", "7"])
    assert "train 9 dialogs, 18 replies, valid 1 dialogs, 2 replies" in capsys.readouterr().out
    expected = read_dialogs(path, seed=7, num_distractors=3, prompt_as_persona=True)
    assert read_dialogs(out) == expected and expected["valid"][0]["personality"][0].startswith("prompt ")
    with pytest.raises(SystemExit):
        main([out, "--dataset_path", str(tmp_path / "missing.json")])
    assert "missing.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # read as train.py reads --dataset_path
        main([out, "--dataset_path", str(tmp_path)])
    assert "is a directory: give the data file itself" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("x your persona: a\n", "train_bad.txt:1: expected 'N text"),
    ("1 hi\tok\n3 there\tyes\n", "train_bad.txt:2: line id 3 follows 1"),
    ("2 hi\tok\n", "train_bad.txt:1: an episode must start at line id 1"),
    ("1 hi\tok\n2 there\t\n", "train_bad.txt:2: a tab but no label"),
    ("1 hi\tok\n2 there\t  \t\tok|no\n", "train_bad.txt:2: a tab but no label"),  # a label of spaces is none
])
def test_malformed_convai2_lines_are_named(tmp_path, text, message):
    with pytest.raises(DialogFormatError, match=message):
        read_dialogs(write(tmp_path, "train_bad.txt", text))


def test_a_right_answer_is_never_one_of_its_own_distractors(tmp_path):
    several = write(tmp_path, "valid.txt", "1 hi\thello there|hi there\t\tbye now|hi there|hello there\n"
                                          "2 how are you ?\tfine\t\tfine|bad|fine\n")
    first, second = read_parlai(several)[0]["utterances"]
    assert first["candidates"] == ["bye now", "hello there"] and first["labels"] == ["hello there", "hi there"]
    assert second["candidates"] == ["bad", "fine"] and "labels" not in second
    assert second["history"] == ["hi", "hello there", "how are you ?"]  # the first label is the turn said
    duplicated = tmp_path / "dup.json"
    duplicated.write_text(json.dumps({"train": [], "valid": [{"personality": ["i like cats ."], "utterances": [
        {"history": ["hi"], "candidates": ["i am a pilot .", "i like cats .", "bad .", "i like cats ."]}]}]}))
    valid = read_dialogs(str(duplicated), need_train=False)["valid"]
    assert valid[0]["utterances"][0]["candidates"] == ["i am a pilot .", "bad .", "i like cats ."]


def test_spaces_around_convai2_fields_are_not_text_and_escaped_newlines_are(tmp_path):
    spaced = "".join(line.replace("\t", " \t ") + "   \n" for line in CONVAI2_WITH_CANDS.splitlines())
    assert read_parlai(write(tmp_path, "spaced.txt", spaced)) == read_parlai(write(tmp_path, "plain.txt",
                                                                                    CONVAI2_WITH_CANDS))
    (dialog,) = read_parlai(write(tmp_path, "escaped.txt", "1 hi\\nthere\tfine\\nyou?\t\tno|fine\\nyou?\n"))
    assert dialog["utterances"][0] == {"history": ["hi\nthere"], "candidates": ["no", "fine\nyou?"]}


def test_malformed_json_names_line_and_column(tmp_path):
    with pytest.raises(DialogFormatError, match=r"broken.json:2:\d+: invalid JSON"):
        read_dialogs(write(tmp_path, "broken.json", '{"train": [\n  {"personality": ]}'))


@pytest.mark.parametrize("mutate, where", [
    (lambda d: d["train"][1]["utterances"][2].update(candidates=[]), r"train\[1\].utterances\[2\].candidates: empty"),
    (lambda d: d["valid"][0]["utterances"][0].update(history="hi"), r"valid\[0\].utterances\[0\].history: expected"),
    (lambda d: d["train"][0].update(personality=[3]), r"train\[0\].personality: expected a list of strings"),
    (lambda d: d.pop("train"), "missing the 'train' list"),
])
def test_malformed_personachat_names_the_json_path(tmp_path, mutate, where):
    data = make_personachat()
    mutate(data)
    with pytest.raises(DialogFormatError, match=where):
        read_dialogs(write(tmp_path, "pc.json", json.dumps(data)))



def test_a_personachat_valid_list_of_dialogs_without_replies_is_refused_as_empty(tmp_path):
    data = make_personachat()
    data["valid"] = [{"personality": ["i like cats."], "utterances": []}]
    with pytest.raises(DialogFormatError, match="pc.json: the valid split has no dialog with a reply"):
        read_dialogs(write(tmp_path, "pc.json", json.dumps(data)))


@pytest.mark.parametrize("valid", ["missing", "empty"])
def test_personachat_without_a_valid_list_holds_out_dialogs_of_train(tmp_path, valid):
    data = make_personachat(n_train=10)
    train = [d["utterances"][0]["history"] for d in data["train"]]
    data.pop("valid") if valid == "missing" else data.update(valid=[])
    path = write(tmp_path, "pc.json", json.dumps(data))
    splits = read_dialogs(path, valid_fraction=0.2)
    assert [len(splits["train"]), len(splits["valid"])] == [8, 2]
    assert sorted(d["utterances"][0]["history"] for s in splits.values() for d in s) == sorted(train)
    assert read_dialogs(path, valid_fraction=0.2) == splits  # the same split every time

def test_unknown_json_layout_is_an_error(tmp_path):
    with pytest.raises(DialogFormatError, match="unknown JSON layout"):
        read_dialogs(write(tmp_path, "x.json", "[1, 2]"))


def test_distractors_never_repeat_the_gold_text_even_from_a_small_pool(tmp_path):
    text = "1 hi\tyo\n2 sure\tyo\n1 hey\tyo\n2 ok\tsure\n1 a\tb\n2 c\td\n1 e\tyo\n2 f\tg\n1 h\ti\n"
    data = read_dialogs(write(tmp_path, "few.txt", text), num_distractors=5, valid_fraction=0.4)
    for split in data.values():
        for dialog in split:
            for utterance in dialog["utterances"]:
                assert len(utterance["candidates"]) == 6
                assert utterance["candidates"][-1] not in utterance["candidates"][:-1]


def test_an_utterances_distractors_differ_while_the_pool_has_enough_texts(tmp_path):
    # 8 dialogs of 3 replies, "sure" and two of their own: 14 or 15 distinct texts in the other dialogs
    text = "".join(f"1 hi {d}\tsure\n2 and {d}\treply {d} b\n3 so {d}\treply {d} c\n" for d in range(8))
    path = write(tmp_path, "small.txt", text)
    for wanted in (14, 19):
        data = read_dialogs(path, num_distractors=wanted, valid_fraction=0.25)
        for split in data.values():
            for dialog in split:
                own = {f"reply {dialog['utterances'][0]['history'][0][3:]} {x}" for x in "bc"}
                for utterance in dialog["utterances"]:
                    gold, distractors = utterance["candidates"][-1], utterance["candidates"][:-1]
                    texts = 14 if gold == "sure" else 15
                    assert len(distractors) == wanted and not (own | {gold}) & set(distractors)
                    assert len(set(distractors)) == min(wanted, texts)  # a text repeats only when it must


def test_redrawing_repeats_leaves_every_other_utterances_distractors_as_they_were(tmp_path, monkeypatch):
    # Many dialogs share "sure", so some turns draw it twice; the rest must draw as before the redraw existed
    text = "".join(f"1 hi {d}\t{'sure' if d % 2 else f'own {d}'}\n2 and {d}\treply {d}\n" for d in range(60))
    path = write(tmp_path, "shared.txt", text)
    redrawn = read_dialogs(path, num_distractors=19)
    monkeypatch.setattr("dialogs._without_repeats", lambda drawn, *args: drawn)  # draws kept, repeats and all
    drawn = read_dialogs(path, num_distractors=19)
    kept = changed = 0
    for name in drawn:
        for old, new in zip(drawn[name], redrawn[name]):
            for before, after in zip(old["utterances"], new["utterances"]):
                distinct = len(set(before["candidates"][:-1])) == 19
                assert (before == after) == distinct
                kept, changed = kept + distinct, changed + (not distinct)
    assert kept > 0 and changed > 0


@pytest.mark.parametrize("text, message", [
    ("1 hi\tok\n2 there\tyes\n", "the valid split has no dialog"),
    ("1 your persona: i like cats.\n2 your persona: i read.\n", "no dialog with a labelled line"),
])
def test_files_without_enough_dialogs_are_refused(tmp_path, text, message):
    with pytest.raises(DialogFormatError, match=message):
        read_dialogs(write(tmp_path, "one.txt", text))


def test_non_utf8_bytes_are_reported_with_their_line(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"1 hi\tok\n2 caf\xe9\tyes\n")
    with pytest.raises(DialogFormatError, match="latin.txt:2: not UTF-8"):
        read_dialogs(str(path))


def test_evaluation_reads_personachat_json_with_a_valid_list_only(tmp_path):
    data = make_personachat()
    for train in ("missing", "empty"):
        obj = {"valid": data["valid"]} if train == "missing" else {"train": [], "valid": data["valid"]}
        path = write(tmp_path, f"{train}.json", json.dumps(obj))
        assert len(read_dialogs(path, need_train=False)["valid"]) == len(data["valid"])
        with pytest.raises(DialogFormatError, match="missing the 'train' list" if train == "missing" else
                           "the train split has no dialog"):
            read_dialogs(path)  # training needs the train split


def test_a_byte_order_mark_is_not_text(tmp_path):
    data = make_personachat()
    json_path = tmp_path / "bom.json"
    json_path.write_bytes(b"\xef\xbb\xbf" + json.dumps(data).encode())
    assert len(read_dialogs(json_path)["valid"]) == len(data["valid"])
    txt = tmp_path / "valid_bom.txt"
    txt.write_bytes("\ufeff1 your persona: i like cats.\n2 hi\thello|no\n".encode())
    dialog, = read_parlai(txt)
    assert dialog["personality"] == ["i like cats."]
