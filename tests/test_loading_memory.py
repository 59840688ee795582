"""Where loaded weights end up in memory: huge-page moves and released checkpoint pages keep every value."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tramontane.args import ModelArgs
from tramontane.fuse import concat_rows
from tramontane.kernels import HUGE_PAGE, load_kernels, weight_empty
from tramontane.loading.common import expected_shapes, iter_safetensors, settle_in_memory
from tramontane.loading.gguf_write import write_gguf

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or load_kernels() is None,
                                reason="huge pages and page release are Linux-only and need the kernels")


def test_weights_move_to_huge_page_memory_and_keep_their_values(tmp_path: Path):
    g = torch.Generator().manual_seed(0)
    tensors = {"big": torch.randn(1024, 1024, generator=g), "small": torch.randn(64, generator=g),
               "shared": torch.randn(1024, 600, generator=g)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    loaded = dict(iter_safetensors(path))  # memory-mapped from the file
    module = torch.nn.Module()
    module.big = torch.nn.Parameter(loaded["big"], requires_grad=False)
    module.small = torch.nn.Parameter(loaded["small"], requires_grad=False)
    module.shared = torch.nn.Parameter(loaded["shared"], requires_grad=False)
    module.register_buffer("alias", module.shared.data.view(600, 1024))  # a second holder of one storage
    before = {name: t.data_ptr() for name, t in module.state_dict().items()}

    settle_in_memory(module, {path})

    assert module.big.data_ptr() != before["big"] and module.big.data_ptr() % HUGE_PAGE == 0
    assert module.small.data_ptr() == before["small"]  # under 2 MiB: left in place
    assert module.shared.data_ptr() == before["shared"] and module.alias.data_ptr() == before["alias"]
    # the file's pages were released; whatever still reads from the mapping reads the file again
    for name in ("big", "small", "shared"):
        torch.testing.assert_close(getattr(module, name), tensors[name], rtol=0, atol=0)
    torch.testing.assert_close(module.alias, tensors["shared"].view(600, 1024), rtol=0, atol=0)


def huge_pages_asked(t: torch.Tensor) -> bool:
    """Whether the mapping holding `t` was marked for 2 MiB pages (madvise's `hg` flag in smaps)."""
    address, inside = t.data_ptr(), False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0]
        if line[:1] in "0123456789abcdef" and "-" in first:
            start, end = (int(x, 16) for x in first.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return "hg" in line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("huge", [True, False])
def test_mapped_empty_gives_the_asked_size_and_pages(huge: bool):
    ext = load_kernels()
    for n in (0, 100, HUGE_PAGE + 3):
        t = ext.mapped_empty(n, huge)
        assert t.dtype == torch.uint8 and t.numel() == n
        t.fill_(7)
        assert int(t.sum()) == 7 * n
        if n >= HUGE_PAGE:
            assert t.data_ptr() % HUGE_PAGE == 0 and huge_pages_asked(t) == huge


def test_weight_empty_uses_huge_pages_only_for_large_cpu_weights():
    big = weight_empty((1024, 1024), torch.float16)  # exactly 2 MiB
    assert big.shape == (1024, 1024) and big.dtype == torch.float16 and big.data_ptr() % HUGE_PAGE == 0
    assert huge_pages_asked(big)
    assert not huge_pages_asked(weight_empty((1024, 1024), torch.float16, huge_pages=False))
    small = weight_empty((3, 5), torch.float32)
    assert small.shape == (3, 5) and small.dtype == torch.float32


def test_fused_weights_are_born_in_huge_pages_and_stay_there():
    g = torch.Generator().manual_seed(1)
    parts = [torch.nn.Linear(512, n, bias=False) for n in (1024, 512)]
    for p in parts:
        p.weight.data = torch.randn(p.out_features, 512, generator=g)
    fused = concat_rows(parts)
    torch.testing.assert_close(fused.weight, torch.cat([p.weight for p in parts]), rtol=0, atol=0)
    address = fused.weight.data_ptr()
    assert address % HUGE_PAGE == 0 and not fused.weight.requires_grad

    settle_in_memory(fused, set())  # already where it belongs: not copied again
    assert fused.weight.data_ptr() == address


def q8_file(folder: Path, n_layers: int) -> tuple[Path, ModelArgs]:
    """A small model's random weights written as a Q8_0 GGUF file (its embedding table over 2 MiB)."""
    args = ModelArgs(dim=256, n_layers=n_layers, head_dim=32, hidden_dim=1024, n_heads=8, n_kv_heads=4,
                     norm_eps=1e-6, vocab_size=16384)
    g = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=g) * 0.05 for name, shape in expected_shapes(args).items()}
    path = folder / "q8.gguf"
    write_gguf(path, args, state, qtype="Q8_0")
    return path, args


def test_gguf_reading_releases_the_mapped_pages_it_copied(tmp_path: Path):
    from tramontane.formats.gguf_file import read_gguf
    from tramontane.loading.gguf import iter_gguf_tensors

    path, args = q8_file(tmp_path, n_layers=2)
    size = path.stat().st_size
    reader = read_gguf(path)
    list(iter_gguf_tensors(reader, args))  # every tensor copied out (Q8_0 dequantized)

    def resident_kib() -> int:  # this process's resident pages of the file's mappings
        total, inside = 0, False
        for line in Path("/proc/self/smaps").read_text().splitlines():
            if line[:1] in "0123456789abcdef" and "-" in line.split()[0]:
                inside = line.split()[-1] == str(path)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
        return total

    assert size > 4 << 20 and resident_kib() * 1024 < size // 4
    sum(int(reader.array(t).view(np.uint8).sum()) for t in reader.tensors)  # the map reads the file again: nothing lost
    assert resident_kib() * 1024 > size // 2


def test_gguf_block_formats_stay_in_small_pages_and_int4_gets_huge_ones(tmp_path: Path):
    """A file's own formats are read into 4 KiB pages (a 7B file decoded 1-1.5% slower in them, where fresh
    2 MiB pages tripled its load), while int4 weights quantized at load (15-17% slower) get 2 MiB ones."""
    from tramontane.loading.gguf import iter_gguf_tensors
    from tramontane.quantize import quantize_int4

    path, args = q8_file(tmp_path, n_layers=1)
    table = dict(iter_gguf_tensors(path, args, keep=("Q8_0",)))["tok_embeddings.weight"]
    assert table.dtype == torch.uint8 and table.nbytes >= HUGE_PAGE and not huge_pages_asked(table)

    packed = quantize_int4(torch.randn(2048, 2048, generator=torch.Generator().manual_seed(1)), group_size=32)[0]
    assert packed.nbytes >= HUGE_PAGE and huge_pages_asked(packed)
