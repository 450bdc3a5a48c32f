"""lfgraph's cache (``lfgraph.cache``): where it is (an empty ``LFGRAPH_CACHE`` is the
default, never the current folder), one line when it cannot be used, and every damaged
entry made again, never taken for the model nor blamed on it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lfgraph import cache, models, pipeline  # noqa: F401  (imported before a test patches the loader)
from lfgraph.cli import main
from lfgraph.models import wrap_module
from lfgraph.sources import TorchSource

import tiny_models as zoo
from cli_checks import one_line


def test_an_empty_lfgraph_cache_is_the_default_not_the_current_folder(tmp_path, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("LFGRAPH_CACHE", "")
    assert cache.cache_dir() == home / ".cache" / "lfgraph"
    monkeypatch.delenv("LFGRAPH_CACHE")
    assert cache.cache_dir() == home / ".cache" / "lfgraph"
    monkeypatch.setenv("LFGRAPH_CACHE", "rel")  # a relative folder is the user's choice: made absolute once
    assert cache.cache_dir() == cwd / "rel"
    assert sorted(p.name for p in cwd.iterdir()) == ["rel"]


@pytest.mark.parametrize("where,match", [("file", "is a file, not a folder"), ("/proc", "cannot be written")])
@pytest.mark.parametrize("argv", [["compress", "{model}", "-o", "{tmp}/o.onnx", "--quiet"], ["analyze", "smollm2"]])
def test_a_cache_that_cannot_be_used_is_one_line_before_the_work(tiny_llama_folder, tmp_path, capsys, monkeypatch, where, match, argv):
    """``/proc`` refuses new files even to root, for whom permission bits mean nothing."""
    value = str(tmp_path / "a-file") if where == "file" else "/proc"
    if where == "file":
        Path(value).write_text("the user's file")
    monkeypatch.setenv("LFGRAPH_CACHE", value)
    if argv[0] == "compress":  # compress checks the cache with its options; analyze when the alias needs it
        monkeypatch.setattr("lfgraph.sources.load_model", lambda *a, **k: pytest.fail("loaded before the cache was checked"))
    monkeypatch.setattr(models, "dequantize_gguf", lambda *a, **k: pytest.fail("dequantised before the cache was checked"))
    argv = [a.replace("{model}", str(tiny_llama_folder)).replace("{tmp}", str(tmp_path)) for a in argv]
    line = one_line(capsys, main(argv), match)
    assert f"LFGRAPH_CACHE={value}" in line and "LFGRAPH_CACHE at a folder" in line
    assert not (tmp_path / "o.onnx").exists()
    if where == "file":
        assert Path(value).read_text() == "the user's file"


# --------------------------------------------------------------------------- damaged entries


@pytest.fixture
def fake_smollm2(tiny_llama_folder, tmp_path, monkeypatch):
    """``smollm2`` dequantised into a fresh cache as the real dequantiser writes it (a cache
    entry), from the tiny Llama: counts how often the dequantisation runs."""
    monkeypatch.setenv("LFGRAPH_CACHE", str(tmp_path / "cache"))
    runs = []

    def dequantize(_gguf, out):
        runs.append(out)
        with cache.cache_entry(out, models.DEQUANTISED_FILES) as tmp:
            for f in tiny_llama_folder.iterdir():
                shutil.copyfile(f, tmp / f.name)
        return out

    monkeypatch.setattr(models, "_package_folder", lambda *a: Path("/nonexistent"))
    monkeypatch.setattr(models, "dequantize_gguf", dequantize)
    return runs


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["truncated weights", "missing seal (an older or interrupted writer)", "missing tokenizer file"])
def test_a_damaged_dequantised_smollm2_is_made_again(fake_smollm2, tiny_llama_folder, capsys, damage):
    """Before: a truncated cached model.safetensors was loaded and refused with a message
    that blamed the model ("check that its files are complete")."""
    first = models.load_model("smollm2")
    ids = first.example_inputs[0]
    want = first.module(ids)  # before the damage: the loaded weights map the cached file
    del first
    folder = fake_smollm2[0]
    assert len(fake_smollm2) == 1 and models.load_model("smollm2") is not None and len(fake_smollm2) == 1  # intact: reused
    if damage == "truncated weights":
        _truncate(folder / "model.safetensors")
    elif damage.startswith("missing seal"):
        (folder / cache.SEAL).unlink()
    else:
        (folder / "tokenizer.json").unlink()
    capsys.readouterr()
    again = models.load_model("smollm2")
    assert len(fake_smollm2) == 2 and "making it again" in capsys.readouterr().err
    torch.testing.assert_close(again.module(ids), want, rtol=0, atol=0)


def test_a_damaged_cached_onnx_export_of_the_original_is_made_again(tmp_path):
    import onnxruntime as ort

    x = torch.randn(2, 16)
    source = TorchSource(wrap_module(zoo.MLP(), (x,), name="mlp"))
    path = source.original_file()
    good = path.read_bytes()
    _truncate(path)
    again = source.original_file()
    assert again == path and again.read_bytes() == good
    name = ort.InferenceSession(str(again)).get_inputs()[0].name
    ort.InferenceSession(str(again)).run(None, {name: x.numpy()})


def test_a_truncated_cached_tensor_is_made_again(tmp_path, capsys):
    from lfgraph.retrain.frozen import TeacherCache

    teacher = models.CausalLMLogits(zoo.tiny_llama(layers=2, vocab_size=64)).eval()
    windows = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(0))
    saved = tmp_path / "teacher" / "t.pt"
    first = TeacherCache.build(teacher, windows, saved=saved)
    _truncate(saved)
    assert cache.read_cached(saved) is None and "cannot be read" in capsys.readouterr().err
    calls = []
    hook = teacher.register_forward_hook(lambda *a: calls.append(1))
    again = TeacherCache.build(teacher, windows, saved=saved)
    hook.remove()
    assert calls, "the damaged entry was taken instead of running the teacher again"
    torch.testing.assert_close(again(windows), first(windows), rtol=0, atol=0)
    assert isinstance(cache.read_cached(saved), dict)  # written whole again


def test_sampled_windows_cache_truncated_is_sampled_again(tmp_path, monkeypatch):
    from lfgraph.passes import map_distillation as md

    monkeypatch.setenv("LFGRAPH_CACHE", str(tmp_path))
    model = models.CausalLMLogits(zoo.tiny_llama(layers=2)).eval()
    windows = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(5))
    a = md.sample_windows(model, windows, 5, prompt_tokens=4, seed=1, cache=True)
    (entry,) = (tmp_path / "samples").iterdir()
    _truncate(entry)
    assert torch.equal(md.sample_windows(model, windows, 5, prompt_tokens=4, seed=1, cache=True), a)
    assert torch.equal(cache.read_cached(entry), a)


def test_a_cache_entry_is_whole_or_absent(tmp_path):
    entry = tmp_path / "e"
    with pytest.raises(RuntimeError):
        with cache.cache_entry(entry, ["a"]) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with cache.cache_entry(entry, ["a"]) as tmp:
        (tmp / "a").write_text("whole")
    assert cache.intact(entry, ["a"]) and json.loads((entry / cache.SEAL).read_text())["files"] == {"a": 5}
    assert not cache.intact(entry, ["a", "b"])
    (entry / "a").write_text("changed size")
    assert cache.cached_folder(entry, ["a"]) is None
    np.testing.assert_equal(sorted(p.name for p in tmp_path.iterdir()), ["e"])


def test_a_damaged_cached_with_past_export_is_made_again(tiny_llama_folder, tmp_path, monkeypatch):
    """The deploy folder times decoding against the original's with-past export, cached by
    fingerprint; a truncated ``model.onnx`` there is exported again (the export is faked:
    the real one takes ~10 s and is the deploy tests' subject)."""
    from lfgraph.outputs import DeployFolderOutput

    exports = []

    def export(hf_model, folder, genai_config=False):
        exports.append(folder)
        (folder / "model.onnx").write_bytes(b"an exported model " * 100)

    monkeypatch.setattr("lfgraph.deploy.export_decoder_with_past", export)
    # its own cache: the fake export must not become the tiny model's entry for the tests after
    monkeypatch.setenv("LFGRAPH_CACHE", str(tmp_path / "cache"))
    source = TorchSource(models.load_model(str(tiny_llama_folder)))
    output = DeployFolderOutput(source, tmp_path / "out")
    folder = output.original(quiet=True)
    assert output.original(quiet=True) == folder and len(exports) == 1
    _truncate(folder / "model.onnx")
    assert output.original(quiet=True) == folder and len(exports) == 2
    assert (folder / "model.onnx").read_bytes() == b"an exported model " * 100


def test_two_gguf_files_of_one_name_never_share_a_cache_entry(tmp_path, monkeypatch):
    """The dequantised folder is keyed by the GGUF's content: another model saved under the
    same file name (or the same file re-quantised) is dequantised again, never taken from the
    entry of the one before (issue 27: a wrong model with exit 0)."""
    from lfgraph import models

    monkeypatch.setenv("LFGRAPH_CACHE", str(tmp_path / "cache"))
    a, b, same = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf", tmp_path / "c" / "model.gguf"
    for path, data in ((a, b"GGUF one model"), (b, b"GGUF another model"), (same, b"GGUF one model")):
        path.parent.mkdir()
        path.write_bytes(data)
    asked = []

    class Asked(Exception):
        pass

    def dequantize(gguf_file, out):  # the entry it would be cached in; the fake files are no models
        asked.append(out)
        raise Asked

    monkeypatch.setattr(models, "dequantize_gguf", dequantize)
    for path in (a, b, same):
        with pytest.raises(Asked):
            models.load_model(str(path))
    assert asked[0] != asked[1] and asked[0] == asked[2]
    assert all(p.parent == tmp_path / "cache" and p.name.startswith("model-") for p in asked)
