"""Pages of memory-mapped checkpoints are given back once read, and no data is lost."""

import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import load_dir, run_cli, write_yaml
from mergekit_timber.integration import input_pages
from mergekit_timber.method.kernel import refine_stack
from pairs.synthetic import write_pair

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def rss_file_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.fixture
def mapped(tmp_path):
    """A 32 MB tensor read through safetensors' memory map, and a private copy of it."""
    want = {"big": torch.randn(4096, 2048), "small": torch.arange(10.0)}
    path = tmp_path / "model.safetensors"
    save_file(want, str(path))
    with safe_open(str(path), framework="pt") as fh:
        yield fh.get_tensor("big"), want["big"]


def test_release_drops_read_pages_and_keeps_values(mapped):
    view, want = mapped
    assert float(view.sum()) == pytest.approx(float(want.sum()), rel=1e-4)  # fault every page in
    before = rss_file_kb()
    released = input_pages.release(view)
    assert released >= view.numel() * view.element_size() - 2 * 4096
    assert before - rss_file_kb() >= 0.9 * released / 1024
    assert torch.equal(view, want)  # read again: the same bytes, from the file


def test_pages_written_to_are_kept(mapped):
    view, want = mapped
    view[7, 7] = 1234.5  # a private copy of that one page
    want[7, 7] = 1234.5
    input_pages.release(view)
    assert torch.equal(view, want)


def test_ordinary_memory_is_left_alone():
    t = torch.randn(1024, 1024)
    copy = t.clone()
    assert input_pages.release(t, t[10:20], None) == 0
    assert torch.equal(t, copy)


def test_can_be_turned_off(mapped, monkeypatch):
    view, _ = mapped
    view.sum()
    monkeypatch.setenv("MERGEKIT_TIMBER_KEEP_INPUT_PAGES", "1")
    assert input_pages.release(view) == 0


def test_kernel_reports_every_row_it_reads_and_the_result_is_unchanged(monkeypatch):
    from mergekit_timber.method import kernel

    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 300, 40, generator=g, dtype=torch.float64)
    instruct = base + 0.1 * torch.randn(2, 300, 40, generator=g, dtype=torch.float64)
    one_chunk = []
    plain = refine_stack(base, instruct, 0.3, read_hook=one_chunk.append)
    # One chunk: the Gram pass's delta is reused, both inputs are reported once, whole.
    assert [v.shape for v in one_chunk] == [base.shape, instruct.shape]
    # 50-row chunks; on the host a batch's chunk stays within CHUNK_BYTES: one matrix a batch.
    monkeypatch.setattr(kernel, "CHUNK_BYTES", 50 * 40 * 8)
    seen = []
    hooked = refine_stack(base, instruct, 0.3, read_hook=seen.append)
    assert torch.equal(plain.tensor, hooked.tensor)
    for source in (base, instruct):
        rows = torch.zeros(2 * 300, dtype=torch.int64)  # the rows of both matrices
        for view in seen:
            if view.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
                assert view.shape == (1, 50, 40)
                start = (view.data_ptr() - source.data_ptr()) // (8 * 40)
                rows[start : start + 50] += 1
        assert rows.tolist() == [2] * 600  # read in the Gram pass and in the rebuild


def test_merge_output_is_identical_with_pages_kept(tmp_path):
    base_dir, instruct_dir = write_pair(tmp_path / "pair", arch="qwen3", layers=1, seed=3)
    config = {
        "merge_method": "timber",
        "base_model": str(base_dir),
        "models": [{"model": str(instruct_dir)}],
    }
    cfg = write_yaml(tmp_path / "timber.yml", config)
    run_cli("mergekit-yaml", cfg, tmp_path / "released")
    run_cli("mergekit-yaml", cfg, tmp_path / "kept", env={"MERGEKIT_TIMBER_KEEP_INPUT_PAGES": "1"})
    released, kept = load_dir(tmp_path / "released"), load_dir(tmp_path / "kept")
    assert released.keys() == kept.keys()
    assert all(torch.equal(released[k], kept[k]) for k in kept)
