"""README.md's examples run as written, in order, on a fresh copy of the repository.

Every ```bash and ```python block of README.md is run top to bottom in one temporary copy
of the repository (the files git tracks), so a multi-step example runs verbatim in
sequence and a section that silently relied on a previous section's output folder
fails. Hub ids are replaced by the local pair in the one way README.md states: a Base
model becomes ./pair/base, every other model ./pair/instruct (in the blocks and in the
config files they name). The blocks or lines that do not run here are listed in SKIPPED
and SKIPPED_SECTIONS with the reason; any other block runs, so a new example is never
silently left out. About ten CLI runs on a tiny pair: the slowest test of its file.
Everything an example writes must be covered by .gitignore.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# README Hub id -> local pair (longest ids are replaced first).
HUB_IDS = {
    "Qwen/Qwen3-0.6B-Base": "./pair/base",
    "Qwen/Qwen3-0.6B": "./pair/instruct",
    "meta-llama/Llama-3.1-8B-Instruct": "./pair/instruct",
    "meta-llama/Llama-3.1-8B": "./pair/base",
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": "./pair/instruct",
}
HUB_ID = re.compile(r"(?<![\w./-])[A-Za-z][\w-]*/[A-Za-z][\w.-]*\d[\w.-]*")  # org/Name-8B-like
CONFIGS_NAMED = ("configs/chain-timber-then-ties.yml",)

# A line (of a bash block) or a whole block (python) containing this text is not run.
SKIPPED = {
    "bash scripts/setup.sh": "creates .venv: the test runs in this interpreter's environment (test_wheel.py installs the package)",
    "source .venv/bin/activate": "the test puts this interpreter's bin first on PATH, as an activated .venv does",
    "bash scripts/demo.sh": "sets up .venv and runs the demo: tests/test_e2e.py and test_synthetic.py cover its steps",
    "bash scripts/test.sh": "runs this test suite",
    "pip install .": "the test runs the installed package (tests/test_wheel.py builds and installs it)",
}

# Whole sections whose examples do not run here (none at present: the long studies and the
# benchmark live in docs/ pages).
SKIPPED_SECTIONS: dict = {}


def code_blocks(text, with_sections=False):
    """(language, body, line number[, section heading]) of each fenced block, in order."""
    found, lines, k, section = [], text.splitlines(), 0, ""
    while k < len(lines):
        if lines[k].startswith("#"):
            section = lines[k].lstrip("#").strip()
        if lines[k].startswith("```"):
            lang, start = lines[k][3:].strip(), k
            end = next(j for j in range(k + 1, len(lines)) if lines[j].startswith("```"))
            block = (lang, "\n".join(lines[k + 1 : end]) + "\n", start + 1)
            found.append(block + (section,) if with_sections else block)
            k = end
        k += 1
    return found


def localize(text):
    for hub_id in sorted(HUB_IDS, key=len, reverse=True):
        text = text.replace(hub_id, HUB_IDS[hub_id])
    return text


def skip_reason(text):
    return next((reason for key, reason in SKIPPED.items() if key in text), None)


def fresh_copy(dest: Path) -> Path:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout.decode()
    for name in filter(None, names.split("\0")):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    for name in CONFIGS_NAMED:
        (dest / name).write_text(localize((dest / name).read_text()))
    subprocess.run(["git", "init", "-q", str(dest)], check=True)  # for git check-ignore
    return dest


def test_readme_chain_recipe_is_the_config_file():
    blocks = [body for lang, body, _ in code_blocks(README.read_text()) if lang == "yaml" and "---" in body]
    assert len(blocks) == 1, "one multi-document YAML in README.md"
    readme_docs = list(yaml.safe_load_all(blocks[0]))
    file_docs = list(yaml.safe_load_all((ROOT / "configs/chain-timber-then-ties.yml").read_text()))
    assert readme_docs == file_docs


def test_readme_examples_run_in_order(tmp_path):
    repo = fresh_copy(tmp_path / "clone")
    before = set(os.listdir(repo))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # python = this venv's
    blocks = code_blocks(README.read_text(), with_sections=True)
    ran, skipped, shown = [], [], None
    for lang, body, line, section in blocks:
        if lang == "text" and shown is not None:  # the output printed by the block above
            assert shown.rstrip("\n") == body.rstrip("\n"), f"README line {line}: the block above prints\n{shown}"
        shown = None
        if lang not in ("bash", "python"):
            continue
        reason = SKIPPED_SECTIONS.get(section) or (skip_reason(body) if lang == "python" else None)
        if reason:
            skipped.append((line, reason))
            continue
        code = localize(body)
        if lang == "bash":
            kept = []
            for text in code.splitlines():
                reason = skip_reason(text)
                kept.append(f"# skipped: {reason}" if reason else text)
                if reason:
                    skipped.append((line, reason))
            code = "\n".join(kept) + "\n"
            if all(not t.strip() or t.lstrip().startswith("#") for t in kept):
                continue
            command = ["bash", "-euo", "pipefail", "-c", code]
        else:
            command = [sys.executable, "-c", code]
        leftover = HUB_ID.findall("\n".join(t for t in code.splitlines() if not t.lstrip().startswith("#")))
        assert not leftover, f"README line {line}: Hub ids not mapped to the local pair: {leftover}"
        proc = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"README line {line} failed:\n{code}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        ran.append(line)
        shown = proc.stdout if lang == "python" else None

    print("README blocks run (line):", ran, "\nskipped (line, why):", *skipped, sep="\n  ")  # pytest -rP shows it
    assert len(ran) >= 6, ran  # local pair, chat, real pair, API, chain, tools
    # The recipe README.md shows is the one `mergekit-timber recipe` wrote.
    (shown_recipe,) = [b for lang, b, _, _ in blocks if lang == "yaml" and "lambda: 0.8" in b and "---" not in b]
    assert localize(shown_recipe) == (repo / "timber.yml").read_text()
    # Each example wrote its own folder, and every one exists.
    for path in ("out-local/model.safetensors", "qwen3-0.6b-timber/model.safetensors",
                 "qwen3-0.6b-timber-api/model.safetensors", "chain-work/llama-3.1-8b-timber/model.safetensors",
                 "chain-out/model.safetensors", "analysis/erank.csv", "analysis-qwen3/erank.csv",
                 "sweep/lambda-0.8/model.safetensors", "timber-l.yml"):  # fmt: skip
        assert (repo / path).exists(), path
    # .gitignore covers every output the README creates.
    created = sorted(set(os.listdir(repo)) - before - {".git"})
    not_ignored = [
        name for name in created
        if subprocess.run(["git", "check-ignore", "-q", name], cwd=repo).returncode != 0
    ]  # fmt: skip
    assert not not_ignored, f"README outputs missing from .gitignore: {not_ignored}"


def test_passk_page_examples_run_after_the_local_pair(tmp_path):
    """docs/passk.md's commands, run in order after the README's local-pair commands (which
    write pair/ and out-local/), create every file they read."""
    repo = fresh_copy(tmp_path / "clone")
    before = set(os.listdir(repo))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    local_pair = [body for lang, body, _, section in code_blocks(README.read_text(), with_sections=True)
                  if lang == "bash" and section == "Build a local pair to try it"]  # fmt: skip
    page = [(line, body) for lang, body, line in code_blocks((ROOT / "docs" / "passk.md").read_text()) if lang == "bash"]
    assert len(local_pair) == 1 and len(page) == 2, (local_pair, page)
    for where, code in [("README local pair", local_pair[0])] + [(f"docs/passk.md line {n}", b) for n, b in page]:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=repo, env=env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, f"{where} failed:\n{code}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    for path in ("base.jsonl", "instruct.jsonl", "timber.jsonl", "passk/passk.csv", "passk-lm-eval/passk.csv"):
        assert (repo / path).is_file(), path
    assert "timber" in (repo / "passk" / "passk.csv").read_text()
    created = sorted(set(os.listdir(repo)) - before - {".git"})
    not_ignored = [n for n in created if subprocess.run(["git", "check-ignore", "-q", n], cwd=repo).returncode != 0]
    assert not not_ignored, f"docs/passk.md outputs missing from .gitignore: {not_ignored}"
