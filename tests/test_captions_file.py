"""Caption files (Flickr8k token format, CSV/TSV), split files and domain tables."""

import warnings

import pytest

from aeir_jax.data import captions_file as cf
from aeir_jax.errors import DataError
from conftest import shared_path


def _write(tmp_path, name, text):
  path = tmp_path / name
  path.write_bytes(text.encode() if isinstance(text, str) else text)
  return str(path)


def _token_lines(names, n=5, start=0):
  return "".join(f"{name}#{i}\t{name} caption {i} .\n" for name in names
                 for i in range(start, start + n))


def _one_line_error(call):
  with pytest.raises(DataError) as error:
    call()
  message = str(error.value)
  assert "\n" not in message
  return message


def test_token_format_groups_and_orders_by_caption_number(tmp_path):
  text = "b.jpg#1\tB one\n" + "a.jpg#0\tA zero\n" + "b.jpg#0\tB zero\n" + "a.jpg#1\tA one\n"
  result = cf.read_captions_file(_write(tmp_path, "caps.txt", text), captions_per_image=2)
  assert result.names == ["b.jpg", "a.jpg"]
  assert result.captions == [["B zero", "B one"], ["A zero", "A one"]]
  assert result.domains is None
  assert result.flat_captions() == ["B zero", "B one", "A zero", "A one"]


def test_stray_key_is_skipped_with_a_warning(tmp_path):
  # As in the real Flickr8k file: caption 0 of x.jpg is keyed 'x.jpg.1#0'.
  text = _token_lines(["a.jpg"]) + "x.jpg.1#0\tstray caption\n" + _token_lines(
      ["x.jpg"], n=4, start=1) + _token_lines(["b.jpg"])
  path = _write(tmp_path, "caps.txt", text)
  with pytest.warns(UserWarning, match=r"skipped 1 line\(s\).*lines 6\b"):
    result = cf.read_captions_file(path, images=["b.jpg", "a.jpg"])
  assert result.names == ["b.jpg", "a.jpg"]
  with pytest.warns(UserWarning):
    message = _one_line_error(lambda: cf.read_captions_file(path))
  assert "image x.jpg has 4 captions (lines 7-10), expected 5" in message
  with pytest.warns(UserWarning) as record:
    result = cf.read_captions_file(path, on_incomplete="drop")
  assert any("dropped image x.jpg" in str(w.message) for w in record)
  assert result.names == ["a.jpg", "b.jpg"]


def test_listed_images_must_be_complete_and_present(tmp_path):
  path = _write(tmp_path, "caps.txt", _token_lines(["a.jpg"]) + _token_lines(["c.jpg"], n=3))
  assert "has no captions for image z.jpg" in _one_line_error(
      lambda: cf.read_captions_file(path, images=["z.jpg"]))
  assert "image c.jpg has 3 captions" in _one_line_error(
      lambda: cf.read_captions_file(path, images=["c.jpg"], on_incomplete="drop"))
  assert cf.read_captions_file(path, captions_per_image=None).captions[1] == [
      "c.jpg caption 0 .", "c.jpg caption 1 .", "c.jpg caption 2 ."]


@pytest.mark.parametrize("text,expected", [
    ("a.jpg#0\tfine\na.jpg#1 no tab\n", ":2: expected 'name.jpg#i<TAB>caption'"),
    ("a.jpg#0\tfine\na.jpg#x\tbad number\n", ":2: expected"),
    ("a.jpg#0\tone\nb.jpg#0\ttwo\na.jpg#0\tagain\n", ":3: caption a.jpg#0 repeats line 1"),
    ("a.jpg#0\tone\na.jpg#1\t  \n", ":2: empty caption for a.jpg"),
    (b"a.jpg#0\tone\na.jpg#1\tcaf\xe9\n", ":2: not valid UTF-8"),
    ("", "is empty"),
])
def test_token_format_errors_give_file_and_line(tmp_path, text, expected):
  path = _write(tmp_path, "caps.txt", text)
  message = _one_line_error(lambda: cf.read_captions_file(path, captions_per_image=None))
  assert path in message and expected in message


def test_csv_with_domain_and_quoted_commas(tmp_path):
  text = ('image,caption,domain\n'
          'a.jpg,"A dog, running .",animal\n'
          'a.jpg,A dog .,animal\n'
          'b.jpg,A man .,people\n'
          'b.jpg,"A man, walking .",people\n')
  result = cf.read_captions_file(_write(tmp_path, "caps.csv", text), captions_per_image=2)
  assert result.names == ["a.jpg", "b.jpg"]
  assert result.captions[0] == ["A dog, running .", "A dog ."]
  assert result.domains == ["animal", "people"]


