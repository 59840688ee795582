"""Every subcommand on the embedded SmolLM2 model: through main() in this process (tests/console.py), and
the chat through the real console script in a terminal."""

from __future__ import annotations

import json
import os
import re
import sys

import pexpect
import pytest

from console import tramontane

EXE = [sys.executable, "-m", "tramontane.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize("command", ["demo", "chat", "complete", "convert", "merge", "info", "classify", "answer", "mask",
                                     "download", "models", "serve", "quantize", "finetune", "embed"])
def test_every_subcommand_has_help(command):
    r = tramontane(command, "--help")
    assert r.returncode == 0 and "usage: tramontane " + command in r.stdout


def test_demo_prints_completions_and_speed():
    r = tramontane("demo", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert "The tramontane is a cold wind that" in r.stdout
    assert re.search(r"\d+ tokens for 3 prompts in [\d.]+s: [\d.]+ tokens/s", r.stdout)


def test_complete_json_and_plain_agree():
    r = tramontane("complete", "The capital of France is", "--max-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["completion_tokens"] == len(out["tokens"]) == 6 and out["finish_reason"] == "length"
    assert out["text"].startswith(" Paris")
    plain = tramontane("complete", "--max-tokens", "6", stdin="The capital of France is\n")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == out["text"] + "\n"


def test_quantized_completions_match_plain_ones():
    # (--compile's tokens are test_compile.py's; --compile reaching compile_decode is test_options.py's)
    # the demo file is Q4_1: int4_asym keeps its blocks and decodes " Paris" like the fp32 load
    asym = tramontane("complete", "The capital of France is", "--max-tokens", "2", "--json", "--quantize", "int4_asym")
    assert asym.returncode == 0, asym.stderr
    assert json.loads(asym.stdout)["text"].startswith(" Paris")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["complete", "x", "--model", "/no/such/model"], 1, "/no/such/model: no such file or folder"),
        (["complete", "x", "--max-tokens", "many"], 2, "--max-tokens: expected an integer, got 'many'"),
        (["complete", "x", "--max-tokens", "0"], 2, "--max-tokens: must be >= 1, got 0"),
        (["complete", "x", "--temperature", "-1"], 2, "--temperature: must be >= 0, got -1"),
        (["chat", "--top-p", "2"], 2, "--top-p: must be in (0, 1], got 2"),
        (["complete", "x", "--dtype", "float8"], 2, "--dtype: invalid choice: 'float8'"),
        (["serve", "--threads", "-1"], 2, "--threads: must be >= 0, got -1"),
        (["info", "/no/such/model"], 1, "no such file or folder"),
        (["frobnicate"], 2, "invalid choice"),
    ],
)
def test_bad_arguments(args, code, message):
    r = tramontane(*args)
    assert r.returncode == code, (r.stdout, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr


def test_info_on_demo_model():
    r = tramontane("info")
    assert r.returncode == 0, r.stderr
    assert "gguf" in r.stdout and "576" in r.stdout and "chat_format" in r.stdout
    info = json.loads(tramontane("info", "--json").stdout)
    assert info["tensor_types"] == "Q4_1 210, F32 61, Q8_0 1"  # as the file stores them, and so loaded


def test_dequantize_gives_the_float_model():
    plain = json.loads(tramontane("complete", "The capital of France is", "--max-tokens", "4", "--json").stdout)
    floats = json.loads(tramontane("complete", "The capital of France is", "--max-tokens", "4", "--json", "--dequantize").stdout)
    assert plain["tokens"][:2] == floats["tokens"][:2]
    r = tramontane("complete", "x", "--dequantize", "--quantize", "int8")
    assert r.returncode == 1 and "exclude" in r.stderr


def test_scripted_chat_from_stdin():
    r = tramontane("chat", "--max-tokens", "12", "--temperature", "0", stdin="Hello!\n/help\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "> Hello!" in r.stdout and "/reset" in r.stdout and re.search(r"\[\d+ tokens, [\d.]+ tokens/s\]", r.stdout)


def test_chat_in_a_terminal():
    child = pexpect.spawn(EXE[0], [*EXE[1:], "chat", "--max-tokens", "24", "--temperature", "0"],
                          env=ENV, encoding="utf-8", timeout=120)
    try:
        child.expect("/help for commands")
        child.expect("> ")

        def ask(text: str) -> str:
            child.sendline(text)
            child.expect(r"\[(\d+) tokens, [\d.]+ tokens/s\]")
            answer = child.before.split(text, 1)[-1].strip()
            child.expect("> ")
            return answer

        first = ask("My name is Ada and I live in Lyon.")
        with_history = ask("What is my name?")
        child.sendline("/reset")
        child.expect(r"\[conversation cleared\]")
        child.expect("> ")
        without_history = ask("What is my name?")
        assert first and with_history and without_history
        # greedy decoding: the same question gives another answer once the first turn is forgotten
        assert with_history != without_history

        # Ctrl-D leaves cleanly
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on():
    child = pexpect.spawn(EXE[0], [*EXE[1:], "chat", "--max-tokens", "1000", "--system", "Answer at great length."],
                          env=ENV, encoding="utf-8", timeout=120)
    try:
        child.expect("> ")
        child.sendline("Write a long story about the wind.")
        child.expect("the wind.\r\n")  # the echo of what we typed
        child.expect(r"\w+ \w+ \w+")  # the answer has started; 1000 tokens take far longer than this
        child.sendintr()
        child.expect(r"\[interrupted, (\d+) tokens")
        assert int(child.match.group(1)) < 1000
        child.expect("> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_ctrl_c_twice_at_the_prompt_leaves():
    child = pexpect.spawn(EXE[0], [*EXE[1:], "chat"], env=ENV, encoding="utf-8", timeout=120)
    try:
        child.expect("> ")
        child.sendintr()
        child.expect(r"Ctrl-C again or Ctrl-D")
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
