"""The checkpoint reader both paths share (``lfgraph.blocks.checkpoint``): headers checked
against file sizes and dtypes before any tensor is read, shard indexes checked, the weight
files chosen as transformers chooses them, and every damage one line (exit 2) naming the
file, block by block (``compress --stream``) and the in-memory one (``analyze``,
``compress``) alike, the input untouched and nothing written."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest

from lfgraph.cli import main
from lfgraph.blocks.checkpoint import INDEX_FILE, SINGLE_FILE, read_header

from cli_checks import one_line
from blocks_helpers import save_folder


def _digest(folder):
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())).hexdigest()


def _split(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _rewrite(path, header, data):
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return save_folder(tmp_path_factory.mktemp("single") / "m", layers=3)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return save_folder(tmp_path_factory.mktemp("sharded") / "m", layers=3, sharded=True)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _first_tensor(header):
    return next(k for k in header if k != "__metadata__")


def _truncate(folder):
    f = folder / SINGLE_FILE
    f.write_bytes(f.read_bytes()[:-1000])
    return SINGLE_FILE, "is truncated"


def _shard_truncated(folder):
    f = sorted(folder.glob("model-*.safetensors"))[1]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return f.name, "is truncated"


def _dtype_lies(folder):
    f = folder / SINGLE_FILE
    header, data = _split(f)
    header[_first_tensor(header)]["dtype"] = "F16"  # half the bytes its offsets span
    _rewrite(f, header, data)
    return SINGLE_FILE, "damaged header"


def _shape_lies(folder):
    f = folder / SINGLE_FILE
    header, data = _split(f)
    name = _first_tensor(header)
    header[name]["shape"] = [header[name]["shape"][0] * 2, *header[name]["shape"][1:]]
    _rewrite(f, header, data)
    return SINGLE_FILE, f"tensor {name} is F32 of shape"


def _overlap(folder):
    f = folder / SINGLE_FILE
    header, data = _split(f)
    ordered = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    a, b = ordered[0], ordered[1]
    size = header[a]["data_offsets"][1] - header[a]["data_offsets"][0]
    if header[b]["data_offsets"][1] - header[b]["data_offsets"][0] == size:  # b reads a's bytes: same size, overlapping
        header[b]["data_offsets"] = list(header[a]["data_offsets"])
    else:
        header[b]["data_offsets"] = [header[a]["data_offsets"][0], header[a]["data_offsets"][0] + header[b]["data_offsets"][1] - header[b]["data_offsets"][0]]
    _rewrite(f, header, data)
    return SINGLE_FILE, "damaged header"


def _unknown_dtype(folder):
    f = folder / SINGLE_FILE
    header, data = _split(f)
    header[_first_tensor(header)]["dtype"] = "C64"
    _rewrite(f, header, data)
    return SINGLE_FILE, "has dtype 'C64'"


def _index_truncated(folder):
    f = folder / INDEX_FILE
    f.write_bytes(f.read_bytes()[:50])
    return INDEX_FILE, "cannot be read"


def _index_not_a_map(folder):
    f = folder / INDEX_FILE
    index = json.loads(f.read_text())
    index["weight_map"] = list(index["weight_map"].items())
    f.write_text(json.dumps(index))
    return INDEX_FILE, "no weight_map of tensor names to shard files"


def _index_misplaces(folder):
    f = folder / INDEX_FILE
    index = json.loads(f.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][name] = shards[1]
    f.write_text(json.dumps(index))
    return name, "which model.safetensors.index.json places in"


def _both_files(folder):
    save_folder(folder.parent / "other", layers=2)
    (folder.parent / "other" / SINGLE_FILE).rename(folder / SINGLE_FILE)
    return f"both {SINGLE_FILE} and {INDEX_FILE}", "which of them is the model is unclear"


def _config_list(folder):
    (folder / "config.json").write_text("[1, 2, 3]\n")
    return "config.json", "holds a JSON list, not an object"


CASES = {
    "truncated single file": ("single", _truncate), "truncated shard": ("sharded", _shard_truncated),
    "dtype lies": ("single", _dtype_lies), "shape lies": ("single", _shape_lies), "overlapping offsets": ("single", _overlap),
    "unknown dtype": ("single", _unknown_dtype), "truncated index": ("sharded", _index_truncated),
    "weight_map not a map": ("sharded", _index_not_a_map), "index misplaces a tensor": ("sharded", _index_misplaces),
    "single file beside an index": ("sharded", _both_files), "config is a list": ("single", _config_list),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("path", ["stream", "in-memory"])
def test_damaged_checkpoints_are_one_line_on_both_paths(case, path, single, sharded, tmp_path, capsys):
    kind, damage = CASES[case]
    folder = _copy(single if kind == "single" else sharded, tmp_path / "in" / "m")
    names, what = damage(folder)
    before = _digest(folder)
    out = tmp_path / "out"
    args = ["compress", str(folder), "-o", str(out), "--quiet"] + (["--stream", "--no-onnx"] if path == "stream" else ["--no-onnx"])
    line = one_line(capsys, main(args), what)
    assert names in line
    assert _digest(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # nothing beside the output


@pytest.mark.parametrize("case", ["truncated single file", "dtype lies", "config is a list"])
def test_analyze_reads_the_same_checks(case, single, tmp_path, capsys):
    kind, damage = CASES[case]
    folder = _copy(single, tmp_path / "m")
    _names, what = damage(folder)
    one_line(capsys, main(["analyze", str(folder)]), what)


def test_header_of_a_whole_file_is_read_in_data_order(single):
    entries, meta = read_header(single / SINGLE_FILE)
    starts = [e.start for e in entries.values()]
    assert starts == sorted(starts) and meta.get("format") == "pt"
    assert entries[next(iter(entries))].start == 8 + struct.unpack("<Q", (single / SINGLE_FILE).read_bytes()[:8])[0]


def test_layers_beyond_the_config_are_refused_on_the_streaming_path_as_in_memory(single, tmp_path, capsys):
    """A config that says 2 layers over a checkpoint of 3: both paths refuse the third
    layer's tensors as unexpected (the streaming path dropped them silently before)."""
    folder = _copy(single, tmp_path / "in" / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (folder / "config.json").write_text(json.dumps(cfg))
    for extra in (["--stream"], []):
        one_line(capsys, main(["compress", str(folder), "-o", str(tmp_path / "out"), "--quiet", "--no-onnx", "--target", "0.5", *extra]),
                 "not expected by the config (model.layers.2.")
        assert not (tmp_path / "out").exists()