def test_tsv_without_domain(tmp_path):
  text = "image\tcaption\na.jpg\tA dog .\na.jpg\tA cat .\n"
  result = cf.read_captions_file(_write(tmp_path, "caps.tsv", text), captions_per_image=2)
  assert result.captions == [["A dog .", "A cat ."]] and result.domains is None


@pytest.mark.parametrize("text,expected", [
    ("img,caption\na.jpg,x\n", ":1: header is ['img', 'caption']"),
    ("image,caption\na.jpg,x,extra\n", ":2: 3 fields, expected 2"),
    ("image,caption,domain\na.jpg,x,animal\na.jpg,y,people\n", ":3: domain 'people' of a.jpg"),
    ("image,caption\na.jpg,x\na.jpg,\n", ":3: empty caption"),
])
def test_csv_errors_give_file_and_line(tmp_path, text, expected):
  path = _write(tmp_path, "caps.csv", text)
  message = _one_line_error(lambda: cf.read_captions_file(path, captions_per_image=None))
  assert path in message and expected in message


def test_split_file(tmp_path):
  assert cf.read_split_file(_write(tmp_path, "s.txt", "a.jpg\nb.jpg\n")) == ["a.jpg", "b.jpg"]
  assert ":2: empty line" in _one_line_error(
      lambda: cf.read_split_file(_write(tmp_path, "s.txt", "a.jpg\n\nb.jpg\n")))
  assert ":3: image a.jpg repeats line 1" in _one_line_error(
      lambda: cf.read_split_file(_write(tmp_path, "s.txt", "a.jpg\nb.jpg\na.jpg\n")))
  assert "is empty" in _one_line_error(lambda: cf.read_split_file(_write(tmp_path, "s", "")))


def test_domain_table(tmp_path):
  text = ("image\tofficial_split\tdomain\tn_captions_with_animal_word\n"
          "a.jpg\ttrain\tanimal\t5\nb.jpg\ttrain\tpeople_scene\t0\n"
          "c.jpg\ttest\tanimal\t4\nd.jpg\ttest\tambiguous\t1\n")
  table = cf.read_domain_table(_write(tmp_path, "d.tsv", text))
  assert table.select(split="train", domain="animal") == ["a.jpg"]
  assert table.select(domain="animal") == ["a.jpg", "c.jpg"]
  assert table.select(split="test") == ["c.jpg", "d.jpg"]
  no_split = cf.read_domain_table(_write(tmp_path, "d2.tsv", "image\tdomain\na.jpg\tanimal\n"))
  assert no_split.splits is None
  assert "no 'official_split' column" in _one_line_error(lambda: no_split.select(split="x"))
  assert ":1: header" in _one_line_error(
      lambda: cf.read_domain_table(_write(tmp_path, "d3.tsv", "image\tsplit\na\tb\n")))
  assert ":2: expected 2 tab-separated fields" in _one_line_error(
      lambda: cf.read_domain_table(_write(tmp_path, "d4.tsv", "image\tdomain\na.jpg\n")))


def test_check_images_exist(tmp_path):
  (tmp_path / "a.jpg").write_bytes(b"x")
  cf.check_images_exist(["a.jpg"], str(tmp_path))
  assert "missing from" in _one_line_error(
      lambda: cf.check_images_exist(["a.jpg", "b.jpg"], str(tmp_path)))
  assert "does not exist" in _one_line_error(
      lambda: cf.check_images_exist(["a.jpg"], str(tmp_path / "none")))


def test_real_flickr8k_files():
  folder = shared_path("data", "flickr8k")
  tokens = str(folder / "Flickr8k.token.txt")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    train = cf.read_captions_file(
        tokens, images=cf.read_split_file(str(folder / "Flickr_8k.trainImages.txt")))
    assert len(train.names) == 6000 and all(len(c) == 5 for c in train.captions)
    message = _one_line_error(lambda: cf.read_captions_file(tokens))
  assert "2258277193_586949ec62.jpg has 4 captions" in message
  table = cf.read_domain_table(str(folder / "domain_split.tsv"))
  assert len(table.select(split="train", domain="animal")) == 1641
  assert len(table.select(split="test", domain="animal")) == 253
