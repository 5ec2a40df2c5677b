"""The output directory of a Timber merge: never mixed with an earlier model, never half-written.

A merge is written into a staging directory beside the output (``.NAME.timber-partial-XXXX``,
same filesystem) and published at the end: renamed into place when the output does not
exist yet, else moved in file by file with ``config.json`` last. While staged, the merge's
``config.json`` is held under another name, so no directory ever pairs a ``config.json``
with weights that are not finished: transformers never loads a half-written merge.

An output directory that already holds model weights is refused unless the user opts in
(``MERGEKIT_TIMBER_REPLACE=1``; ``mergekit-timber sweep --replace``). Then the earlier
model's files are removed at publishing, ``config.json`` first, before the new files move
in; a merge that fails leaves the earlier model as it was.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Iterable, List, Optional

from mergekit_timber.errors import TimberOutputError
from mergekit_timber.flags import flag

REPLACE_ENV = "MERGEKIT_TIMBER_REPLACE"
PENDING_CONFIG = "config.json.timber-pending"
STAGING_MARK = ".timber-partial-"

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
INDEX_SUFFIX = ".index.json"
# The other files of a model directory (mergekit's tokenizer and tagalong copies, the card).
MODEL_FILES = (
    "config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.json", "tokenizer.model", "added_tokens.json", "merges.txt", "vocab.json",
    "vocab.txt", "chat_template.jinja", "chat_template.json", "additional_chat_templates",
    "preprocessor_config.json", "video_preprocessor_config.json", "README.md",
    "mergekit_config.yml",
)  # fmt: skip


def is_weight_file(name: str) -> bool:
    """A weight shard or a shard index, by file name."""
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(INDEX_SUFFIX)


def weight_files(directory: Path) -> List[Path]:
    """Weight files and their indexes directly in `directory`, sorted."""
    if not directory.is_dir():
        return []
    return sorted(item for item in directory.iterdir() if item.is_file() and is_weight_file(item.name))


def hold_config(stage: Path) -> None:
    """Keep the staged config.json under another name until publishing."""
    config = stage / "config.json"
    if config.exists():
        os.replace(config, stage / PENDING_CONFIG)


class OutputDir:
    """One output directory: checked before the merge, staged, published at the end."""

    def __init__(self, path, *, replace: Optional[bool] = None, inputs: Iterable = ()):
        self.path = Path(os.path.abspath(os.fspath(path)))
        self.replace = flag(REPLACE_ENV) if replace is None else bool(replace)
        self.inputs = [Path(p) for p in inputs]

    @property
    def name(self) -> str:
        return self.path.name

    def check(self) -> None:
        """Refuse what the merge must not write into (touches nothing)."""
        if self.path.exists() and not self.path.is_dir():
            raise TimberOutputError(f"output {self.path} exists and is not a directory")
        for model in self.inputs:
            if model.is_dir() and self.path.is_dir() and os.path.samefile(model, self.path):
                raise TimberOutputError(f"output {self.path} is an input model's directory; choose another")
        old = weight_files(self.path)
        if old and not self.replace:
            more = f" and {len(old) - 1} more" if len(old) > 1 else ""
            raise TimberOutputError(
                f"output {self.path} already holds model weights ({old[0].name}{more}); choose a "
                f"new directory, or set {REPLACE_ENV}=1 (sweep: --replace) to replace that model"
            )

    def stage(self) -> Path:
        """A fresh, empty staging directory beside the output (same filesystem: renames are atomic)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            stage = self.path.parent / f".{self.name}{STAGING_MARK}{secrets.token_hex(4)}"
            try:
                os.mkdir(stage)
                return stage
            except FileExistsError:
                continue

    def publish(self, stage: Path) -> None:
        """Move the finished merge from `stage` into the output, config.json last."""
        self.check()  # the directory may have changed while the merge ran
        if self.path.exists():
            self._remove(self.path / "config.json")  # first: the directory no longer loads
            if self.replace:
                for item in weight_files(self.path) + [self.path / n for n in MODEL_FILES]:
                    self._remove(item)
            if not any(self.path.iterdir()):
                self.path.rmdir()
        pending = stage / PENDING_CONFIG
        if not self.path.exists():
            if pending.exists():
                os.replace(pending, stage / "config.json")
            os.rename(stage, self.path)
            return
        for item in sorted(stage.iterdir()):
            if item.name != PENDING_CONFIG:
                self._remove(self.path / item.name)
                os.replace(item, self.path / item.name)
        if pending.exists():
            os.replace(pending, self.path / "config.json")
        stage.rmdir()

    @staticmethod
    def discard(stage: Path) -> None:
        shutil.rmtree(stage, ignore_errors=True)

    @staticmethod
    def _remove(item: Path) -> None:
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        elif item.exists() or item.is_symlink():
            item.unlink()
