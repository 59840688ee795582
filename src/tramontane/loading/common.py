"""Shared loading machinery: build on the meta device, stream tensors in, check every name and shape."""

from __future__ import annotations

import itertools
import pickle
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from ..args import ModelArgs
from ..errors import CheckpointError, TensorMismatchError
from ..formats.layout import read_safetensors
from ..fuse import fuse_projections, use_fast_linears
from ..gguf_linear import use_block_formats
from ..heads import model_for
from ..kernels import HUGE_PAGE, load_kernels, weight_empty
from ..model import Transformer
from ..parallel.shard import ShardPlan
from ..quantize import (
    Int4Linear,
    Int8Linear,
    QuantConfig,
    quantize_linear,
    quantize_model,
    quantized_state_dict,
    tie_quantized_head,
)

# (internal name, tensor, file it came from)
NamedTensors = Iterable[tuple[str, torch.Tensor, Path]]


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `args` must hold, by internal (Mistral-native) name."""
    with torch.device("meta"):
        model = model_for(args)  # with its task head, if the checkpoint has one
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def build_model(
    args: ModelArgs,
    tensors: NamedTensors,
    where: Path,
    dtype: torch.dtype,
    device: torch.device | str,
    progress: bool = False,
    quant: QuantConfig | None = None,
    formats: dict[str, str] | None = None,
    shard: ShardPlan | None = None,
) -> Transformer:
    """Create the model on the meta device and assign each tensor as it streams in.

    Each source tensor is converted on its own, so peak memory is the model plus one tensor. Float
    parameters take `dtype`; quantized buffers keep theirs. With `quant`, the source may be a saved
    quantized checkpoint (its tensors are assigned as they are) or a float one (each weight is
    quantized as it arrives, so a float copy of the whole model never exists). `formats` (internal
    weight name -> GGUF format) names the tensors that arrive as a GGUF file stores them
    (`blocks.use_block_formats` gives each a layer of its format).

    With `shard`, the model is this rank's share (see parallel/shard.py): built at its local sizes, each
    tensor sliced as it arrives (the rest of the source is never copied), the collectives swapped in.

    Raises TensorMismatchError naming the file and tensor for an unknown, duplicate, misshapen or
    missing tensor.
    """
    with torch.device("meta"):
        model = model_for(args if shard is None else shard.local_args())  # with its task head, if any
        if shard is not None:
            shard.check_quantization(quant)
            shard.skeleton(model)
            formats = shard.formats(formats or {})
    if quant is not None:
        quantize_model(model, quant)
    if formats:
        use_block_formats(model, formats, dtype)
    expected = dict(quantized_state_dict(model, keep_vars=True))
    parameters = {name for name, _ in model.named_parameters()}
    # float weight name -> the quantized module that takes it (e.g. layers.0.attention.wq.weight -> ...wq)
    targets: dict[str, Int8Linear | Int4Linear] = {}
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear | Int4Linear):
            targets[name.removesuffix(".table") + ".weight"] = module
    loaded: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(expected), desc="Loading weights", unit="tensor", disable=not progress, leave=False)

    sources: set[Path] = set()
    kept: list[int] = []  # addresses of this source tensor's values that the model keeps as they are
    pages = _FilePages() if torch.device(device).type == "cpu" else None

    def put(name: str, value: torch.Tensor, source: Path) -> None:
        sources.add(source)
        if name in loaded:
            raise TensorMismatchError(source, f"tensor {name!r} appears more than once")
        want = expected[name]
        if tuple(value.shape) != tuple(want.shape):
            raise TensorMismatchError(
                source, f"tensor {name!r} has shape {list(value.shape)}, expected {list(want.shape)}"
            )
        if want.dtype.is_floating_point != value.dtype.is_floating_point:
            raise TensorMismatchError(source, f"tensor {name!r} has dtype {value.dtype}, expected {want.dtype}")
        loaded[name] = value.to(device=device, dtype=dtype if name in parameters else want.dtype)
        kept.append(loaded[name].data_ptr())
        bar.update(1)

    def pick(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        return (name, tensor) if shard is None else shard.pick(name, tensor)

    for source_name, source_tensor, source in tensors:
        local = source_name if shard is None else shard.local_name(source_name)
        if local is None:  # another rank's
            if pages is not None:
                pages.release(source_tensor.data_ptr(), source_tensor.nbytes, [source])
            continue
        if local in targets and source_tensor.dtype.is_floating_point:  # a float weight to quantize as it arrives
            module = targets[local]
            if shard is None and tuple(source_tensor.shape) != (module.out_features, module.in_features):
                raise TensorMismatchError(source, f"tensor {source_name!r} has shape {list(source_tensor.shape)}, "
                                                  f"expected {[module.out_features, module.in_features]}")
            assert quant is not None  # targets exist only for a quantized skeleton
            prefix = source_name.removesuffix("weight")
            # whole rows quantized before a share is cut: the same numbers as in one process
            for leaf, value in quantize_linear(quant, source_tensor.to(device)).state_dict().items():
                picked = pick(prefix + leaf, value)
                assert picked is not None  # local_name kept the weight, so it keeps its scales
                put(_stored_key(picked[0], expected) or picked[0], picked[1], source)
            if pages is not None and pages.ext is not None:
                # quantizing leaves float temporaries in the C heap, among weights that stay: give
                # their pages back now (a 7B Q8_0 file loaded as int8: peak 10.2 -> 8.0 GiB)
                pages.ext.trim_heap()
            if pages is not None:  # copied out: its mapped pages can go
                pages.release(source_tensor.data_ptr(), source_tensor.nbytes, [source])
            kept.clear()
            continue
        picked = pick(source_name, source_tensor)
        assert picked is not None  # local_name kept it
        name, tensor = picked
        if (stored := _stored_key(name, expected)) is not None:
            put(stored, tensor, source)  # float model tensors, or already quantized ones (saved, GGUF Q4_0)
        else:
            raise TensorMismatchError(source, f"unexpected tensor {name!r} (not part of this model's architecture)")
        if pages is not None and source_tensor.data_ptr() not in kept:  # copied out: its mapped pages can go
            pages.release(source_tensor.data_ptr(), source_tensor.nbytes, [source])
        kept.clear()
    bar.close()
    missing = [n for n in expected if n not in loaded]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise TensorMismatchError(where, f"missing tensor(s) {', '.join(missing[:5])}{more}")
    model.load_state_dict(loaded, strict=False, assign=True)
    # Drop our references first (the quantized modules in `targets` hold their weights too): fusing
    # layer by layer then frees each unfused weight as it goes, instead of holding a second copy of
    # every projection until the end.
    loaded.clear()
    targets.clear()
    tie_quantized_head(model)
    model = use_fast_linears(fuse_projections(model)).eval()
    if shard is not None:
        shard.parallelize(model)
    if torch.device(device).type == "cpu":
        settle_in_memory(model, sources)
    return model


class _FilePages:
    """The memory mappings of checkpoint files (from /proc/self/maps, on Linux), to release the pages of
    tensors copied out of them: otherwise they stay resident as long as their file is mapped."""

    def __init__(self) -> None:
        self.ext = load_kernels() if Path("/proc/self/maps").is_file() else None
        self.ranges: dict[Path, list[tuple[int, int]]] = {}

    def mapped(self, file: Path) -> list[tuple[int, int]]:
        if self.ext is None:
            return []
        if file not in self.ranges:
            name, ranges = str(file.resolve()), []
            for line in Path("/proc/self/maps").read_text().splitlines():
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5] == name:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((start, end))
            self.ranges[file] = ranges
        return self.ranges[file]

    def holds(self, address: int, files: Iterable[Path]) -> bool:
        """Whether `address` lies in a mapping of one of `files`."""
        return any(start <= address < end for f in files for start, end in self.mapped(f))

    def release(self, address: int, nbytes: int, files: Iterable[Path]) -> bool:
        """Release the pages of [address, address + nbytes) if it lies in a mapping of one of `files`
        (never loses data: file pages are read again if touched); whether it did."""
        if self.ext is None or not self.holds(address, files):
            return False
        self.ext.release_pages(address, nbytes)
        return True


def settle_in_memory(model: torch.nn.Module, files: set[Path]) -> None:
    """Where Linux allows, move each CPU weight of 2 MiB or more into memory backed by 2 MiB pages, and
    release the pages of the checkpoint `files` that loading mapped and copied out.

    A decode step reads every weight once; with 4 KiB pages its TLB misses cost batch-1 int4 about 15%
    of its bandwidth. Moves happen in place (`Tensor.set_`, so every holder of a tensor sees it), one
    tensor at a time, each source's file pages (or freed heap memory) released after its copy: peak
    memory grows by about the largest tensor. Tensors that share storage stay where they are, and so do
    those that loading already put in memory of their own (`weight_empty`: a GGUF file's own formats
    stay in 4 KiB pages there, see `_Stacks`).
    """
    pages = _FilePages()
    ext = pages.ext
    if ext is None:
        return
    # first the pages of tensors already copied out (fused, say) and the heap memory of temporaries, so
    # that the moves stay under loading's peak
    for f in files:
        for start, end in pages.mapped(f):
            ext.release_pages(start, end - start)
    ext.trim_heap()
    tensors = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    holders = Counter(t.untyped_storage().data_ptr() for t in tensors.values())
    with torch.no_grad():
        for t in tensors.values():
            if (t.device.type != "cpu" or t.nbytes < HUGE_PAGE or not t.is_contiguous() or t.storage_offset()
                    or t.untyped_storage().nbytes() != t.nbytes or holders[t.untyped_storage().data_ptr()] > 1
                    or (t.data_ptr() % HUGE_PAGE == 0 and not pages.holds(t.data_ptr(), files))):
                continue
            source = t.data_ptr()
            moved = weight_empty(tuple(t.shape), t.dtype)
            moved.copy_(t)
            t.set_(moved.untyped_storage(), 0, moved.shape, moved.stride())
            if not pages.release(source, t.nbytes, files):
                ext.trim_heap()  # not from a file: the old copy went back to the C heap, which keeps it resident


def _stored_key(name: str, expected: dict[str, torch.Tensor]) -> str | None:
    """Where a tensor goes: its own name, or for quantized embeddings the `table.` inside them."""
    if name in expected:
        return name
    owner, _, leaf = name.rpartition(".")
    table = f"{owner}.table.{leaf}"
    return table if table in expected else None


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a safetensors file, read one at a time from the memory map."""
    return read_safetensors(path, "pt")


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, read from its header alone."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise CheckpointError(path, f"cannot read safetensors file ({e}); is it truncated or corrupt?") from e


def load_pth(path: Path) -> dict[str, torch.Tensor]:
    """A `.pth` state dict, memory-mapped and without executing any code from the file."""
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:  # what weights_only raises for a pickle that would run code
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it would call {refused.group(1)}" if refused else str(e).splitlines()[0]
        raise CheckpointError(path, f"refused to load a PyTorch checkpoint that is not plain tensors: {what}") from e
    except Exception as e:  # torch raises many types for corrupt pickles
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(path, f"cannot read PyTorch checkpoint safely ({type(e).__name__}: {first})") from e
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(path, "expected a flat dict of tensor name -> tensor")
    return data

