"""The `corral` command (python -m corral) on a tiny random model with the tiny Llama 4 tokenizer:
its output against the Python API's, help, the bench table, and one-line errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import corral
import tiny_tokenizer as tt
from tiny_models import build

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = build("scout", "causal", torch.float32, tmp_path_factory.mktemp("scout_cli"))
    return tt.save(path)


@pytest.fixture(scope="module")
def llm(model_dir):
    return corral.LLM(model_dir)


def corral_cli(*args, stdin=""):
    package_root = str(Path(corral.__file__).parents[1])  # the corral under test, installed or not
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "corral", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=120,
    )


def test_generate_streams_the_completion(model_dir, llm):
    r = corral_cli("generate", model_dir, "The quick brown", "--max-tokens", 5, "--seed", 0, "--temperature", 0.8)
    assert r.returncode == 0, r.stderr
    params = corral.SamplingParams(max_tokens=5, seed=0, temperature=0.8)
    expected = llm.generate("The quick brown", params)[0].outputs[0].text
    assert r.stdout == expected + "\n" and expected
    assert r.stderr == ""  # no progress bar when stderr is not a terminal


def test_generate_chat_and_sampling_flags(model_dir, llm):
    r = corral_cli(
        "generate", model_dir, "Hi", "--chat", "--system", "Be brief.", "--max-tokens", 6, "--top-k", 1,
        "--temperature", 1.0, "--seed", 3, "--ignore-eos", "--quiet",
    )
    assert r.returncode == 0, r.stderr
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = llm.chat(messages, corral.SamplingParams(max_tokens=6, ignore_eos=True))[0].outputs[0].text
    assert r.stdout == expected + "\n"


def test_chat_answers_and_keeps_history(model_dir, llm):
    params = corral.SamplingParams(max_tokens=10)
    r = corral_cli("chat", model_dir, "--max-tokens", 10, stdin="hello\n")
    assert r.returncode == 0, r.stderr
    history = [{"role": "user", "content": "hello"}]
    first = llm.chat(history, params)[0].outputs[0].text
    assert r.stdout == first + "\n"
    r = corral_cli("chat", model_dir, "--max-tokens", 10, stdin="hello\nwhat is your name\n/exit\nnot read\n")
    assert r.returncode == 0, r.stderr
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "what is your name"}]
    second = llm.chat(history, params)[0].outputs[0].text
    assert second != llm.chat(history[2:], params)[0].outputs[0].text  # the history makes a difference
    assert r.stdout == first + "\n" + second + "\n"


def test_chat_exit_right_away(model_dir):
    r = corral_cli("chat", model_dir, stdin="/exit\nhello\n")
    assert (r.returncode, r.stdout) == (0, "")


def test_bench_prints_a_table(model_dir):
    r = corral_cli("bench", model_dir, "--input-len", 8, "--output-len", 4, "--batch-sizes", 1, 2)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if "prefill tok/s" in line and "decode tok/s" in line)
    rows = [line.split() for line in lines[header + 1 :]]
    assert [int(row[0]) for row in rows] == [1, 2]
    assert all(float(x) > 0 for row in rows for x in row[1:])


@pytest.mark.parametrize("command", [[], ["generate"], ["chat"], ["bench"]])
def test_help(command):
    r = corral_cli(*command, "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: corral")
    if command and command[0] != "bench":
        for flag in ("--temperature", "--top-p", "--top-k", "--min-p", "--max-tokens", "--seed", "--kv-cache-dtype"):
            assert flag in r.stdout
    if command == ["bench"]:
        assert "--batch-sizes" in r.stdout and "--input-len" in r.stdout


def one_line_error(r):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("corral: error: ")
    return lines[0]


def test_errors_are_one_line(model_dir, tmp_path):
    missing = tmp_path / "no_such_model"
    assert str(missing) in one_line_error(corral_cli("generate", missing, "hi"))
    assert str(missing) in one_line_error(corral_cli("bench", missing))
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).symlink_to(model_dir / name)
    assert str(no_tokenizer / "tokenizer.json") in one_line_error(corral_cli("chat", no_tokenizer, stdin="hi\n"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in one_line_error(corral_cli("bench", empty))
    assert "min_p" in one_line_error(corral_cli("generate", model_dir, "hi", "--min-p", 2))


def test_console_script_is_declared():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["corral"].partition(":")
    assert (module, function) == ("corral.cli", "main")
    from corral import cli

    assert callable(cli.main)


def test_cli_main_in_process(model_dir, llm, capsys):
    from corral import cli

    assert cli.main(["generate", str(model_dir), "Hello", "--max-tokens", "4", "-q"]) == 0
    expected = llm.generate("Hello", corral.SamplingParams(max_tokens=4))[0].outputs[0].text
    assert capsys.readouterr().out == expected + "\n"


def test_quantization_flag(model_dir, capsys):
    from corral import cli

    assert cli.main(["generate", str(model_dir), "Hello", "--max-tokens", "4", "-q", "--quantization", "int4"]) == 0
    llm = corral.LLM(model_dir, quantization="int4")
    assert capsys.readouterr().out == llm.generate("Hello", corral.SamplingParams(max_tokens=4))[0].outputs[0].text + "\n"
    dtype = corral.LLM(model_dir).stats()["weight_format"]
    assert cli.weights_format(model_dir, "int4") == f"{dtype} -> int4 at load"


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_bar_on_a_terminal(model_dir, quiet):
    """Loading shows a progress bar on stderr when it is a terminal, unless --quiet."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 columns wide
    try:
        env = dict(os.environ, PYTHONPATH=str(Path(corral.__file__).parents[1]))
        args = [sys.executable, "-m", "corral", "generate", str(model_dir), "Hi", "--max-tokens", "2"]
        r = subprocess.run(
            args + ["--quiet"] * quiet,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
            env=env,
            timeout=120,
        )
        os.close(slave)
        slave = None
        err = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            err += chunk
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)
    assert r.returncode == 0
    size = (model_dir / "model.safetensors").stat().st_size
    if quiet:
        assert err == b""
    else:
        dtype = corral.LLM(model_dir).stats()["weight_format"]  # the checkpoint's dtype, as the engine saw it
        assert f"loading {model_dir.name} ({dtype})".encode() in err and b"100%" in err
        assert f"{size / 2**20:.2f}M".encode() in err  # the bar counts the weights' bytes
